"""Dense reference attention: the oracle every generated kernel is tested against.

Public API. It materialises the whole [B, Hq, Nq, Nk] score matrix, so it is for checking, not for
speed. Use it to check your own variants::

    o_ref, lse_ref = attention_reference(q, k, v, mask="causal")   # float64
"""

from __future__ import annotations

import math
from typing import Callable, Union

import torch

Mask = Union[None, str, torch.Tensor, Callable[..., torch.Tensor]]
ScoreMod = Union[None, Callable[..., torch.Tensor]]


def dense_mask(mask: Mask, b: int, hq: int, nq: int, nk: int, device) -> torch.Tensor | None:
    """The visibility mask as a bool tensor broadcastable to [B, Hq, Nq, Nk] (True = visible).

    `mask` is None or "none" (everything visible), "causal" (q_idx >= kv_idx, top-left aligned
    like SDPA's is_causal), a bool tensor broadcastable to [B, Hq, Nq, Nk], or a callable
    ``fn(b, h, q_idx, kv_idx) -> bool tensor`` evaluated on broadcast index grids.
    """
    if mask is None or (isinstance(mask, str) and mask == "none"):
        return None
    q_idx = torch.arange(nq, device=device).view(1, 1, nq, 1)
    kv_idx = torch.arange(nk, device=device).view(1, 1, 1, nk)
    if isinstance(mask, str):
        if mask == "causal":
            return q_idx >= kv_idx
        raise ValueError(f"mask: unknown mask {mask!r} (expected 'none', 'causal', a tensor or a callable)")
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            raise ValueError(f"mask: expected a bool tensor, got {mask.dtype}")
        return mask.to(device)
    if callable(mask):
        bi = torch.arange(b, device=device).view(b, 1, 1, 1)
        hi = torch.arange(hq, device=device).view(1, hq, 1, 1)
        return torch.as_tensor(mask(bi, hi, q_idx, kv_idx), dtype=torch.bool, device=device)
    raise ValueError(f"mask: unsupported mask of type {type(mask).__name__}")


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    mask: Mask = None,
    compute_dtype: torch.dtype | None = torch.float64,
    score_mod: ScoreMod = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense softmax attention with GQA head sharing.

    q: [B, Hq, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv]; Hkv divides Hq and query head h
    reads KV head h // (Hq // Hkv). Returns (o [B, Hq, Nq, Dv], lse [B, Hq, Nq]) in compute_dtype
    (float64 by default; None computes at the inputs' dtype with PyTorch's own matmul and softmax,
    the baseline the tolerance rule compares against; lse is then float32). lse is the natural log of the
    softmax denominator. A row with no visible key gives o = 0 and lse = -inf, and differentiates to
    zero gradients, never NaN. Differentiable in q, k and v (and through lse).

    `score_mod`, a callable ``fn(score, b, h, q_idx, kv_idx) -> tensor`` on the scaled scores
    [B, Hq, Nq, Nk] and broadcast index grids, replaces each score before the mask; its result is
    brought to the compute dtype. Whatever it reads that requires grad receives a gradient.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v: expected 4-D tensors [B, H, N, D]")
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"k: {hkv} KV heads do not divide {hq} query heads")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    dt = compute_dtype or q.dtype
    low = dt in (torch.float16, torch.bfloat16)
    group = hq // hkv
    qc, kc, vc = (t.to(dt) for t in (q, k, v))
    kc = kc.repeat_interleave(group, dim=1)
    vc = vc.repeat_interleave(group, dim=1)
    s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    if score_mod is not None:
        bi = torch.arange(b, device=q.device).view(b, 1, 1, 1)
        hi = torch.arange(hq, device=q.device).view(1, hq, 1, 1)
        q_idx = torch.arange(nq, device=q.device).view(1, 1, nq, 1)
        kv_idx = torch.arange(nk, device=q.device).view(1, 1, 1, nk)
        s = torch.as_tensor(score_mod(s, bi, hi, q_idx, kv_idx)).to(dt).expand(b, hq, nq, nk)
    visible = dense_mask(mask, b, hq, nq, nk, q.device)
    if visible is None and nk == 0:
        visible = torch.zeros(1, 1, nq, 0, dtype=torch.bool, device=q.device)
    if visible is not None:
        visible = visible.expand(b, hq, nq, nk)
        any_visible = visible.any(dim=-1, keepdim=True)
        # Masked scores are -inf; rows with nothing visible take a harmless stand-in of zeros so
        # no NaN reaches autograd, and are zeroed afterwards.
        s = torch.where(any_visible, s.masked_fill(~visible, float("-inf")), torch.zeros_like(s))
    lse = torch.logsumexp(s.float() if low else s, dim=-1)
    # Low precision: PyTorch's own softmax at the input dtype (it saves and differentiates the
    # rounded probabilities), so the baseline has the errors an fp16/bf16 implementation has.
    p = torch.softmax(s, dim=-1)
    if visible is not None:
        p = p * any_visible
        lse = torch.where(any_visible.squeeze(-1), lse, torch.full_like(lse, float("-inf")))
    o = torch.matmul(p, vc)
    return o, lse
