"""Dense float64 reference of Native Sparse Attention (NSA): the oracle for the NSA kernels.

Public API. Slow and exact: every branch materialises a dense [B, Hq, N, N] (or [B, Hq, N, C]) score
matrix and reuses :func:`attngen.reference.dense.attention_reference` with a boolean mask. The math and the
switches attngen chose are described in the project's NSA notes; in short:

* K/V are shared by the three branches (compression, selection, sliding window).
* Compression block i covers tokens [i*stride, i*stride + block); query t sees block i only once it
  is complete (i*stride + block - 1 <= t). A query with no complete block gets o_cmp = 0 and
  lse_cmp = -inf (the dense reference's convention for a row that sees nothing).
* Importance of selection block j (length select_block) is the overlap-weighted sum of the per-head
  compressed scores (each compressed block adds its score once per stride-sized piece it shares
  with block j), summed over the query heads of a GQA group.
* Top-n selection per (position, KV head) among blocks j <= t // select_block; ``initial`` first
  and ``local`` most recent blocks are forced (+inf), future blocks are -inf, ties go to the lower
  index, indices are ascending and -1 padded.
* Window: keys s with t - window < s <= t.

Layout as the rest of attngen: q [B, Hq, N, D], k [B, Hkv, N, D], v [B, Hkv, N, Dv], gates
[B, Hq, N, 3] ordered (cmp, slc, win). Query head h reads KV head h // (Hq // Hkv).

Every building block is public so kernels can be checked piece by piece::

    k_cmp = compress_mean(k, block=32, stride=16)
    s = importance_scores(q, k_cmp, block=32, stride=16, score="probs")   # [B, Hq, N, C]
    s = map_to_selection_blocks(s, block=32, stride=16, select_block=64, n=N)  # [B, Hq, N, S]
    idx = select_blocks(group_scores(s, hkv), select_block=64, top_n=16, initial=1, local=2)
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from attngen.reference.dense import attention_reference

SCORES = ("probs", "dot", "cosine")
PERS = ("token", "block")

# compress(k, v, *, block, stride) -> (k_cmp [B, Hkv, C, D], v_cmp [B, Hkv, C, Dv])
Compress = Callable[..., tuple]


# ----------------------------------------------------------------------------------------------
# Argument checks


def _check_int(name: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name}: must be >= {lo}, got {value}")


def _check_blocks(block: int, stride: int, select_block: Optional[int] = None) -> None:
    _check_int("block", block, 1)
    _check_int("stride", stride, 1)
    if block % stride:
        raise ValueError(f"stride: {stride} does not divide block {block}")
    if select_block is not None:
        _check_int("select_block", select_block, 1)
        if select_block % stride:
            raise ValueError(f"stride: {stride} does not divide select_block {select_block}")


def _check_selection(top_n: int, initial: int, local: int, per: str) -> None:
    _check_int("top_n", top_n, 1)
    _check_int("initial", initial, 0)
    _check_int("local", local, 0)
    if initial + local > top_n:
        raise ValueError(f"initial + local: {initial} + {local} forced blocks exceed top_n {top_n}")
    if per not in PERS:
        raise ValueError(f"per: unknown value {per!r} (expected 'token' or 'block')")


# ----------------------------------------------------------------------------------------------
# Compression


def num_compressed(n: int, block: int, stride: int) -> int:
    """Number of complete compression blocks in a sequence of n tokens: max(0, (n - block)//stride + 1)."""
    return max(0, (n - block) // stride + 1)


def num_selection_blocks(n: int, select_block: int) -> int:
    """Number of selection blocks covering n tokens (the last one may be partial)."""
    return -(-n // select_block)


def compress_mean(x: torch.Tensor, *, block: int, stride: int) -> torch.Tensor:
    """Mean pooling of every complete compression block: x [B, H, N, D] -> [B, H, C, D].

    Block i is the mean of x[:, :, i*stride : i*stride + block]. C = num_compressed(N, block, stride).
    Differentiable.
    """
    _check_blocks(block, stride)
    if x.dim() != 4:
        raise ValueError("x: expected a 4-D tensor [B, H, N, D]")
    b, h, n, d = x.shape
    c = num_compressed(n, block, stride)
    if c == 0:
        return x.new_zeros(b, h, 0, d)
    windows = x.unfold(2, block, stride)  # [B, H, C, D, block]
    return windows.mean(dim=-1)


def compressed_visibility(n: int, c: int, *, block: int, stride: int, device=None) -> torch.Tensor:
    """Bool [N, C]: query t sees compressed block i iff i*stride + block - 1 <= t."""
    t = torch.arange(n, device=device).view(n, 1)
    i = torch.arange(c, device=device).view(1, c)
    return i * stride + block - 1 <= t


def compressed_attention(q, k_cmp, v_cmp, *, block: int, stride: int, scale: float | None = None):
    """Compression branch: (o_cmp [B, Hq, N, Dv], lse_cmp [B, Hq, N]) in float64.

    A query with no complete block gets o = 0, lse = -inf and zero gradients.
    """
    _check_blocks(block, stride)
    n, c = q.shape[2], k_cmp.shape[2]
    vis = compressed_visibility(n, c, block=block, stride=stride, device=q.device)
    return attention_reference(q, k_cmp, v_cmp, scale=scale, mask=vis.view(1, 1, n, c))


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def importance_scores(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    *,
    block: int,
    stride: int,
    score: str = "probs",
    scale: float | None = None,
) -> torch.Tensor:
    """Per-head importance of each compressed block, [B, Hq, N, C] float64, 0 where not visible.

    score="probs": the compression branch's softmax probabilities p_cmp (rows with no complete
    block are all 0). "dot": the logits scale * <q, k_cmp>. "cosine": <q, k_cmp> / (|q| |k_cmp|)
    (0 when either vector is 0). Blocks not yet complete for the query score exactly 0 in all
    three, so under "dot" and "cosine" a negative score ranks below an unscored block.
    """
    _check_blocks(block, stride)
    if score not in SCORES:
        raise ValueError(f"score: unknown score {score!r} (expected one of {', '.join(SCORES)})")
    b, hq, n, d = q.shape
    hkv, c = k_cmp.shape[1], k_cmp.shape[2]
    if hq % hkv:
        raise ValueError(f"k_cmp: {hkv} KV heads do not divide {hq} query heads")
    qd = q.to(torch.float64)
    kd = k_cmp.to(torch.float64).repeat_interleave(hq // hkv, dim=1)
    vis = compressed_visibility(n, c, block=block, stride=stride, device=q.device).view(1, 1, n, c)
    dots = torch.matmul(qd, kd.transpose(-1, -2))
    if score == "dot":
        s = dots * _scale(q, scale)
    elif score == "cosine":
        norms = qd.norm(dim=-1, keepdim=True) * kd.norm(dim=-1).unsqueeze(-2)
        s = torch.where(norms > 0, dots / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(dots))
    else:
        z = (dots * _scale(q, scale)).masked_fill(~vis, float("-inf"))
        any_vis = vis.any(dim=-1, keepdim=True)
        z = torch.where(any_vis, z, torch.zeros_like(z))
        s = torch.softmax(z, dim=-1) * any_vis
    return s * vis


def overlap_matrix(c: int, num_blocks: int, *, block: int, stride: int, select_block: int, device=None):
    """Float64 [C, S]: W[i, j] = number of stride-sized pieces compressed block i shares with
    selection block j. Compressed block i is pieces i .. i + block/stride - 1, selection block j is
    pieces j*r .. j*r + r - 1 with r = select_block/stride."""
    _check_blocks(block, stride, select_block)
    u, r = block // stride, select_block // stride
    i = torch.arange(c, device=device).view(c, 1)
    j = torch.arange(num_blocks, device=device).view(1, num_blocks)
    lo = torch.maximum(i, j * r)
    hi = torch.minimum(i + u, j * r + r)
    return (hi - lo).clamp_min(0).to(torch.float64)


def map_to_selection_blocks(
    scores: torch.Tensor, *, block: int, stride: int, select_block: int, n: int
) -> torch.Tensor:
    """Map compressed-block scores [..., C] onto selection blocks [..., S], S = ceil(n / select_block).

    p_slc[j] = sum_{a<r} sum_{b<u} p_cmp[r*j + a - b] with r = select_block/stride, u = block/stride
    (p_cmp = 0 outside 0..C-1): each compressed block adds its score once per stride-sized piece it
    shares with block j. For block=32, stride=16, select_block=64:
    p[4j-1] + 2p[4j] + 2p[4j+1] + 2p[4j+2] + p[4j+3].
    """
    w = overlap_matrix(
        scores.shape[-1], num_selection_blocks(n, select_block),
        block=block, stride=stride, select_block=select_block, device=scores.device,
    )
    return torch.matmul(scores.to(torch.float64), w)


def group_scores(scores: torch.Tensor, hkv: int) -> torch.Tensor:
    """Sum [B, Hq, ...] over the query heads of each GQA group -> [B, Hkv, ...]."""
    b, hq = scores.shape[:2]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"hkv: {hkv} KV heads do not divide {hq} query heads")
    return scores.reshape(b, hkv, hq // hkv, *scores.shape[2:]).sum(dim=2)


# ----------------------------------------------------------------------------------------------
# Selection


def _select_rows(s: torch.Tensor, own: torch.Tensor, *, top_n: int, initial: int, local: int) -> torch.Tensor:
    """s [..., R, S] scores, own [R] the own block of each row -> indices [..., R, top_n]."""
    nb = s.shape[-1]
    j = torch.arange(nb, device=s.device).view(1, nb)
    own = own.view(-1, 1)
    future = j > own
    forced = ((j < initial) | (j > own - local)) & ~future
    s = s.to(torch.float64)
    s = torch.where(forced, torch.full_like(s, float("inf")), s)
    s = torch.where(future, torch.full_like(s, float("-inf")), s)
    if nb < top_n:  # pad with never-eligible columns so there are always top_n candidates
        s = torch.cat([s, s.new_full((*s.shape[:-1], top_n - nb), float("-inf"))], dim=-1)
    # Stable descending sort: equal scores keep ascending index order, so ties go to the lower
    # index; eligible blocks are a prefix, so they also win any tie against the -inf future.
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :top_n]
    count = torch.clamp(own + 1, max=top_n)  # [R, 1] eligible blocks that get picked
    slot = torch.arange(top_n, device=s.device).view(1, top_n)
    big = torch.iinfo(torch.int64).max
    picked = torch.where(slot < count, order, torch.full_like(order, big))
    picked = torch.sort(picked, dim=-1).values
    return torch.where(picked == big, torch.full_like(picked, -1), picked)


@torch.no_grad()
def select_blocks(
    scores: torch.Tensor,
    *,
    select_block: int,
    top_n: int,
    initial: int = 1,
    local: int = 2,
    per: str = "token",
) -> torch.Tensor:
    """Top-n selection: scores [B, Hkv, N, S] -> block_indices [B, Hkv, N, top_n] int64.

    Position t may pick blocks j <= t // select_block. The first `initial` and the `local` most
    recent blocks (the own block included) are forced (+inf; they count toward top_n), future
    blocks are -inf, ties go to the lower index. Indices are ascending and -1 padded when fewer than
    top_n blocks are eligible.

    per="token" selects per position. per="block" selects once per query block of select_block
    positions, ranking by the scores summed over the block's positions (those < N); every position
    of query block b may pick exactly blocks 0..b, so the selection is causal at block level and
    the selected attention adds the token-level causal mask inside the own block. The positions of
    a block then share one index list, which depends on the scores of all of them (a later
    position's query can change an earlier position's choice; values read stay causal).
    Not differentiable.
    """
    _check_int("select_block", select_block, 1)
    _check_selection(top_n, initial, local, per)
    if scores.dim() != 4:
        raise ValueError("scores: expected a 4-D tensor [B, Hkv, N, S]")
    b, hkv, n, nb = scores.shape
    if nb != num_selection_blocks(n, select_block):
        raise ValueError(f"scores: {nb} selection blocks, expected ceil({n} / {select_block})")
    if per == "token":
        own = torch.arange(n, device=scores.device) // select_block
        return _select_rows(scores, own, top_n=top_n, initial=initial, local=local)
    pad = nb * select_block - n
    s = torch.cat([scores.to(torch.float64), scores.new_zeros(b, hkv, pad, nb, dtype=torch.float64)], dim=2)
    s = s.view(b, hkv, nb, select_block, nb).sum(dim=3)
    own = torch.arange(nb, device=scores.device)
    idx = _select_rows(s, own, top_n=top_n, initial=initial, local=local)  # [B, Hkv, S, top_n]
    return idx.repeat_interleave(select_block, dim=2)[:, :, :n]


def selection_mask(block_indices: torch.Tensor, *, select_block: int, n_keys: int | None = None) -> torch.Tensor:
    """Bool [B, Hkv, N, Nk]: key s visible to query t iff s // select_block is among t's block
    indices (-1 entries ignored) and s <= t."""
    b, hkv, n, _ = block_indices.shape
    nk = n if n_keys is None else n_keys
    nb = num_selection_blocks(nk, select_block)
    if block_indices.numel() and (block_indices.min() < -1 or block_indices.max() >= nb):
        raise ValueError(f"block_indices: entries must be -1 or in 0..{nb - 1}")
    # Block-level hits [B, Hkv, N, S + 1] (-1 lands in the spare last column), then per key.
    slot = torch.where(block_indices < 0, torch.full_like(block_indices, nb), block_indices)
    blk = torch.zeros(b, hkv, n, nb + 1, dtype=torch.bool, device=block_indices.device)
    blk.scatter_(3, slot, True)
    key_block = torch.arange(nk, device=block_indices.device) // select_block
    hit = blk[..., :nb].index_select(3, key_block)  # [B, Hkv, N, Nk]
    dev = block_indices.device
    causal = torch.arange(n, device=dev).view(n, 1) >= torch.arange(nk, device=dev).view(1, nk)
    return hit & causal


def selected_attention(q, k, v, block_indices, *, select_block: int, scale: float | None = None):
    """Selection branch over given indices [B, Hkv, N, n]: (o_slc, lse_slc) in float64."""
    hq, hkv = q.shape[1], k.shape[1]
    mask = selection_mask(block_indices, select_block=select_block, n_keys=k.shape[2])
    return attention_reference(q, k, v, scale=scale, mask=mask.repeat_interleave(hq // hkv, dim=1))


def window_mask(n: int, window: int, n_keys: int | None = None, device=None) -> torch.Tensor:
    """Bool [N, Nk]: key s visible to query t iff t - window < s <= t (window keys including t)."""
    nk = n if n_keys is None else n_keys
    t = torch.arange(n, device=device).view(n, 1)
    s = torch.arange(nk, device=device).view(1, nk)
    return (s <= t) & (s > t - window)


def window_attention(q, k, v, *, window: int, scale: float | None = None):
    """Sliding-window branch: (o_win, lse_win) in float64."""
    _check_int("window", window, 1)
    n, nk = q.shape[2], k.shape[2]
    return attention_reference(q, k, v, scale=scale, mask=window_mask(n, window, nk, q.device).view(1, 1, n, nk))


# ----------------------------------------------------------------------------------------------
# The whole module


def nsa_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    *,
    block: int = 32,
    stride: int = 16,
    select_block: int = 64,
    top_n: int = 16,
    initial: int = 1,
    local: int = 2,
    window: int = 512,
    score: str = "probs",
    per: str = "token",
    compress: str | Compress = "mean",
    k_cmp: torch.Tensor | None = None,
    v_cmp: torch.Tensor | None = None,
    block_indices: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """Native Sparse Attention, dense and exact in float64.

    q [B, Hq, N, D], k [B, Hkv, N, D], v [B, Hkv, N, Dv], gates [B, Hq, N, 3] ordered
    (cmp, slc, win). Returns (o [B, Hq, N, Dv], aux) with
    o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win and aux holding "block_indices"
    [B, Hkv, N, top_n] int64, "o_cmp", "o_slc", "o_win", "lse_cmp", "lse_slc", "lse_win",
    "k_cmp", "v_cmp".

    Compressed keys/values: `k_cmp`/`v_cmp` [B, Hkv, C, D/Dv] when given (C =
    num_compressed(N, block, stride)); otherwise `compress`, either "mean" (mean pooling) or a
    callable ``compress(k, v, block=, stride=) -> (k_cmp, v_cmp)``. `block_indices`, when given,
    replaces the selection (so a kernel and the reference can share indices). Differentiable in
    q, k, v, gates, k_cmp, v_cmp (and whatever the callable differentiates); the selection is
    computed without gradient. scale defaults to 1/sqrt(D).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v: expected 4-D tensors [B, H, N, D]")
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    if k.shape[0] != b or k.shape[2] != n or k.shape[3] != d:
        raise ValueError(f"k: expected shape [{b}, Hkv, {n}, {d}], got {list(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v: expected shape [{b}, {hkv}, {n}, Dv], got {list(v.shape)}")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"k: {hkv} KV heads do not divide {hq} query heads")
    if gates.shape != (b, hq, n, 3):
        raise ValueError(f"gates: expected shape [{b}, {hq}, {n}, 3], got {list(gates.shape)}")
    _check_blocks(block, stride, select_block)
    _check_selection(top_n, initial, local, per)
    _check_int("window", window, 1)
    if score not in SCORES:
        raise ValueError(f"score: unknown score {score!r} (expected one of {', '.join(SCORES)})")

    f64 = torch.float64
    q, k, v, gates = (t.to(f64) for t in (q, k, v, gates))
    c = num_compressed(n, block, stride)
    if (k_cmp is None) != (v_cmp is None):
        raise ValueError("k_cmp, v_cmp: give both or neither")
    if k_cmp is None:
        if compress == "mean":
            k_cmp = compress_mean(k, block=block, stride=stride)
            v_cmp = compress_mean(v, block=block, stride=stride)
        elif callable(compress):
            k_cmp, v_cmp = compress(k, v, block=block, stride=stride)
        else:
            raise ValueError(f"compress: expected 'mean' or a callable, got {compress!r}")
    want_k, want_v = (b, hkv, c, d), (b, hkv, c, v.shape[3])
    if tuple(k_cmp.shape) != want_k:
        raise ValueError(f"k_cmp: expected shape {list(want_k)}, got {list(k_cmp.shape)}")
    if tuple(v_cmp.shape) != want_v:
        raise ValueError(f"v_cmp: expected shape {list(want_v)}, got {list(v_cmp.shape)}")
    k_cmp, v_cmp = k_cmp.to(f64), v_cmp.to(f64)

    o_cmp, lse_cmp = compressed_attention(q, k_cmp, v_cmp, block=block, stride=stride, scale=scale)
    if block_indices is None:
        with torch.no_grad():
            s = importance_scores(q, k_cmp, block=block, stride=stride, score=score, scale=scale)
            s = map_to_selection_blocks(s, block=block, stride=stride, select_block=select_block, n=n)
            block_indices = select_blocks(
                group_scores(s, hkv), select_block=select_block, top_n=top_n,
                initial=initial, local=local, per=per,
            )
    elif block_indices.dtype != torch.int64:
        raise ValueError(f"block_indices: expected int64, got {block_indices.dtype}")
    elif block_indices.shape != (b, hkv, n, top_n):
        raise ValueError(f"block_indices: expected shape [{b}, {hkv}, {n}, {top_n}], got {list(block_indices.shape)}")
    o_slc, lse_slc = selected_attention(q, k, v, block_indices, select_block=select_block, scale=scale)
    o_win, lse_win = window_attention(q, k, v, window=window, scale=scale)
    o = gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_win
    aux = {
        "block_indices": block_indices,
        "o_cmp": o_cmp, "o_slc": o_slc, "o_win": o_win,
        "lse_cmp": lse_cmp, "lse_slc": lse_slc, "lse_win": lse_win,
        "k_cmp": k_cmp, "v_cmp": v_cmp,
    }
    return o, aux
