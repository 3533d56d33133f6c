"""The daemon tests' helpers live next to this file under unique names (daemon_proc,
daemon_worker); put this directory on sys.path so the test modules import them in any
import mode. (No __init__.py here: a package tests/daemon could shadow the real one.)"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
