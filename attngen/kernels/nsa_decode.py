"""NSA decoding: the spec-independent side of a generated NSA module's nsa_attention_with_kvcache.

Decoding keeps two caches per layer: the token cache (k_cache [B, Hkv, S, D], v_cache
[B, Hkv, S, Dv], as dense decoding) and the compressed cache (k_cmp_cache [B, Hkv, Sc, D],
v_cmp_cache [B, Hkv, Sc, Dv]): entry i summarises tokens i*stride .. i*stride + block - 1 and is
valid once that block is complete, so a cache of L tokens goes with num_compressed(L) compressed
entries. New queries sit at the bottom right: query i of batch b at position q_pos[b] + i with
q_pos[b] = L_b - Nq.

* compressed_attention: the compression branch at those positions (query at position p sees the
  compressed keys i with i*stride + block - 1 <= p). A dense module's attention_with_kvcache cannot
  do it: its bottom-right rule would put the queries at the end of the *compressed* sequence, in
  compressed units, while the visibility rule needs token positions. One program per (row tile,
  batch x KV head): rows are the G query heads of the KV group x Nq queries, so every compressed
  tile is read once per KV head; the tile update is nsa_selected's (_fwd_tile).
* append_compressed_: writes the compressed entries that became complete when a cache grew from
  old to new lengths, by mean pooling or the caller's compressor.
* select_per_block: the per="block" selection for decoding (torch, float32): a query block's
  choice sums the scores of all its positions, so the earlier queries of the current block come
  from a small query cache (q_block_cache [B, Hq, select_block, D], slot p % select_block).
  per="token" selection is nsa_topn.topn_select with q_pos.
"""

from __future__ import annotations

from attngen import runtime as _rt  # first: selects Triton's interpreter when there is no GPU
from attngen.kernels.nsa_selected import _fwd_tile

import torch
import triton
import triton.language as tl

MAX_ROWS = 64  # packed rows (query heads x queries) per program at most
BLOCK_N = 32  # compressed keys per tile


def num_compressed(n: int, block: int, stride: int) -> int:
    """Compressed entries complete in n tokens: max(0, (n - block) // stride + 1)."""
    return max(0, (n - block) // stride + 1)


@triton.jit(do_not_specialize=["N_QR", "ROWS"])
def cmp_decode_kernel(
    Q, K, V, O, LSE, QPOS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    qk_scale, N_QR, ROWS, block, stride,
    H_KV: tl.constexpr, GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, V_HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # program (row tile, batch x KV head); row r: query head i_hk * GROUP + r // N_QR, query r % N_QR
    # at position QPOS[b] + r % N_QR, which sees compressed keys 0 .. visible(position) - 1
    i_m = tl.program_id(0)
    i_bk = tl.program_id(1)
    i_b = i_bk // H_KV
    i_hk = i_bk % H_KV
    o_r = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_r = o_r < ROWS
    o_i = o_r % N_QR
    o_h = tl.where(m_r, i_hk * GROUP + o_r // N_QR, i_hk * GROUP)
    o_pos = tl.load(QPOS + i_b) + o_i
    n_vis = tl.where(o_pos + 1 >= block, (tl.maximum(o_pos + 1 - block, 0)) // stride + 1, 0)  # [BM]
    b_lim = tl.where(m_r, n_vis - 1, -1)  # last visible compressed key of each row
    hi = tl.max(tl.where(m_r, n_vis, 0), 0)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    p_q = Q + i_b.to(tl.int64) * stride_qb + o_h.to(tl.int64)[:, None] * stride_qh + o_i[:, None] * stride_qm + o_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_r[:, None] & (o_d[None, :] < HEAD_DIM), other=0.0)
    if DOT_UPCAST:
        b_q = b_q.to(tl.float32)
    p_k0 = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    p_v0 = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        start_s = hi * 0 + start_n  # a tensor scalar (the interpreter's loop index is a Python int)
        b_m, b_l, b_acc = _fwd_tile(
            b_q, b_m, b_l, b_acc, b_lim, p_k0, p_v0, start_s, hi - start_s, qk_scale,
            stride_kn, stride_kd, stride_vn, stride_vd,
            HEAD_DIM, V_HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_DV, DOT_UPCAST, DOT_PRECISION,
        )
    m_any = b_l > 0.0
    b_l_use = tl.where(m_any, b_l, 1.0)
    b_o = tl.where(m_any[:, None], b_acc / b_l_use[:, None], 0.0)
    b_lse = tl.where(m_any, (b_m + tl.math.log2(b_l_use)) * 0.6931471805599453, float("-inf"))
    p_o = O + i_b.to(tl.int64) * stride_ob + o_h.to(tl.int64)[:, None] * stride_oh + o_i[:, None] * stride_om + o_dv[None, :] * stride_od
    tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_r[:, None] & (o_dv[None, :] < V_HEAD_DIM))
    tl.store(LSE + i_b.to(tl.int64) * stride_lb + o_h.to(tl.int64) * stride_lh + o_i * stride_lm, b_lse, mask=m_r)


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@torch.no_grad()
def compressed_attention(q, k_cmp, v_cmp, q_pos, *, block: int, stride: int, scale: float):
    """Compression branch of decoding (arguments checked by the caller): q [B, Hq, Nq, D] with row i
    of batch b at position q_pos[b] + i (q_pos int32 [B]); k_cmp [B, Hkv, Sc, D], v_cmp
    [B, Hkv, Sc, Dv] holding at least the entries complete at the last position. Returns o
    [B, Hq, Nq, Dv] in q's dtype and lse float32 [B, Hq, Nq] (o = 0, lse = -inf for a row with no
    complete block). Forward only."""
    b, hq, n_q, d = q.shape
    hkv, dv = k_cmp.shape[1], v_cmp.shape[3]
    o = _rt.empty((b, hq, n_q, dv), dtype=q.dtype, device=q.device)
    lse = _rt.empty((b, hq, n_q), dtype=torch.float32, device=q.device)
    if b == 0 or n_q == 0:
        return o, lse
    group = hq // hkv
    rows = group * n_q
    block_m = min(max(16, _pow2(rows)), MAX_ROWS)
    cmp_decode_kernel[(triton.cdiv(rows, block_m), b * hkv)](
        q, k_cmp, v_cmp, o, lse, q_pos,
        *q.stride(), *k_cmp.stride(), *v_cmp.stride(), *o.stride(), *lse.stride(),
        scale * 1.4426950408889634, n_q, rows, block, stride,
        H_KV=hkv, GROUP=group, HEAD_DIM=d, V_HEAD_DIM=dv,
        BLOCK_D=max(16, _pow2(d)), BLOCK_DV=max(16, _pow2(dv)), BLOCK_M=block_m, BLOCK_N=BLOCK_N,
        DOT_UPCAST=_rt.dot_upcast(q.dtype), DOT_PRECISION=_rt.dot_precision(q.dtype), num_warps=4,
    )
    return o, lse


def _mean(x: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    return x.unfold(2, block, stride).float().mean(dim=-1).to(x.dtype)  # [B, H, C, D]


@torch.no_grad()
def append_compressed_(k_cache, v_cache, k_cmp_cache, v_cmp_cache, old_lengths, new_lengths, *, block: int,
                       stride: int, compress=None) -> None:
    """Write into k_cmp_cache / v_cmp_cache (in place) the compressed entries that complete when
    batch b's token cache grows from old_lengths[b] to new_lengths[b] tokens (lists of ints; the
    token cache already holds the new tokens): entries num_compressed(old) .. num_compressed(new) - 1.
    compress: None for mean pooling, else compress(k, v) -> (k_cmp, v_cmp) mapping token windows
    [1, Hkv, n, D] to [1, Hkv, num_compressed(n), D] (e.g. attngen.layers.nsa compressors:
    ``lambda k, v: (layer.k_compress(k), layer.v_compress(v))``). Arguments checked by the caller."""
    for i, (old, new) in enumerate(zip(old_lengths, new_lengths)):
        c0, c1 = num_compressed(old, block, stride), num_compressed(new, block, stride)
        if c1 <= c0:
            continue
        lo, hi = c0 * stride, (c1 - 1) * stride + block  # the tokens of entries c0 .. c1 - 1
        k_win, v_win = k_cache[i:i + 1, :, lo:hi], v_cache[i:i + 1, :, lo:hi]
        if compress is None:
            k_new, v_new = _mean(k_win, block, stride), _mean(v_win, block, stride)
        else:
            k_new, v_new = compress(k_win, v_win)
            want = (1, k_cache.shape[1], c1 - c0)
            for name, t, cache in (("k", k_new, k_cmp_cache), ("v", v_new, v_cmp_cache)):
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != (*want, cache.shape[3]):
                    got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"compress: returned {name}_cmp of shape {got}; expected {(*want, cache.shape[3])}")
        k_cmp_cache[i:i + 1, :, c0:c1] = k_new.to(k_cmp_cache.dtype)
        v_cmp_cache[i:i + 1, :, c0:c1] = v_new.to(v_cmp_cache.dtype)


def _select_rows(s: torch.Tensor, own: int, *, top_n: int, initial: int, local: int) -> torch.Tensor:
    """Scores s [H, S] (S = own + 1 eligible blocks) -> ascending indices [H, top_n], -1 padded;
    the first `initial` and the `local` latest blocks forced, ties to the lower index."""
    nb = s.shape[-1]
    j = torch.arange(nb, device=s.device)
    forced = (j < initial) | (j > own - local)
    s = torch.where(forced, torch.full_like(s, float("inf")), s)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :top_n]
    out = torch.sort(order, dim=-1).values
    if out.shape[-1] < top_n:
        out = torch.cat([out, out.new_full((*out.shape[:-1], top_n - out.shape[-1]), -1)], dim=-1)
    return out


@torch.no_grad()
def select_per_block(q, q_block_cache, k_cmp, lengths, *, block: int, stride: int, select_block: int,
                     top_n: int, initial: int, local: int, score: str, scale: float) -> torch.Tensor:
    """per="block" selection of decoding (float32, torch; a loop over the batch).

    q [B, Hq, Nq, D] at positions L_b - Nq .. L_b - 1 (lengths: the L_b); q_block_cache
    [B, Hq, select_block, D] holds the queries of the earlier positions of the query block of
    position L_b - Nq (slot p % select_block) and receives the new queries of the last block.
    A query block's choice ranks the selection blocks by the group scores summed over its positions
    up to L_b - 1 (the reference's rule on the sequence of L_b tokens). Returns block indices int64 [B, Hkv, Nq, top_n]."""
    b, hq, n_q, d = q.shape
    hkv = k_cmp.shape[1]
    group = hq // hkv
    out = torch.full((b, hkv, n_q, top_n), -1, dtype=torch.int64, device=q.device)
    pieces, per_sel = block // stride, select_block // stride
    for i, length in enumerate(lengths):
        p0 = length - n_q
        first = max(p0, 0)
        s0 = (first // select_block) * select_block
        past = q_block_cache[i:i + 1, :, : first - s0]  # positions s0 .. first - 1
        qq = torch.cat([past, q[i:i + 1, :, first - p0:]], dim=2)  # positions s0 .. length - 1
        m = qq.shape[2]
        if m == 0:
            continue
        pos = torch.arange(s0, length, device=q.device)
        c = num_compressed(length, block, stride)
        kc = k_cmp[i, :, :c].float().repeat_interleave(group, dim=0)  # [Hq, C, D]
        dots = torch.matmul(qq[0].float(), kc.transpose(-1, -2))  # [Hq, m, C]
        vis = torch.arange(c, device=q.device).view(1, c) * stride + block - 1 <= pos.view(m, 1)  # [m, C]
        if score == "dot":
            sc = dots * scale
        elif score == "cosine":
            norms = qq[0].float().norm(dim=-1, keepdim=True) * kc.norm(dim=-1).unsqueeze(-2)
            sc = torch.where(norms > 0, dots / norms.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(dots))
        else:
            q_at = torch.tensor([s0], dtype=torch.int32, device=q.device)
            lse = compressed_attention(qq, k_cmp[i:i + 1], k_cmp[i:i + 1], q_at, block=block, stride=stride, scale=scale)[1][0]
            lse = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)
            sc = torch.exp(dots * scale - lse.unsqueeze(-1))
        sc = torch.where(vis, sc, torch.zeros_like(sc))
        nb = (length - 1) // select_block + 1
        sel = sc.new_zeros(hq, m, nb + pieces)
        j = torch.arange(c, device=q.device)
        for a in range(pieces):  # compressed entry i adds its score to the block of each piece i + a
            sel.index_add_(2, (j + a) // per_sel, sc)
        sel = sel[..., :nb].reshape(hkv, group, m, nb).sum(dim=1)  # [Hkv, m, S]
        qblk = pos // select_block
        for blk in torch.unique(qblk[pos >= first]).tolist():
            rows = qblk == blk
            choice = _select_rows(sel[:, rows, : blk + 1].sum(dim=1), blk, top_n=top_n, initial=initial, local=local)
            dst = (torch.arange(n_q, device=q.device) + p0) // select_block == blk
            dst &= torch.arange(n_q, device=q.device) + p0 >= 0
            out[i, :, dst] = choice.unsqueeze(1)
        # the last block's new queries go into the query cache
        keep = torch.arange(first, length, device=q.device)
        keep = keep[keep >= ((length - 1) // select_block) * select_block]
        if keep.numel():
            q_block_cache[i, :, keep % select_block] = q[i, :, keep - p0]
    return out


def check_nsa_kvcache(fn: str, q, gates, k_cmp_cache, v_cmp_cache, q_block_cache, lengths, *, kv_heads: int,
                      head_dim: int, v_head_dim: int, block: int, stride: int, select_block: int, per: str) -> None:
    """The NSA-only arguments of nsa_attention_with_kvcache (q and the token cache checked by
    attngen.kernels.kvcache.check_kvcache): gates [B, Hq, Nq, 3], the compressed caches
    [B, Hkv, Sc, D/Dv] long enough for num_compressed(L_b) entries, and with per="block" the query
    cache [B, Hq, select_block, D]. All in q's dtype and on q's device. ValueError naming them."""
    b, hq, n_q, _ = q.shape
    wanted = [("gates", gates, (b, hq, n_q, 3))]
    for name, t, d in (("k_cmp_cache", k_cmp_cache, head_dim), ("v_cmp_cache", v_cmp_cache, v_head_dim)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be a 4-D tensor [B, Hkv, Sc, D], got {getattr(t, 'shape', type(t).__name__)}")
        wanted.append((name, t, (b, kv_heads, k_cmp_cache.shape[2], d)))
    if per == "block":
        if q_block_cache is None:
            raise ValueError(f"{fn}: q_block_cache is required (per='block' selection sums the scores of the query block's earlier positions)")
        wanted.append(("q_block_cache", q_block_cache, (b, hq, select_block, head_dim)))
    elif q_block_cache is not None:
        raise ValueError(f"{fn}: q_block_cache is only used with per='block' selection; this module selects per token")
    _rt.check_like_q(fn, q, wanted)
    cap = k_cmp_cache.shape[2]
    for i, n in enumerate(lengths):
        need = num_compressed(n, block, stride)
        if need > cap:
            raise ValueError(f"{fn}: k_cmp_cache holds {cap} compressed entries but batch {i} needs {need} "
                             f"(cache_seqlens[{i}] + Nnew = {n} tokens): the compressed cache is too small")
