"""The reference decoder's attention kernels: one chunk of queries against the K/V of its context.

Shapes everywhere: q [n, heads, d] holds the last n of the L positions in k, v [L, kv_heads, d];
query i sees keys 0 .. L-n+i (causal, aligned lower right). Query head h uses kv head
h // (heads // kv_heads) (GQA). Each function returns [n, heads * d].

``attention`` is the bit-exact reference (float32, explicit matmuls). The others use
PyTorch's fused kernels, in the inputs' dtype:

- ``sdpa_attention``: one call with the lower-right causal mask. PyTorch serves that mask
  only with FlashAttention-2 or the memory-efficient kernel; on an H200 the plain causal
  prefill (n == L) gets cuDNN's kernel instead, which is much faster, and that gap is
  what made a prefill over a cached prefix run at 47% of the matmul rate against 69%.
- ``split_attention``: the same result from two calls that need no lower-right mask::

      keys     0 ............ L-n-1 | L-n ........ L-1
      part 1   every query, no mask | -
      part 2   -                    | square causal (the plain is_causal kernel)

  merged with the log-sum-exp of each part: out = w * out1 + (1 - w) * out2 with
  w = sigmoid(lse1 - lse2). Each part runs on the kernel PyTorch's dispatcher picks for
  its shapes (cuDNN on the H200), through the backend's own op, which returns the
  log-sum-exp the public API hides. Those ops are private, so the first use of each
  (device, dtype, backend) is checked against ``sdpa_attention`` on the same inputs; a
  mismatch or an error logs a warning and that combination uses ``sdpa_attention`` from
  then on. Results then depend only on the shapes (the chunking), as before.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.nn.attention.bias import causal_lower_right

log = logging.getLogger(__name__)

_CUDNN, _FLASH = int(SDPBackend.CUDNN_ATTENTION), int(SDPBackend.FLASH_ATTENTION)

# Relative RMS error above which the split result is taken to be wrong (bf16 rounding of
# two different kernels is ~2e-3; a wrong log-sum-exp convention is ~1e-1).
SPLIT_CHECK_RTOL = 2e-2

SPLIT_MIN_QUERIES = 512
"""Shorter chunks keep the one-call lower-right kernel (H200, 8B: at 4K tokens 90% cached
the split path's extra launches cost more than its faster kernel saved)."""


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention in float32 with explicit matmuls; ``allowed`` [n, L] bool.
    Returns float32."""
    n, num_heads, d = q.shape
    num_kv = k.shape[1]
    group = num_heads // num_kv
    # [n, kv, group, d] -> [kv, group * n, d]: one bmm per kv head over its whole group
    qg = q.float().view(n, num_kv, group, d).permute(1, 2, 0, 3).reshape(num_kv, group * n, d)
    kt = k.float().permute(1, 0, 2).contiguous()  # [kv, L, d]
    vt = v.float().permute(1, 0, 2).contiguous()  # [kv, L, d]
    scores = torch.bmm(qg * (1.0 / math.sqrt(d)), kt.transpose(1, 2)).view(num_kv, group, n, -1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(num_kv, group * n, -1)
    out = torch.bmm(probs, vt).view(num_kv, group, n, d)
    return out.permute(2, 0, 1, 3).reshape(n, num_heads * d)


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """[len, heads, d] -> [1, heads, len, d], a view (the kernels take these strides)."""
    return t.transpose(0, 1).unsqueeze(0)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention in one fused call (lower-right mask when n < L)."""
    n, num_heads, d = q.shape
    end = k.shape[0]
    qh, kh, vh = (_heads_first(t) for t in (q, k, v))
    # A decode step (n == 1) keeps the lower-right mask too, although it masks nothing:
    # unmasked, the dispatcher picks cuDNN, whose single-query results vary from run to
    # run on the H200 (seen: a cache run and its cache-off twin parting after one decode
    # step); the lower-right kernel is deterministic.
    mask, causal = (None, True) if n == end else (causal_lower_right(n, end), False)
    try:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=causal, enable_gqa=True)
    except RuntimeError as exc:
        # A backend without native GQA for this mask: repeat each KV head for its group.
        log.warning("SDPA with enable_gqa failed (%s); repeating KV heads", exc)
        group = num_heads // k.shape[1]
        kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=causal)
    return out[0].transpose(0, 1).reshape(n, num_heads * d)


def split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``sdpa_attention``'s result from a prefix part and a square causal part (module doc)."""
    n, end = q.shape[0], k.shape[0]
    start = end - n
    if start == 0 or n < SPLIT_MIN_QUERIES:
        # Nothing to split, or a chunk so short that launches, not the kernel, cost the
        # time (the split path launches two attention calls and a merge per layer).
        return sdpa_attention(q, k, v)
    key = _verdict_key(q, k, v)
    verdict = _split_verdicts.get(key)
    if verdict is False:
        return sdpa_attention(q, k, v)
    try:
        out = _split_merge(q, k, v, start)
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        log.warning("split attention failed on %s (%s: %s); using the lower-right kernel",
                    key, type(exc).__name__, exc)
        _split_verdicts[key] = False
        return sdpa_attention(q, k, v)
    if verdict is None:
        # The first use decides for this key; it must also return what every later use
        # will, or one chunk computed first would differ from the same chunk computed again.
        reference = sdpa_attention(q, k, v)
        _split_verdicts[key] = _agrees(out, reference, key)
        return out if _split_verdicts[key] else reference
    return out


# (device type, index, dtype, backend) -> whether the split result matched on first use
_split_verdicts: dict[tuple, bool] = {}


def _agrees(out: torch.Tensor, reference: torch.Tensor, key: tuple) -> bool:
    err = float((out.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-30))
    if err > SPLIT_CHECK_RTOL:
        log.warning("split attention differs from the lower-right kernel on %s (relative RMS "
                    "%.3g); using the lower-right kernel from now on", key, err)
        return False
    return True


def _verdict_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
    """(device type, index, dtype, backend the dispatcher picks for a non-causal call of
    these shapes); backend None where the dispatcher cannot be asked (a torch without
    ``_fused_sdp_choice``), whose verdict is then False."""
    qh, kh, vh = (_heads_first(t) for t in (q, k, v))
    try:
        backend = int(torch._fused_sdp_choice(qh, kh, vh, None, 0.0, False, scale=None, enable_gqa=True))
    except (AttributeError, RuntimeError, TypeError) as exc:
        key = (q.device.type, q.device.index, q.dtype, None)
        if key not in _split_verdicts:
            log.warning("cannot ask SDPA for its backend (%s); using the lower-right kernel", exc)
            _split_verdicts[key] = False
        return key
    return (q.device.type, q.device.index, q.dtype, backend)


def _split_merge(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    n, num_heads, d = q.shape
    qh = _heads_first(q)
    out1, lse1 = _attend_with_lse(qh, _heads_first(k[:start]), _heads_first(v[:start]), causal=False)
    out2, lse2 = _attend_with_lse(qh, _heads_first(k[start:]), _heads_first(v[start:]), causal=True)
    # softmax over the union = each part's softmax weighted by its share of the total mass
    weight = torch.sigmoid(lse1 - lse2).unsqueeze(-1)          # [1, heads, n, 1] float32
    out = out2.float().lerp_(out1.float(), weight).to(q.dtype)  # out2 + w * (out1 - out2)
    return out[0].transpose(0, 1).reshape(n, num_heads * d)


def _attend_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [1, heads, n, d], natural-log log-sum-exp [1, heads, n] float32) through the
    op of the backend the dispatcher picks; raises NotImplementedError for backends
    whose op is not wired here (efficient, math), which then use the lower-right path."""
    backend = int(torch._fused_sdp_choice(q, k, v, None, 0.0, causal, scale=None, enable_gqa=True))
    ops = torch.ops.aten
    if backend == _CUDNN:
        out, lse = ops._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False)[:2]
    elif backend == _FLASH and q.device.type == "cpu":
        out, lse = ops._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
    elif backend == _FLASH:
        out, lse = ops._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False)[:2]
    else:
        raise NotImplementedError(f"no log-sum-exp op wired for SDPA backend {backend}")
    n = q.shape[2]
    # cuDNN returns [1, heads, n, 1]; the memory-efficient layout pads n: keep [1, heads, n]
    return out, lse.float().flatten(2)[..., :n]
