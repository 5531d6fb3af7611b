"""``python -m curate.download --pool POOL --out RAW`` (same as ``qcap download``)."""

import sys

from base.cli import run_guarded
from curate.download.run import main

if __name__ == "__main__":
    sys.exit(run_guarded(main, sys.argv[1:], "python -m curate.download"))
