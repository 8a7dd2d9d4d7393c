"""attention_with_kvcache: KV-cache decoding of every dense generated module.

Each call is compared with the float64 reference computed sequence by sequence: batch b's keys are
the cache's first cache_seqlens[b] positions followed by the new k (built here, independently of
the cache the kernel reads), its queries sit at positions L_b - Nq .. L_b - 1, and the module's
MASK / SCORE_MOD are evaluated at those absolute positions with q_len = kv_len = L_b. Contiguous
and paged caches (shuffled page tables), GQA groups 1 to 8, Nq 1..16, fp16 / bf16 / fp32, split
counts 1..3; the cache after an append; every ValueError, with the cache unchanged after it.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from attngen.language.expr import parse_expr, parse_params, to_torch
from attngen.param_values import check_values
from attngen.reference.dense import attention_reference
from attngen.runtime import DEVICE, TORCH_DTYPES
from attngen.testing import compare

from helpers import SPEC_PATHS, generated

# Shipped specs across GQA groups (G = Hq / Hkv): llama3_gqa 4, mqa 8, mha 1, sliding_window 2,
# alibi 2 (score_mod reading a per-head tensor), document 2 (an int tensor mask), softcap 2 (a
# float parameter), gqa_hd80 (head dims that are not powers of two, Dv != D).
SPECS = ["llama3_gqa", "mqa", "mha", "sliding_window", "alibi", "document", "softcap", "gqa_hd80"]


# --------------------------------------------------------------------------- the reference


def _expr(mod, text: str, kind: str):
    decls = parse_params(dict(mod.PARAMS)) if mod.PARAMS else {}
    return to_torch(parse_expr(text, kind=kind, params=decls))


def shifted_mask_and_mod(mod, params: dict, b: int, first: int, length: int):
    """attention_reference's mask and score_mod for batch row b whose first reference query row
    sits at absolute position `first`, keys at 0..length-1, q_len = kv_len = length."""
    mask = None
    if mod.MASK != "none":
        fn = _expr(mod, "q_idx >= kv_idx" if mod.MASK == "causal" else mod.MASK, "mask")

        def mask(bi, h, q_idx, kv_idx):
            return fn(bi + b, h, q_idx + first, kv_idx, length, length, **params)

    score_mod = None
    if mod.SCORE_MOD:
        sfn = _expr(mod, mod.SCORE_MOD, "score_mod")

        def score_mod(score, bi, h, q_idx, kv_idx):
            return sfn(bi + b, h, q_idx + first, kv_idx, length, length, score=score, **params)

    return mask, score_mod


def reference(mod, q, keys, values, lengths, params, scale, compute_dtype):
    """(o [B, Hq, Nq, Dv], lse [B, Hq, Nq]) sequence by sequence; keys[b] / values[b] are
    [Hkv, L_b, D]; query rows before position 0 give o = 0, lse = -inf."""
    b, hq, nq, _ = q.shape
    dt = compute_dtype or q.dtype
    o = torch.zeros(b, hq, nq, mod.V_HEAD_DIM, dtype=dt)
    lse = torch.full((b, hq, nq), float("-inf"), dtype=dt if compute_dtype else torch.float32)
    rparams = {n: (t.to(compute_dtype) if compute_dtype and isinstance(t, torch.Tensor) and t.is_floating_point() else t)
               for n, t in params.items()}
    for i, length in enumerate(lengths):
        skip = max(0, nq - length)  # rows before the sequence's start
        if skip == nq:
            continue
        mask, score_mod = shifted_mask_and_mod(mod, rparams, i, length - nq + skip, length)
        ro, rlse = attention_reference(
            q[i:i + 1, :, skip:].cpu(), keys[i][None].cpu(), values[i][None].cpu(), scale=scale, mask=mask,
            compute_dtype=compute_dtype, score_mod=score_mod,
        )
        o[i, :, skip:] = ro[0].to(o.dtype)
        lse[i, :, skip:] = rlse[0].to(lse.dtype)
    return o, lse


# --------------------------------------------------------------------------- caches


def make_case(mod, *, batch, n_q, seqlens, n_new, capacity, dtype, paged, page_size, bnhd, seed):
    """q, a cache (contiguous or paged with a shuffled page table) holding random keys at
    0..seqlens[b]-1 and NaN past them, new keys/values (or None), and the full key/value
    sequences the reference sees."""
    g = torch.Generator().manual_seed(seed)
    hkv, d, dv = mod.KV_HEADS, mod.HEAD_DIM, mod.V_HEAD_DIM

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q = rand(batch, mod.Q_HEADS, n_q, d)
    full_k = [rand(hkv, s + n_new, d) for s in seqlens]
    full_v = [rand(hkv, s + n_new, dv) for s in seqlens]
    new_k = torch.stack([fk[:, s:] for fk, s in zip(full_k, seqlens)]) if n_new else None
    new_v = torch.stack([fv[:, s:] for fv, s in zip(full_v, seqlens)]) if n_new else None
    nan = float("nan")
    if not paged:
        kc = torch.full((batch, capacity, hkv, d) if bnhd else (batch, hkv, capacity, d), nan, dtype=dtype)
        vc = torch.full((batch, capacity, hkv, dv) if bnhd else (batch, hkv, capacity, dv), nan, dtype=dtype)
        if bnhd:  # [B, S, H, D] storage, passed as a transposed view
            kc, vc = kc.transpose(1, 2), vc.transpose(1, 2)
        for i, s in enumerate(seqlens):
            kc[i, :, :s] = full_k[i][:, :s]
            vc[i, :, :s] = full_v[i][:, :s]
        table = None
    else:
        max_pages = -(-capacity // page_size)
        num_pages = batch * max_pages + 1  # one page no row uses
        perm = torch.randperm(num_pages, generator=g)[: batch * max_pages]
        table = perm.view(batch, max_pages).to(torch.int32)
        shape_k = (num_pages, page_size, hkv, d) if bnhd else (num_pages, hkv, page_size, d)
        shape_v = (num_pages, page_size, hkv, dv) if bnhd else (num_pages, hkv, page_size, dv)
        kc, vc = torch.full(shape_k, nan, dtype=dtype), torch.full(shape_v, nan, dtype=dtype)
        if bnhd:  # vLLM's / FlashAttention's [num_pages, page_size, H, D]
            kc, vc = kc.transpose(1, 2), vc.transpose(1, 2)
        for i, s in enumerate(seqlens):
            for j in range(s):
                kc[table[i, j // page_size], :, j % page_size] = full_k[i][:, j]
                vc[table[i, j // page_size], :, j % page_size] = full_v[i][:, j]
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return dict(q=dev(q), k_cache=dev(kc), v_cache=dev(vc), cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device=DEVICE),
                k=dev(new_k), v=dev(new_v), block_table=dev(table), full_k=full_k, full_v=full_v)


def cache_positions(case, b, length, which="k_cache"):
    """The cache's positions 0..length-1 of batch row b, [Hkv, length, D]."""
    c, table = case[which].cpu(), case["block_table"]
    if table is None:
        return c[b, :, :length]
    page = c.shape[2]
    return torch.stack([c[int(table[b, j // page]), :, j % page] for j in range(length)], dim=1)


def run_and_check(mod, case, *, params, num_splits, scale=None):
    q = case["q"]
    lengths = [int(s) + (case["k"].shape[2] if case["k"] is not None else 0) for s in case["cache_seqlens"].tolist()]
    o, lse = mod.attention_with_kvcache(
        q, case["k_cache"], case["v_cache"], case["cache_seqlens"], k=case["k"], v=case["v"],
        block_table=case["block_table"], num_splits=num_splits, scale=scale, return_lse=True, **params,
    )
    assert o.shape == (q.shape[0], mod.Q_HEADS, q.shape[2], mod.V_HEAD_DIM) and o.dtype == q.dtype
    assert lse.shape == (q.shape[0], mod.Q_HEADS, q.shape[2]) and lse.dtype == torch.float32
    # the append: every position 0..L_b-1 now holds the sequence's keys and values, exactly
    for i, length in enumerate(lengths):
        assert torch.equal(cache_positions(case, i, length, "k_cache"), case["full_k"][i]), f"k_cache row {i}"
        assert torch.equal(cache_positions(case, i, length, "v_cache"), case["full_v"][i]), f"v_cache row {i}"
    cpu_params = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in params.items()}
    ro, rlse = reference(mod, q, case["full_k"], case["full_v"], lengths, cpu_params, scale, torch.float64)
    bo, blse = reference(mod, q, case["full_k"], case["full_v"], lengths, cpu_params, scale, None)
    results = [compare("o", o, ro, bo, q.dtype), compare("lse", lse, rlse, blse, q.dtype)]
    bad = [str(r) for r in results if not r.ok]
    assert not bad, "\n".join(bad)
    return o, lse


def params_for(mod, batch, capacity):
    return check_values(mod, batch=batch, n_q=capacity, n_k=capacity, seed=0)


# --------------------------------------------------------------------------- property tests


@st.composite
def cases(draw, name):
    mod = generated(name)
    dtypes = [TORCH_DTYPES[d] for d in mod.DTYPES]
    batch = draw(st.integers(1, 2))
    n_q = draw(st.sampled_from([1, 1, 2, 3, 5, 16]))
    n_new = draw(st.sampled_from([0, 1, n_q]))
    seqlens = draw(st.lists(st.integers(0, 150), min_size=batch, max_size=batch))
    paged = draw(st.booleans())
    page_size = draw(st.sampled_from([16, 32]))
    capacity = max(seqlens) + n_new + draw(st.integers(0, 20))
    return dict(
        batch=batch, n_q=n_q, seqlens=seqlens, n_new=n_new, capacity=max(capacity, 1), dtype=draw(st.sampled_from(dtypes)),
        paged=paged, page_size=page_size, bnhd=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
        num_splits=draw(st.integers(1, 3)),
    )


@pytest.mark.kernel
@pytest.mark.parametrize("name", SPECS)
@settings(max_examples=10)
@given(data=st.data())
def test_matches_reference(name, data):
    mod = generated(name)
    c = data.draw(cases(name))
    splits = c.pop("num_splits")
    case = make_case(mod, **c)
    run_and_check(mod, case, params=params_for(mod, c["batch"], c["capacity"]), num_splits=splits)


@pytest.mark.kernel
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("name,dtype", [("mha", torch.float32), ("llama3_gqa", torch.bfloat16), ("mqa", torch.float16)])
def test_split_counts_agree(name, dtype, paged):
    mod = generated(name)
    c = dict(batch=2, n_q=2, seqlens=[200, 77], n_new=1, capacity=224, dtype=dtype, paged=paged, page_size=16, bnhd=False, seed=3)
    params = params_for(mod, 2, 224)
    outs = []
    for splits in (1, 2, 3):
        case = make_case(mod, **c)  # a fresh cache each time: the append happens once per cache
        outs.append(run_and_check(mod, case, params=params, num_splits=splits))
    o1, l1 = outs[0]
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for o, lse in outs[1:]:
        torch.testing.assert_close(o.float(), o1.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(lse, l1, atol=1e-5, rtol=1e-5)


@pytest.mark.kernel
@pytest.mark.parametrize("name,n_q,splits", [("mqa", 16, 3), ("llama3_gqa", 16, 2), ("document", 13, 2), ("gqa_hd80", 7, 1)])
def test_many_rows_paged_transposed(name, n_q, splits):
    """G x Nq rows past one row tile (mqa: 8 x 16 = 128 rows, two tiles of 64), a chunk of new keys
    longer than one page, a [num_pages, page_size, H, D] cache passed transposed."""
    mod = generated(name)
    c = dict(batch=2, n_q=n_q, seqlens=[90, 5], n_new=n_q, capacity=128, dtype=torch.float16, paged=True,
             page_size=16, bnhd=True, seed=11)
    run_and_check(mod, make_case(mod, **c), params=params_for(mod, 2, 128), num_splits=splits)


@pytest.mark.kernel
@pytest.mark.parametrize("n_q", [1, 4])
@pytest.mark.parametrize("paged", [False, True])
def test_sliding_window_reads_only_window_tiles(n_q, paged):
    """Cache positions in key tiles wholly before the window hold NaN: a read of one would make o
    NaN (p = 0 times NaN), so a finite, correct o shows they were not visited."""
    mod = generated("sliding_window")
    w, length = 20, 300
    c = dict(batch=1, n_q=n_q, seqlens=[length], n_new=0, capacity=320, dtype=torch.float16, paged=paged,
             page_size=16, bnhd=False, seed=5)
    case = make_case(mod, **c)
    first_tile = (length - n_q - w + 1) // mod._DECODE_BLOCK_N * mod._DECODE_BLOCK_N
    assert first_tile > 0
    for name in ("k_cache", "v_cache"):
        cache, table = case[name], case["block_table"]
        for j in range(first_tile):
            if table is None:
                cache[0, :, j] = float("nan")
            else:
                cache[int(table[0, j // 16]), :, j % 16] = float("nan")
    o = mod.attention_with_kvcache(case["q"], case["k_cache"], case["v_cache"], case["cache_seqlens"],
                                   block_table=case["block_table"], num_splits=2, w=w)
    assert torch.isfinite(o).all()
    ro, _ = reference(mod, case["q"], case["full_k"], case["full_v"], [length], {"w": w}, None, torch.float64)
    bo, _ = reference(mod, case["q"], case["full_k"], case["full_v"], [length], {"w": w}, None, None)
    r = compare("o", o, ro, bo, torch.float16)
    assert r.ok, str(r)


@pytest.mark.kernel
def test_queries_before_the_sequence_see_nothing():
    """L_b < Nq: the first Nq - L_b queries sit before position 0 and get o = 0, lse = -inf; an
    empty sequence (L_b = 0) gives that for every query."""
    mod = generated("llama3_gqa")
    case = make_case(mod, batch=2, n_q=5, seqlens=[2, 0], n_new=1, capacity=16, dtype=torch.float16, paged=False,
                     page_size=16, bnhd=False, seed=1)
    o, lse = run_and_check(mod, case, params={}, num_splits=1)
    assert (o[0, :, :2] == 0).all() and torch.isinf(lse[0, :, :2]).all()
    assert torch.isfinite(lse[0, :, 2:]).all()
    assert (o[1, :, :4] == 0).all() and (lse[1, :, :4] == float("-inf")).all()


def test_decode_plan_bounds_follow_the_mask():
    """Causal and sliding-window decoding use the mask's tile bounds; a mask whose bounds depend on
    the head falls back to every tile, masked."""
    from attngen.language.spec import parse_spec
    from attngen.planning.decode import decode_plan

    def plan(mask, params=""):
        text = f"name: t\nheads: {{q: 4, kv: 2}}\nhead_dim: 32\ndtypes: [fp16]\nmask: {mask}\n{params}"
        return decode_plan(parse_spec(text))

    sw = plan("sliding_window(w)", "params: {w: int}\n")
    assert "tile bounds" in sw.rule and "arg_w" in dict((n, v) for n, v, _ in sw.ranges)["lo"]
    assert "tile bounds" in plan("causal").rule
    head = plan("kv_idx <= q_idx - h")
    assert "depend on the head" in head.rule and "o_hc" in head.predicate


# --------------------------------------------------------------------------- bad input


def _bad_calls():
    """(label, the argument the message must name, a function of (mod, case) -> kwargs of a call)."""
    S = 40  # noqa: N806

    def over(case, **kw):
        return {**case, **kw}

    return [
        ("cache too small", "k_cache", lambda m, c: over(c, cache_seqlens=torch.tensor([S, 3], dtype=torch.int32))),
        ("cache_seqlens dtype", "cache_seqlens", lambda m, c: over(c, cache_seqlens=c["cache_seqlens"].long())),
        ("cache_seqlens shape", "cache_seqlens", lambda m, c: over(c, cache_seqlens=c["cache_seqlens"][:1])),
        ("cache_seqlens negative", "cache_seqlens", lambda m, c: over(c, cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32))),
        ("k_cache dtype", "k_cache", lambda m, c: over(c, k_cache=c["k_cache"].float())),
        ("k_cache heads", "k_cache", lambda m, c: over(c, k_cache=c["k_cache"][:, :1])),
        ("v_cache head dim", "v_cache", lambda m, c: over(c, v_cache=c["v_cache"][..., :8])),
        ("v_cache length", "v_cache", lambda m, c: over(c, v_cache=c["v_cache"][:, :, :S - 1])),
        ("k without v", "k and v", lambda m, c: over(c, v=None)),
        ("k heads", "k", lambda m, c: over(c, k=c["k"][:, :1])),
        ("v dtype", "v", lambda m, c: over(c, v=c["v"].float())),
        ("q heads", "q", lambda m, c: over(c, q=c["q"][:, :1])),
        ("q dtype", "q", lambda m, c: over(c, q=c["q"].double())),
        ("num_splits zero", "num_splits", lambda m, c: over(c, num_splits=0)),
        ("num_splits bool", "num_splits", lambda m, c: over(c, num_splits=True)),
        ("unknown parameter", "bogus", lambda m, c: over(c, bogus=1)),
    ]


def _paged_bad_calls():
    def over(case, **kw):
        return {**case, **kw}

    def bad_page(m, c):  # pages of 24 (not a power of two): the first 24 slots of each page
        return over(c, k_cache=c["k_cache"][:, :, :24], v_cache=c["v_cache"][:, :, :24])

    def outside(m, c):
        t = c["block_table"].clone()
        t[1, 0] = c["k_cache"].shape[0]
        return over(c, block_table=t)

    return [
        ("block table too short", "block_table", lambda m, c: over(c, block_table=c["block_table"][:, :1])),
        ("block table index outside", "block_table", outside),
        ("block table negative", "block_table", lambda m, c: over(c, block_table=c["block_table"] * 0 - 1)),
        ("block table dtype", "block_table", lambda m, c: over(c, block_table=c["block_table"].long())),
        ("block table rows", "block_table", lambda m, c: over(c, block_table=c["block_table"][:1])),
        ("page size", "page size", bad_page),
        ("small page", "page size", lambda m, c: over(c, k_cache=c["k_cache"][:, :, :8], v_cache=c["v_cache"][:, :, :8])),
    ]


def _check_rejected(mod, case, kwargs, needle):
    before = {n: case[n].clone() for n in ("k_cache", "v_cache")}
    args = {n: kwargs[n] for n in ("q", "k_cache", "v_cache", "cache_seqlens")}
    rest = {n: x for n, x in kwargs.items() if n not in args and n not in ("full_k", "full_v")}
    with pytest.raises(ValueError, match=needle):
        mod.attention_with_kvcache(*args.values(), **rest)
    for n, t in before.items():
        assert torch.equal(case[n].nan_to_num(7.0), t.nan_to_num(7.0)), f"{n} changed by a rejected call"


@pytest.mark.parametrize("label,needle,make", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_contiguous_bad_input_raises_and_leaves_the_cache(label, needle, make):
    mod = generated("llama3_gqa")
    case = make_case(mod, batch=2, n_q=1, seqlens=[30, 3], n_new=2, capacity=40, dtype=torch.bfloat16, paged=False,
                     page_size=16, bnhd=False, seed=2)
    _check_rejected(mod, case, make(mod, case), needle)


@pytest.mark.parametrize("label,needle,make", _paged_bad_calls(), ids=[c[0] for c in _paged_bad_calls()])
def test_paged_bad_input_raises_and_leaves_the_cache(label, needle, make):
    mod = generated("llama3_gqa")
    case = make_case(mod, batch=2, n_q=1, seqlens=[40, 3], n_new=2, capacity=64, dtype=torch.bfloat16, paged=True,
                     page_size=32, bnhd=False, seed=2)
    _check_rejected(mod, case, make(mod, case), needle)


def test_missing_parameter_is_named():
    mod = generated("sliding_window")
    case = make_case(mod, batch=1, n_q=1, seqlens=[5], n_new=1, capacity=16, dtype=torch.float16, paged=False,
                     page_size=16, bnhd=False, seed=0)
    _check_rejected(mod, case, {n: x for n, x in case.items()}, "missing parameter w")


def test_no_query_appends_and_returns_empty_outputs():
    """Nq = 0 launches no kernel: the new keys are still appended, o and lse are empty."""
    mod = generated("mqa")
    case = make_case(mod, batch=2, n_q=0, seqlens=[3, 0], n_new=2, capacity=16, dtype=torch.float16, paged=False,
                     page_size=16, bnhd=False, seed=4)
    o, lse = mod.attention_with_kvcache(case["q"], case["k_cache"], case["v_cache"], case["cache_seqlens"], k=case["k"],
                                        v=case["v"], return_lse=True)
    assert o.shape == (2, mod.Q_HEADS, 0, mod.V_HEAD_DIM) and lse.shape == (2, mod.Q_HEADS, 0)
    for i, length in enumerate([5, 2]):
        assert torch.equal(cache_positions(case, i, length), case["full_k"][i])
        assert torch.equal(cache_positions(case, i, length, "v_cache"), case["full_v"][i])


# every shipped dense spec through the entry point once (the property tests above draw from SPECS)
ALL_DENSE = sorted(p.stem for p in SPEC_PATHS if "sparse:" not in p.read_text())


@pytest.mark.kernel
@pytest.mark.parametrize("name", [n for n in ALL_DENSE if n not in SPECS])
def test_every_shipped_dense_spec_decodes(name):
    mod = generated(name)
    dtype = TORCH_DTYPES[mod.DTYPES[0]]
    case = make_case(mod, batch=2, n_q=3, seqlens=[70, 21], n_new=1, capacity=80, dtype=dtype, paged=True,
                     page_size=16, bnhd=False, seed=1)
    run_and_check(mod, case, params=params_for(mod, 2, 80), num_splits=2)
