"""Run as ``python -m curate <command> ...``; lists the commands with --help."""

import sys

from curate.cli import main

sys.exit(main())
