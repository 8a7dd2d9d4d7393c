"""Generated modules under torch.compile: every entry point runs through torch.library custom ops
(attngen::<name>_<sha>_*), which torch.library.opcheck accepts (schema, fake tensors, autograd
registration, AOT dispatch with dynamic shapes), and a function calling a module compiles with
fullgraph=True (no graph break), gives eager's outputs and gradients, and with dynamic=True takes a
new sequence length without recompiling.

Tiny shapes: every kernel runs in Triton's interpreter on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

from attngen import runtime
from tests.helpers import build_and_import, dense_spec, generated

pytestmark = pytest.mark.kernel

# int, float and tensor parameters, one tensor learnable (the score_mod reads it once)
PARAMS_SPEC = dense_spec(
    "cmp_params", q=4, kv=2, d=16, dtypes="[fp16, fp32]", mask="sliding_window(w)",
    extra="params: {w: int, c: float, rb: {tensor: fp32, dims: 2}}\n"
          "score_mod: softcap(c) + rb[h, min(q_idx - kv_idx, 7)]\n",
)
GQA_SPEC = dense_spec("cmp_gqa", q=4, kv=2, d=16, dtypes="[fp16, fp32]", mask="causal")


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    return build_and_import(tmp_path_factory.mktemp("gqa"), GQA_SPEC)


@pytest.fixture(scope="module")
def pmod(tmp_path_factory):
    return build_and_import(tmp_path_factory.mktemp("params"), PARAMS_SPEC)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _qkv(b, n_q, n_k, dtype=torch.float16, grad=True, seed=0, hq=4, hkv=2, d=16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n_q, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, n_k, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, n_k, d, generator=g).to(dtype)
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def _params(grad=True):
    rb = (torch.randn(4, 8, generator=torch.Generator().manual_seed(3)) * 0.5).requires_grad_(grad)
    return {"w": 5, "c": 4.0, "rb": rb}


def _opcheck(op, args):
    torch.library.opcheck(op, args)


# ----------------------------------------------------------------------------- the ops


def test_ops_are_named_per_module_and_spec(gqa, pmod):
    names = {str(op._qualname) for op in (gqa._OP_FWD, gqa._OP_BWD, gqa._OP_VARLEN_FWD, gqa._OP_VARLEN_BWD, gqa._OP_KVCACHE)}
    assert len(names) == 5
    assert all(n.startswith(f"attngen::cmp_gqa_{gqa.SPEC_SHA256[:12]}_") for n in names)
    assert str(pmod._OP_FWD._qualname) == f"attngen::cmp_params_{pmod.SPEC_SHA256[:12]}_fwd"
    # the spec's parameters are typed op arguments, in PARAMS' order
    schema = str(pmod._OP_FWD._opoverload._schema)
    assert "SymInt param_w, float param_c, Tensor param_rb" in schema, schema
    # the KV-cache op declares the caches it appends to as mutated
    assert "Tensor(a1!) k_cache, Tensor(a2!) v_cache" in str(pmod._OP_KVCACHE._opoverload._schema)


def test_opcheck_dense(gqa):
    q, k, v = _qkv(1, 13, 21, seed=1)
    scale = 0.25
    _opcheck(gqa._OP_FWD, (q, k, v, scale, 3, 0))
    o, lse = gqa._OP_FWD(q, k, v, scale, 3, 0)
    do, dlse = torch.randn_like(o), torch.randn_like(lse)
    _opcheck(gqa._OP_BWD, (q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), do, dlse, scale, 3, 0))


def test_opcheck_dense_transposed_layout(gqa):
    # a [B, N, H, D] tensor seen through .transpose(1, 2): o comes back in that layout, and the fake agrees
    q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in _qkv(2, 9, 9, seed=2))
    o, _ = gqa._OP_FWD(q, k, v, 0.25, 0, 0)
    assert o.stride() == gqa._op_fwd_fake(q, k, v, 0.25, 0, 0)[0].stride() and o.stride(1) < o.stride(2)
    _opcheck(gqa._OP_FWD, (q, k, v, 0.25, 0, 0))


def test_opcheck_params(pmod):
    q, k, v = _qkv(1, 11, 11, seed=4)
    p = _params()
    args = (q, k, v, 0.3, 0, 2, p["w"], p["c"], p["rb"])
    _opcheck(pmod._OP_FWD, args)
    o, lse = pmod._OP_FWD(*args)
    do, dlse = torch.randn_like(o), torch.randn_like(lse)
    detached = (q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), do, dlse, 0.3, 0, 2, p["w"], p["c"], p["rb"].detach())
    for want in (False, True):
        _opcheck(pmod._OP_BWD, (*detached, want))


def _packed(lens_q, lens_k, dtype=torch.float16, seed=5):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, 4, 16, generator=g).to(dtype).requires_grad_()
    k = torch.randn(tk, 2, 16, generator=g).to(dtype).requires_grad_()
    v = torch.randn(tk, 2, 16, generator=g).to(dtype).requires_grad_()
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    return q, k, v, cu(lens_q), cu(lens_k)


def test_opcheck_varlen(pmod):
    q, k, v, cu_q, cu_k = _packed([5, 0, 9], [7, 3, 9])
    p = _params()
    args = (q, k, v, cu_q, cu_k, 9, 9, 0.3, p["w"], p["c"], p["rb"])
    _opcheck(pmod._OP_VARLEN_FWD, args)
    o, lse = pmod._OP_VARLEN_FWD(*args)
    do, dlse = torch.randn_like(o), torch.randn_like(lse)
    _opcheck(pmod._OP_VARLEN_BWD, (q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), do, dlse,
                                   cu_q, cu_k, 9, 9, 0.3, p["w"], p["c"], p["rb"].detach(), True))


@pytest.mark.parametrize("paged", [False, True])
def test_opcheck_kvcache(pmod, paged):
    b, cap = 2, 32
    g = torch.Generator().manual_seed(6)
    q = torch.randn(b, 4, 2, 16, generator=g).half()
    k_new, v_new = (torch.randn(b, 2, 2, 16, generator=g).half() for _ in range(2))
    seqlens = torch.tensor([5, 17], dtype=torch.int32)
    if paged:
        k_cache, v_cache = (torch.randn(6, 2, 16, 16, generator=g).half() for _ in range(2))
        table = torch.tensor([[4, 0], [1, 5]], dtype=torch.int32)
    else:
        k_cache, v_cache = (torch.randn(b, 2, cap, 16, generator=g).half() for _ in range(2))
        table = None
    p = _params(grad=False)
    # the op appends k, v at cache_seqlens (the same slots on every call) and declares the caches mutated
    _opcheck(pmod._OP_KVCACHE, (q, k_cache, v_cache, seqlens, k_new, v_new, table, None, 0.25, p["w"], p["c"], p["rb"]))
    _opcheck(pmod._OP_KVCACHE, (q, k_cache, v_cache, seqlens, None, None, table, 2, 0.25, p["w"], p["c"], p["rb"]))


# ----------------------------------------------------------------------------- torch.compile


def _loss(o, lse):
    return (o.float() * torch.linspace(-1, 1, o.shape[-1])).sum() + (lse * 0.5).sum()


def _grads(fn, tensors):
    for t in tensors:
        t.grad = None
    out = fn()
    _loss(*out).backward()
    return [o.detach().clone() for o in out] + [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_matches_eager_with_params(pmod, backend):
    q, k, v = _qkv(2, 10, 13, seed=7)
    p = _params()

    def f(q, k, v, rb):
        o, lse = pmod.attention(q, k, v, w=p["w"], c=p["c"], rb=rb, scale=0.3, q_offset=3, return_lse=True)
        return o * 2, lse

    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    tensors = (q, k, v, p["rb"])
    want = _grads(lambda: f(*tensors), tensors)
    got = _grads(lambda: compiled(*tensors), tensors)
    assert counter.frame_count == 1
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert want[-1].abs().sum() > 0  # the learnable tensor's gradient flowed through the ops


def test_fullgraph_gqa_inductor(gqa):
    q, k, v = _qkv(1, 17, 17, seed=8)
    f = lambda q, k, v: gqa.attention(q, k, v, return_lse=True)  # noqa: E731
    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    want, got = _grads(lambda: f(q, k, v), (q, k, v)), _grads(lambda: compiled(q, k, v), (q, k, v))
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_dynamic_lengths_do_not_recompile(pmod):
    p = _params()
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True, dynamic=True)
    def f(q, k, v, rb):
        return pmod.attention(q, k, v, w=p["w"], c=p["c"], rb=rb, return_lse=True)

    for n_q, n_k in ((9, 12), (14, 20), (3, 5)):
        q, k, v = _qkv(1, n_q, n_k, seed=n_q)
        want = _grads(lambda: pmod.attention(q, k, v, w=p["w"], c=p["c"], rb=p["rb"], return_lse=True), (q, k, v, p["rb"]))
        got = _grads(lambda: f(q, k, v, p["rb"]), (q, k, v, p["rb"]))
        for a, b in zip(want, got):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"


def test_fullgraph_varlen(pmod):
    q, k, v, cu_q, cu_k = _packed([4, 9, 1], [6, 9, 2])
    p = _params()

    def f(q, k, v, rb):
        return pmod.attention_varlen(q, k, v, cu_q, cu_k, 9, 9, w=p["w"], c=p["c"], rb=rb, return_lse=True)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    tensors = (q, k, v, p["rb"])
    want, got = _grads(lambda: f(*tensors), tensors), _grads(lambda: compiled(*tensors), tensors)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("paged", [False, True])
def test_fullgraph_kvcache_appends_like_eager(gqa, paged):
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 4, 1, 16, generator=g).half()
    k_new, v_new = (torch.randn(2, 2, 1, 16, generator=g).half() for _ in range(2))
    seqlens = torch.tensor([3, 20], dtype=torch.int32)
    if paged:
        caches = [torch.randn(4, 2, 16, 16, generator=g).half() for _ in range(2)]
        table = torch.tensor([[3, 0], [1, 2]], dtype=torch.int32)
    else:
        caches = [torch.randn(2, 2, 24, 16, generator=g).half() for _ in range(2)]
        table = None

    def f(q, k_cache, v_cache, k, v):
        return gqa.attention_with_kvcache(q, k_cache, v_cache, seqlens, k=k, v=v, block_table=table, return_lse=True)

    eager_caches = [c.clone() for c in caches]
    want = f(q, *eager_caches, k_new, v_new)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, *caches, k_new, v_new)
    for a, b in zip((*want, *eager_caches), (*got, *caches)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    # the append reached the caller's cache: batch 0's new key at position 3 (page table[0, 0] when paged)
    page = int(table[0, 0]) if paged else 0
    assert torch.equal(caches[0][page, :, 3], k_new[0, :, 0]) and torch.equal(caches[1][page, :, 3], v_new[0, :, 0])


def test_reimport_same_spec_reuses_its_ops(tmp_path, gqa):
    # the same spec built again elsewhere (same name and hash): no second registration error, and
    # the op runs the module imported last
    again = build_and_import(tmp_path, GQA_SPEC)
    assert again.SPEC_SHA256 == gqa.SPEC_SHA256 and again is not gqa
    assert again._OP_FWD is gqa._OP_FWD
    q, k, v = _qkv(1, 5, 5, grad=False)
    torch.testing.assert_close(again.attention(q, k, v), gqa.attention(q, k, v), rtol=0, atol=0)
    (tmp_path / "other").mkdir()
    other = build_and_import(tmp_path / "other", GQA_SPEC.replace("mask: causal", "mask: none"))
    assert other._OP_FWD is not gqa._OP_FWD
    assert not torch.equal(other.attention(q, k, v), gqa.attention(q, k, v))


def test_errors_stay_eager_value_errors(pmod):
    q, k, v, cu_q, cu_k = _packed([4, 5], [4, 5])
    p = _params(grad=False)
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0"):
        pmod.attention_varlen(q, k, v, cu_q + 1, cu_k, 5, 5, **p)
    with pytest.raises(ValueError, match="missing parameter w"):
        pmod.attention(*_qkv(1, 4, 4), c=1.0, rb=p["rb"])


# ----------------------------------------------------------------------------- NSA


def test_opcheck_nsa():
    mod = generated("nsa_tiny")
    g = torch.Generator().manual_seed(10)
    n = 40
    q = torch.randn(1, 4, n, 16, generator=g).requires_grad_()
    k, v = (torch.randn(1, 2, n, 16, generator=g).requires_grad_() for _ in range(2))
    k_cmp = runtime.compress_mean(k.detach(), block=mod.BLOCK, stride=mod.STRIDE)
    _, lse_cmp = mod._CMP.attention(q.detach(), k_cmp, k_cmp, return_lse=True)
    _opcheck(mod._OP_SELECT, (q.detach(), k_cmp, lse_cmp, 0.25))
    idx = mod._OP_SELECT(q.detach(), k_cmp, lse_cmp, 0.25)
    _opcheck(mod._OP_SELECTED_FWD, (q, k, v, idx, 0.25))
    o, lse = mod._OP_SELECTED_FWD(q, k, v, idx, 0.25)
    d = (q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), idx, torch.randn_like(o), torch.randn_like(lse), 0.25)
    _opcheck(mod._OP_SELECTED_BWD, d)


def _nsa_cache_case(mod, seed=11):
    g = torch.Generator().manual_seed(seed)
    b, cap, ccap = 2, 48, 12
    kc, vc = (torch.randn(b, 2, cap, 16, generator=g) for _ in range(2))
    kcc, vcc = torch.zeros(b, 2, ccap, 16), torch.zeros(b, 2, ccap, 16)
    lens = torch.tensor([21, 33], dtype=torch.int32)
    mod.nsa_append_compressed_(kc, vc, kcc, vcc, torch.zeros_like(lens), lens)
    q, gates = torch.randn(b, 4, 1, 16, generator=g), torch.rand(b, 4, 1, 3, generator=g)
    k, v = (torch.randn(b, 2, 1, 16, generator=g) for _ in range(2))
    return q, kc, vc, lens, gates, kcc, vcc, k, v


def test_opcheck_nsa_kvcache():
    mod = generated("nsa_tiny")
    q, kc, vc, lens, gates, kcc, vcc, k, v = _nsa_cache_case(mod)
    _opcheck(mod._OP_KVCACHE, (q, kc, vc, lens, gates, kcc, vcc, k, v, None, None, 0.25))


def test_fullgraph_nsa_matches_eager():
    mod = generated("nsa_tiny")
    g = torch.Generator().manual_seed(12)
    n = 37
    q = torch.randn(1, 4, n, 16, generator=g).requires_grad_()
    k, v = (torch.randn(1, 2, n, 16, generator=g).requires_grad_() for _ in range(2))
    gates = torch.rand(1, 4, n, 3, generator=g).requires_grad_()

    def f(q, k, v, gates):
        o, aux = mod.nsa_attention(q, k, v, gates, return_aux=True)
        return o, aux["lse_slc"]

    tensors = (q, k, v, gates)
    counter = CompileCounterWithBackend("aot_eager")
    want = _grads(lambda: f(*tensors), tensors)
    got = _grads(lambda: torch.compile(f, backend=counter, fullgraph=True)(*tensors), tensors)
    assert counter.frame_count == 1
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_fullgraph_nsa_kvcache_matches_eager():
    mod = generated("nsa_tiny")
    q, kc, vc, lens, gates, kcc, vcc, k, v = _nsa_cache_case(mod, seed=13)

    def f(q, kc, vc, kcc, vcc, k, v):
        o, aux = mod.nsa_attention_with_kvcache(q, kc, vc, lens, gates, k_cmp_cache=kcc, v_cmp_cache=vcc, k=k, v=v, return_aux=True)
        return o, aux["block_indices"]

    eager = [t.clone() for t in (kc, vc, kcc, vcc)]
    want = f(q, *eager, k, v)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, kc, vc, kcc, vcc, k, v)
    for a, b in zip((*want, *eager), (*got, kc, vc, kcc, vcc)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_opcheck_moba_kvcache_mutates_its_query_cache():
    # per-block selection writes the new queries into q_block_cache: the op declares it mutated
    mod = generated("moba")
    g = torch.Generator().manual_seed(14)
    b, cap = 2, 64
    kc, vc = (torch.randn(b, 2, cap, 32, generator=g).half() for _ in range(2))
    kcc, vcc = torch.zeros(b, 2, 4, 32).half(), torch.zeros(b, 2, 4, 32).half()
    lens = torch.tensor([20, 35], dtype=torch.int32)
    mod.nsa_append_compressed_(kc, vc, kcc, vcc, torch.zeros_like(lens), lens)
    q, gates = torch.randn(b, 4, 1, 32, generator=g).half(), torch.rand(b, 4, 1, 3, generator=g).half()
    k, v = (torch.randn(b, 2, 1, 32, generator=g).half() for _ in range(2))
    q_block = torch.randn(b, 4, mod.SELECT_BLOCK, 32, generator=g).half()
    assert "!)? q_block_cache" in str(mod._OP_KVCACHE._opoverload._schema)
    _opcheck(mod._OP_KVCACHE, (q, kc, vc, lens, gates, kcc, vcc, k, v, q_block, None, 0.25))
