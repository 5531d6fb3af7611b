"""qcap's ground floor, shared by every stage and importing none of them.

Shards and uid files (:mod:`base.shards`), configs and presets (:mod:`base.config`), the CLI
plumbing (:mod:`base.cli`), model loading and checkpoints (:mod:`base.models`, with qcap's tiny
open_clip configs in ``model_configs/``), dataset cards (:mod:`base.card`), the stage kit's pools
(:mod:`base.workers`, :mod:`base.raykit`), image augmentation (:mod:`base.augment`), caption
columns (:mod:`base.multicaption`) and package versions (:mod:`base.versions`).
"""
