import sys

from parts.cli import main

sys.exit(main())
