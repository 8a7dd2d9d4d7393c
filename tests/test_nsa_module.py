"""attngen.layers.nsa: the compressors against per-block float64 formulas, the layer's layout, gradients
and errors. Torch only (the layer runs on the float64 oracle through reference_attention)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from attngen.layers import nsa as nsa
from attngen.reference.nsa import compress_mean, nsa_reference, num_compressed

F64 = torch.float64


def gelu(x):  # exact (erf) GELU, written out
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def head_params(mod, h):
    """The parameters of head h (index 0 when the weights are shared)."""
    i = 0 if mod.heads is None else h
    return {name: p[i] for name, p in mod.named_parameters()}


def per_block(mod, x, formula):
    """out[:, h, i] = formula(parameters of head h, tokens of block i of head h [B, block, D])."""
    b, hh, n, d = x.shape
    c = num_compressed(n, mod.block, mod.stride)
    out = torch.zeros(b, hh, c, d, dtype=F64)
    for h in range(hh):
        p = head_params(mod, h)
        for i in range(c):
            out[:, h, i] = formula(p, x[:, h, i * mod.stride: i * mod.stride + mod.block])
    return out


def weighted_formula(p, tok):
    score = gelu(tok @ p["w1"] + p["b1"][0]) @ p["w2"][:, 0]  # [B, block]
    w = torch.exp(score - score.max(dim=1, keepdim=True).values)
    w = w / w.sum(dim=1, keepdim=True)
    return (w.unsqueeze(-1) * tok).sum(dim=1)


def mlp_formula(p, tok):
    b, block, d = tok.shape
    z = (tok + p["pos"][0]).reshape(b, block * d)
    return gelu(z @ p["w1"] + p["b1"][0]) @ p["w2"] + p["b2"][0]


def mean_formula(p, tok):
    return tok.sum(dim=1) / tok.shape[1]


FORMULAS = {"mean": mean_formula, "weighted": weighted_formula, "mlp": mlp_formula}


@settings(max_examples=30)
@given(
    method=st.sampled_from(nsa.METHODS),
    stride=st.sampled_from([1, 2, 3, 4]),
    mult=st.integers(1, 3),
    n=st.integers(1, 23),
    heads=st.integers(1, 3),
    d=st.sampled_from([1, 5, 8]),
    shared=st.booleans(),
    hidden=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
@example(method="mlp", stride=2, mult=2, n=3, heads=2, d=4, shared=False, hidden=3, seed=0)  # N < block: C = 0
@example(method="weighted", stride=4, mult=2, n=8, heads=1, d=8, shared=True, hidden=4, seed=1)  # N = block: C = 1
@example(method="weighted", stride=3, mult=2, n=17, heads=2, d=5, shared=False, hidden=2, seed=2)  # N % stride != 0
def test_compress_matches_per_block_formula(method, stride, mult, n, heads, d, shared, hidden, seed):
    block = stride * mult
    torch.manual_seed(seed)
    mod = nsa.make_compress(method, block, stride, d, heads=None if shared else heads,
                            hidden=None if method == "mean" else hidden, dtype=F64)
    x = torch.randn(2, heads, n, d, dtype=F64)
    got = mod(x)
    c = num_compressed(n, block, stride)
    assert got.shape == (2, heads, c, d)
    assert got.dtype == F64
    torch.testing.assert_close(got, per_block(mod, x, FORMULAS[method]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_weighted_pooling_ignores_a_constant_added_to_every_score(dtype):
    """Why WeightedCompress's scoring layer has no output bias: adding the same constant to every
    token's weight logit (per head, as such a bias would) leaves the compressed output unchanged,
    up to rounding of the shifted logits in `dtype`."""
    torch.manual_seed(11)
    mod = nsa.WeightedCompress(6, 3, 8, heads=2, dtype=dtype)
    x = torch.randn(2, 2, 20, 8, dtype=dtype)
    scores = torch.randn(2, 2, 20, 1).to(dtype)
    base = mod.pool(x, scores).double()
    eps, xmax = torch.finfo(dtype).eps, float(x.abs().max())
    for shift in (torch.tensor([-4.0, 2.5]).view(1, 2, 1, 1), torch.tensor(6.0)):
        shifted_scores = scores + shift.to(dtype)
        # a shifted logit s rounds by up to eps * |s| / 2, which scales its weight by about as much;
        # the weighted sum itself rounds by about eps * max|x| per step of the block's sum
        bound = eps * xmax * (2 + float(shifted_scores.abs().max()))
        assert (mod.pool(x, shifted_scores).double() - base).abs().max() <= bound
    # the bound is tight enough to see a change that is not the same for every token
    other = scores + 3 * torch.randn(scores.shape).to(dtype)
    assert (mod.pool(x, other).double() - base).abs().max() > 3 * bound


def test_weighted_forward_is_pooling_of_its_perceptron_scores():
    torch.manual_seed(12)
    mod = nsa.WeightedCompress(4, 2, 5, heads=3, hidden=6, dtype=F64)
    x = torch.randn(2, 3, 11, 5, dtype=F64)
    scores = gelu(x @ mod.w1 + mod.b1) @ mod.w2
    torch.testing.assert_close(mod(x), mod.pool(x, scores), rtol=1e-12, atol=1e-12)
    assert sorted(n for n, _ in mod.named_parameters()) == ["b1", "w1", "w2"]


def test_mean_equals_reference_compress_mean():
    x = torch.randn(2, 3, 37, 8)
    mod = nsa.MeanCompress(8, 4, 8)
    assert torch.equal(mod(x), compress_mean(x, block=8, stride=4))
    assert list(mod.parameters()) == []


def test_compress_on_strided_views():
    """The layer hands [B, N, H, D] storage transposed to [B, H, N, D]: same result as contiguous."""
    torch.manual_seed(3)
    for method in nsa.METHODS:
        mod = nsa.make_compress(method, 6, 3, 8, heads=2, dtype=F64)
        x = torch.randn(2, 20, 2, 8, dtype=F64).transpose(1, 2)
        assert not x.is_contiguous()
        torch.testing.assert_close(mod(x), mod(x.contiguous()), rtol=0, atol=0)


@pytest.mark.parametrize("method", nsa.METHODS)
def test_short_sequence_gives_empty_output_with_working_gradients(method):
    torch.manual_seed(0)
    mod = nsa.make_compress(method, 8, 4, 6, heads=2, dtype=F64)
    x = torch.randn(1, 2, 7, 6, dtype=F64, requires_grad=True)
    out = mod(x)
    assert out.shape == (1, 2, 0, 6)
    (out.sum() + x.sum()).backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # only the x.sum() term contributes
    for name, p in mod.named_parameters():
        assert p.grad is None or not p.grad.any(), name


@pytest.mark.parametrize("cls", [nsa.WeightedCompress, nsa.MlpCompress])
@pytest.mark.parametrize("heads", [None, 2])
def test_gradcheck(cls, heads):
    torch.manual_seed(1)
    mod = cls(4, 2, 3, heads=heads, hidden=3, dtype=F64)
    names = [name for name, _ in mod.named_parameters()]
    x = torch.randn(1, 2, 9, 3, dtype=F64, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in mod.parameters()]

    def f(x, *ps):
        return torch.func.functional_call(mod, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


# ----------------------------------------------------------------------------------------------
# Argument errors


@pytest.mark.parametrize(
    "call, word",
    [
        (lambda: nsa.make_compress("max", 4, 2, 8), "method"),
        (lambda: nsa.make_compress("mean", 4, 3, 8), "stride"),
        (lambda: nsa.make_compress("mlp", 0, 1, 8), "block"),
        (lambda: nsa.make_compress("mlp", 4, 2, 0), "dim"),
        (lambda: nsa.make_compress("weighted", 4, 2, 8, heads=0), "heads"),
        (lambda: nsa.make_compress("mean", 4, 2, 8, hidden=3), "hidden"),
        (lambda: nsa.make_compress("mlp", 4, 2, 8, hidden=0), "hidden"),
        (lambda: nsa.make_compress("mlp", 4, 2, 8)(torch.randn(2, 10, 8)), "x"),
        (lambda: nsa.make_compress("mlp", 4, 2, 8)(torch.randn(1, 2, 10, 4)), "x"),
        (lambda: nsa.make_compress("mlp", 4, 2, 8, heads=3)(torch.randn(1, 2, 10, 8)), "x"),
        (lambda: nsa.make_compress("weighted", 4, 2, 8)(torch.randn(1, 2, 10, 8, dtype=F64)), "x"),
        (lambda: nsa.make_compress("mean", 4, 2, 8)(torch.ones(1, 2, 10, 8, dtype=torch.int64)), "x"),
    ],
)
def test_compress_errors_name_the_argument(call, word):
    with pytest.raises(ValueError, match=rf"^{word}\b"):
        call()


# ----------------------------------------------------------------------------------------------
# The layer, on the float64 oracle


def config(method="mlp", **over):
    c = dict(Q_HEADS=4, KV_HEADS=2, HEAD_DIM=8, V_HEAD_DIM=16, BLOCK=4, STRIDE=2, SELECT_BLOCK=4, TOP_N=3,
             INITIAL=1, LOCAL=1, WINDOW=6, SCORE="probs", PER="token", METHOD=method)
    c.update(over)
    return SimpleNamespace(**c)


def layer_on_reference(method="mlp", d_model=12, **over):
    cfg = config(method, **over)
    return nsa.NativeSparseAttention(cfg, d_model, bias=True, attention_fn=nsa.reference_attention(cfg), dtype=F64)


def test_reference_attention_passes_every_constant():
    cfg = config("mean", TOP_N=2, INITIAL=0, LOCAL=2, WINDOW=3, SCORE="cosine", PER="block", SELECT_BLOCK=6, STRIDE=2,
                 BLOCK=6)
    torch.manual_seed(4)
    n = 25
    q, k = torch.randn(2, 4, n, 8, dtype=F64), torch.randn(2, 2, n, 8, dtype=F64)
    v, gates = torch.randn(2, 2, n, 16, dtype=F64), torch.rand(2, 4, n, 3, dtype=F64)
    o, aux = nsa.reference_attention(cfg)(q, k, v, gates, scale=0.3, return_aux=True)
    want, want_aux = nsa_reference(q, k, v, gates, block=6, stride=2, select_block=6, top_n=2, initial=0, local=2,
                                   window=3, score="cosine", per="block", scale=0.3)
    assert torch.equal(o, want)
    assert torch.equal(aux["block_indices"], want_aux["block_indices"])


def test_reference_attention_without_window_drops_the_branch():
    torch.manual_seed(5)
    cfg = config("mean", WINDOW=0)
    q, k = torch.randn(1, 4, 13, 8, dtype=F64), torch.randn(1, 2, 13, 8, dtype=F64)
    v, gates = torch.randn(1, 2, 13, 16, dtype=F64), torch.rand(1, 4, 13, 3, dtype=F64)
    o, aux = nsa.reference_attention(cfg)(q, k, v, gates, return_aux=True)
    _, parts = nsa_reference(q, k, v, gates, block=4, stride=2, select_block=4, top_n=3, initial=1, local=1, window=2)
    want = gates[..., 0:1] * parts["o_cmp"] + gates[..., 1:2] * parts["o_slc"]
    torch.testing.assert_close(o, want, rtol=1e-14, atol=1e-14)
    assert "lse_win" not in aux and "lse_cmp" in aux


def test_layer_layout_and_projections():
    """Heads are split and merged as [B, N, H*D] <-> [B, H, N, D]; gates are (cmp, slc, win) per head."""
    torch.manual_seed(6)
    seen = {}

    def fake(q, k, v, gates, *, k_cmp, v_cmp, scale, return_aux):
        seen.update(q=q, k=k, v=v, gates=gates, k_cmp=k_cmp, v_cmp=v_cmp, scale=scale)
        seen["o"] = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[-1], dtype=q.dtype)
        return seen["o"]

    cfg = config("weighted")
    layer = nsa.NativeSparseAttention(cfg, 12, bias=True, attention_fn=fake, scale=0.7, dtype=F64)
    b, n = 2, 9
    x = torch.randn(b, n, 12, dtype=F64)
    y = layer(x)
    assert y.shape == (b, n, 12) and seen["scale"] == 0.7
    wq, bq = layer.q_proj.weight, layer.q_proj.bias
    wg, bg = layer.gate.weight, layer.gate.bias
    for h in range(4):
        rows = slice(h * 8, (h + 1) * 8)
        torch.testing.assert_close(seen["q"][:, h], x @ wq[rows].T + bq[rows])
        for j in range(3):
            r = 3 * h + j
            torch.testing.assert_close(seen["gates"][:, h, :, j], torch.sigmoid(x @ wg[r] + bg[r]))
    for h in range(2):
        torch.testing.assert_close(seen["v"][:, h], x @ layer.v_proj.weight[h * 16:(h + 1) * 16].T
                                   + layer.v_proj.bias[h * 16:(h + 1) * 16])
    assert seen["k_cmp"].shape == (b, 2, num_compressed(n, 4, 2), 8)
    assert seen["v_cmp"].shape == (b, 2, num_compressed(n, 4, 2), 16)
    torch.testing.assert_close(seen["k_cmp"], layer.k_compress(seen["k"]))
    torch.testing.assert_close(seen["v_cmp"], layer.v_compress(seen["v"]))
    want = sum(seen["o"][:, h] @ layer.o_proj.weight[:, h * 16:(h + 1) * 16].T for h in range(4)) + layer.o_proj.bias
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize("method", nsa.METHODS)
@pytest.mark.parametrize("shared", [False, True])
def test_gradients_reach_every_parameter(method, shared):
    torch.manual_seed(7)
    cfg = config(method)
    layer = nsa.NativeSparseAttention(cfg, 12, bias=True, share_compress_heads=shared,
                                      attention_fn=nsa.reference_attention(cfg), dtype=F64)
    x = torch.randn(2, 21, 12, dtype=F64, requires_grad=True)
    layer(x).square().sum().backward()
    names = [name for name, _ in layer.named_parameters()]
    if method != "mean":
        assert any(name.startswith("k_compress.") for name in names)
        assert any(name.startswith("v_compress.") for name in names)
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.endswith(("pos", "w1", "b1", "w2", "b2")) and p.dim() >= 2 and p.shape[0] > 1:
            assert all(g.abs().sum() > 0 for g in p.grad), f"{name}: a head got no gradient"
        assert p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_layer_on_sequences_shorter_than_a_block():
    torch.manual_seed(8)
    layer = layer_on_reference("mlp", BLOCK=8, STRIDE=4, SELECT_BLOCK=8)
    x = torch.randn(1, 5, 12, dtype=F64, requires_grad=True)
    y = layer(x)
    assert y.shape == (1, 5, 12) and torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_layer_is_deterministic():
    def run():
        torch.manual_seed(9)
        layer = layer_on_reference("mlp")
        x = torch.randn(2, 17, 12, dtype=F64, requires_grad=True)
        y, aux = layer(x, return_aux=True)
        y.square().sum().backward()
        return y, aux["block_indices"], x.grad, [p.grad for p in layer.parameters()]

    a, b = run(), run()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert all(torch.equal(g, h) for g, h in zip(a[3], b[3]))


def test_gate_bias_starts_on_the_window_branch():
    layer = layer_on_reference("mean")
    gates = torch.sigmoid(layer.gate.bias.view(4, 3))
    assert (gates[:, 2] > 0.8).all() and (gates[:, :2] < 0.2).all()
    no_window = layer_on_reference("mean", WINDOW=0)
    assert not no_window.gate.bias.any()


@pytest.mark.parametrize(
    "make, word",
    [
        (lambda: nsa.NativeSparseAttention(SimpleNamespace(Q_HEADS=4), 12), "module"),
        (lambda: nsa.NativeSparseAttention(config("max"), 12, attention_fn=lambda *a, **k: None), "module"),
        (lambda: nsa.NativeSparseAttention(config(), 0, attention_fn=lambda *a, **k: None), "d_model"),
        (lambda: nsa.NativeSparseAttention(config(), 12), "attention_fn"),
        (lambda: nsa.NativeSparseAttention(config(), 12, attention_fn=3), "attention_fn"),
        (lambda: nsa.NativeSparseAttention(config(), 12, bias=1, attention_fn=lambda *a, **k: None), "bias"),
        (lambda: nsa.NativeSparseAttention(config(), 12, gate_bias=(1, 2), attention_fn=lambda *a, **k: None),
         "gate_bias"),
        (lambda: layer_on_reference()(torch.randn(2, 5, 11, dtype=F64)), "x"),
        (lambda: layer_on_reference()(torch.randn(5, 12, dtype=F64)), "x"),
    ],
)
def test_layer_errors_name_the_argument(make, word):
    with pytest.raises(ValueError, match=rf"^{word}\b"):
        make()


GENERATED_TINY = Path(__file__).resolve().parents[1] / "generated" / "nsa_tiny.py"


@pytest.mark.kernel
@pytest.mark.skipif(not GENERATED_TINY.exists(), reason="generated/nsa_tiny.py is not built in this checkout")
@pytest.mark.parametrize("method", ["mean", "mlp"])
def test_layer_on_the_generated_module(method):
    """The layer on the generated NSA kernels (fp32) equals the layer on the float64 oracle, forward
    and every parameter gradient; "mlp" sends learned k_cmp / v_cmp through the kernels."""
    from attngen.tools.verify import import_generated

    mod = import_generated(GENERATED_TINY)
    cfg = SimpleNamespace(**{c: getattr(mod, c) for c in nsa.MODULE_CONSTANTS})
    cfg.METHOD = method
    torch.manual_seed(10)
    layer = nsa.NativeSparseAttention(cfg, 24, bias=True, attention_fn=mod.nsa_attention)
    oracle = nsa.NativeSparseAttention(cfg, 24, bias=True, attention_fn=nsa.reference_attention(cfg))
    oracle.load_state_dict(layer.state_dict())
    x = torch.randn(2, 37, 24)
    ys = []
    for net in (layer, oracle):
        y, aux = net(x, return_aux=True)
        y.square().sum().backward()
        ys.append((y, aux["block_indices"]))
    assert torch.equal(ys[0][1], ys[1][1])
    torch.testing.assert_close(ys[0][0], ys[1][0], rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(layer.named_parameters(), oracle.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
