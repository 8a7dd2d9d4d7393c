"""The NSA float64 reference: every building block against a loop-by-loop brute force on tiny sizes,
the whole module against the brute force assembled from those loops, and the edge cases the kernels
will meet (no complete compression block, N < block, ragged N, GQA groups, ties, padding)."""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from attngen.reference.nsa import (
    compress_mean,
    compressed_attention,
    group_scores,
    importance_scores,
    map_to_selection_blocks,
    nsa_reference,
    num_compressed,
    num_selection_blocks,
    select_blocks,
    selected_attention,
    selection_mask,
    window_attention,
    window_mask,
)

F64 = torch.float64
SMALL = dict(block=8, stride=4, select_block=16, top_n=3, initial=1, local=1, window=10)


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64)


def inputs(b, hq, hkv, n, d=8, dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=g, dtype=F64)
    k = torch.randn(b, hkv, n, d, generator=g, dtype=F64)
    v = torch.randn(b, hkv, n, dv, generator=g, dtype=F64)
    gates = torch.rand(b, hq, n, 3, generator=g, dtype=F64)
    return q, k, v, gates


# ------------------------------------------------------------------------------------------------
# Brute force: plain loops, one query row at a time.


def bf_compress(x, block, stride):
    b, h, n, d = x.shape
    c = num_compressed(n, block, stride)
    out = torch.zeros(b, h, c, d, dtype=F64)
    for i in range(c):
        acc = torch.zeros(b, h, d, dtype=F64)
        for tok in range(i * stride, i * stride + block):
            acc = acc + x[:, :, tok]
        out[:, :, i] = acc / block
    return out


def bf_attend(qrow, keys, vals, scale):
    """One query row against a list of (key, value) rows: (o, lse)."""
    if not keys:
        return torch.zeros(vals.shape[-1] if isinstance(vals, torch.Tensor) else 0, dtype=F64), -math.inf
    z = [scale * float(qrow @ kk) for kk in keys]
    m = max(z)
    w = [math.exp(x - m) for x in z]
    tot = sum(w)
    o = sum(wi / tot * vv for wi, vv in zip(w, vals))
    return o, m + math.log(tot)


def bf_scores(q, k_cmp, block, stride, score, scale):
    b, hq, n, _ = q.shape
    hkv, c = k_cmp.shape[1], k_cmp.shape[2]
    grp = hq // hkv
    out = torch.zeros(b, hq, n, c, dtype=F64)
    for bi in range(b):
        for h in range(hq):
            for t in range(n):
                vis = [i for i in range(c) if i * stride + block - 1 <= t]
                kk = [k_cmp[bi, h // grp, i] for i in vis]
                if score == "probs":
                    if not vis:
                        continue
                    z = [scale * float(q[bi, h, t] @ x) for x in kk]
                    m = max(z)
                    tot = sum(math.exp(x - m) for x in z)
                    for i, x in zip(vis, z):
                        out[bi, h, t, i] = math.exp(x - m) / tot
                elif score == "dot":
                    for i, x in zip(vis, kk):
                        out[bi, h, t, i] = scale * float(q[bi, h, t] @ x)
                else:
                    for i, x in zip(vis, kk):
                        den = float(q[bi, h, t].norm() * x.norm())
                        out[bi, h, t, i] = float(q[bi, h, t] @ x) / den if den > 0 else 0.0
    return out


def bf_map(p, block, stride, select_block, n):
    """Overlap weights from token ranges: |[i*s, i*s+l) ∩ [j*l', (j+1)*l')| / s."""
    c = p.shape[-1]
    nb = -(-n // select_block)
    out = torch.zeros(*p.shape[:-1], nb, dtype=F64)
    for j in range(nb):
        for i in range(c):
            lo = max(i * stride, j * select_block)
            hi = min(i * stride + block, (j + 1) * select_block)
            if hi > lo:
                assert (hi - lo) % stride == 0
                out[..., j] += (hi - lo) // stride * p[..., i]
    return out


def bf_pick(row, own, top_n, initial, local):
    """row: list of scores over all blocks; own: the own block."""
    cand = []
    for j in range(own + 1):
        forced = j < initial or j > own - local
        cand.append((-(math.inf if forced else float(row[j])), j))
    cand.sort()
    chosen = sorted(j for _, j in cand[:top_n])
    return chosen + [-1] * (top_n - len(chosen))


def bf_select(scores, select_block, top_n, initial, local, per):
    b, hkv, n, nb = scores.shape
    out = torch.full((b, hkv, n, top_n), -1, dtype=torch.int64)
    for bi in range(b):
        for g in range(hkv):
            rows = scores[bi, g].tolist()
            for t in range(n):
                own = t // select_block
                if per == "token":
                    row = rows[t]
                else:
                    lo, hi = own * select_block, min(n, (own + 1) * select_block)
                    row = [sum(rows[u][j] for u in range(lo, hi)) for j in range(nb)]
                out[bi, g, t] = torch.tensor(bf_pick(row, own, top_n, initial, local))
    return out


def bf_nsa(q, k, v, gates, *, block, stride, select_block, top_n, initial, local, window, score="probs",
           per="token", scale=None):
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    grp = hq // hkv
    scale = 1 / math.sqrt(d) if scale is None else scale
    kc, vc = bf_compress(k, block, stride), bf_compress(v, block, stride)
    s = bf_map(bf_scores(q, kc, block, stride, score, scale), block, stride, select_block, n)
    gs = torch.zeros(b, hkv, n, s.shape[-1], dtype=F64)
    for h in range(hq):
        gs[:, h // grp] += s[:, h]
    idx = bf_select(gs, select_block, top_n, initial, local, per)
    dv = v.shape[-1]
    res = {name: torch.zeros(b, hq, n, dv, dtype=F64) for name in ("o_cmp", "o_slc", "o_win")}
    res.update({name: torch.zeros(b, hq, n, dtype=F64) for name in ("lse_cmp", "lse_slc", "lse_win")})
    for bi in range(b):
        for h in range(hq):
            g = h // grp
            for t in range(n):
                sets = {
                    "cmp": ([kc[bi, g, i] for i in range(kc.shape[2]) if i * stride + block - 1 <= t],
                            [vc[bi, g, i] for i in range(kc.shape[2]) if i * stride + block - 1 <= t]),
                }
                chosen = {int(j) for j in idx[bi, g, t] if j >= 0}
                slc = [u for u in range(t + 1) if u // select_block in chosen]
                win = [u for u in range(t + 1) if u > t - window]
                sets["slc"] = ([k[bi, g, u] for u in slc], [v[bi, g, u] for u in slc])
                sets["win"] = ([k[bi, g, u] for u in win], [v[bi, g, u] for u in win])
                for name, (kk, vv) in sets.items():
                    if kk:
                        o, lse = bf_attend(q[bi, h, t], kk, vv, scale)
                        res["o_" + name][bi, h, t] = o
                    else:
                        lse = -math.inf
                    res["lse_" + name][bi, h, t] = lse
    o = gates[..., 0:1] * res["o_cmp"] + gates[..., 1:2] * res["o_slc"] + gates[..., 2:3] * res["o_win"]
    res["block_indices"] = idx
    return o, res


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# Building blocks


def test_overlap_mapping_formula_example():
    # block 32, stride 16, select_block 64: p[4j-1] + 2p[4j] + 2p[4j+1] + 2p[4j+2] + p[4j+3]
    n = 300
    c = num_compressed(n, 32, 16)
    p = rand(2, 3, c, seed=1)
    got = map_to_selection_blocks(p, block=32, stride=16, select_block=64, n=n)
    assert got.shape == (2, 3, num_selection_blocks(n, 64))

    def at(i):
        return p[..., i] if 0 <= i < c else torch.zeros_like(p[..., 0])

    for j in range(got.shape[-1]):
        want = at(4 * j - 1) + 2 * at(4 * j) + 2 * at(4 * j + 1) + 2 * at(4 * j + 2) + at(4 * j + 3)
        close(got[..., j], want)


@pytest.mark.parametrize(
    "block,stride,select_block", [(8, 4, 16), (4, 4, 4), (8, 8, 16), (12, 4, 8), (16, 4, 16), (6, 2, 4)]
)
@pytest.mark.parametrize("n", [1, 7, 37, 64, 101])
def test_map_to_selection_blocks_vs_brute(block, stride, select_block, n):
    c = num_compressed(n, block, stride)
    p = rand(1, 2, 3, c, seed=n)
    close(map_to_selection_blocks(p, block=block, stride=stride, select_block=select_block, n=n),
          bf_map(p, block, stride, select_block, n))


@pytest.mark.parametrize("n", [0, 3, 8, 9, 12, 37, 150])
def test_compress_mean_vs_brute(n):
    x = rand(2, 2, n, 5, seed=n)
    got = compress_mean(x, block=8, stride=4)
    assert got.shape == (2, 2, num_compressed(n, 8, 4), 5)
    close(got, bf_compress(x, 8, 4))


@pytest.mark.parametrize("score", ["probs", "dot", "cosine"])
@pytest.mark.parametrize("g", [1, 2, 4])
def test_importance_scores_vs_brute(score, g):
    n = 45
    q = rand(1, 4, n, 8, seed=2)
    kc = rand(1, 4 // g, num_compressed(n, 8, 4), 8, seed=3)
    got = importance_scores(q, kc, block=8, stride=4, score=score)
    close(got, bf_scores(q, kc, 8, 4, score, 1 / math.sqrt(8)))
    if score == "probs":  # rows with a complete block sum to 1, the first block - 1 rows are empty
        sums = got.sum(-1)
        close(sums[:, :, 7:], torch.ones_like(sums[:, :, 7:]))
        assert (got[:, :, :7] == 0).all()


def test_group_scores_sums_heads_of_a_group():
    s = rand(2, 8, 5, 3, seed=4)
    got = group_scores(s, 2)
    close(got[:, 0], s[:, 0:4].sum(1))
    close(got[:, 1], s[:, 4:8].sum(1))


def check_selection_invariants(idx, n, select_block, top_n, initial, local):
    for t in range(n):
        own = t // select_block
        rows = idx[..., t, :].reshape(-1, top_n).tolist()
        for row in rows:
            real = [j for j in row if j >= 0]
            assert row == real + [-1] * (top_n - len(real)), row  # -1 only as trailing padding
            assert real == sorted(set(real))  # ascending, no duplicates
            assert all(j <= own for j in real)  # no future block
            assert len(real) == min(top_n, own + 1)
            forced = {j for j in range(own + 1) if j < initial or j > own - local}
            assert forced <= set(real)


@pytest.mark.parametrize("per", ["token", "block"])
@pytest.mark.parametrize("top_n,initial,local", [(3, 1, 1), (3, 1, 2), (4, 0, 0), (2, 2, 0), (5, 1, 2), (1, 0, 1)])
@pytest.mark.parametrize("ties", [False, True])
def test_select_blocks_vs_brute(per, top_n, initial, local, ties):
    n, l2 = 150, 16
    nb = num_selection_blocks(n, l2)
    g = torch.Generator().manual_seed(top_n * 10 + initial + local)
    if ties:  # few distinct values: plenty of ties, which must go to the lower index
        scores = torch.randint(0, 3, (2, 2, n, nb), generator=g).to(F64)
    else:
        scores = torch.rand(2, 2, n, nb, generator=g, dtype=F64)
    got = select_blocks(scores, select_block=l2, top_n=top_n, initial=initial, local=local, per=per)
    assert got.dtype == torch.int64 and got.shape == (2, 2, n, top_n)
    assert torch.equal(got, bf_select(scores, l2, top_n, initial, local, per))
    check_selection_invariants(got, n, l2, top_n, initial, local)


def test_select_ties_go_to_the_lower_index():
    n, l2 = 100, 10
    scores = torch.zeros(1, 1, n, 10, dtype=F64)
    got = select_blocks(scores, select_block=l2, top_n=4, initial=0, local=1)
    # own block forced, then the lowest indices
    assert got[0, 0, 99].tolist() == [0, 1, 2, 9]
    assert got[0, 0, 35].tolist() == [0, 1, 2, 3]
    scores[..., 5] = 1.0
    scores[..., 7] = 1.0
    got = select_blocks(scores, select_block=l2, top_n=4, initial=0, local=1)
    assert got[0, 0, 99].tolist() == [0, 5, 7, 9]


def test_select_fewer_eligible_than_top_n_pads():
    n, l2 = 40, 16
    scores = rand(1, 1, n, 3, seed=5)
    got = select_blocks(scores, select_block=l2, top_n=5, initial=1, local=1)
    assert got[0, 0, 0].tolist() == [0, -1, -1, -1, -1]
    assert got[0, 0, 20].tolist() == [0, 1, -1, -1, -1]
    assert got[0, 0, 39].tolist() == [0, 1, 2, -1, -1]


def test_select_forced_beat_any_score():
    n, l2 = 160, 16
    scores = torch.zeros(1, 1, n, 10, dtype=F64)
    scores[..., 3] = 1e300
    scores[..., 2] = 1e299
    scores[..., 0] = -1e300  # forced blocks win whatever their score
    scores[..., 9] = -1e300
    got = select_blocks(scores, select_block=l2, top_n=4, initial=1, local=2)
    assert got[0, 0, 159].tolist() == [0, 3, 8, 9]
    assert got[0, 0, 70].tolist() == [0, 2, 3, 4]  # 0, 3, 4 forced; 2 outscores 1


def test_select_per_block_shares_indices_within_a_query_block():
    n, l2 = 150, 16
    scores = rand(1, 2, n, num_selection_blocks(n, l2), seed=6).abs()
    got = select_blocks(scores, select_block=l2, top_n=3, initial=1, local=1, per="block")
    for blk in range(num_selection_blocks(n, l2)):
        rows = got[:, :, blk * l2:(blk + 1) * l2]
        assert (rows == rows[:, :, :1]).all()
        assert rows.max() <= blk
    # and the mask is causal inside the own block
    mask = selection_mask(got, select_block=l2)
    t = torch.arange(n)
    assert not (mask & (t.view(1, n) > t.view(n, 1))).any()


def test_selection_mask_vs_brute():
    n, l2 = 50, 8
    idx = torch.tensor([[[[0, 3, -1]] * n]])  # [1, 1, n, 3]
    m = selection_mask(idx, select_block=l2)
    for t in range(n):
        for s in range(n):
            assert bool(m[0, 0, t, s]) == (s <= t and s // l2 in (0, 3))


@pytest.mark.parametrize("w", [1, 3, 10, 200])
def test_window_mask_vs_brute(w):
    n = 37
    m = window_mask(n, w)
    for t in range(n):
        assert [s for s in range(n) if m[t, s]] == list(range(max(0, t - w + 1), t + 1))


def test_compressed_branch_zero_before_first_complete_block():
    q, k, v, _ = inputs(1, 4, 2, 30)
    kc, vc = compress_mean(k, block=8, stride=4), compress_mean(v, block=8, stride=4)
    o, lse = compressed_attention(q, kc, vc, block=8, stride=4)
    assert (o[:, :, :7] == 0).all() and torch.isneginf(lse[:, :, :7]).all()
    assert torch.isfinite(lse[:, :, 7:]).all() and (o[:, :, 7:].abs().sum(-1) > 0).all()


# ------------------------------------------------------------------------------------------------
# The whole module against the brute force


def compare(q, k, v, gates, **kw):
    o, aux = nsa_reference(q, k, v, gates, **kw)
    o_bf, bf = bf_nsa(q, k, v, gates, **kw)
    assert torch.equal(aux["block_indices"], bf["block_indices"])
    close(o, o_bf)
    for name in ("o_cmp", "o_slc", "o_win", "lse_cmp", "lse_slc", "lse_win"):
        close(aux[name], bf[name])
    return o, aux


@settings(max_examples=8)
@given(
    n=st.integers(1, 150),
    g=st.sampled_from([1, 2, 4]),
    hkv=st.sampled_from([1, 2]),
    score=st.sampled_from(["probs", "dot", "cosine"]),
    per=st.sampled_from(["token", "block"]),
    seed=st.integers(0, 2**16),
)
@example(n=150, g=4, hkv=1, score="probs", per="token", seed=0)
@example(n=150, g=2, hkv=2, score="probs", per="block", seed=1)
@example(n=5, g=2, hkv=1, score="probs", per="token", seed=2)  # N < block: no compressed key at all
@example(n=1, g=1, hkv=1, score="dot", per="block", seed=3)
def test_nsa_vs_brute(n, g, hkv, score, per, seed):
    q, k, v, gates = inputs(1, g * hkv, hkv, n, seed=seed)
    _, aux = compare(q, k, v, gates, score=score, per=per, **SMALL)
    check_selection_invariants(aux["block_indices"], n, 16, 3, 1, 1)


@pytest.mark.parametrize("kw", [
    dict(block=4, stride=4, select_block=4, top_n=5, initial=2, local=2, window=7),
    dict(block=8, stride=4, select_block=8, top_n=2, initial=0, local=1, window=1),
    dict(block=12, stride=4, select_block=8, top_n=4, initial=1, local=2, window=30),
])
def test_nsa_vs_brute_other_geometries(kw):
    q, k, v, gates = inputs(2, 4, 2, 71, seed=7)
    compare(q, k, v, gates, **kw)


def test_group_shares_selection_and_heads_read_their_group():
    q, k, v, gates = inputs(1, 8, 2, 120, seed=8)
    o, aux = nsa_reference(q, k, v, gates, **SMALL)
    idx = aux["block_indices"]
    assert idx.shape == (1, 2, 120, 3)
    # each query head attends exactly to its group's selection
    for h in range(8):
        o_h, _ = selected_attention(q[:, h:h + 1], k[:, h // 4:h // 4 + 1], v[:, h // 4:h // 4 + 1],
                                    idx[:, h // 4:h // 4 + 1], select_block=16)
        close(aux["o_slc"][:, h:h + 1], o_h)


def test_gates_combine_linearly():
    q, k, v, _ = inputs(1, 4, 2, 60, seed=9)
    outs = {}
    for name, gate in (("o_cmp", (1, 0, 0)), ("o_slc", (0, 1, 0)), ("o_win", (0, 0, 1))):
        gates = torch.tensor(gate, dtype=F64).expand(1, 4, 60, 3)
        o, aux = nsa_reference(q, k, v, gates, **SMALL)
        close(o, aux[name])
        outs[name] = aux[name]
    gates = rand(1, 4, 60, 3, seed=10)
    o, _ = nsa_reference(q, k, v, gates, **SMALL)
    close(o, sum(gates[..., i:i + 1] * outs[n] for i, n in enumerate(("o_cmp", "o_slc", "o_win"))))


def test_window_branch_vs_brute():
    q, k, v, _ = inputs(1, 2, 1, 40, seed=11)
    o, lse = window_attention(q, k, v, window=5)
    for t in range(40):
        keys = list(range(max(0, t - 4), t + 1))
        o_bf, lse_bf = bf_attend(q[0, 0, t], [k[0, 0, s] for s in keys], [v[0, 0, s] for s in keys], 1 / math.sqrt(8))
        close(o[0, 0, t], o_bf)
        assert abs(float(lse[0, 0, t]) - lse_bf) < 1e-10


def test_precomputed_and_callable_compression():
    q, k, v, gates = inputs(1, 4, 2, 50, seed=12)
    o_mean, aux = nsa_reference(q, k, v, gates, **SMALL)
    o_pre, _ = nsa_reference(q, k, v, gates, k_cmp=aux["k_cmp"], v_cmp=aux["v_cmp"], **SMALL)
    close(o_pre, o_mean)

    def first_token(k, v, *, block, stride):  # a stand-in for the learned compressions to come
        c = num_compressed(k.shape[2], block, stride)
        return k[:, :, : c * stride : stride], v[:, :, : c * stride : stride]

    o_fn, aux_fn = nsa_reference(q, k, v, gates, compress=first_token, **SMALL)
    close(aux_fn["k_cmp"], k[:, :, 0:44:4])  # 11 complete blocks of 8 in 50 tokens
    o_bf, _ = bf_nsa(q, k, v, gates, **SMALL)  # mean pooling: must differ from the stand-in
    assert not torch.allclose(o_fn, o_bf)


def test_given_block_indices_are_used():
    q, k, v, gates = inputs(1, 2, 1, 64, seed=13)
    idx = torch.full((1, 1, 64, 3), -1, dtype=torch.int64)
    idx[..., 0] = 0
    _, aux = nsa_reference(q, k, v, gates, block_indices=idx, **SMALL)
    assert aux["block_indices"] is idx
    o_bf, _ = selected_attention(q, k, v, idx, select_block=16)
    close(aux["o_slc"], o_bf)
    assert (aux["o_slc"][:, :, 16:] != 0).all()  # position >= 16 sees block 0 only


@pytest.mark.parametrize("n", [5, 30])
def test_gradients_finite_and_correct(n):
    q, k, v, gates = inputs(1, 4, 2, n, d=4, dv=3, seed=14)
    kc, vc = compress_mean(k, block=8, stride=4), compress_mean(v, block=8, stride=4)
    idx = nsa_reference(q, k, v, gates, **SMALL)[1]["block_indices"]
    leaves = [x.clone().requires_grad_() for x in (q, k, v, gates, kc, vc)]

    def f(q, k, v, gates, kc, vc):
        o, aux = nsa_reference(q, k, v, gates, k_cmp=kc, v_cmp=vc, block_indices=idx, **SMALL)
        return o, aux["lse_slc"], aux["lse_win"]

    o, lse_s, lse_w = f(*leaves)
    (o.sum() + lse_s.sum() + lse_w.sum()).backward()
    for x in leaves:
        assert x.grad is not None and torch.isfinite(x.grad).all()
    assert torch.autograd.gradcheck(f, leaves, fast_mode=True)
    # mean-pooled path: gradients reach k and v through the compression too, rows with no
    # complete block (t < 7) included, and lse_cmp's -inf rows give zero gradient
    q2, k2, v2, g2 = (x.clone().requires_grad_() for x in (q, k, v, gates))
    o, aux = nsa_reference(q2, k2, v2, g2, score="probs", **SMALL)
    lse_c = aux["lse_cmp"]
    (o.sum() + torch.where(torch.isfinite(lse_c), lse_c, torch.zeros_like(lse_c)).sum()).backward()
    for x in (q2, k2, v2, g2):
        assert torch.isfinite(x.grad).all()
    assert (q2.grad[:, :, :7].abs().sum() > 0)  # slc and win still reach early rows


def test_dtype_is_float64():
    q, k, v, gates = (x.float() for x in inputs(1, 2, 1, 20, seed=15))
    o, aux = nsa_reference(q, k, v, gates, **SMALL)
    assert o.dtype == F64 and all(aux[n].dtype == F64 for n in ("o_cmp", "lse_cmp", "o_slc", "o_win"))


@pytest.mark.parametrize("kw,msg", [
    (dict(block=8, stride=3), "stride"),
    (dict(select_block=10, stride=4), "select_block"),
    (dict(top_n=0), "top_n"),
    (dict(initial=-1), "initial"),
    (dict(top_n=2, initial=1, local=2), "exceed top_n"),
    (dict(window=0), "window"),
    (dict(score="max"), "score"),
    (dict(per="head"), "per"),
    (dict(block=8.0), "block"),
    (dict(compress="mlp"), "compress"),
])
def test_argument_errors(kw, msg):
    q, k, v, gates = inputs(1, 2, 1, 20)
    args = dict(SMALL)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        nsa_reference(q, k, v, gates, **args)


def test_shape_errors():
    q, k, v, gates = inputs(1, 4, 2, 20)
    with pytest.raises(ValueError, match="gates"):
        nsa_reference(q, k, v, gates[..., :2], **SMALL)
    with pytest.raises(ValueError, match="KV heads"):
        nsa_reference(q, k[:, :1].expand(1, 3, 20, 8), v[:, :1].expand(1, 3, 20, 6), gates, **SMALL)
    with pytest.raises(ValueError, match="k_cmp"):
        kc, vc = torch.zeros(1, 2, 2, 8, dtype=F64), torch.zeros(1, 2, 2, 6, dtype=F64)  # C is 4, not 2
        nsa_reference(q, k, v, gates, k_cmp=kc, v_cmp=vc, **SMALL)
    with pytest.raises(ValueError, match="both or neither"):
        nsa_reference(q, k, v, gates, k_cmp=torch.zeros(1, 2, 4, 8, dtype=F64), **SMALL)
    with pytest.raises(ValueError, match="block_indices"):
        nsa_reference(q, k, v, gates, block_indices=torch.zeros(1, 2, 20, 2, dtype=torch.int64), **SMALL)
    with pytest.raises(ValueError, match="int64"):
        nsa_reference(q, k, v, gates, block_indices=torch.zeros(1, 2, 20, 3, dtype=torch.int32), **SMALL)
    bad = torch.zeros(1, 2, 20, 3, dtype=torch.int64)
    bad[0, 0, 5, 1] = 2  # 20 tokens hold selection blocks 0 and 1 only
    with pytest.raises(ValueError, match="block_indices"):
        nsa_reference(q, k, v, gates, block_indices=bad, **SMALL)
    with pytest.raises(ValueError, match="selection blocks"):
        select_blocks(torch.zeros(1, 1, 20, 5), select_block=16, top_n=2, local=1)
