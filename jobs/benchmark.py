"""Benchmark every method x attack (see pipeline/bench.py); same as `python -m pipeline bench`."""

import sys

from pipeline.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
