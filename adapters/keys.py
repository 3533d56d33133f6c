"""Page keys for engines that name pages themselves, and dtype names for their layouts.

SGLang names a page by a hex string (a chained SHA-256 of its tokens and the page
before); kvstore names pages by 16-byte digests within a ``KeyNamespace``. The map
keeps SGLang's chaining and adds the namespace::

    key = BLAKE2b-128(key = namespace digest, data = utf-8 of the engine's page hash)

so equal hashes of two engines share a page only when their namespaces (model,
layout, TP rank/size, LoRA, salt) are equal too. vLLM pages are keyed from their
token ids with ``kvstore.page_keys`` itself, the same keys as a ``CacheClient``'s.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch

from kvstore.layout import DTYPES
from kvstore.page_keys import KEY_BYTES, PageKey

_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def digest_keys(namespace_digest: bytes, page_hashes: Iterable[str]) -> list[PageKey]:
    """kvstore keys of engine page hashes (strings) within one namespace."""
    blake = hashlib.blake2b
    return [blake(h.encode(), digest_size=KEY_BYTES, key=namespace_digest).digest()
            for h in page_hashes]


def dtype_name(dtype: torch.dtype) -> str:
    """The ``KVLayout.dtype`` name of a torch dtype; ValueError names the supported ones."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"KV dtype {dtype} is not supported by kvstore; supported: "
                         f"{sorted(DTYPES)}") from None
