"""NSA block selection: importance scores of the selection blocks and top-n, fused.

topn_select(q, k_cmp, lse_cmp, ...) returns the selected blocks of each query position (or each
query block) as int64 indices [B, Hkv, N, top_n], ascending and -1 padded. Every NSA parameter is
an argument, so one copy serves every NSA spec: a generated NSA module calls it with its spec's
values. The float64 oracle is attngen.reference.nsa (importance_scores, map_to_selection_blocks,
group_scores, select_blocks).

One program scores a tile of query positions (per="token") or one query block (per="block") for
one KV head. For each chunk of CHUNK selection blocks it loops over the compressed blocks that
overlap the chunk, and for each head of the KV group recomputes the compressed scores (softmax
probability exp(q.k*scale - lse_cmp), the logit q.k*scale, or the cosine) of the visible
compressed blocks, sums them over the group, and maps them onto the chunk's selection blocks with
the overlap weights (a small [BLOCK_C, BLOCK_S] matmul of small integers). The chunk's scores
[BLOCK_M, BLOCK_S] then merge into a running top-n list kept in registers. Neither the [N, C]
compressed scores nor the [N, S] selection-block scores are ever written to memory, and the
register footprint does not grow with the sequence: S beyond one chunk is streamed.

Ties go to the lower index everywhere: inside a chunk by the lowest index among equal maxima,
across chunks because the running list only holds indices below the current chunk.
Scores are summed in float32 in an order different from the float64 reference, so two blocks
whose scores differ by float32 rounding only may come out in either order.

Cost: every chunk re-reads the block//stride - 1 compressed blocks it shares with the previous
chunk (at most one extra compressed tile per chunk; none while S <= CHUNK). The overlap map is a
float32 'ieee' dot (exact weights; CUDA cores, not tensor cores).

Registers (sm_90, 8 warps, BLOCK_S 64, D 128 / 192, any group size): 16-bit inputs with 32 rows
per tile take 180-211 registers, float32 inputs with 16 rows 139-204, no spills. Holding all S
selection blocks of a row tile at once instead would spill from S = 256 on (D = 192: from 128),
hence the chunks.

Kernels (what `attngen report` compiles): token_kernel (per="token"), block_kernel (per="block").
"""

from attngen import runtime as _rt  # first: selects Triton's interpreter when there is no GPU

import torch
import triton
import triton.language as tl

SCORES = {"probs": 0, "dot": 1, "cosine": 2}  # score= values, and the kernels' SCORE constexpr
PERS = ("token", "block")  # per= values: one choice per query position, or per query block
CHUNK = 64  # selection blocks scored per pass (BLOCK_S at most)
TILE_M = 32  # query positions per tile
TILE_C = 32  # compressed blocks per tile
NO_BLOCK = 1 << 30  # "no block" in the running lists (above every real index)


@triton.jit
def _chunk_scores(
    p_q0, p_k0, p_row0, p_kn0, o_m, o_pos, m_m, j0, i_lo, i_hi, scale,
    stride_qh, stride_qm, stride_qd, stride_kn, stride_kd, stride_rh, stride_rm,
    block, stride, pieces, per_select,
    GROUP: tl.constexpr, SCORE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Group scores of selection blocks j0 .. j0 + BLOCK_S - 1 for rows o_m at positions o_pos:
    [BM, BS] float32 (0 for rows outside m_m). Compressed blocks i_lo .. i_hi - 1 are the ones that can contribute.
    p_row0: per (head, position) float32, lse_cmp for probs and |q| for cosine; p_kn0: |k_cmp|."""
    o_d = tl.arange(0, BLOCK_D)
    o_j = j0 + tl.arange(0, BLOCK_S)
    m_d = o_d < HEAD_DIM
    b_acc = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
    for c0 in range(i_lo, i_hi, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < i_hi
        b_kt = tl.load(p_k0 + o_c[None, :] * stride_kn + o_d[:, None] * stride_kd, mask=m_d[:, None] & m_c[None, :], other=0.0)  # [BD, BC]
        if DOT_UPCAST:
            b_kt = b_kt.to(tl.float32)
        if SCORE == 2:
            b_kn = tl.load(p_kn0 + o_c, mask=m_c, other=0.0)  # [BC]
        # -- compressed block i is visible to t once complete: i*stride + block - 1 <= t
        m_vis = (o_c[None, :] * stride + block - 1 <= o_pos[:, None]) & m_c[None, :] & m_m[:, None]  # [BM, BC]
        b_ps = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        for i_g in range(GROUP):
            p_q = p_q0 + i_g * stride_qh
            b_q = tl.load(p_q + o_m[:, None] * stride_qm + o_d[None, :] * stride_qd, mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
            if DOT_UPCAST:
                b_q = b_q.to(tl.float32)
            b_s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION)  # [BM, BC]
            if SCORE != 1:
                b_row = tl.load(p_row0 + i_g * stride_rh + o_m * stride_rm, mask=m_m, other=0.0)  # [BM]
            if SCORE == 0:
                # rows with no complete block have lse = -inf and nothing visible: keep exp finite
                b_lse = tl.where(b_row == float("-inf"), 0.0, b_row)
                b_p = tl.exp(tl.where(m_vis, b_s * scale - b_lse[:, None], float("-inf")))
            elif SCORE == 1:
                b_p = b_s * scale
            else:
                b_norm = b_row[:, None] * b_kn[None, :]
                b_p = tl.where(b_norm > 0, b_s / tl.where(b_norm > 0, b_norm, 1.0), 0.0)
            b_ps += tl.where(m_vis, b_p, 0.0)
        # -- overlap map: compressed block i is stride pieces i .. i + pieces - 1, selection block
        # j is pieces j*per_select .. (j+1)*per_select - 1; weight = pieces shared
        lo = tl.maximum(o_c[:, None], o_j[None, :] * per_select)
        hi = tl.minimum(o_c[:, None] + pieces, o_j[None, :] * per_select + per_select)
        b_w = tl.maximum(hi - lo, 0).to(tl.float32)  # [BC, BS]
        b_acc = tl.dot(b_ps, b_w, b_acc, input_precision="ieee")
    return b_acc


@triton.jit
def _merge(b_lv, b_li, b_cv, o_j, own, top_n, initial, local, BIG: tl.constexpr, TOP_PAD: tl.constexpr):
    """Merge a chunk of scores b_cv [R, BS] (block indices o_j, all above those in b_li) into the
    running top-n list (b_lv values, b_li indices, [R, TP], BIG = empty). Position rows of own block
    `own` [R] may pick blocks 0..own; the first `initial` and the `local` latest are forced."""
    m_elig = o_j[None, :] <= own[:, None]
    m_forced = ((o_j[None, :] < initial) | (o_j[None, :] > own[:, None] - local)) & m_elig
    b_cv = tl.where(m_forced, float("inf"), b_cv)
    m_la = b_li < BIG
    m_ca = m_elig
    o_t = tl.arange(0, TOP_PAD)
    b_nv = tl.full(b_lv.shape, float("-inf"), tl.float32)
    b_ni = tl.full(b_li.shape, BIG, tl.int32)
    for i_t in range(top_n):
        # -- best remaining score, then the lowest index holding it
        b_m = tl.maximum(tl.max(tl.where(m_la, b_lv, float("-inf")), 1), tl.max(tl.where(m_ca, b_cv, float("-inf")), 1))
        i_l = tl.min(tl.where(m_la & (b_lv == b_m[:, None]), b_li, BIG), 1)
        i_c = tl.min(tl.where(m_ca & (b_cv == b_m[:, None]), o_j[None, :], BIG), 1)
        i_p = tl.minimum(i_l, i_c)
        b_nv = tl.where(o_t[None, :] == i_t, b_m[:, None], b_nv)
        b_ni = tl.where(o_t[None, :] == i_t, i_p[:, None], b_ni)
        m_la = m_la & (b_li != i_p[:, None])
        m_ca = m_ca & (o_j[None, :] != i_p[:, None])
    return b_nv, b_ni


@triton.jit
def _ascending(b_li, top_n, BIG: tl.constexpr, TOP_PAD: tl.constexpr):
    """The picked indices [R, TP] sorted ascending, -1 for empty slots."""
    o_t = tl.arange(0, TOP_PAD)
    b_prev = tl.full([b_li.shape[0]], -1, tl.int32)
    b_out = tl.full(b_li.shape, -1, tl.int32)
    for i_t in range(top_n):
        b_cur = tl.min(tl.where(b_li > b_prev[:, None], b_li, BIG), 1)
        b_out = tl.where(o_t[None, :] == i_t, tl.where(b_cur == BIG, -1, b_cur)[:, None], b_out)
        b_prev = b_cur
    return b_out


@triton.jit
def _num_visible(t, block, stride):
    """Compressed blocks complete at position t (a scalar >= 0): max(0, (t + 1 - block)//stride + 1)."""
    return tl.where(t + 1 >= block, (tl.maximum(t + 1 - block, 0)) // stride + 1, 0)


@triton.jit(do_not_specialize=["N", "n_cmp"])
def token_kernel(
    Q, K, ROW, KN, OUT, QPOS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_rb, stride_rh, stride_rm,
    N, n_cmp, scale, block, stride, select_block, top_n, initial, local,
    H_KV: tl.constexpr, GROUP: tl.constexpr, SCORE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, TOP_PAD: tl.constexpr,
    BIG: tl.constexpr, DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_QPOS: tl.constexpr,
):
    """Per-token selection: program (tile of BLOCK_M rows, batch x KV head). Row m sits at
    position m, or QPOS[b] + m with HAS_QPOS (decoding: rows at a negative position pick nothing)."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H_KV
    i_hk = i_bh % H_KV
    pieces = block // stride
    per_select = select_block // stride
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < N
    if HAS_QPOS:
        pos0 = tl.load(QPOS + i_b)
    else:
        pos0 = 0
    o_pos = pos0 + o_m
    t_last = tl.maximum(pos0 + tl.minimum(i_m * BLOCK_M + BLOCK_M, N) - 1, 0)
    n_vis = _num_visible(t_last, block, stride)
    own = tl.where(o_pos >= 0, tl.maximum(o_pos, 0) // select_block, -1)
    p_q0 = Q + i_b.to(tl.int64) * stride_qb + (i_hk * GROUP).to(tl.int64) * stride_qh
    p_k0 = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    p_row0 = ROW + i_b.to(tl.int64) * stride_rb + (i_hk * GROUP).to(tl.int64) * stride_rh
    p_kn0 = KN + i_bh.to(tl.int64) * n_cmp

    b_lv = tl.full([BLOCK_M, TOP_PAD], float("-inf"), tl.float32)
    b_li = tl.full([BLOCK_M, TOP_PAD], BIG, tl.int32)
    for j0 in range(0, t_last // select_block + 1, BLOCK_S):
        # compressed blocks overlapping pieces j0*per_select .. (j0 + BLOCK_S)*per_select - 1
        i_lo = tl.maximum(j0 * per_select - pieces + 1, 0)
        i_hi = tl.minimum((j0 + BLOCK_S) * per_select, n_vis)
        b_cv = _chunk_scores(
            p_q0, p_k0, p_row0, p_kn0, o_m, o_pos, m_m, j0, i_lo, i_hi, scale,
            stride_qh, stride_qm, stride_qd, stride_kn, stride_kd, stride_rh, stride_rm,
            block, stride, pieces, per_select,
            GROUP, SCORE, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_C, BLOCK_S, DOT_UPCAST, DOT_PRECISION,
        )
        o_j = j0 + tl.arange(0, BLOCK_S)
        b_lv, b_li = _merge(b_lv, b_li, b_cv, o_j, own, top_n, initial, local, BIG, TOP_PAD)

    b_out = _ascending(b_li, top_n, BIG, TOP_PAD)
    o_t = tl.arange(0, TOP_PAD)
    p_out = OUT + i_bh.to(tl.int64) * N * top_n + o_m[:, None] * top_n + o_t[None, :]
    tl.store(p_out, b_out.to(tl.int64), mask=m_m[:, None] & (o_t[None, :] < top_n))


@triton.jit(do_not_specialize=["N", "n_cmp"])
def block_kernel(
    Q, K, ROW, KN, OUT, QPOS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_rb, stride_rh, stride_rm,
    N, n_cmp, scale, block, stride, select_block, top_n, initial, local,
    H_KV: tl.constexpr, GROUP: tl.constexpr, SCORE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, TOP_PAD: tl.constexpr,
    BIG: tl.constexpr, DOT_UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_QPOS: tl.constexpr,
):
    """Per-block selection: program (query block, batch x KV head). The block's scores are summed
    over its positions (those < N), one choice is made, and every position of the block gets it.
    Rows are at positions 0 .. N - 1 (QPOS unused: topn_select rejects q_pos with per="block")."""
    i_qb = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H_KV
    i_hk = i_bh % H_KV
    pieces = block // stride
    per_select = select_block // stride
    start = i_qb * select_block
    end = tl.minimum(start + select_block, N)
    n_vis = _num_visible(end - 1, block, stride)
    own = i_qb + tl.zeros([1], dtype=tl.int32)
    p_q0 = Q + i_b.to(tl.int64) * stride_qb + (i_hk * GROUP).to(tl.int64) * stride_qh
    p_k0 = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    p_row0 = ROW + i_b.to(tl.int64) * stride_rb + (i_hk * GROUP).to(tl.int64) * stride_rh
    p_kn0 = KN + i_bh.to(tl.int64) * n_cmp

    b_lv = tl.full([1, TOP_PAD], float("-inf"), tl.float32)
    b_li = tl.full([1, TOP_PAD], BIG, tl.int32)
    for j0 in range(0, i_qb + 1, BLOCK_S):
        i_lo = tl.maximum(j0 * per_select - pieces + 1, 0)
        i_hi = tl.minimum((j0 + BLOCK_S) * per_select, n_vis)
        b_cv = tl.zeros([BLOCK_S], dtype=tl.float32)
        for m0 in range(start, end, BLOCK_M):
            o_m = m0 + tl.arange(0, BLOCK_M)
            b_rows = _chunk_scores(
                p_q0, p_k0, p_row0, p_kn0, o_m, o_m, o_m < end, j0, i_lo, i_hi, scale,
                stride_qh, stride_qm, stride_qd, stride_kn, stride_kd, stride_rh, stride_rm,
                block, stride, pieces, per_select,
                GROUP, SCORE, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_C, BLOCK_S, DOT_UPCAST, DOT_PRECISION,
            )
            b_cv += tl.sum(b_rows, 0)
        o_j = j0 + tl.arange(0, BLOCK_S)
        b_lv, b_li = _merge(b_lv, b_li, b_cv[None, :], o_j, own, top_n, initial, local, BIG, TOP_PAD)

    b_out = _ascending(b_li, top_n, BIG, TOP_PAD)  # [1, TP]
    o_t = tl.arange(0, TOP_PAD)
    p_out0 = OUT + i_bh.to(tl.int64) * N * top_n
    for m0 in range(start, end, BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M)
        b_rep = tl.broadcast_to(b_out, [BLOCK_M, TOP_PAD])
        tl.store(p_out0 + o_m[:, None] * top_n + o_t[None, :], b_rep.to(tl.int64), mask=(o_m[:, None] < end) & (o_t[None, :] < top_n))


def _check_int(name, value, lo):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name}: must be >= {lo}, got {value}")


def _check(q, k_cmp, lse_cmp, block, stride, select_block, top_n, initial, local, score, per, q_pos=None):
    for name, value, lo in (
        ("block", block, 1), ("stride", stride, 1), ("select_block", select_block, 1),
        ("top_n", top_n, 1), ("initial", initial, 0), ("local", local, 0),
    ):
        _check_int(name, value, lo)
    if block % stride:
        raise ValueError(f"stride: {stride} does not divide block {block}")
    if select_block % stride:
        raise ValueError(f"stride: {stride} does not divide select_block {select_block}")
    if initial + local > top_n:
        raise ValueError(f"initial + local: {initial} + {local} forced blocks exceed top_n {top_n}")
    if score not in SCORES:
        raise ValueError(f"score: unknown score {score!r} (expected one of {', '.join(SCORES)})")
    if per not in PERS:
        raise ValueError(f"per: unknown value {per!r} (expected 'token' or 'block')")
    for name, t in (("q", q), ("k_cmp", k_cmp)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [B, H, N, D]")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name}: dtype {t.dtype} is not one of float16, bfloat16, float32")
    b, hq, n, d = q.shape
    if k_cmp.dtype != q.dtype:
        raise ValueError(f"k_cmp: dtype {k_cmp.dtype} differs from q's {q.dtype}")
    if k_cmp.device != q.device:
        raise ValueError(f"k_cmp: on {k_cmp.device}, q on {q.device}")
    if _rt.INTERPRET and q.device.type != "cpu":
        raise ValueError(f"q: on {q.device}, but kernels run in Triton's CPU interpreter: pass CPU tensors")
    if not _rt.INTERPRET and q.device.type != "cuda":
        raise ValueError(f"q: on {q.device}; expected a CUDA tensor")
    hkv = k_cmp.shape[1]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"k_cmp: {hkv} KV heads do not divide q's {hq} heads")
    if q_pos is None:
        c = max(0, (n - block) // stride + 1)
        if tuple(k_cmp.shape) != (b, hkv, c, d):
            raise ValueError(f"k_cmp: expected shape {[b, hkv, c, d]} (C = complete blocks of N = {n}), got {list(k_cmp.shape)}")
    else:
        if per != "token":
            raise ValueError(f"q_pos: positions are supported with per='token' only, not {per!r}")
        if not isinstance(q_pos, torch.Tensor) or tuple(q_pos.shape) != (b,) or q_pos.dtype != torch.int32:
            raise ValueError(f"q_pos: expected an int32 tensor of shape [{b}]")
        if q_pos.device != q.device:
            raise ValueError(f"q_pos: on {q_pos.device}, q on {q.device}")
        if k_cmp.shape[0] != b or k_cmp.shape[3] != d:
            raise ValueError(f"k_cmp: expected shape [{b}, Hkv, C, {d}], got {list(k_cmp.shape)}")
        if b and n:
            last = int(q_pos.max()) + n - 1
            need = max(0, (last + 1 - block) // stride + 1)
            if k_cmp.shape[2] < need:
                raise ValueError(f"k_cmp: holds {k_cmp.shape[2]} compressed blocks; position {last} sees {need}")
    if score == "probs":
        if not isinstance(lse_cmp, torch.Tensor) or tuple(lse_cmp.shape) != (b, hq, n):
            raise ValueError(f"lse_cmp: expected a tensor of shape {[b, hq, n]}")
        if lse_cmp.dtype != torch.float32:
            raise ValueError(f"lse_cmp: expected float32, got {lse_cmp.dtype}")
        if lse_cmp.device != q.device:
            raise ValueError(f"lse_cmp: on {lse_cmp.device}, q on {q.device}")


@torch.no_grad()
def topn_select(q, k_cmp, lse_cmp, *, block, stride, select_block, top_n, initial, local, score, per, scale, check=True, q_pos=None):
    """Selected blocks of NSA: block_idx int64 [B, Hkv, N, top_n], ascending, -1 padded.

    q [B, Hq, N, D], k_cmp [B, Hkv, C, D] (same dtype), lse_cmp float32 [B, Hq, N] (the compression
    branch's natural-log lse, -inf where no block is complete; only read for score="probs").
    Equals nsa_reference.select_blocks(group_scores(map_to_selection_blocks(importance_scores(...))))
    up to float32 rounding of the scores. scale None means 1/sqrt(D). No gradient.
    block, stride: the compression blocks (stride divides block); select_block (a multiple of
    stride), top_n, initial and local (forced first and latest blocks, initial + local <= top_n);
    score one of SCORES, per one of PERS. Bad arguments raise ValueError naming them; check=False
    skips those checks for a caller whose parameters and tensors are already validated.

    q_pos (decoding; per="token" only): int32 [B], row i of batch b sits at position q_pos[b] + i
    instead of i. k_cmp [B, Hkv, C, D] is then a compressed cache of any length C holding at least
    the blocks complete at the last row's position (later entries are never read); a row at a
    negative position picks nothing (-1). Without q_pos C must be the complete blocks of N.
    """
    if check:  # check=False: a caller whose spec and tensors are already validated
        _check(q, k_cmp, lse_cmp, block, stride, select_block, top_n, initial, local, score, per, q_pos)
    b, hq, n, d = q.shape
    hkv, c = k_cmp.shape[1], k_cmp.shape[2]
    scale = d ** -0.5 if scale is None else float(scale)
    out = _rt.empty((b, hkv, n, top_n), dtype=torch.int64, device=q.device)
    if b == 0 or n == 0:
        return out
    has_pos = q_pos is not None
    if c == 0:  # no complete compressed block anywhere: the kernels read none, but need a pointer
        k_cmp = q.new_zeros(b, hkv, 1, d)
    unused = q.new_zeros(1, 1, 1, dtype=torch.float32)
    # per (head, position) value the scores need: lse_cmp, or |q| for cosine; |k_cmp| for cosine
    row, k_norm = lse_cmp if score == "probs" else unused, unused
    if score == "cosine":
        row = torch.linalg.vector_norm(q.float(), dim=-1)
        k_norm = torch.linalg.vector_norm(k_cmp.float(), dim=-1).contiguous()
    num_sel = -(-n // select_block)
    # selection blocks a row can pick: up to the last row's own block (with q_pos: one host read)
    last = n - 1 + (max(0, int(q_pos.max())) if has_pos else 0)
    block_s = min(max(16, triton.next_power_of_2(last // select_block + 1)), CHUNK)
    common = dict(
        H_KV=hkv, GROUP=hq // hkv, SCORE=SCORES[score],
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_C=TILE_C, BLOCK_S=block_s, TOP_PAD=max(2, triton.next_power_of_2(top_n)),
        BIG=NO_BLOCK, DOT_UPCAST=_rt.dot_upcast(q.dtype), DOT_PRECISION=_rt.dot_precision(q.dtype),
        HAS_QPOS=has_pos,
    )
    args = (
        q, k_cmp, row, k_norm, out, q_pos if has_pos else out, *q.stride(), *k_cmp.stride(), *row.stride(),
        n, k_cmp.shape[2], scale, block, stride, select_block, top_n, initial, local,
    )
    # float32 tiles take twice the registers: half the rows keeps them from spilling (sm_90); a
    # narrow float32 head (D <= 32) spilled with 8 warps (capped at 128 registers) and not with 4
    tall = TILE_M // 2 if q.dtype == torch.float32 else TILE_M
    warps = 4 if q.dtype == torch.float32 and common["BLOCK_D"] <= 32 else 8
    if per == "token":
        block_m = tall
        token_kernel[(triton.cdiv(n, block_m), b * hkv)](*args, BLOCK_M=block_m, **common, num_warps=warps)
    else:  # row tiles no taller than a query block
        block_m = min(tall, max(16, triton.next_power_of_2(select_block)))
        block_kernel[(num_sel, b * hkv)](*args, BLOCK_M=block_m, **common, num_warps=warps)
    return out
