"""Run as ``python -m finetune <command> ...``; lists the commands with --help."""

import sys

from finetune.cli import main

sys.exit(main())
