#!/usr/bin/env bash
# Opt-in: a venv with the engines the adapters are tested against (SGLang 0.5.23,
# vLLM 0.33.0, CPU torch 2.13), kept apart from the project's own venv. ~2 GB.
#   bash scripts/setup_adapters.sh [VENV]        (default .venv-adapters)
#   KVSTORE_REQUIRE_ENGINES=1 VENV/bin/python -m pytest tests/adapters -q
# What the engines import on CPU is listed in scripts/adapters-requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-adapters}
python3 -m venv "$VENV"
# --no-compile: no .pyc for the engines' thousands of modules at install (Python
# compiles the few the tests import when they are first imported).
PIP="$VENV/bin/python -m pip"
# One resolve for torch, kvstore and the engines' CPU imports, torch pinned in it so
# that nothing pulls another build (a CPU wheel where one is provided locally).
$PIP install -q --no-compile "torch==2.13.0" -e ".[test]" -r scripts/adapters-requirements.txt
# The engines themselves without their GPU dependency trees (their metadata asks for
# newer torch and CUDA packages; what the tests drive runs on this torch).
$PIP install -q --no-compile --no-deps "sglang==0.5.23" "vllm==0.33.0"
echo "adapters venv ready: KVSTORE_REQUIRE_ENGINES=1 $VENV/bin/python -m pytest tests/adapters -q"
