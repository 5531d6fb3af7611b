"""Run as ``python -m captioning <command> ...``; lists the commands with --help."""

import sys

from captioning.cli import main

sys.exit(main())
