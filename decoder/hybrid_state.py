"""A hybrid model's state snapshot as one cache "page": the SSD layers' conv and SSM states
and the sliding-window layers' last ``window`` positions of K/V, packed into one float32
vector in a fixed order, so that it can travel through L2 and L3 like a page of its own
layout (``snapshot_layout``).

    [ SSD layer 0: conv (K-1 x conv_dim), ssm (heads x head_dim x state) | SSD layer 1 ... |
      window layer 0: K (window x kv_heads x head_dim), V (same) | window layer 1 ... | pad ]

Window K/V keep their bits and their size: float32 as is, 16-bit dtypes two to a float32
slot (a bit-cast view, never a conversion). For a snapshot at position B < window, the
positions before 0 are zeros and never read back.
"""

from __future__ import annotations

import math

import torch

from kvstore.layout import DTYPES, KVLayout
from kvstore.page_keys import KEY_BYTES

from .hybrid_config import HybridConfig
from .hybrid_model import HybridPools, HybridState
from .model import pool_view

SNAPSHOT_PAGE_TOKENS = KEY_BYTES // 2
"""A snapshot is cached under its page's 16-byte key read as 8 uint16 "tokens" (controller/
hybrid.py), so its layout's page holds 8 of them."""

SNAPSHOT_CHUNK_FLOATS = 1 << 19
"""At most 2 MiB per chunk of a snapshot's layout (a 98 MiB snapshot is 48 chunks)."""


class SnapshotCodec:
    """Packs and unpacks the snapshots of one model (config) with window K/V of ``kv_dtype``."""

    def __init__(self, config: HybridConfig, kv_dtype: str = "float32") -> None:
        self.config, self.kv_dtype = config, DTYPES[kv_dtype]
        if self.kv_dtype.itemsize not in (2, 4) or config.base.head_dim % 2:
            raise ValueError(f"window K/V of {kv_dtype} cannot be packed; use float32, bfloat16 or float16")
        c, b = config, config.base
        self.num_ssd = len(c.layers_of("S"))
        self.num_window = len(c.layers_of("W"))
        self.conv_numel = (c.conv_kernel - 1) * c.conv_dim
        self.ssm_numel = c.ssm_heads * c.ssm_head_dim * c.ssm_state
        # float32 slots per window layer's K (or V)
        self.window_numel = (c.window * b.num_kv_heads * b.head_dim * self.kv_dtype.itemsize // 4
                             if self.num_window else 0)
        self.numel = self.num_ssd * (self.conv_numel + self.ssm_numel) + self.num_window * 2 * self.window_numel

    @property
    def nbytes(self) -> int:
        return self.numel * 4

    def layout(self) -> KVLayout:
        """One snapshot per page (page_first: contiguous): L "layers" x 2 x 8 tokens x 1 head x
        head_dim >= numel floats, with L such that a chunk (the copy ops' unit, one warp's work
        on the CUDA path) is at most SNAPSHOT_CHUNK_FLOATS."""
        per_layer = 2 * SNAPSHOT_PAGE_TOKENS
        num_layers = max(1, math.ceil(self.numel / (2 * SNAPSHOT_CHUNK_FLOATS)))
        head_dim = math.ceil(self.numel / (per_layer * num_layers))
        return KVLayout(num_layers=num_layers, num_kv_heads=1, head_dim=head_dim,
                        page_size=SNAPSHOT_PAGE_TOKENS, dtype="float32", arrangement="page_first")

    def pack(self, state: HybridState, pools: HybridPools, page_table: torch.Tensor, end: int,
             out: torch.Tensor) -> None:
        """Write the snapshot after position ``end`` - 1 into ``out`` (a flat float32 view of
        at least ``numel`` elements): ``state`` (the SSD state there) and the window layers'
        K/V of positions [end - window, end) read from ``pools.window`` through ``page_table``."""
        parts = []
        for conv, ssm in zip(state.conv, state.ssm):
            parts += [conv.reshape(-1), ssm.reshape(-1)]
        if self.num_window:
            positions, lo = self._window_positions(end, page_table.device)
            for j in range(self.num_window):
                for kv in (0, 1):
                    pages = pool_view(pools.window, pools.window_layout, j, kv)
                    block = torch.zeros(self.config.window, *pages.shape[2:], dtype=pages.dtype,
                                        device=out.device)
                    P = pools.window_layout.page_size
                    block[lo:] = pages[page_table[positions // P], positions % P]
                    parts.append(block.reshape(-1).view(torch.float32))
        flat = torch.cat(parts)
        out[: self.numel].copy_(flat)
        out[self.numel:].zero_()

    def unpack(self, flat: torch.Tensor, pools: HybridPools, page_table: torch.Tensor,
               end: int) -> HybridState:
        """The SSD state held by ``flat``; writes its window K/V into ``pools.window`` at
        positions [max(0, end - window), end) through ``page_table``."""
        c = self.config
        flat = flat.reshape(-1)
        at = 0

        def take(numel: int, *shape: int) -> torch.Tensor:
            nonlocal at
            out = flat[at: at + numel].reshape(shape).clone()
            at += numel
            return out

        conv, ssm = [], []
        for _ in range(self.num_ssd):
            conv.append(take(self.conv_numel, c.conv_kernel - 1, c.conv_dim))
            ssm.append(take(self.ssm_numel, c.ssm_heads, c.ssm_head_dim, c.ssm_state))
        if self.num_window:
            positions, lo = self._window_positions(end, page_table.device)
            P = pools.window_layout.page_size
            for j in range(self.num_window):
                for kv in (0, 1):
                    pages = pool_view(pools.window, pools.window_layout, j, kv)
                    block = take(self.window_numel, self.window_numel).view(pages.dtype)
                    block = block.view(c.window, *pages.shape[2:])
                    pages[page_table[positions // P], positions % P] = block[lo:]
        return HybridState(conv, ssm)

    def _window_positions(self, end: int, device: torch.device) -> tuple[torch.Tensor, int]:
        """Positions [max(0, end - window), end) and the offset of the first inside the block."""
        start = max(0, end - self.config.window)
        return torch.arange(start, end, device=device), start - (end - self.config.window)
