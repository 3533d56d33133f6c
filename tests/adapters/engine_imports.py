"""Importing an engine for its adapter's tests: skip the tests without it, or fail.

A plain run skips an engine's tests when the engine does not import (the core venv has
no engines), naming the import error, so a missing dependency is not mistaken for a
missing engine. CI sets ``KVSTORE_REQUIRE_ENGINES=1`` with the adapters' venv: there a
failed import fails the run, so the adapters' tests cannot rot as silent skips."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

REQUIRE_ENV = "KVSTORE_REQUIRE_ENGINES"


def import_engine(module: str) -> ModuleType:
    """``module`` imported, or the calling test module skipped (or failed, under CI)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = "install the engines with: bash scripts/setup_adapters.sh [VENV]"
        if os.environ.get(REQUIRE_ENV) == "1":
            raise ImportError(f"{module} does not import ({exc}) and {REQUIRE_ENV}=1 requires "
                              f"it; {hint}") from exc
        pytest.skip(f"{module} does not import ({exc}); {hint}", allow_module_level=True)
