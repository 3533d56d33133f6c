"""Page keys of a vLLM request: token chain, multimodal items, LoRA, salt, TP rank, PP stage.

``kvstore.page_keys`` chains pages by their token ids. Multimodal prompts repeat
one placeholder token id for every position of an image, so two images would get
equal keys; vLLM's own block hashes add the items' hashes for that reason. Here a
page that overlaps items is keyed by its token key folded with those items'
identifiers, and the chain goes on from the folded key, so every later page
depends on the items too::

    k_i  = page_keys(prev, tokens of page i)
    key_i = k_i                                 no item overlaps page i
            BLAKE2b-128(key = k_i, data = ids)  ids = identifiers of overlapping items
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any, Sequence

from adapters.vllm.plan import MMSpan, PageTransfer
from kvstore.layout import KVLayout
from kvstore.page_keys import KEY_BYTES, KeyNamespace, PageKey, page_keys


def transfer_keys(namespace: KeyNamespace, t: PageTransfer, page_size: int) -> list[PageKey]:
    """Keys of every full page of ``t.token_ids`` in ``namespace`` (plus t's LoRA and salt)."""
    if t.lora_id or t.cache_salt:
        namespace = replace(namespace, lora_id=t.lora_id,
                            cache_salt=t.cache_salt or namespace.cache_salt)
    return chain_keys(namespace.digest(), t.token_ids, page_size, t.mm_spans)


def chain_keys(seed: bytes, tokens: Sequence[int], page_size: int,
               mm_spans: Sequence[MMSpan] = ()) -> list[PageKey]:
    """The page chain of ``tokens`` from ``seed``, multimodal items folded in (see module doc)."""
    if not mm_spans:
        return page_keys(seed, list(tokens), page_size)
    keys: list[PageKey] = []
    prev = seed
    for start in range(0, len(tokens) // page_size * page_size, page_size):
        (key,) = page_keys(prev, list(tokens[start:start + page_size]), page_size)
        ids = [s.identifier for s in mm_spans
               if s.offset < start + page_size and start < s.offset + s.length]
        if ids:
            data = "\x00".join(ids).encode()
            key = hashlib.blake2b(data, digest_size=KEY_BYTES, key=key).digest()
        keys.append(key)
        prev = key
    return keys


def mm_spans_of(request: Any) -> tuple[MMSpan, ...]:
    """The multimodal items of a vLLM ``Request`` (``mm_features``) as spans; ValueError
    for an item without an identifier (its KV could not be told apart)."""
    spans = []
    for feature in getattr(request, "mm_features", None) or ():
        ident = getattr(feature, "identifier", None) or getattr(feature, "mm_hash", None)
        pos = feature.mm_position
        if not ident:
            raise ValueError(f"request {request.request_id}: a multimodal item has no hash; "
                             "kvstore cannot key its KV (enable vLLM's mm hashing)")
        spans.append(MMSpan(int(pos.offset), int(pos.length), str(ident)))
    return tuple(spans)


def request_ids(request: Any) -> tuple[str | None, str | None]:
    """(LoRA name, cache salt) of a vLLM ``Request``: both change the KV or who may read it."""
    lora = getattr(request, "lora_request", None)
    return (getattr(lora, "lora_name", None) if lora else None), getattr(request, "cache_salt", None)


def vllm_namespace(model_id: str, layout: KVLayout, *, tp_rank: int, tp_size: int,
                   pp_rank: int, pp_size: int, cache_salt: str | None) -> KeyNamespace:
    """The namespace of one worker's pages. MLA's latent is the same on every TP rank,
    so MLA pages are shared by all ranks (rank 0 of 1)."""
    if layout.is_mla:
        tp_rank, tp_size = 0, 1
    return KeyNamespace(model_id, layout, tp_rank=tp_rank, tp_size=tp_size,
                        pp_rank=pp_rank, pp_size=pp_size, cache_salt=cache_salt)
