#!/usr/bin/env bash
# Opt-in: a venv with the engines the adapters are tested against (SGLang 0.5.23,
# vLLM 0.33.0, CPU torch 2.13), kept apart from the project's own venv. ~1.5 GB.
#   bash scripts/setup_adapters.sh [VENV]        (default .venv-adapters)
#   VENV/bin/python -m pytest tests/adapters -q
# The packages besides torch and the engines are listed in scripts/adapters-requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-adapters}
python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
# torch first, pinned, so that nothing below pulls another build (the engines' own
# metadata asks for newer torch versions; they run on 2.13 for what the tests drive).
$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[test]"
# The engines without their GPU dependency trees, then what they import on CPU.
$PIP install -q --no-deps "sglang==0.5.23" "vllm==0.33.0"
$PIP install -q -r scripts/adapters-requirements.txt
echo "adapters venv ready: $VENV/bin/python -m pytest tests/adapters -q"
