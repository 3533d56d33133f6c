"""DecoderConfig: the shape and seed of the reference decoder, and the KV layout it implies."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields

from kvstore.layout import ARRANGEMENTS, KVLayout


class DecoderConfigError(ValueError):
    """A DecoderConfig field is invalid; the message names the field and the fix."""


_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "intermediate_size",
    "max_positions",
)


@dataclass(frozen=True)
class DecoderConfig:
    """A small Llama-style decoder: sizes, RoPE and norm constants, and the weight seed.

    Equal configs give bit-identical weights in every process and on every
    device (weights are drawn on CPU from ``seed``, then moved).
    """

    vocab_size: int
    """Token ids are in [0, vocab_size)."""
    hidden_size: int
    """Width of the residual stream."""
    num_layers: int
    """Transformer blocks; each holds one layer of the KV pool."""
    num_heads: int
    """Query heads per layer."""
    num_kv_heads: int
    """K/V heads per layer (GQA); must divide num_heads."""
    head_dim: int
    """Elements per head; even (RoPE rotates pairs)."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rms_eps: float = 1e-5
    """Epsilon inside RMSNorm's square root."""
    seed: int = 0
    """Seed of the CPU generator that draws every weight."""
    max_positions: int = 4096
    """Longest sequence (prompt + output) the model accepts; sizes the RoPE table."""
    tie_embeddings: bool = False
    """Use the token embedding as the output projection (no separate lm_head)."""

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise DecoderConfigError(
                    f"DecoderConfig.{name} must be a positive int, got {value!r}"
                )
        if self.num_heads % self.num_kv_heads:
            raise DecoderConfigError(
                f"DecoderConfig.num_kv_heads ({self.num_kv_heads}) must divide num_heads "
                f"({self.num_heads}); each KV head serves a whole group of query heads"
            )
        if self.head_dim % 2:
            raise DecoderConfigError(
                f"DecoderConfig.head_dim must be even for RoPE, got {self.head_dim}"
            )
        for name in ("rope_theta", "rms_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise DecoderConfigError(
                    f"DecoderConfig.{name} must be a positive number, got {value!r}"
                )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not (
            0 <= self.seed < 2**63
        ):
            raise DecoderConfigError(
                f"DecoderConfig.seed must be an int in [0, 2**63), got {self.seed!r}"
            )
        if not isinstance(self.tie_embeddings, bool):
            raise DecoderConfigError(
                f"DecoderConfig.tie_embeddings must be a bool, got {self.tie_embeddings!r}"
            )

    @classmethod
    def preset(cls, name: str, **overrides: object) -> "DecoderConfig":
        """A named size: "tiny" (unit tests), "small" (the demo), "llama3-8b" (the GPU bench:
        Llama-3-8B's shapes, random weights). ``overrides`` replace fields."""
        if name not in PRESETS:
            raise DecoderConfigError(
                f"unknown DecoderConfig preset {name!r}; use one of {sorted(PRESETS)}"
            )
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise DecoderConfigError(f"unknown DecoderConfig fields in overrides: {sorted(unknown)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def model_id(self) -> str:
        """Stable name of these weights, for a page-key namespace: equal iff configs are equal."""
        text = ",".join(f"{k}={v!r}" for k, v in sorted(asdict(self).items()))
        digest = hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
        return f"kvstore-reference-decoder/{digest}"

    def kv_layout(
        self, page_size: int, dtype: str = "float32", arrangement: str = "layer_first"
    ) -> KVLayout:
        """The KV pool layout of this model with ``page_size`` tokens per page."""
        if arrangement not in ARRANGEMENTS:
            raise DecoderConfigError(
                f"arrangement {arrangement!r} is unknown; use one of {ARRANGEMENTS}"
            )
        return KVLayout(
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            page_size=page_size,
            dtype=dtype,
            arrangement=arrangement,  # type: ignore[arg-type]
        )


PRESETS: dict[str, dict[str, object]] = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_positions=1024,
    ),
    "small": dict(
        vocab_size=8192,
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        intermediate_size=1408,
        max_positions=8192,
    ),
    # Llama-3-8B's shapes (8.03e9 parameters, 16 GB in bf16): only for a GPU, with
    # weights drawn there (ReferenceDecoder(..., draw_on="device")).
    "llama3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=14336,
        rope_theta=500000.0,
        max_positions=131072,
    ),
}
