"""NSA block selection (attngen.kernels.nsa_topn) against the float64 reference.

The kernel sums float32 scores in another order than the float64 reference, so two blocks whose
scores differ by rounding only may swap. Each comparison therefore carries an error bound per
selection-block score (from the magnitudes of the terms summed into it): a row whose reference
choice is decided by more than the bounds must match exactly, and every other row must still be a
valid top-n (no picked block below an unpicked one by more than the bounds). Crafted inputs whose
scores are exact or far apart must match on every row, and structural properties (forced blocks
present, no future block, ascending, -1 padding, no duplicates) hold on arbitrary inputs.
"""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from attngen.reference import nsa
from attngen.kernels import nsa_topn

F64 = torch.float64
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# (block, stride, select_block)
GEOMETRIES = [(32, 16, 64), (16, 16, 16), (8, 4, 16), (16, 8, 32)]
TOL = 1e-4  # relative error bound of a float32 score sum (observed errors are ~1e-6)


def make_inputs(b, hkv, g, n, d, geometry, dtype, seed, spread=False):
    block, stride, _ = geometry
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * g, n, d, generator=gen, dtype=F64)
    c = nsa.num_compressed(n, block, stride)
    k_cmp = torch.randn(b, hkv, c, d, generator=gen, dtype=F64)
    if spread:  # distinct large logits on some compressed blocks
        factor = 1 + 3 * torch.rand(b, hkv, c, 1, generator=gen, dtype=F64)
        k_cmp = k_cmp * torch.where(torch.rand(b, hkv, c, 1, generator=gen) < 0.3, factor, torch.ones_like(factor))
    return q.to(dtype), k_cmp.to(dtype)


def lse_of(q, k_cmp, block, stride):
    _, lse = nsa.compressed_attention(q.to(F64), k_cmp.to(F64), k_cmp.to(F64), block=block, stride=stride)
    return lse.to(torch.float32)


def run_kernel(q, k_cmp, lse, geometry, top_n, initial, local, score, per, scale=None):
    block, stride, select_block = geometry
    return nsa_topn.topn_select(
        q, k_cmp, lse, block=block, stride=stride, select_block=select_block, top_n=top_n,
        initial=initial, local=local, score=score, per=per, scale=scale,
    )


def reference(q, k_cmp, geometry, top_n, initial, local, score, per, scale=None):
    block, stride, select_block = geometry
    n, hkv = q.shape[2], k_cmp.shape[1]
    s = nsa.importance_scores(q.to(F64), k_cmp.to(F64), block=block, stride=stride, score=score, scale=scale)
    s = nsa.map_to_selection_blocks(s, block=block, stride=stride, select_block=select_block, n=n)
    return nsa.select_blocks(
        nsa.group_scores(s, hkv), select_block=select_block, top_n=top_n, initial=initial, local=local, per=per
    )


# ------------------------------------------------------------------------------------------------
# Reference scores with error bounds, per decision row


def _row_sum(x, n, select_block):
    """[B, H, N, S] -> [B, H, S, S]: summed over the positions of each query block (< N)."""
    b, h, _, s = x.shape
    pad = x.new_zeros(b, h, s * select_block - n, s)
    return torch.cat([x, pad], dim=2).view(b, h, s, select_block, s).sum(dim=3)


def decision_scores(q, k_cmp, geometry, score, per, scale=None):
    """Float64 group scores of each decision row (a position, or a query block for per="block")
    [B, Hkv, R, S], an error bound for each, and each row's own block [R]."""
    block, stride, select_block = geometry
    b, hq, n, d = q.shape
    hkv = k_cmp.shape[1]
    qd, kd = q.to(F64), k_cmp.to(F64)
    sc = 1 / math.sqrt(d) if scale is None else scale
    s = nsa.importance_scores(qd, kd, block=block, stride=stride, score=score, scale=scale)
    vis = nsa.compressed_visibility(n, kd.shape[2], block=block, stride=stride)
    # bound on |float32 score - exact| per (head, position, compressed block), up to TOL
    norms = qd.norm(dim=-1, keepdim=True) * kd.repeat_interleave(hq // hkv, dim=1).norm(dim=-1).unsqueeze(-2)
    if score == "probs":
        _, lse = nsa.compressed_attention(qd, kd, kd, block=block, stride=stride)
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1)
        err = s * (1 + sc * norms + lse.abs())
    elif score == "dot":
        err = s.abs() + sc * norms
    else:
        err = s.abs() + 1.0
    err = torch.where(vis, err, torch.zeros_like(err))

    def to_rows(x):
        x = nsa.map_to_selection_blocks(x, block=block, stride=stride, select_block=select_block, n=n)
        x = nsa.group_scores(x, hkv)
        return _row_sum(x, n, select_block) if per == "block" else x

    scores, bound = to_rows(s), TOL * to_rows(err)
    rows = scores.shape[2]
    own = torch.arange(rows) if per == "block" else torch.arange(n) // select_block
    return scores, bound, own


def picked_mask(idx, num_blocks):
    """int64 [..., top_n] (-1 padded) -> bool [..., S]."""
    slot = torch.where(idx < 0, torch.full_like(idx, num_blocks), idx)
    m = torch.zeros(*idx.shape[:-1], num_blocks + 1, dtype=torch.bool)
    m.scatter_(-1, slot, True)
    return m[..., :num_blocks]


def _beats(f, e, j_idx, a, b):
    """Pairwise [.., S(a), S(b)]: block a's score beats block b's beyond the bounds, or ties it
    exactly (both bounds 0: every term was an exact zero) with the lower index."""
    fa, fb = f.unsqueeze(-1), f.unsqueeze(-2)
    ea, eb = e.unsqueeze(-1), e.unsqueeze(-2)
    exact_tie = (ea == 0) & (eb == 0) & (fa == fb) & (j_idx.view(-1, 1) < j_idx.view(1, -1))
    return (fa - ea > fb + eb) | exact_tie


def check_against_reference(out, q, k_cmp, geometry, top_n, initial, local, score, per, scale=None):
    """Rows decided beyond the error bounds equal the reference; the rest are valid top-n choices.
    Returns the fraction of decided rows."""
    _, _, select_block = geometry
    ref = reference(q, k_cmp, geometry, top_n, initial, local, score, per, scale)
    f, e, own = decision_scores(q, k_cmp, geometry, score, per, scale)
    if per == "block":  # one decision per query block: its first position's row
        out, ref = out[:, :, ::select_block], ref[:, :, ::select_block]
    nb = f.shape[-1]
    j = torch.arange(nb)
    elig = j.view(1, nb) <= own.view(-1, 1)  # [R, S]
    forced = ((j.view(1, nb) < initial) | (j.view(1, nb) > own.view(-1, 1) - local)) & elig
    f = torch.where(forced, torch.full_like(f, float("inf")), f)
    e = torch.where(forced, torch.zeros_like(e), e)
    got, want = picked_mask(out, nb), picked_mask(ref, nb)

    def all_pairs(sel, pred):  # for every picked a and eligible unpicked b: pred[a, b]
        other = elig & ~sel
        need = sel.unsqueeze(-1) & other.unsqueeze(-2)
        return (pred | ~need).flatten(-2).all(-1)

    decided = all_pairs(want, _beats(f, e, j, j, j))
    # valid: no unpicked block beats a picked one beyond the bounds (nor wins an exact tie)
    beaten = _beats(f, e, j, j, j).transpose(-1, -2)
    valid = all_pairs(got, ~beaten)
    same = (out == ref).all(-1)
    bad = decided & ~same
    assert not bad.any(), f"{int(bad.sum())} decided rows differ; first at {bad.nonzero()[0].tolist()}: got {out[bad][0].tolist()}, want {ref[bad][0].tolist()}"
    assert valid.all(), f"{int((~valid).sum())} rows are not a top-n of the reference scores; first at {(~valid).nonzero()[0].tolist()}: got {out[~valid][0].tolist()}, reference {ref[~valid][0].tolist()}"
    return decided.float().mean().item()


def check_structure(out, n, geometry, top_n, initial, local, per):
    """Properties that hold whatever the scores: shape, forced blocks present, no future block,
    ascending without duplicates, -1 exactly in the trailing slots past min(top_n, own + 1)."""
    _, _, select_block = geometry
    assert out.dtype == torch.int64 and out.shape[2:] == (n, top_n)
    own = (torch.arange(n) // select_block).view(n, 1)
    count = torch.clamp(own + 1, max=top_n)
    slot = torch.arange(top_n).view(1, top_n)
    assert ((out >= 0) == (slot < count)).all(), "-1 padding not exactly past min(top_n, own + 1)"
    assert (out <= own).all(), "a block after the position's own block"
    valid = out >= 0
    if top_n > 1:
        step = out[..., 1:] - out[..., :-1]
        assert ((step > 0) | ~valid[..., 1:]).all(), "indices not strictly ascending"
    picked = picked_mask(out, nsa.num_selection_blocks(n, select_block))
    nb = picked.shape[-1]
    j = torch.arange(nb).view(1, nb)
    forced = ((j < initial) | (j > own - local)) & (j <= own)
    assert (picked | ~forced).all(), "a forced block is missing"
    if per == "block":
        first = out[:, :, (torch.arange(n) // select_block) * select_block]
        assert (out == first).all(), "positions of one query block chose differently"


# ------------------------------------------------------------------------------------------------
# Hypothesis: against the reference


@st.composite
def cases(draw):
    n = draw(st.integers(1, 300))
    geometry = draw(st.sampled_from(GEOMETRIES))
    # mostly fewer picks than blocks, so that rows have a choice to make
    num_blocks = nsa.num_selection_blocks(n, geometry[2])
    top_n = draw(st.integers(1, 8) if draw(st.booleans()) else st.integers(1, max(1, min(8, num_blocks // 2))))
    initial = draw(st.integers(0, top_n))
    local = draw(st.integers(0, top_n - initial))
    return dict(
        b=draw(st.integers(1, 2)),
        hkv=draw(st.integers(1, 2)),
        g=draw(st.sampled_from([1, 2, 3, 4, 8, 16])),
        n=n,
        d=draw(st.sampled_from([16, 32, 48])),
        geometry=geometry,
        dtype=draw(st.sampled_from(sorted(DTYPES))),
        top_n=top_n, initial=initial, local=local,
        score=draw(st.sampled_from(["probs", "dot", "cosine"])),
        per=draw(st.sampled_from(["token", "block"])),
        spread=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.kernel
@settings(max_examples=15)
@given(cases())
@example(dict(b=1, hkv=1, g=16, n=300, d=48, geometry=(32, 16, 64), dtype="bf16", top_n=8, initial=1, local=2,
              score="probs", per="token", spread=True, seed=1))
@example(dict(b=2, hkv=2, g=3, n=111, d=32, geometry=(8, 4, 16), dtype="fp16", top_n=5, initial=1, local=1,
              score="dot", per="block", spread=False, seed=2))
@example(dict(b=1, hkv=2, g=1, n=20, d=16, geometry=(32, 16, 64), dtype="fp32", top_n=3, initial=1, local=1,
              score="cosine", per="token", spread=False, seed=3))  # N < block: no compressed block
def test_matches_reference(case):
    c = case
    q, k_cmp = make_inputs(c["b"], c["hkv"], c["g"], c["n"], c["d"], c["geometry"], DTYPES[c["dtype"]], c["seed"], c["spread"])
    block, stride, _ = c["geometry"]
    lse = lse_of(q, k_cmp, block, stride)
    args = (c["geometry"], c["top_n"], c["initial"], c["local"], c["score"], c["per"])
    out = run_kernel(q, k_cmp, lse, *args)
    check_structure(out, c["n"], c["geometry"], c["top_n"], c["initial"], c["local"], c["per"])
    decided = check_against_reference(out, q, k_cmp, *args)
    assert decided >= 0.5, f"only {decided:.0%} of rows are decided beyond the error bounds: the inputs test little"


@pytest.mark.kernel
@pytest.mark.parametrize("score", ["probs", "dot", "cosine"])
@pytest.mark.parametrize("per", ["token", "block"])
def test_many_decisions(score, per):
    """19 selection blocks, 3 picks of which 1 + 1 forced, 4 heads summed: most rows choose."""
    geometry, n = (8, 4, 16), 300
    q, k_cmp = make_inputs(1, 1, 4, n, 16, geometry, torch.float32, seed=1)
    lse = lse_of(q, k_cmp, 8, 4)
    out = run_kernel(q, k_cmp, lse, geometry, 3, 1, 1, score, per)
    check_structure(out, n, geometry, 3, 1, 1, per)
    assert check_against_reference(out, q, k_cmp, geometry, 3, 1, 1, score, per) >= 0.8


@pytest.mark.kernel
@pytest.mark.parametrize("score", ["probs", "cosine"])
def test_strided_inputs(score):
    """q seen through .transpose(1, 2) of a [B, N, H, D] tensor, k_cmp and lse_cmp sliced: the
    same choice as from contiguous copies."""
    geometry, n = (16, 8, 32), 150
    q, k_cmp = make_inputs(2, 2, 2, n, 16, geometry, torch.float16, seed=4)
    lse = lse_of(q, k_cmp, 16, 8)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_wide = torch.cat([k_cmp, k_cmp], dim=-1)[..., :16]
    lse_wide = torch.stack([lse, lse], dim=-1)[..., 0]
    want = run_kernel(q, k_cmp, lse, geometry, 3, 1, 1, score, "token")
    got = run_kernel(q_t, k_wide, lse_wide, geometry, 3, 1, 1, score, "token")
    assert not q_t.is_contiguous() and not k_wide.is_contiguous() and not lse_wide.is_contiguous()
    assert torch.equal(got, want)
    check_against_reference(got, q, k_cmp, geometry, 3, 1, 1, score, "token")


@pytest.mark.kernel
def test_streams_many_selection_blocks():
    """S = 70 > one chunk of 64 selection blocks: the running top-n list carries across chunks."""
    geometry, n = (8, 4, 8), 553
    q, k_cmp = make_inputs(1, 1, 1, n, 16, geometry, torch.float32, seed=5, spread=True)
    lse = lse_of(q, k_cmp, 8, 4)
    for score, per in (("probs", "token"), ("dot", "block")):
        out = run_kernel(q, k_cmp, lse, geometry, 6, 1, 2, score, per)
        check_structure(out, n, geometry, 6, 1, 2, per)
        assert check_against_reference(out, q, k_cmp, geometry, 6, 1, 2, score, per) >= 0.5


# ------------------------------------------------------------------------------------------------
# Crafted inputs: exact ties and well-separated scores must match on every row


@pytest.mark.kernel
@pytest.mark.parametrize("score", ["probs", "dot", "cosine"])
@pytest.mark.parametrize("per", ["token", "block"])
def test_all_zero_scores_tie_to_lower_index(score, per):
    """q = 0: every block scores exactly 0 under dot and cosine (and probs are uniform over the
    visible blocks); the choice is the forced blocks, then the lowest indices."""
    geometry = (16, 8, 32)
    q = torch.zeros(1, 4, 200, 16)
    _, k_cmp = make_inputs(1, 2, 2, 200, 16, geometry, torch.float32, seed=7)
    lse = lse_of(q, k_cmp, 16, 8)
    out = run_kernel(q, k_cmp, lse, geometry, 4, 1, 1, score, per)
    check_structure(out, 200, geometry, 4, 1, 1, per)
    if score != "probs":
        assert torch.equal(out, reference(q, k_cmp, geometry, 4, 1, 1, score, per))
        # the rule spelled out at t = 150 (own block 4): forced 0 and 4, then the lowest, 1 and 2
        assert out[0, :, 150].tolist() == [[0, 1, 2, 4]] * 2
    else:
        check_against_reference(out, q, k_cmp, geometry, 4, 1, 1, score, per)


@pytest.mark.kernel
@pytest.mark.parametrize("score", ["dot", "cosine"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_separated_scores_match_exactly(score, geometry):
    """A few 'hot' compressed blocks, far enough apart that no selection block overlaps two, with
    distinct magnitudes; all other compressed keys are 0 (score exactly 0). Every selection-block
    score is then 0 or one hot value times an overlap weight, and those are far apart: the kernel
    must equal the reference on every row, including the exact ties among the zero blocks."""
    block, stride, select_block = geometry
    n, d, g = 260, 16, 3
    u, r = block // stride, select_block // stride
    c = nsa.num_compressed(n, block, stride)
    k_cmp = torch.zeros(1, 1, c, d)
    hot = list(range(0, c, 2 * (r + u)))
    gen = torch.Generator().manual_seed(11)
    mags = 1 + 0.05 * torch.randperm(len(hot), generator=gen).double()  # distinct in [1, 1.95]: w*a never meet
    for i, a in zip(hot, mags.tolist()):
        k_cmp[0, 0, i, 0] = a
        k_cmp[0, 0, i, 1] = 0.5 * a if score == "dot" else 0.3 * (a - 1)  # cosine: distinct angles
    # the same direction for every head; the sign flips per position, so negative scores rank
    # below the exact zeros on half the rows
    sign = torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0).view(1, 1, n, 1)
    q = torch.zeros(1, g, n, d)
    q[..., 0] = 1.0
    q = q * sign
    for per in ("token", "block"):
        out = run_kernel(q, k_cmp, None, geometry, 5, 1, 1, score, per)
        check_structure(out, n, geometry, 5, 1, 1, per)
        assert torch.equal(out, reference(q, k_cmp, geometry, 5, 1, 1, score, per)), per


@pytest.mark.kernel
@pytest.mark.parametrize("top_n", [3, 5])
def test_chunk_boundary(top_n):
    """S = 70 selection blocks, scored in chunks of 64: the hot compressed block 127 (pieces 127
    and 128) straddles the chunk boundary and gives blocks 63 and 64 the same largest score. Block
    64 must get it from the compressed block the chunks share, and the exact tie across the
    boundary goes to 63. Other hot blocks (every 8th) are smaller, distinct."""
    geometry, n, d = (8, 4, 8), 553, 16
    c = nsa.num_compressed(n, 8, 4)
    k_cmp = torch.zeros(1, 1, c, d)
    hot = list(range(7, c, 8))
    gen = torch.Generator().manual_seed(13)
    mags = 1 + 0.05 * torch.randperm(len(hot), generator=gen).float()
    for i, a in zip(hot, mags.tolist()):
        k_cmp[0, 0, i, 0] = 2.5 if i == 127 else a
    q = torch.zeros(1, 1, n, d)
    q[..., 0] = 1.0
    for per in ("token", "block"):
        out = run_kernel(q, k_cmp, None, geometry, top_n, 1, 1, "dot", per)
        check_structure(out, n, geometry, top_n, 1, 1, per)
        assert torch.equal(out, reference(q, k_cmp, geometry, top_n, 1, 1, "dot", per)), per
        assert 63 in out[0, 0, -1].tolist() and (top_n == 3) != (64 in out[0, 0, -1].tolist())


@pytest.mark.kernel
def test_probs_dominant_blocks_match_exactly():
    """score="probs" with large distinct logits: each position's mass sits on a few compressed
    blocks whose probabilities differ by large factors, so the reference's choice is decided on
    every row that has enough visible blocks."""
    geometry = (16, 16, 16)  # one compressed block per selection block: no overlap sums
    n, d = 257, 16
    c = nsa.num_compressed(n, 16, 16)
    gen = torch.Generator().manual_seed(3)
    logits = 0.7 * torch.randperm(c, generator=gen).double()  # distinct, 0.7 nats apart
    k_cmp = torch.zeros(1, 1, c, d, dtype=F64)
    k_cmp[0, 0, :, 0] = logits.float().double()  # exact in float32, as the kernel reads it
    q = torch.zeros(1, 2, n, d, dtype=F64)
    q[..., 0] = math.sqrt(d)  # logit of block i is logits[i] for every position and head
    lse = lse_of(q, k_cmp, 16, 16)
    out = run_kernel(q.float(), k_cmp.float(), lse, geometry, 6, 1, 1, "probs", "token")
    assert torch.equal(out, reference(q, k_cmp, geometry, 6, 1, 1, "probs", "token"))


# ------------------------------------------------------------------------------------------------
# Arbitrary inputs: structure only


@pytest.mark.kernel
@settings(max_examples=10)
@given(
    n=st.integers(1, 200),
    geometry=st.sampled_from(GEOMETRIES),
    top_n=st.integers(1, 6),
    score=st.sampled_from(["probs", "dot", "cosine"]),
    per=st.sampled_from(["token", "block"]),
    kind=st.sampled_from(["huge", "constant", "sparse"]),
    seed=st.integers(0, 2**16),
)
def test_structure_on_arbitrary_inputs(n, geometry, top_n, score, per, kind, seed):
    block, stride, _ = geometry
    initial, local = min(1, top_n), min(2, top_n - min(1, top_n))
    q, k_cmp = make_inputs(1, 1, 2, n, 16, geometry, torch.float16, seed)
    if kind == "huge":  # logits of thousands: probabilities underflow to exact zeros
        q = (q.float() * 30).half()
    elif kind == "constant":  # every score equal per row: ties everywhere
        q = torch.ones_like(q)
        k_cmp = torch.ones_like(k_cmp)
    else:
        keep = torch.rand(q.shape[:3] + (1,), generator=torch.Generator().manual_seed(seed)) < 0.5
        q = q * keep.to(q.dtype)
    lse = lse_of(q, k_cmp, block, stride)
    out = run_kernel(q, k_cmp, lse, geometry, top_n, initial, local, score, per)
    check_structure(out, n, geometry, top_n, initial, local, per)


# ------------------------------------------------------------------------------------------------
# Arguments


def test_empty_sequence_and_batch():
    for shape in ((1, 2, 0, 16), (0, 2, 5, 16)):
        q = torch.zeros(shape)
        k_cmp = torch.zeros(shape[0], 1, 0, 16)
        out = run_kernel(q, k_cmp, torch.zeros(shape[:3]), (32, 16, 64), 3, 1, 1, "probs", "token")
        assert out.shape == (shape[0], 1, shape[2], 3) and out.dtype == torch.int64


@pytest.mark.parametrize(
    "change, word",
    [
        (dict(score="softmax"), "score"),
        (dict(per="row"), "per"),
        (dict(top_n=2, initial=2, local=1), r"initial \+ local"),
        (dict(stride=5), "stride"),
        (dict(top_n=0), "top_n"),
        (dict(block=16.0), "block"),
        (dict(k_dtype=torch.float16), "k_cmp"),
        (dict(k_cmp_len=4), "k_cmp"),
        (dict(lse_shape=(1, 2, 99)), "lse_cmp"),
        (dict(lse_dtype=torch.float64), "lse_cmp"),
        (dict(hkv=3), "k_cmp"),
    ],
)
def test_bad_arguments(change, word):
    ch = dict(change)
    hkv = ch.pop("hkv", 1)
    n, d = 100, 16
    c = ch.pop("k_cmp_len", nsa.num_compressed(n, 32, 16))
    q = torch.zeros(1, 2, n, d)
    k_cmp = torch.zeros(1, hkv, c, d, dtype=ch.pop("k_dtype", torch.float32))
    lse = torch.zeros(ch.pop("lse_shape", (1, 2, n)), dtype=ch.pop("lse_dtype", torch.float32))
    kw = dict(block=32, stride=16, select_block=64, top_n=4, initial=1, local=2, score="probs", per="token", scale=None)
    kw.update(ch)
    with pytest.raises(ValueError, match=word):
        nsa_topn.topn_select(q, k_cmp, lse, **kw)
