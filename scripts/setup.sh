#!/usr/bin/env bash
# Prepare this checkout: a virtual environment in .venv with kvstore installed (editable).
#
#   bash scripts/setup.sh          # what the demo needs
#   bash scripts/setup.sh test     # plus test tools, redis-server and the Mooncake store
#
# torch: the venv sees the interpreter's own packages, so a torch that is already
# installed (a CUDA or NPU build, say) is kept; only when none is found does this
# install torch 2.13.0 (pip's default build for the platform; install the build
# you want first to choose another).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
python=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($python --version)"
    if ! "$python" -m venv --system-site-packages .venv 2>/dev/null; then
        rm -rf .venv
        # Debian ships venv apart from python3 (package python3-venv).
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "setup: installing python3-venv with apt-get"
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
            "$python" -m venv --system-site-packages .venv
        else
            echo "setup: '$python -m venv' failed; install python3-venv (apt-get install python3-venv) and retry" >&2
            exit 1
        fi
    fi
fi
venv_python=.venv/bin/python

if ! "$venv_python" -c "import torch" 2>/dev/null; then
    echo "setup: no torch found, installing torch==2.13.0"
    "$venv_python" -m pip install -q torch==2.13.0
fi

extras=""
if [ "$mode" = test ]; then
    extras="[test,mooncake]"
    # Test servers come from Debian's packages: redis-server (and redis-cli for the
    # cluster tests) and libibverbs1, which the Mooncake store loads even over TCP.
    if ! command -v redis-server >/dev/null || ! /sbin/ldconfig -p 2>/dev/null | grep -q libibverbs.so.1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "setup: installing redis-server and libibverbs1 with apt-get"
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server libibverbs1 >/dev/null
        else
            echo "setup: install redis-server and libibverbs1 (as root: apt-get install redis-server libibverbs1);" \
                 "tests that need them are skipped until then" >&2
        fi
    fi
fi
echo "setup: installing kvstore${extras} into .venv"
"$venv_python" -m pip install -q -e ".${extras}"
echo "setup: done"
