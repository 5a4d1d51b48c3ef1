import sys

from rexft.cli import main

sys.exit(main())
