"""The engine's arguments, checked by one rule for both clients (embedded and daemon):
anything wrong is a CacheError that names the argument, the bad entry and what is
expected, never a TypeError or ValueError from deep inside.

    tokens        a 1-D sequence of token ids: a list/tuple/range of ints, a numpy array
                  or a torch tensor of an integer dtype; each id in 0..2**31-1
    device pages  the same kinds of container, of distinct ints inside the engine's pool
    layer         an int in 0..num_layers-1 (not 1.0, not True)
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch

from controller.api import CacheError

MAX_TOKEN_ID = 2**31 - 1   # page keys hash ids as int32 (kvstore.page_keys)


def token_array(tokens: Any, what: str = "tokens") -> np.ndarray:
    """``tokens`` as a 1-D int64 array; CacheError naming what is wrong."""
    arr = _int_array(tokens, what, "token ids")
    if arr.size:
        bad = np.flatnonzero((arr < 0) | (arr > MAX_TOKEN_ID))
        if bad.size:
            i = int(bad[0])
            raise CacheError(f"{what}[{i}] = {int(arr[i])} is not a token id (0..{MAX_TOKEN_ID})")
    return arr


def page_id_list(pages: Any, what: str) -> list[int]:
    """``pages`` as a list of ints (no range check: see ``check_page_ids``)."""
    return [int(i) for i in _int_array(pages, what, "device page ids")]


def check_page_ids(pages: Any, num_pages: int, what: str) -> list[int]:
    """``pages`` as a list of distinct ints in 0..num_pages-1; CacheError naming the first bad one."""
    out = page_id_list(pages, what)
    for i, page in enumerate(out):
        if not 0 <= page < num_pages:
            raise CacheError(f"{what}[{i}] = {page} is outside the engine pool of {num_pages} "
                             f"pages (valid ids: 0..{num_pages - 1})")
    if len(set(out)) != len(out):
        seen: set[int] = set()
        dup = next(p for p in out if p in seen or seen.add(p))
        raise CacheError(f"{what} names device page {dup} twice; each page holds one page of tokens")
    return out


def layer_index(layer: Any, num_layers: int) -> int:
    """``layer`` as an int in 0..num_layers-1; CacheError otherwise."""
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise CacheError(f"layer must be an int, got {layer!r} ({type(layer).__name__})")
    if not 0 <= layer < num_layers:
        raise CacheError(f"layer must be in 0..{num_layers - 1}, got {layer}")
    return int(layer)


def _int_array(values: Any, what: str, kind: str) -> np.ndarray:
    """A 1-D int64 array of ``values`` (a sequence, numpy array or tensor of integers)."""
    expected = f"{what} must be a 1-D sequence of {kind} (ints, or an integer numpy array or tensor)"
    if values is None or isinstance(values, (str, bytes, numbers.Number)):
        raise CacheError(f"{expected}, got {type(values).__name__}")
    if isinstance(values, torch.Tensor):
        if not _is_int_dtype(values.dtype):
            raise CacheError(f"{expected}, got a tensor of {values.dtype}")
        values = values.detach().cpu().numpy()
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError, OverflowError):   # ragged, or ints beyond 64 bits
        arr = np.asarray(list(values), dtype=object)
    if arr.ndim != 1:
        raise CacheError(f"{expected}, got {type(values).__name__} of shape {arr.shape}")
    # numpy turns [True, 2] into ints: a bool among ints is refused like a float
    is_bad = arr.dtype.kind not in "iu" or (isinstance(values, (list, tuple))
                                          and bool in set(map(type, values)))
    if arr.size and is_bad:  # find the entry to name (the slow path)
        for i, item in enumerate(values if isinstance(values, (list, tuple)) else arr.tolist()):
            if isinstance(item, bool) or not isinstance(item, numbers.Integral):
                raise CacheError(f"{what}[{i}] is {item!r} ({type(item).__name__}); {kind} must be ints")
            if abs(item) >= 2**63:
                raise CacheError(f"{what}[{i}] = {item} is too large for one of the {kind}")
        raise CacheError(f"{expected}, got {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _is_int_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool
