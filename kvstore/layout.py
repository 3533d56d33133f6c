"""KVLayout: the shape of one engine's KV pool and the byte arithmetic that follows.

A pool holds ``num_pages`` pages of ``page_size`` tokens. Each page stores, per
layer, ``num_kv`` tensors (K and V; MLA pools keep one latent tensor, so
``num_kv == 1``) of shape ``[page_size, num_kv_heads, head_dim]``. That unit,
one page of one layer's K (or V, or latent), is a *chunk*: the smallest
contiguous piece a copy op moves.

Two arrangements of the same chunks in one tensor::

    layer_first: [layer][kv][page][token][head][dim]   (engine-friendly: one layer is contiguous)
    page_first:  [page][layer][kv][token][head][dim]   (store-friendly: one page is contiguous)

Chunk (layer l, kv k, page p) starts at element ``chunk_index * chunk_numel`` where

    layer_first: chunk_index = (l * num_kv + k) * num_pages + p
    page_first:  chunk_index = (p * num_layers + l) * num_kv + k
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

Arrangement = Literal["layer_first", "page_first"]
ARRANGEMENTS: tuple[str, ...] = ("layer_first", "page_first")

# dtype names accepted in config, mapped to torch dtypes. Names (not torch
# objects) are what travel in page-key namespaces and wire messages.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
    "uint8": torch.uint8,
}


class LayoutError(ValueError):
    """A KVLayout field (or a tensor checked against a layout) is invalid."""


@dataclass(frozen=True)
class KVLayout:
    """How one engine arranges its paged KV cache.

    Frozen and hashable: two engines share cached pages only when their layouts
    (and the rest of the page-key namespace) are equal.
    """

    num_layers: int
    """Transformer layers that hold KV."""
    num_kv_heads: int
    """KV heads per layer on this rank (after tensor parallel split); 1 for MLA."""
    head_dim: int
    """Elements per head per token (the latent width for MLA)."""
    page_size: int
    """Tokens per page; pages are the unit of caching and transfer."""
    dtype: str = "bfloat16"
    """Element type, one of DTYPES."""
    arrangement: Arrangement = "layer_first"
    """Order of the pool's dimensions, see the module docstring."""
    is_mla: bool = False
    """One latent tensor per layer (DeepSeek MLA style) instead of K and V."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "page_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise LayoutError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if self.dtype not in DTYPES:
            raise LayoutError(
                f"KVLayout.dtype {self.dtype!r} is not supported; use one of {sorted(DTYPES)}"
            )
        if self.arrangement not in ARRANGEMENTS:
            raise LayoutError(
                f"KVLayout.arrangement {self.arrangement!r} is unknown; use one of {ARRANGEMENTS}"
            )
        if self.is_mla and self.num_kv_heads != 1:
            raise LayoutError(
                f"KVLayout.num_kv_heads must be 1 for an MLA layout (one latent per token), "
                f"got {self.num_kv_heads}"
            )

    # ---- sizes -------------------------------------------------------------
    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def num_kv(self) -> int:
        """Tensors per layer: 2 (K, V), or 1 (MLA latent)."""
        return 1 if self.is_mla else 2

    @property
    def chunk_numel(self) -> int:
        """Elements in one page of one layer's K (or V, or latent)."""
        return self.page_size * self.num_kv_heads * self.head_dim

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_numel * self.itemsize

    @property
    def page_layer_bytes(self) -> int:
        """Bytes of one page in one layer (K and V together)."""
        return self.num_kv * self.chunk_bytes

    @property
    def page_bytes(self) -> int:
        """Bytes of one page across all layers: one host-pool slot."""
        return self.num_layers * self.page_layer_bytes

    # ---- shapes and index math ----------------------------------------------
    def pool_shape(self, num_pages: int) -> tuple[int, ...]:
        """Shape of a pool tensor of ``num_pages`` pages in this arrangement."""
        if num_pages < 0:
            raise LayoutError(f"num_pages must be >= 0, got {num_pages}")
        tail = (self.page_size, self.num_kv_heads, self.head_dim)
        if self.arrangement == "layer_first":
            return (self.num_layers, self.num_kv, num_pages, *tail)
        return (num_pages, self.num_layers, self.num_kv, *tail)

    def chunk_index(self, layer: int, kv: int, page: int, num_pages: int) -> int:
        """Index of chunk (layer, kv, page) counted in chunks from the pool's start."""
        if self.arrangement == "layer_first":
            return (layer * self.num_kv + kv) * num_pages + page
        return (page * self.num_layers + layer) * self.num_kv + kv

    def chunk_strides(self, num_pages: int) -> tuple[int, int, int]:
        """Strides, in chunks, of (layer, kv, page) in a pool of ``num_pages`` pages."""
        if self.arrangement == "layer_first":
            return (self.num_kv * num_pages, num_pages, 1)
        return (self.num_kv, 1, self.num_layers * self.num_kv)

    def with_arrangement(self, arrangement: Arrangement) -> "KVLayout":
        return replace(self, arrangement=arrangement)

    def check_pool(self, pool: torch.Tensor, what: str = "pool") -> int:
        """Check that ``pool`` is a contiguous tensor of this layout; return its page count."""
        if not isinstance(pool, torch.Tensor):
            raise LayoutError(f"{what} must be a torch.Tensor, got {type(pool).__name__}")
        if pool.dtype != self.torch_dtype:
            raise LayoutError(f"{what} has dtype {pool.dtype}, layout says {self.dtype}")
        if pool.dim() != 6:
            raise LayoutError(
                f"{what} must have 6 dims {self.pool_shape(0)} with any page count, "
                f"got shape {tuple(pool.shape)}"
            )
        page_dim = 2 if self.arrangement == "layer_first" else 0
        num_pages = pool.shape[page_dim]
        if tuple(pool.shape) != self.pool_shape(num_pages):
            raise LayoutError(self._shape_mismatch(tuple(pool.shape), what))
        if not pool.is_contiguous():
            raise LayoutError(f"{what} must be contiguous (call .contiguous() once at setup)")
        return num_pages

    def _shape_mismatch(self, shape: tuple[int, ...], what: str) -> str:
        """Say which shape was expected and what the given one is (if it is a pool of
        the other arrangement, name that and its page count)."""
        other = "page_first" if self.arrangement == "layer_first" else "layer_first"
        as_other = self.with_arrangement(other)
        other_pages = shape[2 if other == "layer_first" else 0]
        if shape == as_other.pool_shape(other_pages):
            return (f"{what} has shape {shape}: that is a {other} pool of {other_pages} pages, but "
                    f"the layout says {self.arrangement}, whose pool of {other_pages} pages has "
                    f"shape {self.pool_shape(other_pages)}; give KVLayout(arrangement={other!r}) "
                    f"or pass the pool in {self.arrangement} order")
        return (f"{what} has shape {shape}; a {self.arrangement} pool of N pages must have shape "
                f"{self._shape_pattern()}")

    def _shape_pattern(self) -> str:
        """The pool shape with the page count left as N, e.g. (2, 2, N, 16, 8, 128)."""
        dims = [str(d) for d in self.pool_shape(1)]
        dims[2 if self.arrangement == "layer_first" else 0] = "N"
        return "(" + ", ".join(dims) + ")"

    def fingerprint(self) -> str:
        """Stable text that names everything here that makes bytes differ (not the arrangement
        of the engine's pool, which the host side normalises)."""
        kind = "mla" if self.is_mla else "mha"
        return (
            f"{kind}:L{self.num_layers}:H{self.num_kv_heads}:D{self.head_dim}"
            f":P{self.page_size}:{self.dtype}"
        )
