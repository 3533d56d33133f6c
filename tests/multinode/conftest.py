"""The multi-node tests use the store servers of the connector tests (l3_servers) and the
daemon process helper of the daemon tests (daemon_proc); put those directories and this
one on sys.path so the modules import by their unique names in any import mode. (No
__init__.py here: a package tests/multinode would be no better, and the others have none.)"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
for _dir in (_HERE, os.path.join(_HERE, "..", "connectors"), os.path.join(_HERE, "..", "daemon")):
    sys.path.insert(0, os.path.normpath(_dir))
