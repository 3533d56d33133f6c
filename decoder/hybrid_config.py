"""HybridConfig: a hybrid decoder's shape: which layers are Mamba-2-style SSD layers, which
full attention (GQA), which sliding-window attention, and the sizes of the SSD state.

Layer ``i`` has kind ``pattern[i % len(pattern)]``::

    "S"  SSD (Mamba-2 style, scalar decay per head): causal depthwise conv1d + SSM state
    "A"  full attention over the paged KV pool (the only layers whose pages are cached)
    "W"  sliding-window attention: a query at position p sees keys (p - window, p]

Per sequence, an SSD layer carries a fixed-size state (conv: the last ``conv_kernel - 1``
inputs; SSM: [ssm_heads, ssm_head_dim, ssm_state] float32) and a window layer needs only
its last ``window`` positions of K/V. Those are what a state snapshot holds
(decoder/hybrid_state.py); the full-attention layers' K/V is paged as in the dense model.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields

from kvstore.layout import KVLayout

from .config import DecoderConfig, DecoderConfigError

LAYER_KINDS = ("S", "A", "W")


@dataclass(frozen=True)
class HybridConfig:
    """A DecoderConfig (embeddings, attention and MLP sizes, seed) plus the hybrid fields."""

    base: DecoderConfig
    pattern: str = "SSSA"
    """Layer kinds, repeated over ``base.num_layers`` (module doc); at least one "A"."""
    ssm_state: int = 16
    """N: state width per SSD head (the B and C projections' width)."""
    ssm_head_dim: int = 16
    """P: channels per SSD head."""
    ssm_expand: int = 2
    """Inner width of an SSD layer = ssm_expand * hidden_size = ssm_heads * ssm_head_dim."""
    conv_kernel: int = 4
    """Taps of the causal depthwise conv1d before the scan."""
    ssd_chunk: int = 16
    """Tokens per block of the chunked (matmul) scan; blocks sit on the absolute grid of
    multiples of ssd_chunk (and also end where a prefill chunk ends)."""
    window: int = 32
    """Keys a sliding-window layer sees (a multiple of the page size the engine uses)."""

    def __post_init__(self) -> None:
        if not self.pattern or set(self.pattern) - set(LAYER_KINDS) or "A" not in self.pattern:
            raise DecoderConfigError(
                f"HybridConfig.pattern must be a string of {LAYER_KINDS} holding at least one "
                f"'A' (full attention), got {self.pattern!r}")
        for name in ("ssm_state", "ssm_head_dim", "ssm_expand", "conv_kernel", "ssd_chunk", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise DecoderConfigError(f"HybridConfig.{name} must be a positive int, got {value!r}")
        if self.inner_size % self.ssm_head_dim:
            raise DecoderConfigError(
                f"HybridConfig.ssm_head_dim ({self.ssm_head_dim}) must divide the inner width "
                f"ssm_expand * hidden_size ({self.inner_size})")
        if self.conv_kernel < 2:
            raise DecoderConfigError("HybridConfig.conv_kernel must be >= 2 (a 1-tap conv has no state)")

    @classmethod
    def preset(cls, name: str, **overrides: object) -> "HybridConfig":
        """``tiny-hybrid`` / ``tiny-hybrid-swa`` (CPU tests), ``small-hybrid`` (the demo),
        ``hybrid-8b`` / ``hybrid-8b-swa`` (the H200 bench). ``overrides`` replace hybrid fields."""
        if name not in HYBRID_PRESETS:
            raise DecoderConfigError(f"unknown HybridConfig preset {name!r}; use one of {sorted(HYBRID_PRESETS)}")
        base_name, base_overrides, hybrid = HYBRID_PRESETS[name]
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise DecoderConfigError(f"unknown HybridConfig fields in overrides: {sorted(unknown)}")
        return cls(base=DecoderConfig.preset(base_name, **base_overrides), **{**hybrid, **overrides})

    # ---- derived ------------------------------------------------------------------
    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.pattern[i % len(self.pattern)] for i in range(self.base.num_layers))

    def layers_of(self, kind: str) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == kind]

    @property
    def inner_size(self) -> int:
        return self.ssm_expand * self.base.hidden_size

    @property
    def ssm_heads(self) -> int:
        return self.inner_size // self.ssm_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels through the conv: x (inner) then B and C (ssm_state each)."""
        return self.inner_size + 2 * self.ssm_state

    @property
    def model_id(self) -> str:
        text = ",".join(f"{k}={v!r}" for k, v in sorted(asdict(self).items()) if k != "base")
        digest = hashlib.blake2b(f"{self.base.model_id};{text}".encode(), digest_size=8).hexdigest()
        return f"kvstore-reference-hybrid/{digest}"

    def kv_layout(self, page_size: int, dtype: str = "float32",
                  arrangement: str = "layer_first") -> KVLayout:
        """The paged pool of the full-attention layers: the only per-token KV that is cached."""
        return self._layout("A", page_size, dtype, arrangement)

    def window_layout(self, page_size: int, dtype: str = "float32") -> KVLayout | None:
        """The engine's paged pool of the sliding-window layers (None without "W" layers);
        never cached page by page: a snapshot carries the last window (hybrid_state.py)."""
        if "W" not in self.pattern:
            return None
        if self.window % page_size:
            raise DecoderConfigError(
                f"HybridConfig.window ({self.window}) must be a multiple of the page size ({page_size})")
        return self._layout("W", page_size, dtype, "layer_first")

    def _layout(self, kind: str, page_size: int, dtype: str, arrangement: str) -> KVLayout:
        return KVLayout(num_layers=len(self.layers_of(kind)), num_kv_heads=self.base.num_kv_heads,
                        head_dim=self.base.head_dim, page_size=page_size, dtype=dtype,
                        arrangement=arrangement)  # type: ignore[arg-type]


# name -> (DecoderConfig preset, its overrides, hybrid fields)
HYBRID_PRESETS: dict[str, tuple[str, dict, dict]] = {
    "tiny-hybrid": ("tiny", dict(num_layers=4), dict(pattern="SSSA")),
    "tiny-hybrid-swa": ("tiny", dict(num_layers=6), dict(pattern="SWSA", window=32)),
    "small-hybrid": ("small", {}, dict(pattern="SSSA", ssm_state=32, ssm_head_dim=64, ssd_chunk=64)),
    # 8B class: Llama-3-8B's attention/MLP shapes, 24 SSD layers (128 heads x 64 x 128 state)
    # and 8 full-attention layers. Its KV is a quarter of the dense model's per token.
    "hybrid-8b": ("llama3-8b", {}, dict(pattern="SSSA", ssm_state=128, ssm_head_dim=64,
                                        ssd_chunk=256)),
    # ... with half the SSD layers turned into 4K-window attention (gpt-oss / Jamba-like mix).
    "hybrid-8b-swa": ("llama3-8b", {}, dict(pattern="SWSA", ssm_state=128, ssm_head_dim=64,
                                            ssd_chunk=256, window=4096)),
}
