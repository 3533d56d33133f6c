"""The contract suite runs every CacheClient test over both modes: the embedded
controller and a client of a live daemon. The daemon helpers live in tests/daemon."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "daemon"))
