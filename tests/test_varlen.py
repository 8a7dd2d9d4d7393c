"""Packed sequences: attention_varlen (FlashAttention-2's varlen layout). Each sequence of a packed
batch is checked against the float64 reference computed on that sequence alone (its own lengths,
positions from 0, its index as b), forward and backward, with outputs NaN-poisoned so a row no
program writes fails; plus determinism, GQA groups, strides, and the ValueErrors of bad input."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from attngen import runtime
from attngen.param_values import check_values
from attngen.reference.dense import attention_reference
from attngen.testing import _loss, compare, learnable_params, reference_mask, reference_score_mod

from helpers import SPEC_PATHS, assert_all_ok, build_and_import, dense_spec, generated


def _packed(lengths, h, d, dtype, g):
    """A packed [total, h, d] tensor with non-contiguous strides (a view of [h, total, d] storage)."""
    total = sum(lengths)
    return torch.randn(h, total, d, generator=g).to(runtime.DEVICE, dtype).transpose(0, 1)


def _cu(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=runtime.DEVICE)


def _at_b(fn, b):
    # a reference mask / score_mod of a batch of one that reads b as sequence b
    if fn is None or isinstance(fn, str):
        return fn
    if fn.__code__.co_argcount == 4:
        return lambda bi, h, qi, ki: fn(bi + b, h, qi, ki)
    return lambda s, bi, h, qi, ki: fn(s, bi + b, h, qi, ki)


def check_varlen(mod, lens_q, lens_k, dtype, params, *, backward=True, seed=0):
    """Compare attention_varlen over sequences of lengths (lens_q[b], lens_k[b]) with the reference
    of each sequence: o, lse, and with backward dq, dk, dv and the learnable tensors' gradients."""
    g = torch.Generator().manual_seed(seed)
    q = _packed(lens_q, mod.Q_HEADS, mod.HEAD_DIM, dtype, g)
    k = _packed(lens_k, mod.KV_HEADS, mod.HEAD_DIM, dtype, g)
    v = _packed(lens_k, mod.KV_HEADS, mod.V_HEAD_DIM, dtype, g)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    learn = learnable_params(mod) if backward else []
    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    kparams = {n: (t.detach().requires_grad_() if n in learn else t) for n, t in params.items()}
    leaves += [kparams[n] for n in learn]
    with runtime.poison_outputs():
        o, lse = mod.attention_varlen(*leaves[:3], cu_q, cu_k, max(lens_q, default=0), max(lens_k, default=0),
                                      return_lse=True, **kparams)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)
    dlse = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(o.device)
    results = {}
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for label, cdt in (("ref", torch.float64), ("base", None)):
        ins = [t.detach().clone().requires_grad_(backward) for t in (q, k, v)]
        rparams = dict(params)
        for n in learn:
            rparams[n] = params[n].detach().to(cdt or params[n].dtype).requires_grad_()
            ins.append(rparams[n])
        mask, smod = reference_mask(mod, rparams), reference_score_mod(mod, rparams)
        os, lses = [], []
        for b in range(len(lens_q)):
            rows = [ins[0][cq[b]:cq[b + 1]], ins[1][ck[b]:ck[b + 1]], ins[2][ck[b]:ck[b + 1]]]
            ro, rlse = attention_reference(*(t.transpose(0, 1)[None] for t in rows), mask=_at_b(mask, b),
                                           compute_dtype=cdt, score_mod=_at_b(smod, b))
            os.append(ro[0].transpose(0, 1))
            lses.append(rlse[0])
        ro = torch.cat(os) if os else torch.zeros(0, mod.Q_HEADS, mod.V_HEAD_DIM, dtype=cdt or dtype)
        rlse = torch.cat(lses, 1) if lses else torch.zeros(mod.Q_HEADS, 0)
        grads = [None] * len(ins)
        if backward:
            grads = torch.autograd.grad(_loss(ro, rlse, do.to(ro.dtype), dlse.to(rlse.dtype)), ins, allow_unused=True)
            grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(ins, grads)]
        results[label] = (ro, rlse, *grads)
    out = [compare("o", o, results["ref"][0], results["base"][0], dtype),
           compare("lse", lse, results["ref"][1], results["base"][1], dtype)]
    if backward:
        with runtime.poison_outputs():
            kernel_grads = torch.autograd.grad(_loss(o, lse, do.to(o.dtype), dlse.float()), leaves)
        for name, kg, rg, bg in zip(("dq", "dk", "dv", *(f"d{n}" for n in learn)), kernel_grads,
                                    results["ref"][2:], results["base"][2:]):
            out.append(compare(name, kg, rg, bg, dtype))
    return out


def _params(mod, lens_q, lens_k, scalars=None):
    """Check values sized for every sequence (tensors indexed by b cover B sequences of the
    longest length), with the drawn scalars."""
    n = max([*lens_q, *lens_k, 1])
    return {**check_values(mod, batch=max(len(lens_q), 1), n_q=n, n_k=n), **(scalars or {})}


# (spec, scalar parameters drawn): MHA, MQA, GQA, windows, chunks, a b-indexed document tensor, and
# score_mods with a learnable tensor (alibi's slopes, relpos_bias's table)
SPECS = {
    "mha": {},
    "mqa": {},
    "llama3_gqa": {},
    "sliding_window": {"w": st.integers(1, 30)},
    "chunked_local": {"c": st.integers(1, 30)},
    "document": {},
    "alibi": {},
    "relpos_bias": {},
}
LENGTHS = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=4)


@pytest.mark.kernel
@pytest.mark.parametrize("name", sorted(SPECS))
@settings(max_examples=2, deadline=None)
@given(data=st.data(), lengths=LENGTHS)
@example(data=None, lengths=[(17, 33), (0, 5), (1, 1), (20, 0), (3, 0)])  # ragged, empty, length 1, no keys
def test_varlen_matches_the_reference(name, data, lengths):
    mod = generated(name)
    if data is None:
        scalars = {n: {"w": 7, "c": 12}[n] for n in SPECS[name]}
    else:
        scalars = {n: data.draw(s, label=n) for n, s in SPECS[name].items()}
    lens_q, lens_k = [a for a, _ in lengths], [b for _, b in lengths]
    dtype = runtime.TORCH_DTYPES[mod.DTYPES[0]]
    results = check_varlen(mod, lens_q, lens_k, dtype, _params(mod, lens_q, lens_k, scalars), seed=len(lengths))
    assert_all_ok(results, f"{name} lengths {lengths} {scalars}")


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """Causal modules with 8 query heads over 8 / G KV heads (G = 1, 2, 4, 8), every dtype."""
    tmp = tmp_path_factory.mktemp("varlen")
    return {
        g: build_and_import(tmp, dense_spec(f"varlen_g{g}", q=8, kv=8 // g, d=16, dtypes="[fp16, bf16, fp32]"))
        for g in (1, 2, 4, 8)
    }


@pytest.mark.kernel
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@settings(max_examples=2, deadline=None)
@given(lengths=LENGTHS, dtype=st.sampled_from(["fp16", "bf16", "fp32"]))
@example(lengths=[(1, 1), (0, 0), (19, 7)], dtype="fp32")
def test_varlen_gqa_groups_and_dtypes(grouped, group, lengths, dtype):
    mod = grouped[group]
    assert mod.GROUP == group
    lens_q, lens_k = [a for a, _ in lengths], [b for _, b in lengths]
    results = check_varlen(mod, lens_q, lens_k, runtime.TORCH_DTYPES[dtype], {}, seed=group)
    assert_all_ok(results, f"G={group} {dtype} lengths {lengths}")


def _run(mod, lens_q, lens_k, params, seed=0):
    """attention_varlen forward and backward (with the learnable tensors): o, lse and the gradients."""
    g = torch.Generator().manual_seed(seed)
    dtype = runtime.TORCH_DTYPES[mod.DTYPES[0]]
    q = _packed(lens_q, mod.Q_HEADS, mod.HEAD_DIM, dtype, g).requires_grad_()
    k = _packed(lens_k, mod.KV_HEADS, mod.HEAD_DIM, dtype, g).requires_grad_()
    v = _packed(lens_k, mod.KV_HEADS, mod.V_HEAD_DIM, dtype, g).requires_grad_()
    learn = learnable_params(mod)
    params = {n: (t.detach().clone().requires_grad_() if n in learn else t) for n, t in params.items()}
    o, lse = mod.attention_varlen(q, k, v, _cu(lens_q), _cu(lens_k), max(lens_q), max(lens_k), return_lse=True, **params)
    do = torch.randn(o.shape, generator=g).to(o.dtype)
    grads = torch.autograd.grad((o * do).sum() + torch.where(torch.isfinite(lse), lse, 0).sum(),
                                [q, k, v, *(params[n] for n in learn)])
    return (o, lse, *grads)


@pytest.mark.kernel
@pytest.mark.parametrize("name", ["document", "alibi"])
def test_varlen_is_deterministic(name):
    """Two runs give bitwise equal outputs and gradients (no atomics; the learnable tensors'
    gradients are summed sequence by sequence in a fixed order)."""
    mod = generated(name)
    lens_q, lens_k = [21, 0, 40, 3], [30, 6, 33, 0]
    params = _params(mod, lens_q, lens_k)
    first, second = _run(mod, lens_q, lens_k, params), _run(mod, lens_q, lens_k, params)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.kernel
def test_varlen_sequences_are_independent():
    """Not vacuous: a sequence's rows are the same whatever its neighbours are (packing changes no
    result beyond the sequence), and they equal attention() on that sequence as a batch of one."""
    mod = generated("llama3_gqa")
    g = torch.Generator().manual_seed(5)
    dtype = runtime.TORCH_DTYPES[mod.DTYPES[0]]
    q = _packed([50], mod.Q_HEADS, mod.HEAD_DIM, dtype, g)
    k = _packed([50], mod.KV_HEADS, mod.HEAD_DIM, dtype, g)
    v = _packed([50], mod.KV_HEADS, mod.V_HEAD_DIM, dtype, g)
    o = mod.attention_varlen(q, k, v, _cu([20, 30]), _cu([25, 25]), 30, 25)
    alone = mod.attention_varlen(q[20:], k[25:], v[25:], _cu([30]), _cu([25]), 30, 25)
    torch.testing.assert_close(o[20:], alone, rtol=0, atol=0)
    padded = mod.attention(q[20:].transpose(0, 1)[None], k[25:].transpose(0, 1)[None], v[25:].transpose(0, 1)[None])
    torch.testing.assert_close(alone, padded[0].transpose(0, 1), rtol=0, atol=0)
    # one sequence of 50 is not two: the second half's rows see other keys
    whole = mod.attention_varlen(q, k, v, _cu([50]), _cu([50]), 50, 50)
    assert not torch.allclose(whole[20:], o[20:])


def _inputs(mod, total_q=6, total_k=5):
    g = torch.Generator().manual_seed(0)
    dtype = runtime.TORCH_DTYPES[mod.DTYPES[0]]
    return (_packed([total_q], mod.Q_HEADS, mod.HEAD_DIM, dtype, g), _packed([total_k], mod.KV_HEADS, mod.HEAD_DIM, dtype, g),
            _packed([total_k], mod.KV_HEADS, mod.V_HEAD_DIM, dtype, g))


def _i32(values):
    return torch.tensor(values, dtype=torch.int32, device=runtime.DEVICE)


def _bad_args(mod, change):
    """Valid attention_varlen arguments (two sequences: q rows 2 + 4, k rows 3 + 2) with `change`
    applied: a tensor edit by name for q, k, v; a tensor of a list's values for cu_seqlens (float32
    when the list holds floats), or the value itself."""
    q, k, v = _inputs(mod)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=_i32([0, 2, 6]), cu_seqlens_k=_i32([0, 3, 5]), max_seqlen_q=4, max_seqlen_k=3)
    for key, value in change.items():
        if key in ("q", "k", "v"):
            t = args[key]
            value = {"flat": t.reshape(t.shape[0], -1), "heads": t[:, :1].expand(-1, 3, -1), "dim": t[..., :32],
                     "dtype": t.to(torch.float16 if t.dtype == torch.bfloat16 else torch.bfloat16), "rows": t[:4]}[value]
        elif isinstance(value, list):
            value = torch.tensor(value, dtype=torch.float32 if any(isinstance(x, float) for x in value) else torch.int32)
        args[key] = value
    return args


@pytest.mark.kernel
def test_varlen_valid_baseline_of_the_rejections():
    # the arguments test_varlen_rejects_bad_input starts from are accepted
    mod = generated("llama3_gqa")
    with torch.no_grad():
        assert mod.attention_varlen(**_bad_args(mod, {})).shape == (6, mod.Q_HEADS, mod.V_HEAD_DIM)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(cu_seqlens_q=torch.tensor([0, 2, 6], dtype=torch.int64)), "cu_seqlens_q must have dtype torch.int32"),
        (dict(cu_seqlens_k=[0.0, 2.0, 5.0]), "cu_seqlens_k must have dtype torch.int32"),
        (dict(cu_seqlens_q=[[0, 2, 6]]), r"cu_seqlens_q must be 1-D \[B \+ 1\]"),
        (dict(cu_seqlens_k=torch.zeros(0, dtype=torch.int32)), r"cu_seqlens_k must be 1-D \[B \+ 1\]"),
        (dict(cu_seqlens_q=(0, 2, 6)), "cu_seqlens_q must be an int32 torch.Tensor, got tuple"),
        (dict(cu_seqlens_k=torch.tensor([0, 3, 5], dtype=torch.int32, device="meta")), "cu_seqlens_k is on meta"),
        (dict(cu_seqlens_q=[1, 2, 6]), "cu_seqlens_q must start at 0"),
        (dict(cu_seqlens_k=[0, 4, 3, 5]), "cu_seqlens_k must be non-decreasing"),
        (dict(cu_seqlens_q=[0, 2, 5]), "cu_seqlens_q ends at 5, but q has 6 rows"),
        (dict(cu_seqlens_k=[0, 2, 6]), "cu_seqlens_k ends at 6, but k has 5 rows"),
        (dict(cu_seqlens_k=[0, 5]), "cu_seqlens_q has 2 sequences but cu_seqlens_k has 1"),
        (dict(max_seqlen_q=3), r"max_seqlen_q = 3 is smaller than a sequence's length \(4\)"),
        (dict(max_seqlen_k=2), r"max_seqlen_k = 2 is smaller than a sequence's length \(3\)"),
        (dict(max_seqlen_k=4.0), "max_seqlen_k must be an int"),
        (dict(q="flat"), r"q must be 3-D \[total, H, D\]"),
        (dict(k="heads"), "k has 3 heads; expected 8 KV heads"),
        (dict(q="dim"), "q has head_dim 32; expected 128"),
        (dict(v="dtype"), "q, k, v must share one dtype"),
        (dict(v="rows"), "v has 4 keys but k has 5"),
    ],
)
def test_varlen_rejects_bad_input(change, match):
    """A ValueError naming the argument, before any kernel runs (no kernel marker: nothing launches)."""
    mod = generated("llama3_gqa")
    with pytest.raises(ValueError, match=match):
        mod.attention_varlen(**_bad_args(mod, change))


@pytest.mark.kernel
@pytest.mark.parametrize("lengths", [[(40, 40), (33, 37), (0, 4), (17, 9)], [(48, 48), (1, 30)]])
def test_varlen_document_skip_per_sequence(lengths):
    """Sorted document ids of a different length per sequence (doc[b, i] = i // (5 + 3 b)): the
    id-range skip drops whole tiles of earlier documents, and its ranges must be those of the
    program's own sequence (b) and rows within it."""
    mod = generated("document")
    lens_q, lens_k = [a for a, _ in lengths], [b for _, b in lengths]
    n = max(lens_q + lens_k)
    doc = torch.stack([torch.arange(n) // (5 + 3 * b) for b in range(len(lengths))]).to(runtime.DEVICE, torch.int32)
    dtype = runtime.TORCH_DTYPES[mod.DTYPES[0]]
    results = check_varlen(mod, lens_q, lens_k, dtype, {"doc": doc}, seed=7)
    assert_all_ok(results, f"lengths {lengths}")


# every other shipped dense spec once, forward and backward (the property test draws from SPECS)
ALL_DENSE = sorted(p.stem for p in SPEC_PATHS if "sparse:" not in p.read_text())


@pytest.mark.kernel
@pytest.mark.parametrize("name", [n for n in ALL_DENSE if n not in SPECS])
def test_every_shipped_dense_spec_packs(name):
    mod = generated(name)
    lens_q, lens_k = [23, 0, 37], [31, 4, 19]
    dtype = runtime.TORCH_DTYPES[mod.DTYPES[0]]
    assert_all_ok(check_varlen(mod, lens_q, lens_k, dtype, _params(mod, lens_q, lens_k), seed=5), name)
