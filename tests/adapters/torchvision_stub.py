"""An import stub for torchvision, for SGLang's module imports only.

SGLang 0.5.23's ``sglang.srt.configs`` (imported by its KV pools and cache controller)
imports image-model configs that import ``torchvision.transforms`` at module level.
No torchvision build matches the CPU torch 2.13 of the adapters' venv (the PyPI wheels
are CUDA builds whose ops fail to register), and nothing on the KV-cache path uses
torchvision. ``install()`` puts placeholder modules in ``sys.modules`` only when the
real package does not import; any use of a placeholder raises, so a test that
reached torchvision for real would fail, not pass on a stand-in."""

from __future__ import annotations

import importlib.machinery
import sys
import types

_MODULES = ("torchvision", "torchvision.io", "torchvision.transforms",
            "torchvision.transforms.functional", "torchvision.transforms.v2",
            "torchvision.transforms.v2.functional")


class _Unavailable:
    """Any attribute of a stubbed module: usable as a name, raises when called."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> "_Unavailable":
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} was called, but torchvision is only an import stub "
                           "in the adapters' test venv (tests/adapters/torchvision_stub.py)")


class _StubModule(types.ModuleType):
    def __getattr__(self, attr: str) -> _Unavailable:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{self.__name__}.{attr}")


def install() -> bool:
    """Stub torchvision if it does not import; True when the stub was installed."""
    try:
        import torchvision  # noqa: F401
        return False
    except Exception:  # noqa: BLE001 - ImportError, or a CUDA build failing to register ops
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    for name in _MODULES:
        module = _StubModule(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        module.__path__ = []
        # transformers parses the version of any torchvision it finds; 0.0.0 is below
        # every feature gate, so it takes its torchvision-free code paths.
        module.__version__ = "0.0.0"
        sys.modules[name] = module
    return True
