"""Absolute positions: attention()'s q_offset and kv_offset. Query row i is at position
q_offset + i, key row j at kv_offset + j; masks and score_mods read those positions (q_len, kv_len
are q_offset + Nq, kv_offset + Nk). Checked against the float64 reference with the mask and
score_mod read at the shifted positions (attngen.testing), and by the chunked-prefill property:
attention over a chunk of queries at its offset gives the matching rows of full attention, forward
and backward. The tile bounds themselves are checked against brute force in test_classify.py."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from attngen import runtime
from attngen.param_values import check_values
from attngen.testing import ULP, check_module, random_inputs

from helpers import SPEC_PATHS, assert_all_ok, generated

# (spec, scalar parameters drawn): causal + GQA, the scalar-mask families, a tensor indexed by
# position (document), score_mods that read positions (alibi, relpos_bias)
SPECS = {
    "llama3_gqa": {},
    "sliding_window": {"w": st.integers(1, 40)},
    "prefix_lm": {"p": st.integers(0, 120)},
    "global_window": {"g": st.integers(0, 30), "w": st.integers(1, 40)},  # a disjunction walked in disjoint pieces
    "chunked_local": {"c": st.integers(1, 40)},
    "document": {},
    "alibi": {},
    "relpos_bias": {},
}
OFFSETS = st.one_of(st.just(0), st.integers(0, 90))


def _params(mod, scalars, n_q, n_k, q_offset, kv_offset, seed=0):
    """The registry's check values sized by positions (a document tensor covers every position
    offset + row), with the drawn scalars."""
    values = check_values(mod, batch=2, n_q=q_offset + n_q, n_k=kv_offset + n_k, seed=seed)
    return {**values, **scalars}


@pytest.mark.kernel
@pytest.mark.parametrize("name", sorted(SPECS))
@settings(max_examples=3, deadline=None)
@given(data=st.data(), n_q=st.integers(1, 40), n_k=st.integers(1, 40), q_offset=OFFSETS, kv_offset=OFFSETS)
@example(data=None, n_q=33, n_k=20, q_offset=50, kv_offset=17)  # offsets past the lengths, unaligned
@example(data=None, n_q=20, n_k=50, q_offset=0, kv_offset=35)  # keys after every query: causal sees none
def test_offsets_match_the_reference(name, data, n_q, n_k, q_offset, kv_offset):
    mod = generated(name)
    if data is None:
        scalars = {n: {"w": 7, "p": 60, "c": 12, "g": 5}[n] for n in SPECS[name]}
    else:
        scalars = {n: data.draw(s, label=n) for n, s in SPECS[name].items()}
    params = _params(mod, scalars, n_q, n_k, q_offset, kv_offset)
    dtype = runtime.TORCH_DTYPES[mod.DTYPES[0]]
    q, k, v = random_inputs(mod, batch=2, n_q=n_q, n_k=n_k, dtype=dtype, seed=n_q + q_offset)
    results = check_module(mod, q, k, v, params=params, q_offset=q_offset, kv_offset=kv_offset)
    assert_all_ok(results, f"{name} Nq={n_q} Nk={n_k} offsets ({q_offset}, {kv_offset}) {scalars}")


@pytest.mark.kernel
def test_offsets_change_what_a_row_sees():
    """Not vacuous: with q_offset > kv_offset a causal query sees more keys, so o differs from the
    unshifted call; equal offsets leave causal attention unchanged."""
    mod = generated("llama3_gqa")
    q, k, v = random_inputs(mod, batch=1, n_q=20, n_k=20, dtype=torch.float16, seed=3)
    base = mod.attention(q, k, v)
    assert not torch.allclose(mod.attention(q, k, v, q_offset=10), base)
    torch.testing.assert_close(mod.attention(q, k, v, q_offset=7, kv_offset=7), base, rtol=0, atol=0)


def _assert_rows_equal(actual, expected, what):
    """Kernel against kernel on the same data: equal up to accumulation order (a few ulps of the
    largest value)."""
    tol = 4 * ULP[expected.dtype] * max(1.0, float(expected.abs().max()))
    err = float((actual.float() - expected.float()).abs().max()) if actual.numel() else 0.0
    assert actual.shape == expected.shape and err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


@pytest.mark.kernel
@pytest.mark.parametrize("name", ["llama3_gqa", "sliding_window", "document", "relpos_bias"])
@settings(max_examples=2, deadline=None)
@given(n=st.integers(2, 70), cut=st.tuples(st.integers(0, 70), st.integers(1, 70)))
@example(n=64, cut=(17, 29))
def test_chunked_prefill_equals_rows_of_full_attention(name, n, cut):
    """attention(q[s:e], k[:e], v[:e], q_offset=s) == attention(q, k, v)[s:e] (masks that are
    causal: the chunk sees no key past its last query), forward (o, lse) and backward: with dO zero
    outside the chunk, dq's rows, dk and dv over keys [0, e) (zero past e) and a learnable bias's
    gradient of the full call equal the chunk call's."""
    s = min(cut[0], n - 1)
    e = min(n, s + cut[1])
    mod = generated(name)
    dtype = runtime.TORCH_DTYPES[mod.DTYPES[0]]
    q, k, v = random_inputs(mod, batch=2, n_q=n, n_k=n, dtype=dtype, seed=n)
    params = _params(mod, {"w": 9} if name == "sliding_window" else {}, n, n, 0, 0)
    learn = [p for p, t in params.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    g = torch.Generator().manual_seed(e)
    do = torch.randn(2, mod.Q_HEADS, e - s, mod.V_HEAD_DIM, generator=g).to(dtype)

    def run(q_rows, offset, keys):
        leaves = [t.detach().clone().requires_grad_() for t in (q_rows, k[:, :, :keys], v[:, :, :keys])]
        ps = {p: (t.detach().clone().requires_grad_() if p in learn else t) for p, t in params.items()}
        o, lse = mod.attention(*leaves, return_lse=True, q_offset=offset, **ps)
        rows = o[:, :, s - offset:e - offset]
        grads = torch.autograd.grad((rows.float() * do.float()).sum(), leaves + [ps[p] for p in learn])
        return o.detach(), lse.detach(), grads

    o_full, lse_full, g_full = run(q, 0, n)
    o_chunk, lse_chunk, g_chunk = run(q[:, :, s:e], s, e)
    _assert_rows_equal(o_chunk, o_full[:, :, s:e], "o")
    finite = torch.isfinite(lse_full[:, :, s:e])
    assert torch.equal(finite, torch.isfinite(lse_chunk))
    _assert_rows_equal(lse_chunk[finite], lse_full[:, :, s:e][finite], "lse")
    _assert_rows_equal(g_chunk[0], g_full[0][:, :, s:e], "dq")
    assert not g_full[0][:, :, :s].any() and not g_full[0][:, :, e:].any()  # dO is zero there
    for what, a, b in zip(["dk", "dv"], g_chunk[1:3], g_full[1:3]):
        _assert_rows_equal(a, b[:, :, :e], what)
        assert not b[:, :, e:].any(), what  # keys after the chunk: seen by none of its queries
    for what, a, b in zip([f"d{p}" for p in learn], g_chunk[3:], g_full[3:]):
        _assert_rows_equal(a, b, what)


@pytest.mark.kernel
@settings(max_examples=2, deadline=None)
@given(n=st.integers(2, 70), s=st.integers(0, 69), w=st.integers(1, 30))
@example(n=70, s=45, w=13)
def test_sliding_window_chunk_with_only_its_keys(n, s, w):
    """A KV offset too: the chunk's queries [s, n) with only the keys they can see,
    [max(0, s - w + 1), n) at kv_offset, give the rows of full attention (forward and backward)."""
    s = min(s, n - 1)
    ks = max(0, s - w + 1)
    mod = generated("sliding_window")
    q, k, v = random_inputs(mod, batch=1, n_q=n, n_k=n, dtype=torch.float16, seed=w)
    g = torch.Generator().manual_seed(n)
    do = torch.randn(1, mod.Q_HEADS, n - s, mod.V_HEAD_DIM, generator=g).half()

    def run(qs, kk, vv, q_off, kv_off):
        leaves = [t.detach().clone().requires_grad_() for t in (qs, kk, vv)]
        o = mod.attention(*leaves, w=w, q_offset=q_off, kv_offset=kv_off)
        grads = torch.autograd.grad((o[:, :, s - q_off:].float() * do.float()).sum(), leaves)
        return o.detach(), grads

    o_full, (dq, dk, dv) = run(q, k, v, 0, 0)
    o_chunk, (dq_c, dk_c, dv_c) = run(q[:, :, s:], k[:, :, ks:], v[:, :, ks:], s, ks)
    _assert_rows_equal(o_chunk, o_full[:, :, s:], "o")
    _assert_rows_equal(dq_c, dq[:, :, s:], "dq")
    _assert_rows_equal(dk_c, dk[:, :, ks:], "dk")
    _assert_rows_equal(dv_c, dv[:, :, ks:], "dv")
    assert not dk[:, :, :ks].any() and not dv[:, :, :ks].any()  # keys the chunk cannot see


@pytest.mark.parametrize("bad, error", [
    ({"q_offset": -1}, "q_offset must be >= 0"),
    ({"kv_offset": -5}, "kv_offset must be >= 0"),
    ({"q_offset": 1.0}, "q_offset must be an int"),
    ({"kv_offset": True}, "kv_offset must be an int"),
    ({"q_offset": torch.tensor(3)}, "q_offset must be an int"),
    ({"kv_offset": None}, "kv_offset must be an int"),
    ({"q_offset": 2**30}, "q_offset \\+ the sequence length"),
])
def test_bad_offsets_are_rejected(bad, error):
    mod = generated("llama3_gqa")
    q, k, v = random_inputs(mod, batch=1, n_q=4, n_k=4, dtype=torch.float16)
    with pytest.raises(ValueError, match=f"llama3_gqa: {error}"):
        mod.attention(q, k, v, **bad)


@pytest.mark.parametrize("name", ["llama3_gqa", "relpos_bias", "document"])
def test_offsets_are_never_specialised(name):
    """A new offset must not compile a new kernel variant: Q_OFF and KV_OFF are in every dense
    kernel's do_not_specialize list."""
    mod = generated(name)
    kernels = [mod._fwd_kernel, mod._bwd_dkdv_kernel, mod._bwd_dq_kernel]
    if hasattr(mod, "_bwd_param_kernel"):
        kernels.append(mod._bwd_param_kernel)
    for kernel in kernels:
        fn = kernel.fn if hasattr(kernel, "configs") else kernel  # under the autotuner
        assert {"Q_OFF", "KV_OFF"} <= set(fn.arg_names)
        if hasattr(fn, "params"):  # a JITFunction (GPU)
            nospec = {p.name for p in fn.params if p.do_not_specialize}
        else:  # the interpreter's function keeps the decorator's arguments
            nospec = set(fn.kwargs["do_not_specialize"])
        assert {"Q_OFF", "KV_OFF"} <= nospec, fn


@pytest.mark.kernel
@pytest.mark.parametrize("q_offset, kv_offset", [(23, 7), (0, 41), (70, 70)])
def test_document_id_skip_reads_ids_at_positions(q_offset, kv_offset):
    """Short sorted documents, so the id-range skip drops most tile pairs: its ranges are taken at
    the rows' positions (ids[b, offset + row]), else it would skip visible pairs here."""
    mod = generated("document")
    n_q, n_k = 40, 60
    n = max(q_offset + n_q, kv_offset + n_k)
    doc = (torch.arange(n) // 5).to(torch.int32).expand(2, n).contiguous()
    doc[1] = doc[1] // 3  # longer documents in the second row
    q, k, v = random_inputs(mod, batch=2, n_q=n_q, n_k=n_k, dtype=torch.float16, seed=q_offset)
    results = check_module(mod, q, k, v, params={"doc": doc}, q_offset=q_offset, kv_offset=kv_offset)
    assert_all_ok(results, f"offsets ({q_offset}, {kv_offset})")


# every other shipped dense spec through the offsets once, forward and backward
ALL_DENSE = sorted(p.stem for p in SPEC_PATHS if "sparse:" not in p.read_text())


@pytest.mark.kernel
@pytest.mark.parametrize("name", [n for n in ALL_DENSE if n not in SPECS])
def test_every_shipped_dense_spec_takes_offsets(name):
    mod = generated(name)
    n_q, n_k, q_offset, kv_offset = 29, 37, 45, 19
    params = _params(mod, {}, n_q, n_k, q_offset, kv_offset)
    dtype = runtime.TORCH_DTYPES[mod.DTYPES[0]]
    q, k, v = random_inputs(mod, batch=2, n_q=n_q, n_k=n_k, dtype=dtype, seed=3)
    results = check_module(mod, q, k, v, params=params, q_offset=q_offset, kv_offset=kv_offset)
    assert_all_ok(results, f"{name} offsets ({q_offset}, {kv_offset})")
