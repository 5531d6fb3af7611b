"""The installed qcap's version, for provenance records (cards, caption and DR configs).

Read from the package's metadata (``importlib.metadata``), not from ``qcap.__version__``: the
stages (curate, captioning, train, finetune) are lower floors than the ``qcap`` package that
dispatches to them, and never import it (``tests/test_cli.py`` checks the direction).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import metadata

UNKNOWN = "0+unknown"  # run from a source tree that was never installed


@lru_cache(maxsize=1)
def qcap_version() -> str:
    """``pyproject.toml``'s version of the installed qcap, or ``0+unknown`` when it is not installed."""
    try:
        return metadata.version("qcap")
    except metadata.PackageNotFoundError:
        return UNKNOWN
