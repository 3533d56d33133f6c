"""The bundled reference decoder: a small Llama-style model over a paged KV pool, and an
engine that runs prefill and greedy decode against the cache's client API."""

from .config import PRESETS, DecoderConfig, DecoderConfigError
from .engine import EngineError, GenerationResult, PageAllocator, ReferenceEngine, RunningRequest
from .model import DecoderShapeError, ReferenceDecoder

__all__ = [
    "PRESETS",
    "DecoderConfig",
    "DecoderConfigError",
    "DecoderShapeError",
    "EngineError",
    "GenerationResult",
    "PageAllocator",
    "ReferenceDecoder",
    "ReferenceEngine",
    "RunningRequest",
]
