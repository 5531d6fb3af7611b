"""Run as ``python -m demo <command> ...``; lists the commands with --help."""

import sys

from demo.cli import main

sys.exit(main())
