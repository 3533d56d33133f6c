#!/usr/bin/env bash
# Opt-in: a venv with the engines the adapters are tested against (SGLang 0.5.23,
# vLLM 0.33.0, CPU torch 2.13), kept apart from the project's own venv. ~1.5 GB.
#   scripts/setup_adapters.sh [VENV]        (default .venv-adapters)
#   VENV/bin/python -m pytest tests/adapters -q
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-adapters}
python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[test]"
# The engines without their GPU dependency trees; then what importing their plug-in
# interfaces needs on CPU (measured).
$PIP install -q --no-deps "sglang==0.5.23" "vllm==0.33.0"
$PIP install -q orjson psutil pybase64 requests triton pillow starlette msgspec pydantic tqdm \
  ipython aiohttp urllib3 regex transformers cbor2 openai-harmony openai cachetools \
  cloudpickle uvloop py-cpuinfo prometheus-client xgrammar fastapi partial-json-parser llguidance
echo "adapters venv ready: $VENV/bin/python -m pytest tests/adapters -q"
