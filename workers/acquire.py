"""The acquire process: ``python -m workers.acquire CONFIG --camera ID`` (``linewatch acquire``).

Process entry points for service managers; the command line lives in one place,
:mod:`linewatch.cli`.
"""

import sys
from collections.abc import Sequence

from linewatch.cli import main as cli_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``linewatch acquire`` with ``argv`` (default: this process's arguments)."""
    return cli_main(["acquire", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
