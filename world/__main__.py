"""Run as ``python -m world <command> ...``; lists the commands with --help."""

import sys

from world.cli import main

sys.exit(main())
