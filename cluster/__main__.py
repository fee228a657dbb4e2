"""``python -m cluster``: the command line (see cluster.cli.main)."""

import sys

from cluster.cli.main import main

sys.exit(main())
