import sys

from hetrun.cli import main

sys.exit(main())
