"""Spark entry point: one incremental run (scan -> extract -> ... -> load) over ROOT...

    ./spark-submit.sh run ROOT... [--home DIR] [--config FILE] [--retry-errors]
"""

import sys

from lookalike.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
