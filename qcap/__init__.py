"""qcap: caption-quality ablation datasets for CLIP, end to end.

The ``qcap`` command dispatches to the stages (``curate``, ``captioning``, ``train``,
``finetune``); see :mod:`qcap.cli`.
"""

__version__ = "0.1.0"
