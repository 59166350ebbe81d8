"""Spark entry point: re-embed every image from its thumbnail and cluster anew.

    ./spark-submit.sh recluster [--model M] [--home DIR] [--config FILE]
"""

import sys

from lookalike.cli import main

if __name__ == "__main__":
    sys.exit(main(["recluster", *sys.argv[1:]]))
