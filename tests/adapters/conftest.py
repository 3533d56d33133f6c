"""Adapter tests: helpers on the path; engine tests skip cleanly without the engine.

The engine tests (marked ``sglang`` / ``vllm``) need the engines' packages, which
``scripts/setup_adapters.sh`` installs into a venv of their own."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
# daemon_proc (a real `kvstore serve` subprocess) for the daemon-mode tests
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "daemon"))
