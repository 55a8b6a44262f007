"""The inference worker process: ``python -m workers.infer CONFIG --worker N``."""

import sys

from linewatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
