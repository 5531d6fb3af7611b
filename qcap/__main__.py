"""Run as ``python -m qcap <command> ...``."""

import sys

from qcap.cli import main

sys.exit(main())
