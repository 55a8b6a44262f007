import sys

from linewatch.cli import main

sys.exit(main())
