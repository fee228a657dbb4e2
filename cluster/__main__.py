"""``python -m cluster``: the command line (see cluster.cli)."""

import sys

from cluster.cli import main

sys.exit(main())
