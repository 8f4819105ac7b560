import sys

from ssw.cli import main

sys.exit(main())
