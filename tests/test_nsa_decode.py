"""NSA decoding (nsa_attention_with_kvcache of a generated NSA module) against the float64 oracle
run on each whole sequence, read at the last Nq positions; the compressed-cache helper against
mean pooling of the whole keys; the q_pos arguments of the selection kernels."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attngen.kernels import nsa_decode, nsa_topn
from attngen.reference import nsa as nr
from attngen.testing import compare, nsa_composed

from helpers import generated

F64 = torch.float64


def ranked(mod, q, k_cmp, n):
    """The float64 scores the selection ranks, [B, Hkv, N, S]: per position, or per="block" the sum
    over the position's query block (positions < n), with forced blocks +inf and future ones -inf."""
    s = nr.importance_scores(q.double(), k_cmp.double(), block=mod.BLOCK, stride=mod.STRIDE, score=mod.SCORE)
    s = nr.group_scores(nr.map_to_selection_blocks(s, block=mod.BLOCK, stride=mod.STRIDE, select_block=mod.SELECT_BLOCK, n=n), mod.KV_HEADS)
    nb = s.shape[-1]
    own = torch.arange(n) // mod.SELECT_BLOCK
    if mod.PER == "block":
        onehot = (own.view(n, 1) == torch.arange(nb).view(1, nb)).double()  # [N, S]
        s = torch.einsum("bhts,tq->bhqs", s, onehot)[:, :, own]
    j = torch.arange(nb).view(1, nb)
    o = own.view(n, 1)
    s = torch.where(((j < mod.INITIAL) | (j > o - mod.LOCAL)) & (j <= o), math.inf, s)
    return torch.where(j > o, -math.inf, s)


def sequences(mod, lengths, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    q = torch.randn(len(lengths), mod.Q_HEADS, n, mod.HEAD_DIM, generator=g).to(dtype)
    k = torch.randn(len(lengths), mod.KV_HEADS, n, mod.HEAD_DIM, generator=g).to(dtype)
    v = torch.randn(len(lengths), mod.KV_HEADS, n, mod.V_HEAD_DIM, generator=g).to(dtype)
    gates = torch.rand(len(lengths), mod.Q_HEADS, n, 3, generator=g).to(dtype)
    return q, k, v, gates


def decode(mod, q, k, v, gates, lengths, n_q, n_new, *, spare=5):
    """Prefill the caches with the first L_b - n_new tokens (compressed cache by the helper), then
    decode the last n_q queries, appending n_new tokens. Returns (o, aux, caches)."""
    b = len(lengths)
    cap = max(lengths) + spare
    cache_len = torch.tensor([n - n_new for n in lengths], dtype=torch.int32)
    k_cache = torch.full((b, mod.KV_HEADS, cap, mod.HEAD_DIM), float("nan"), dtype=q.dtype)
    v_cache = torch.full((b, mod.KV_HEADS, cap, mod.V_HEAD_DIM), float("nan"), dtype=q.dtype)
    sc = nr.num_compressed(cap, mod.BLOCK, mod.STRIDE) + 1
    k_cmp = torch.full((b, mod.KV_HEADS, sc, mod.HEAD_DIM), float("nan"), dtype=q.dtype)
    v_cmp = torch.full((b, mod.KV_HEADS, sc, mod.V_HEAD_DIM), float("nan"), dtype=q.dtype)
    qq, gg = q.new_zeros(b, mod.Q_HEADS, n_q, mod.HEAD_DIM), gates.new_zeros(b, mod.Q_HEADS, n_q, 3)
    kn, vn = k.new_zeros(b, mod.KV_HEADS, n_new, mod.HEAD_DIM), v.new_zeros(b, mod.KV_HEADS, n_new, mod.V_HEAD_DIM)
    extra = {}
    if mod.PER == "block":
        extra["q_block_cache"] = torch.full((b, mod.Q_HEADS, mod.SELECT_BLOCK, mod.HEAD_DIM), float("nan"), dtype=q.dtype)
    for i, n in enumerate(lengths):
        c0 = n - n_new
        k_cache[i, :, :c0], v_cache[i, :, :c0] = k[i, :, :c0], v[i, :, :c0]
        kn[i], vn[i] = k[i, :, c0:n], v[i, :, c0:n]
        qq[i], gg[i] = q[i, :, n - n_q:n], gates[i, :, n - n_q:n]
        if mod.PER == "block":
            s0 = ((n - n_q) // mod.SELECT_BLOCK) * mod.SELECT_BLOCK
            for p in range(s0, n - n_q):
                extra["q_block_cache"][i, :, p % mod.SELECT_BLOCK] = q[i, :, p]
    mod.nsa_append_compressed_(k_cache, v_cache, k_cmp, v_cmp, torch.zeros_like(cache_len), cache_len)
    o, aux = mod.nsa_attention_with_kvcache(
        qq, k_cache, v_cache, cache_len, gg, k_cmp_cache=k_cmp, v_cmp_cache=v_cmp,
        k=kn if n_new else None, v=vn if n_new else None, return_aux=True, **extra,
    )
    return o, aux, (k_cache, v_cache, k_cmp, v_cmp, extra.get("q_block_cache"))


def check_decode(mod, lengths, n_q, n_new, dtype, seed):
    q, k, v, gates = sequences(mod, lengths, dtype, seed)
    o, aux, (k_cache, _, k_cmp_cache, _, qbc) = decode(mod, q, k, v, gates, lengths, n_q, n_new)
    idx = aux["block_indices"]
    for i, n in enumerate(lengths):
        qi, ki, vi, gi = (t[i:i + 1, :, :n] for t in (q, k, v, gates))
        k_cmp = nr.compress_mean(ki.double(), block=mod.BLOCK, stride=mod.STRIDE)
        c = k_cmp.shape[2]
        # the cache and the compressed cache after the append
        assert torch.equal(k_cache[i, :, :n], k[i, :, :n])
        assert torch.allclose(k_cmp_cache[i, :, :c].double(), k_cmp[0], atol=2e-2, rtol=1e-2)
        # the selection: a top-n of the oracle's scores (the same scores picked, up to rounding)
        r = ranked(mod, qi, k_cmp, n)[0, :, n - n_q:]  # [Hkv, Nq, S]
        mine = idx[i]
        assert bool((mine < r.shape[-1]).all())
        picked = torch.where(mine >= 0, torch.gather(r, 2, mine.clamp_min(0)), -math.inf).sort(-1).values
        best = torch.cat([r, r.new_full((*r.shape[:-1], mod.TOP_N), -math.inf)], -1).sort(-1, descending=True).values[..., :mod.TOP_N].sort(-1).values
        fin = torch.isfinite(best)
        assert torch.equal(torch.isfinite(picked), fin) and torch.equal(picked[~fin], best[~fin])
        assert torch.allclose(picked[fin], best[fin], rtol=1e-3, atol=1e-3), (picked, best)
        # the output: the oracle over the whole sequence with those indices at the last positions
        _, raux = nr.nsa_reference(qi.double(), ki.double(), vi.double(), gi.double(), block=mod.BLOCK, stride=mod.STRIDE,
                                   select_block=mod.SELECT_BLOCK, top_n=mod.TOP_N, initial=mod.INITIAL, local=mod.LOCAL,
                                   window=max(mod.WINDOW, 1), score=mod.SCORE, per=mod.PER)
        full = raux["block_indices"].clone()
        full[0, :, n - n_q:] = mine
        ins = (qi, ki, vi, gi)
        ref, rlse = nsa_composed(mod, *ins, None, None, full)
        base, blse = nsa_composed(mod, *ins, None, None, full, compute_dtype=None)
        sl = slice(n - n_q, n)
        for name, a, rr, bb in [("o", o[i], ref[0, :, sl], base[0, :, sl])] + [
                (nm, aux[nm][i], rlse[nm][0, :, sl], blse[nm][0, :, sl]) for nm in rlse]:
            res = compare(name, a, rr, bb, dtype)
            assert res.ok, f"{mod.NAME} L={lengths} Nq={n_q} Nnew={n_new} batch {i}: {res}"
        if qbc is not None:  # the query cache holds the last block's queries
            s0 = ((n - 1) // mod.SELECT_BLOCK) * mod.SELECT_BLOCK
            for p in range(max(s0, n - n_q), n):
                assert torch.equal(qbc[i, :, p % mod.SELECT_BLOCK], q[i, :, p])


CASES = [
    # (spec, lengths, Nq, Nnew): cache lengths off the block grid, one per batch
    ("nsa_tiny", [37], 1, 1),
    ("nsa_tiny", [21, 40], 3, 3),
    ("nsa_tiny", [50, 16], 4, 2),
    ("nsa_g4_weighted", [70, 33], 1, 1),
    ("nsa_g4_weighted", [96], 2, 0),
    ("moba", [41, 64], 1, 1),
    ("moba", [30, 47], 4, 4),
]


@pytest.mark.kernel
@pytest.mark.parametrize("name,lengths,n_q,n_new", CASES)
def test_decode_matches_reference(name, lengths, n_q, n_new):
    mod = generated(name)
    check_decode(mod, lengths, n_q, n_new, torch.float16, seed=len(lengths) * 7 + n_q)


@pytest.mark.kernel
@settings(max_examples=4, deadline=None)
@given(
    name=st.sampled_from(["nsa_tiny", "nsa_g4_weighted", "moba"]),
    lengths=st.lists(st.integers(4, 70), min_size=1, max_size=2),
    n_q=st.integers(1, 4),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_decode_property(name, lengths, n_q, dtype, seed):
    """Random cache lengths (one per batch), Nq queries appended as Nq new tokens."""
    check_decode(generated(name), lengths, n_q, n_q, dtype, seed)


@pytest.mark.kernel
def test_decode_without_append_and_fp32():
    """Queries over a cache already holding them (Nnew = 0), float32, a query before position 0
    (L < Nq) seeing nothing."""
    mod = generated("nsa_tiny")
    check_decode(mod, [29, 8], 3, 0, torch.float32, seed=5)
    q, k, v, gates = sequences(mod, [2], torch.float32, 1)
    o, aux, _ = decode(mod, q, k, v, gates, [2], 3, 0)
    assert bool((o[0, :, 0] == 0).all()) and bool((aux["block_indices"][0, :, 0] == -1).all())


def test_append_compressed_matches_mean_pooling_of_the_whole_keys():
    """Growing the cache in steps of 1..5 tokens keeps the compressed cache equal to compress_mean
    of all keys so far (and leaves entries not yet complete untouched)."""
    mod = generated("nsa_g4_weighted")
    g = torch.Generator().manual_seed(0)
    b, n = 2, 75
    k = torch.randn(b, mod.KV_HEADS, n, mod.HEAD_DIM, generator=g, dtype=F64).float()
    v = torch.randn(b, mod.KV_HEADS, n, mod.V_HEAD_DIM, generator=g, dtype=F64).float()
    k_cmp = torch.full((b, mod.KV_HEADS, 10, mod.HEAD_DIM), 7.0)
    v_cmp = torch.full((b, mod.KV_HEADS, 10, mod.V_HEAD_DIM), 7.0)
    lens = [0, 0]
    steps = [[3, 1], [5, 16], [1, 2], [9, 4], [16, 17], [20, 30], [21, 5]]
    for step in steps:
        new = [a + s for a, s in zip(lens, step)]
        mod.nsa_append_compressed_(k, v, k_cmp, v_cmp, torch.tensor(lens, dtype=torch.int32), torch.tensor(new, dtype=torch.int32))
        lens = new
        for i, m in enumerate(lens):
            want_k = nr.compress_mean(k[i:i + 1, :, :m].double(), block=mod.BLOCK, stride=mod.STRIDE)[0]
            want_v = nr.compress_mean(v[i:i + 1, :, :m].double(), block=mod.BLOCK, stride=mod.STRIDE)[0]
            c = want_k.shape[1]
            assert torch.allclose(k_cmp[i, :, :c].double(), want_k, atol=1e-6)
            assert torch.allclose(v_cmp[i, :, :c].double(), want_v, atol=1e-6)
            assert bool((k_cmp[i, :, c:] == 7.0).all())


def test_append_compressed_with_a_learnable_compressor():
    """The caller's compressor (attngen.layers.nsa) applied to the new windows equals the compressor
    applied to the whole keys."""
    from attngen.layers.nsa import make_compress

    mod = generated("nsa_g4_weighted")
    torch.manual_seed(0)
    ck = make_compress("weighted", mod.BLOCK, mod.STRIDE, mod.HEAD_DIM, heads=mod.KV_HEADS)
    cv = make_compress("mlp", mod.BLOCK, mod.STRIDE, mod.V_HEAD_DIM, heads=mod.KV_HEADS)
    k = torch.randn(1, mod.KV_HEADS, 60, mod.HEAD_DIM)
    v = torch.randn(1, mod.KV_HEADS, 60, mod.V_HEAD_DIM)
    k_cmp, v_cmp = torch.zeros(1, mod.KV_HEADS, 8, mod.HEAD_DIM), torch.zeros(1, mod.KV_HEADS, 8, mod.V_HEAD_DIM)
    with torch.no_grad():
        for a, z in [(0, 20), (20, 41), (41, 60)]:
            mod.nsa_append_compressed_(k, v, k_cmp, v_cmp, torch.tensor([a], dtype=torch.int32), torch.tensor([z], dtype=torch.int32),
                                       compress=lambda kk, vv: (ck(kk), cv(vv)))
        c = nr.num_compressed(60, mod.BLOCK, mod.STRIDE)
        assert torch.allclose(k_cmp[:, :, :c], ck(k), atol=1e-5)
        assert torch.allclose(v_cmp[:, :, :c], cv(v), atol=1e-5)


@pytest.mark.kernel
@pytest.mark.parametrize("score", ["probs", "dot", "cosine"])
def test_topn_q_pos_equals_the_rows_of_the_whole_sequence(score):
    """topn_select with q_pos over the last rows and a longer compressed cache picks what the
    whole-sequence call picks for those rows."""
    g = torch.Generator().manual_seed(3)
    block, stride, sb, n, tail = 8, 4, 16, 70, 5
    q = torch.randn(2, 4, n, 16, generator=g)
    c = nr.num_compressed(n, block, stride)
    k_cmp = torch.randn(2, 2, c, 16, generator=g)
    lse = nr.compressed_attention(q.double(), k_cmp.double(), k_cmp.double(), block=block, stride=stride)[1].float()
    kw = dict(block=block, stride=stride, select_block=sb, top_n=3, initial=1, local=1, score=score, per="token", scale=None)
    whole = nsa_topn.topn_select(q, k_cmp, lse, **kw)
    spare = torch.cat([k_cmp, torch.full_like(k_cmp[:, :, :6], float("nan"))], dim=2)
    q_pos = torch.tensor([n - tail, n - tail - 9], dtype=torch.int32)
    rows = torch.stack([q[0, :, n - tail:], q[1, :, n - tail - 9:n - 9]])
    lrows = torch.stack([lse[0, :, n - tail:], lse[1, :, n - tail - 9:n - 9]])
    part = nsa_topn.topn_select(rows, spare, lrows, **kw, q_pos=q_pos)
    assert torch.equal(part[0], whole[0, :, n - tail:])
    assert torch.equal(part[1], whole[1, :, n - tail - 9:n - 9])


@pytest.mark.parametrize("change,word", [
    (dict(k_cmp_cache="short"), "compressed cache is too small"),
    (dict(gates="bad"), "gates"),
    (dict(q_block_cache="given"), "q_block_cache"),
])
def test_bad_arguments_raise_and_write_nothing(change, word):
    mod = generated("nsa_tiny")
    b, cap = 1, 40
    q = torch.randn(b, mod.Q_HEADS, 1, mod.HEAD_DIM)
    k_cache = torch.zeros(b, mod.KV_HEADS, cap, mod.HEAD_DIM)
    v_cache = torch.zeros(b, mod.KV_HEADS, cap, mod.V_HEAD_DIM)
    sc = 2 if change.get("k_cmp_cache") == "short" else 10
    k_cmp = torch.zeros(b, mod.KV_HEADS, sc, mod.HEAD_DIM)
    v_cmp = torch.zeros(b, mod.KV_HEADS, sc, mod.V_HEAD_DIM)
    gates = torch.rand(b, mod.Q_HEADS, 2 if change.get("gates") else 1, 3)
    extra = {"q_block_cache": torch.zeros(b, mod.Q_HEADS, mod.SELECT_BLOCK, mod.HEAD_DIM)} if change.get("q_block_cache") else {}
    k = torch.ones(b, mod.KV_HEADS, 1, mod.HEAD_DIM)
    with pytest.raises(ValueError, match=word):
        mod.nsa_attention_with_kvcache(q, k_cache, v_cache, torch.tensor([20], dtype=torch.int32), gates, k_cmp_cache=k_cmp,
                                       v_cmp_cache=v_cmp, k=k, v=k[..., : mod.V_HEAD_DIM], **extra)
    assert bool((k_cache == 0).all()) and bool((k_cmp == 0).all())


def test_moba_needs_its_query_cache():
    mod = generated("moba")
    q = torch.randn(1, mod.Q_HEADS, 1, mod.HEAD_DIM, dtype=torch.float16)
    kc = torch.zeros(1, mod.KV_HEADS, 32, mod.HEAD_DIM, dtype=torch.float16)
    with pytest.raises(ValueError, match="q_block_cache is required"):
        mod.nsa_attention_with_kvcache(q, kc, kc, torch.tensor([5], dtype=torch.int32), torch.rand(1, mod.Q_HEADS, 1, 3).half(),
                                       k_cmp_cache=kc, v_cmp_cache=kc)
