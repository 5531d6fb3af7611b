"""Run as ``python -m train <command> ...``; lists the commands with --help."""

import sys

from train.cli import main

sys.exit(main())
