"""NSA selected-block attention: forward, dQ and dK/dV kernels, and their autograd wrapper.

selected_attention(q, k, v, block_idx, select_block, scale) attends each query to the blocks its
index list names. The block length, index lists and scale are arguments, so one copy serves every
NSA spec: a generated NSA module calls it with its spec's values. The float64 oracle is
attngen.reference.nsa.selected_attention.

Query t of KV head hk sees key s iff s // SB is one of block_idx[b, hk, t, :] (-1 entries skipped)
and s <= t; the G query heads of a KV head share its index list.

Forward and dQ (group-centric, as in the NSA paper): one program per (batch, KV head, pack of
PACK consecutive positions). Its rows are the PACK x G (position, query head) pairs, so a loaded
K/V tile feeds every query head of the group at once; PACK = max(16, pow2(G)) // G fills the 16
rows tl.dot needs when G is small. The program walks the union of the PACK index lists, each
block once, with a per-row mask "this row's position selected it and s <= t"; the union (sorted,
duplicates and blocks wholly in the pack's future dropped) is built in torch before the launch,
so the kernel's loop does no de-duplication and skips nothing at run time.
dK/dV (deterministic, no atomics): the index lists are inverted in torch (positions sorted by the
block they selected, offsets per (batch, KV head, block)); one program per (batch, KV head, block,
key tile) walks the (position, head) pairs that selected its block and owns its keys' gradients.
Keys that no position selected get exactly zero.

Kernels (what `attngen report` compiles): fwd_kernel, bwd_dq_kernel, bwd_dkdv_kernel, launched
with the fixed tiles of _tiles (no autotuning).
"""

from attngen import runtime as _rt  # first: selects Triton's interpreter when there is no GPU

import torch
import triton
import triton.language as tl


def _pow2(x):
    return 1 << max(0, int(x) - 1).bit_length()


def _tiles(group, head_dim, v_head_dim, select_block):
    """Tile sizes and warps by a fixed rule (no autotuning).

    Rows: BLOCK_R = max(16, pow2(G)), PACK = BLOCK_R // G positions per program (G < 16 packs
    positions, G >= 16 pads the heads; rounding PACK down keeps 16 rows where ceil(16 / G)
    positions would need 32, e.g. G = 3). Head dims are padded to powers of two (load masks).
    Key tile BLOCK_N = pow2(select_block), at least 16, at most 64, halved when a padded head dim
    exceeds 128 and halved again for head dims that are not multiples of 16 above 64 (their row
    loads are not vectorised, so they take more registers). dK/dV row tile 32.
    Warps: 4, or 8 for "wide" head dims (padded above 64, or not multiples of 16) in the forward and
    dK/dV, and in dQ only with 32 rows (G > 16), padded dims summing past 384, or unaligned dims.
    Compiled ahead of time for sm_90 this spills nowhere for head dims that are multiples of 16
    (up to 256) or below 128; other choices did (forward, 4 warps, G = 3, 128; dQ, 4 warps,
    32 rows, 192; dQ, 8 warps, 16 rows, 192 / 128). Under the interpreter the key tile is
    always 32, so tests see blocks of 64 keys take two tiles and blocks of 16 fill half of one.
    """
    block_r = max(16, _pow2(group))
    block_d, block_dv = max(16, _pow2(head_dim)), max(16, _pow2(v_head_dim))
    widest = max(block_d, block_dv)
    unaligned = head_dim % 16 != 0 or v_head_dim % 16 != 0
    wide = widest > 64 or unaligned
    block_n = max(16, min(_pow2(select_block), 64 >> (widest > 128) >> (unaligned and widest > 64)))
    if _rt.INTERPRET:
        block_n = 32
    return dict(
        PACK=block_r // group, BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_N=block_n, BLOCK_M=32,
        WARPS_FWD=8 if wide else 4,
        WARPS_DQ=8 if wide and (block_r > 16 or block_d + block_dv > 384 or unaligned) else 4,
        WARPS_DKDV=8 if wide else 4,
    )


@triton.jit
def _rows(
    IDX, i_b, i_hk, i_p, N_Q,
    H_KV: tl.constexpr, GROUP: tl.constexpr, PACK: tl.constexpr, N_SEL: tl.constexpr,
    BLOCK_SEL: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """The program's rows (position, query head): position, validity, query head, each row's
    index list [BR, BSEL] (-1 for padding and invalid rows), and the pack's last position."""
    o_r = tl.arange(0, BLOCK_R)
    o_rp = o_r // GROUP
    o_t = i_p * PACK + o_rp
    m_r = (o_rp < PACK) & (o_t < N_Q)
    o_h = i_hk * GROUP + o_r % GROUP
    o_j = tl.arange(0, BLOCK_SEL)
    p_idx = IDX + (i_b * H_KV + i_hk).to(tl.int64) * N_Q * N_SEL
    b_ridx = tl.load(
        p_idx + o_t.to(tl.int64)[:, None] * N_SEL + o_j[None, :],
        mask=m_r[:, None] & (o_j[None, :] < N_SEL), other=-1,
    )  # [BR, BSEL]
    t_last = tl.minimum(i_p * PACK + PACK, N_Q) - 1
    return o_t, m_r, o_h, b_ridx, t_last


@triton.jit
def _fwd_tile(
    b_q, b_m, b_l, b_acc, b_lim, p_k0, p_v0, start_s, n_in, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd,
    HEAD_DIM: tl.constexpr, V_HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # keys start_s + [0, BLOCK_N); the first n_in of them exist and lie in the block; row r sees
    # key s iff s <= b_lim[r] (b_lim: -1 for rows that did not select the block, else min(t, last key))
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_s = o_n < n_in
    p_kt = p_k0 + start_s.to(tl.int64) * stride_kn + o_n[None, :] * stride_kn + o_d[:, None] * stride_kd
    p_v = p_v0 + start_s.to(tl.int64) * stride_vn + o_n[:, None] * stride_vn + o_dv[None, :] * stride_vd
    b_kt = tl.load(p_kt, mask=m_s[None, :] & (o_d[:, None] < HEAD_DIM), other=0.0)  # [BD, BN]
    b_v = tl.load(p_v, mask=m_s[:, None] & (o_dv[None, :] < V_HEAD_DIM), other=0.0)  # [BN, BDV]
    if DOT_UPCAST:
        b_kt = b_kt.to(tl.float32)
    # -- scores in base-2 units, masked by selection and causality per row
    b_s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION) * qk_scale  # [BR, BN]
    b_s = tl.where(o_n[None, :] <= (b_lim - start_s)[:, None], b_s, float("-inf"))
    # -- update running max m, denominator l and accumulator
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    b_m_use = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)  # rows with nothing visible yet
    b_p = tl.math.exp2(b_s - b_m_use[:, None])
    b_alpha = tl.math.exp2(b_m - b_m_use)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_p = b_p.to(p_v0.dtype.element_ty)
    if DOT_UPCAST:
        b_p = b_p.to(tl.float32)
        b_v = b_v.to(tl.float32)
    b_acc = tl.dot(b_p, b_v, b_acc * b_alpha[:, None], input_precision=DOT_PRECISION)
    return b_m_new, b_l, b_acc


@triton.jit(do_not_specialize=["N_Q", "N_K", "N_PACKS"])
def fwd_kernel(
    Q, K, V, IDX, UNION, COUNT, O, LSE, QPOS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    qk_scale, N_Q, N_K, N_PACKS,
    H: tl.constexpr, H_KV: tl.constexpr, GROUP: tl.constexpr, PACK: tl.constexpr,
    SB: tl.constexpr, N_SEL: tl.constexpr, BLOCK_SEL: tl.constexpr,
    HEAD_DIM: tl.constexpr, V_HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_QPOS: tl.constexpr,
):
    # one program per (pack of PACK positions, batch x KV head); rows = (position, query head) pairs;
    # row t sits at position t, or QPOS[b] + t with HAS_QPOS (decoding)
    i_p = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H_KV
    i_hk = i_bh % H_KV
    o_t, m_r, o_h, b_ridx, t_last = _rows(IDX, i_b, i_hk, i_p, N_Q, H_KV, GROUP, PACK, N_SEL, BLOCK_SEL, BLOCK_R)
    if HAS_QPOS:
        pos0 = tl.load(QPOS + i_b)
    else:
        pos0 = 0
    o_pos = pos0 + o_t
    t_last_pos = pos0 + t_last
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)

    p_q = Q + i_b.to(tl.int64) * stride_qb + o_h.to(tl.int64) * stride_qh + o_t.to(tl.int64) * stride_qm  # [BR]
    b_q = tl.load(p_q[:, None] + o_d[None, :] * stride_qd, mask=m_r[:, None] & (o_d[None, :] < HEAD_DIM), other=0.0)  # [BR, BD]
    if DOT_UPCAST:
        b_q = b_q.to(tl.float32)
    p_k0 = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    p_v0 = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh

    b_m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_R], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    # -- the union of the pack's index lists, each block once, ascending
    p_u = UNION + (i_bh.to(tl.int64) * N_PACKS + i_p) * (PACK * N_SEL)
    for u in range(0, tl.load(COUNT + i_bh.to(tl.int64) * N_PACKS + i_p)):
        blk = tl.load(p_u + u)
        s_end = tl.minimum(blk * SB + SB, N_K)  # one past the block's last key
        if HAS_QPOS:  # a cache: keys past the pack's last position may hold anything, never load them
            s_end = tl.minimum(s_end, t_last_pos + 1)
        m_sel = tl.sum((b_ridx == blk).to(tl.int32), 1) > 0  # [BR] rows whose position selected blk
        b_lim = tl.where(m_sel, tl.minimum(o_pos, s_end - 1), -1)
        for in_blk in range(0, SB, BLOCK_N):
            start_s = blk * SB + in_blk
            if start_s <= t_last_pos:  # a tile wholly in the pack's future is skipped
                b_m, b_l, b_acc = _fwd_tile(
                    b_q, b_m, b_l, b_acc, b_lim, p_k0, p_v0, start_s, s_end - start_s, qk_scale,
                    stride_kn, stride_kd, stride_vn, stride_vd,
                    HEAD_DIM, V_HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_DV, DOT_UPCAST, DOT_PRECISION,
                )

    # -- rows with no visible key: o = 0, lse = -inf
    m_any = b_l > 0.0
    b_o = b_acc / tl.where(m_any, b_l, 1.0)[:, None]
    b_lse = tl.where(m_any, (b_m + tl.math.log2(tl.where(m_any, b_l, 1.0))) * 0.6931471805599453, float("-inf"))
    p_o = O + i_b.to(tl.int64) * stride_ob + o_h.to(tl.int64) * stride_oh + o_t.to(tl.int64) * stride_om
    tl.store(p_o[:, None] + o_dv[None, :] * stride_od, b_o.to(O.dtype.element_ty), mask=m_r[:, None] & (o_dv[None, :] < V_HEAD_DIM))
    tl.store(LSE + (i_b * H + o_h).to(tl.int64) * N_Q + o_t, b_lse, mask=m_r)


@triton.jit
def _dq_tile(
    b_dq, b_q, b_do, b_lse, b_delta, b_lim, p_k0, p_v0, start_s, n_in, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd,
    HEAD_DIM: tl.constexpr, V_HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_s = o_n[None, :] < n_in
    p_kt = p_k0 + start_s.to(tl.int64) * stride_kn + o_n[None, :] * stride_kn + o_d[:, None] * stride_kd
    p_vt = p_v0 + start_s.to(tl.int64) * stride_vn + o_n[None, :] * stride_vn + o_dv[:, None] * stride_vd
    b_kt = tl.load(p_kt, mask=m_s & (o_d[:, None] < HEAD_DIM), other=0.0)  # [BD, BN]
    b_vt = tl.load(p_vt, mask=m_s & (o_dv[:, None] < V_HEAD_DIM), other=0.0)  # [BDV, BN]
    if DOT_UPCAST:
        b_kt = b_kt.to(tl.float32)
        b_vt = b_vt.to(tl.float32)
    b_s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION) * qk_scale  # [BR, BN]
    b_p = tl.math.exp2(b_s - b_lse[:, None])
    b_p = tl.where(o_n[None, :] <= (b_lim - start_s)[:, None], b_p, 0.0)
    b_dp = tl.dot(b_do, b_vt, input_precision=DOT_PRECISION)  # [BR, BN]
    b_ds = (b_p * (b_dp - b_delta[:, None])).to(p_k0.dtype.element_ty)
    if DOT_UPCAST:
        b_ds = b_ds.to(tl.float32)
    b_dq += tl.dot(b_ds, tl.trans(b_kt), input_precision=DOT_PRECISION)  # [BR, BD]
    return b_dq


@triton.jit(do_not_specialize=["N_Q", "N_K", "N_PACKS"])
def bwd_dq_kernel(
    Q, K, V, O, DO, IDX, UNION, COUNT, LSE, DLSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    qk_scale, sm_scale, N_Q, N_K, N_PACKS,
    H: tl.constexpr, H_KV: tl.constexpr, GROUP: tl.constexpr, PACK: tl.constexpr,
    SB: tl.constexpr, N_SEL: tl.constexpr, BLOCK_SEL: tl.constexpr,
    HEAD_DIM: tl.constexpr, V_HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # the forward's schedule; also writes delta = rowsum(dO * O) - dLSE for the dK/dV kernel
    i_p = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H_KV
    i_hk = i_bh % H_KV
    o_t, m_r, o_h, b_ridx, t_last = _rows(IDX, i_b, i_hk, i_p, N_Q, H_KV, GROUP, PACK, N_SEL, BLOCK_SEL, BLOCK_R)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_q = m_r[:, None] & (o_d[None, :] < HEAD_DIM)
    m_o = m_r[:, None] & (o_dv[None, :] < V_HEAD_DIM)

    p_q = Q + i_b.to(tl.int64) * stride_qb + o_h.to(tl.int64) * stride_qh + o_t.to(tl.int64) * stride_qm
    p_o = O + i_b.to(tl.int64) * stride_ob + o_h.to(tl.int64) * stride_oh + o_t.to(tl.int64) * stride_om
    p_do = DO + i_b.to(tl.int64) * stride_dob + o_h.to(tl.int64) * stride_doh + o_t.to(tl.int64) * stride_dom
    b_q = tl.load(p_q[:, None] + o_d[None, :] * stride_qd, mask=m_q, other=0.0)  # [BR, BD]
    b_do = tl.load(p_do[:, None] + o_dv[None, :] * stride_dod, mask=m_o, other=0.0)  # [BR, BDV]
    b_o = tl.load(p_o[:, None] + o_dv[None, :] * stride_od, mask=m_o, other=0.0)  # [BR, BDV]
    o_lse = (i_b * H + o_h).to(tl.int64) * N_Q + o_t
    b_dlse = tl.load(DLSE + o_lse, mask=m_r, other=0.0)
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1) - b_dlse
    tl.store(DELTA + o_lse, b_delta, mask=m_r)
    # rows past the end and rows that see no key take lse = +inf, so their p is exactly 0
    b_lse = tl.load(LSE + o_lse, mask=m_r, other=float("inf"))
    b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse) * 1.4426950408889634  # base 2
    if DOT_UPCAST:
        b_q = b_q.to(tl.float32)
        b_do = b_do.to(tl.float32)
    p_k0 = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    p_v0 = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh

    b_dq = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    p_u = UNION + (i_bh.to(tl.int64) * N_PACKS + i_p) * (PACK * N_SEL)
    for u in range(0, tl.load(COUNT + i_bh.to(tl.int64) * N_PACKS + i_p)):
        blk = tl.load(p_u + u)
        s_end = tl.minimum(blk * SB + SB, N_K)
        m_sel = tl.sum((b_ridx == blk).to(tl.int32), 1) > 0
        b_lim = tl.where(m_sel, tl.minimum(o_t, s_end - 1), -1)
        for in_blk in range(0, SB, BLOCK_N):
            start_s = blk * SB + in_blk
            if start_s <= t_last:
                b_dq = _dq_tile(
                    b_dq, b_q, b_do, b_lse, b_delta, b_lim, p_k0, p_v0, start_s, s_end - start_s, qk_scale,
                    stride_kn, stride_kd, stride_vn, stride_vd,
                    HEAD_DIM, V_HEAD_DIM, BLOCK_N, BLOCK_D, BLOCK_DV, DOT_UPCAST, DOT_PRECISION,
                )
    p_dq = DQ + i_b.to(tl.int64) * stride_dqb + o_h.to(tl.int64) * stride_dqh + o_t.to(tl.int64) * stride_dqm
    tl.store(p_dq[:, None] + o_d[None, :] * stride_dqd, (b_dq * sm_scale).to(DQ.dtype.element_ty), mask=m_q)


@triton.jit(do_not_specialize=["N_Q", "N_K", "N_BLK"])
def bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, POS, OFFS, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    qk_scale, sm_scale, N_Q, N_K, N_BLK,
    H: tl.constexpr, H_KV: tl.constexpr, GROUP: tl.constexpr, SB: tl.constexpr, TILES: tl.constexpr,
    HEAD_DIM: tl.constexpr, V_HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # one program per (key tile of a selection block, batch x KV head): rows are the (position,
    # query head) pairs whose position selected the block, GROUP consecutive rows per position
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H_KV
    i_hk = i_bh % H_KV
    i_blk = i_n // TILES
    in_blk = (i_n % TILES) * BLOCK_N
    o_n = tl.arange(0, BLOCK_N)
    o_s = i_blk * SB + in_blk + o_n
    m_s = (in_blk + o_n < SB) & (o_s < N_K)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    m_k = m_s[:, None] & (o_d[None, :] < HEAD_DIM)
    m_v = m_s[:, None] & (o_dv[None, :] < V_HEAD_DIM)
    p_k = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh + o_s.to(tl.int64) * stride_kn
    p_v = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh + o_s.to(tl.int64) * stride_vn
    b_k = tl.load(p_k[:, None] + o_d[None, :] * stride_kd, mask=m_k, other=0.0)  # [BN, BD]
    b_v = tl.load(p_v[:, None] + o_dv[None, :] * stride_vd, mask=m_v, other=0.0)  # [BN, BDV]
    if DOT_UPCAST:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    seg = i_bh.to(tl.int64) * N_BLK + i_blk
    e_lo = tl.load(OFFS + seg) * GROUP
    e_hi = tl.load(OFFS + seg + 1) * GROUP
    for e0 in range(e_lo, e_hi, BLOCK_M):
        o_e = e0 + tl.arange(0, BLOCK_M)
        m_e = o_e < e_hi
        o_t = tl.load(POS + o_e // GROUP, mask=m_e, other=0)
        o_h = i_hk * GROUP + (o_e % GROUP).to(tl.int32)
        p_q = Q + i_b.to(tl.int64) * stride_qb + o_h.to(tl.int64) * stride_qh + o_t.to(tl.int64) * stride_qm
        p_do = DO + i_b.to(tl.int64) * stride_dob + o_h.to(tl.int64) * stride_doh + o_t.to(tl.int64) * stride_dom
        b_qt = tl.load(p_q[None, :] + o_d[:, None] * stride_qd, mask=m_e[None, :] & (o_d[:, None] < HEAD_DIM), other=0.0)  # [BD, BM]
        b_do = tl.load(p_do[:, None] + o_dv[None, :] * stride_dod, mask=m_e[:, None] & (o_dv[None, :] < V_HEAD_DIM), other=0.0)  # [BM, BDV]
        o_lse = (i_b * H + o_h).to(tl.int64) * N_Q + o_t
        b_lse = tl.load(LSE + o_lse, mask=m_e, other=float("inf"))
        b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse) * 1.4426950408889634  # base 2
        b_delta = tl.load(DELTA + o_lse, mask=m_e, other=0.0)
        if DOT_UPCAST:
            b_qt = b_qt.to(tl.float32)
            b_do = b_do.to(tl.float32)
        b_st = tl.dot(b_k, b_qt, input_precision=DOT_PRECISION) * qk_scale  # [BN, BM]
        b_pt = tl.math.exp2(b_st - b_lse[None, :])
        b_pt = tl.where(m_s[:, None] & m_e[None, :] & (o_s[:, None] <= o_t[None, :]), b_pt, 0.0)
        b_pt_lo = b_pt.to(DO.dtype.element_ty)
        if DOT_UPCAST:
            b_pt_lo = b_pt_lo.to(tl.float32)
        b_dv += tl.dot(b_pt_lo, b_do, input_precision=DOT_PRECISION)  # [BN, BDV]
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)  # [BN, BM]
        b_dst = (b_pt * (b_dpt - b_delta[None, :])).to(Q.dtype.element_ty)
        if DOT_UPCAST:
            b_dst = b_dst.to(tl.float32)
        b_dk += tl.dot(b_dst, tl.trans(b_qt), input_precision=DOT_PRECISION)  # [BN, BD]

    p_dk = DK + i_b.to(tl.int64) * stride_dkb + i_hk.to(tl.int64) * stride_dkh + o_s.to(tl.int64) * stride_dkn
    p_dv = DV + i_b.to(tl.int64) * stride_dvb + i_hk.to(tl.int64) * stride_dvh + o_s.to(tl.int64) * stride_dvn
    tl.store(p_dk[:, None] + o_d[None, :] * stride_dkd, (b_dk * sm_scale).to(DK.dtype.element_ty), mask=m_k)
    tl.store(p_dv[:, None] + o_dv[None, :] * stride_dvd, b_dv.to(DV.dtype.element_ty), mask=m_v)


def _check(q, k, v, block_idx, select_block, scale):
    """ValueError naming the argument for anything the kernels cannot take."""
    for name, t in (("q", q), ("k", k), ("v", v), ("block_idx", block_idx)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"selected attention: {name} must be a 4-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"selected attention: q, k, v must share one of float16, bfloat16, float32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if block_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"selected attention: block_idx must be int32 or int64, got {block_idx.dtype}")
    if len({t.device for t in (q, k, v, block_idx)}) != 1:
        raise ValueError("selected attention: q, k, v, block_idx must be on one device")
    b, hq, n, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"selected attention: k has shape {list(k.shape)}; expected [{b}, Hkv, Nk, {d}]")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"selected attention: k has {hkv} heads, which do not divide q's {hq}")
    if tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(f"selected attention: v has shape {list(v.shape)}; expected [{b}, {hkv}, {nk}, Dv]")
    if tuple(block_idx.shape[:3]) != (b, hkv, n):
        raise ValueError(f"selected attention: block_idx has shape {list(block_idx.shape)}; expected [{b}, {hkv}, {n}, top_n]")
    if isinstance(select_block, bool) or not isinstance(select_block, int) or select_block < 1:
        raise ValueError(f"selected attention: select_block must be a positive int, got {select_block!r}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale != scale or abs(scale) == float("inf"):
        raise ValueError(f"selected attention: scale must be a finite float, got {scale!r}")
    if block_idx.numel():
        lo, hi = torch.aminmax(block_idx)
        nb = -(-nk // select_block)
        if int(lo) < -1 or int(hi) >= nb:
            raise ValueError(f"selected attention: block_idx entries must be -1 or in 0..{nb - 1} (Nk = {nk}, select_block = {select_block})")


def _union(idx, select_block, pack, q_pos=None):
    """The blocks each pack of `pack` consecutive positions visits: (union int32 [B, Hkv, P, pack * n],
    count int32 [B, Hkv, P]) with P = ceil(N / pack). Entries union[..., :count] are the distinct
    blocks of the pack's index lists, ascending, without blocks wholly after the pack's last
    position (no key of them is visible); the rest is -1. Two sorts of B * Hkv * N * n entries.
    q_pos int32 [B]: row t of batch b sits at position q_pos[b] + t."""
    b, hkv, n, top = idx.shape
    n_packs = triton.cdiv(n, pack)
    u = idx.to(torch.int64)
    if n_packs * pack != n:
        u = torch.cat([u, u.new_full((b, hkv, n_packs * pack - n, top), -1)], dim=2)
    u = u.view(b, hkv, n_packs, pack * top)
    t_last = (torch.arange(1, n_packs + 1, device=idx.device) * pack).clamp(max=n).view(1, 1, n_packs, 1) - 1
    if q_pos is not None:
        t_last = t_last + q_pos.to(torch.int64).view(b, 1, 1, 1)
    big = 1 << 62
    u = torch.where((u < 0) | (u * select_block > t_last), big, u)
    u = torch.sort(u, dim=3).values
    dup = torch.zeros_like(u, dtype=torch.bool)
    dup[..., 1:] = u[..., 1:] == u[..., :-1]
    u = torch.sort(torch.where(dup, big, u), dim=3).values
    count = (u < big).sum(dim=3).to(torch.int32)
    return torch.where(u == big, -1, u).to(torch.int32).contiguous(), count.contiguous()


def _forward(q, k, v, idx, select_block, scale, q_pos=None):
    """idx: int32 [B, Hkv, N, n] contiguous. Returns o [B, Hq, N, Dv] (q's dtype), lse float32
    [B, Hq, N], and the packs' block lists (see _union) for the dQ kernel. q_pos: see
    selected_attention."""
    b, hq, n, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    o = _rt.empty_like_layout(q, (b, hq, n, dv), dtype=q.dtype)
    lse = _rt.empty((b, hq, n), dtype=torch.float32, device=q.device)
    if b == 0 or n == 0 or nk == 0 or idx.shape[3] == 0:
        return o.zero_(), lse.fill_(float("-inf")), None
    c = _tiles(hq // hkv, d, dv, select_block)
    union, count = _union(idx, select_block, c["PACK"], q_pos)
    fwd_kernel[(union.shape[2], b * hkv)](
        q, k, v, idx, union, count, o, lse, count if q_pos is None else q_pos,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        scale * 1.4426950408889634, n, nk, union.shape[2],
        H=hq, H_KV=hkv, GROUP=hq // hkv, PACK=c["PACK"],
        SB=select_block, N_SEL=idx.shape[3], BLOCK_SEL=_pow2(idx.shape[3]),
        HEAD_DIM=d, V_HEAD_DIM=dv, BLOCK_D=c["BLOCK_D"], BLOCK_DV=c["BLOCK_DV"],
        BLOCK_R=c["BLOCK_R"], BLOCK_N=c["BLOCK_N"],
        DOT_UPCAST=_rt.dot_upcast(q.dtype), DOT_PRECISION=_rt.dot_precision(q.dtype),
        HAS_QPOS=q_pos is not None, num_warps=c["WARPS_FWD"],
    )
    return o, lse, (union, count)


def _invert(idx, select_block, n_blocks):
    """Which positions selected each block: (pos int32 [M], offs int64 [B * Hkv * n_blocks + 1]).

    The positions that selected block j of (b, hk) are pos[offs[s]:offs[s + 1]] with
    s = (b * Hkv + hk) * n_blocks + j, ascending. Duplicate entries of a list count once; blocks
    wholly after the position (no key visible) are left out. O(M log M) for M = B * Hkv * N * n."""
    b, hkv, n, top = idx.shape
    blk = torch.sort(idx.to(torch.int64), dim=3).values
    t = torch.arange(n, device=idx.device, dtype=torch.int64).view(1, 1, n, 1)
    dup = torch.zeros_like(blk, dtype=torch.bool)
    dup[..., 1:] = blk[..., 1:] == blk[..., :-1]
    ok = (blk >= 0) & ~dup & (blk * select_block <= t)
    head = torch.arange(b * hkv, device=idx.device, dtype=torch.int64).view(b, hkv, 1, 1)
    n_seg = b * hkv * n_blocks
    key = torch.where(ok, head * n_blocks + blk, torch.full_like(blk, n_seg)).flatten()
    key, order = torch.sort(key, stable=True)  # stable: positions stay ascending within a block
    pos = t.expand(b, hkv, n, top).flatten()[order].to(torch.int32)
    offs = torch.searchsorted(key, torch.arange(n_seg + 1, device=idx.device, dtype=torch.int64))
    return pos, offs


def _backward(q, k, v, o, lse, idx, packs, do, dlse, select_block, scale):
    b, hq, n, d = q.shape
    hkv, nk, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    dq, dk, dv = _rt.empty_like(q), _rt.empty_like(k), _rt.empty_like(v)
    if packs is None:  # nothing visible to any row
        return dq.zero_(), dk.zero_(), dv.zero_()
    union, count = packs
    do = torch.zeros_like(o) if do is None else do
    dlse = torch.zeros_like(lse) if dlse is None else dlse.to(torch.float32).contiguous()
    delta = _rt.empty((b, hq, n), dtype=torch.float32, device=q.device)
    c = _tiles(hq // hkv, d, dv_dim, select_block)
    common = dict(
        H=hq, H_KV=hkv, GROUP=hq // hkv, SB=select_block,
        HEAD_DIM=d, V_HEAD_DIM=dv_dim, BLOCK_D=c["BLOCK_D"], BLOCK_DV=c["BLOCK_DV"], BLOCK_N=c["BLOCK_N"],
        DOT_UPCAST=_rt.dot_upcast(q.dtype), DOT_PRECISION=_rt.dot_precision(q.dtype),
    )
    bwd_dq_kernel[(union.shape[2], b * hkv)](
        q, k, v, o, do, idx, union, count, lse, dlse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(),
        scale * 1.4426950408889634, scale, n, nk, union.shape[2],
        PACK=c["PACK"], N_SEL=idx.shape[3], BLOCK_SEL=_pow2(idx.shape[3]), BLOCK_R=c["BLOCK_R"],
        num_warps=c["WARPS_DQ"], **common,
    )
    n_blocks = triton.cdiv(nk, select_block)
    tiles = triton.cdiv(select_block, c["BLOCK_N"])
    pos, offs = _invert(idx, select_block, n_blocks)
    bwd_dkdv_kernel[(n_blocks * tiles, b * hkv)](
        q, k, v, do, lse, delta, pos, offs, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        scale * 1.4426950408889634, scale, n, nk, n_blocks,
        TILES=tiles, BLOCK_M=c["BLOCK_M"], num_warps=c["WARPS_DKDV"], **common,
    )
    return dq, dk, dv


class _SelectedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, select_block, scale):
        o, lse, packs = _forward(q, k, v, idx, select_block, scale)
        ctx.save_for_backward(q, k, v, o, lse, idx, *(packs or ()))
        ctx.select_block, ctx.scale = select_block, scale
        return o, lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels' gradients are not differentiable again
    def backward(ctx, do, dlse):
        q, k, v, o, lse, idx, *packs = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, idx, packs or None, do, dlse, ctx.select_block, ctx.scale)
        return dq, dk, dv, None, None, None


def selected_attention(q, k, v, block_idx, select_block: int, scale: float, check: bool = True, q_pos=None):
    """Attention over the selected blocks of NSA.

    q [B, Hq, N, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] (fp16 / bf16 / fp32, any strides);
    block_idx int32 or int64 [B, Hkv, N, n]: query t of KV head hk sees key s iff
    s // select_block is in block_idx[b, hk, t] (-1 entries skipped) and s <= t.
    Returns o [B, Hq, N, Dv] in q's dtype and lse float32 [B, Hq, N] (natural log; a row that sees
    nothing has o = 0, lse = -inf and zero gradients). Differentiable in q, k, v (also through lse).
    check=False skips the argument checks (and the device sync of the index range check) for a
    caller that has validated its tensors and made block_idx itself.

    q_pos (decoding): int32 [B], query row t of batch b sits at position q_pos[b] + t (so it sees
    keys s <= q_pos[b] + t of its blocks; k, v may be a cache longer than the sequence, keys past
    the positions are never read). Forward only: no gradient with q_pos.
    """
    if check:
        _check(q, k, v, block_idx, select_block, scale)
        if q_pos is not None and (not isinstance(q_pos, torch.Tensor) or tuple(q_pos.shape) != (q.shape[0],)
                                  or q_pos.dtype != torch.int32 or q_pos.device != q.device):
            raise ValueError(f"selected attention: q_pos must be an int32 tensor of shape [{q.shape[0]}] on q's device")
    idx = block_idx.to(torch.int32).contiguous()
    scale = float(scale)
    if q_pos is not None:
        with torch.no_grad():
            return _forward(q, k, v, idx, select_block, scale, q_pos)[:2]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _SelectedAttention.apply(q, k, v, idx, select_block, scale)
    return _forward(q, k, v, idx, select_block, scale)[:2]


def backward(q, k, v, o, lse, block_idx, do, dlse, select_block: int, scale: float):
    """(dq, dk, dv) of selected_attention's (o, lse) from the tensors alone (for a caller that keeps
    no Python state between forward and backward, such as a torch.library op): the forward's packs
    are recomputed from block_idx (_union: two sorts of B * Hkv * N * n entries)."""
    idx = block_idx.to(torch.int32).contiguous()
    b, hq, n, d = q.shape
    packs = None
    if b and n and k.shape[2] and idx.shape[3]:
        packs = _union(idx, select_block, _tiles(hq // k.shape[1], d, v.shape[3], select_block)["PACK"])
    return _backward(q, k, v, o, lse, idx, packs, do, dlse, select_block, float(scale))
