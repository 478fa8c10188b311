"""``python -m edgesplit.runtime.node``: the same as ``edge-node``."""

import sys

from .server import main

sys.exit(main())
