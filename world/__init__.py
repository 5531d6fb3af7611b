"""The embedded world: a procedurally generated DataComp-style pool with exact ground truth.

Modules: ``scenes`` (drawing, class and depth maps), ``describe`` (true descriptions, clean
captions, the lexicon), ``alttext`` (the web alt-text noise model and its sourced rates),
``generate`` (the world folder), ``server`` (loopback HTTP with planted faults), ``oracle``
(caption scoring), ``preview`` (a sample grid), ``cli`` (the commands). The folder layout is
described in ``generate`` and in ARCHITECTURE.md ("world").

The main entry points are importable from here without loading anything heavy::

    from world import WorldConfig, generate_world, WorldServer, score_caption
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "WorldConfig": "world.config",
    "generate_world": "world.generate",
    "WorldServer": "world.server",
    "score_caption": "world.oracle",
    "load_truth": "world.oracle",
    "write_preview": "world.preview",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'world' has no attribute {name!r}")
