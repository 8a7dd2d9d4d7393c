"""score_mod and tensor parameters: the runtime checks, the learnable tensor's gradient (chunked,
deterministic), `attngen verify` on tensor parameters, and plain specs staying plain. The
property tests against the float64 reference are in test_attention.py."""

import math

import pytest
import torch

from attngen import runtime
from attngen.testing import check_module, default_params, random_inputs

from helpers import INTERP_TILES, ROOT, assert_all_ok, build_and_import, dense_spec, generated


def _inputs(name, n=12, batch=1):
    mod = generated(name)
    q, k, v = random_inputs(mod, batch=batch, n_q=n, n_k=n, dtype=torch.float16, seed=5)
    return mod, q, k, v


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("relpos_bias", {}, "relpos_bias: missing parameter rb (fp32 tensor, 2 dims)"),
        ("relpos_bias", {"rb": torch.zeros(4, 8), "bias": 1.0}, "relpos_bias: unknown parameter bias (parameters: rb)"),
        ("relpos_bias", {"rb": torch.zeros(4, 8, dtype=torch.float64)}, "relpos_bias: parameter rb must have dtype torch.float32"),
        ("relpos_bias", {"rb": torch.zeros(32)}, "relpos_bias: parameter rb must have 2 dims, got shape (32,)"),
        ("relpos_bias", {"rb": torch.zeros(4, 0)}, "relpos_bias: parameter rb must have at least one element"),
        ("relpos_bias", {"rb": [[0.0]]}, "relpos_bias: parameter rb must be a fp32 tensor, got list"),
        ("relpos_bias", {"rb": torch.zeros(4, 8, device="meta")}, "relpos_bias: parameter rb is on meta, expected"),
        ("document", {"doc": torch.zeros(1, 12, dtype=torch.int64)}, "document: parameter doc must have dtype torch.int32"),
        ("alibi", {"slopes": torch.ones(4), "w": 3}, "alibi: unknown parameter w"),
        ("softcap", {"c": torch.ones(1)}, "softcap: parameter c must be a finite float"),
        ("mha", {"w": 3}, "mha: unknown parameter w (parameters: none)"),
    ],
)
def test_bad_parameters_raise_valueerror_naming_them(name, params, message):
    mod, q, k, v = _inputs(name)
    with pytest.raises(ValueError) as info:
        mod.attention(q, k, v, **params)
    assert message in str(info.value)


@pytest.mark.kernel
def test_bias_gradient_is_deterministic_and_only_bias_may_require_grad():
    """Two backward passes give bitwise-equal d(rb), also when only rb requires a gradient."""
    mod, q, k, v = _inputs("relpos_bias", n=40, batch=2)
    rb0 = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    grads = []
    for _ in range(2):
        rb = rb0.clone().requires_grad_()
        o = mod.attention(q, k, v, rb=rb)
        o.float().pow(2).sum().backward()
        grads.append(rb.grad)
    assert torch.equal(grads[0], grads[1])
    # distances of 31 and more all land in rb[:, 31]: it has many contributions, and is not 0
    assert bool((grads[0][:, 31] != 0).all())


@pytest.mark.kernel
def test_bias_gradient_over_several_row_chunks(monkeypatch):
    """With chunks of a few query rows the gradient pass still matches the float64 reference."""
    monkeypatch.setattr(runtime, "PARAM_GRAD_ELEMS", 2 * 4 * 37)  # 2 rows of B * H * Nk per chunk
    mod = generated("relpos_bias")
    q, k, v = random_inputs(mod, batch=1, n_q=29, n_k=37, dtype=torch.bfloat16, seed=2, bnhd=True)
    rb = 0.7 * torch.randn(4, 20, generator=torch.Generator().manual_seed(4))
    assert_all_ok(check_module(mod, q, k, v, params={"rb": rb}), "relpos_bias in chunks")


def test_learnable_slopes_and_bias_get_no_nan_on_empty_inputs():
    """Nk = 0: o = 0, lse = -inf, and the learnable tensor's gradient is 0, not NaN."""
    mod = generated("alibi")
    q, k, v = random_inputs(mod, batch=1, n_q=5, n_k=0, dtype=torch.float16)
    slopes = torch.ones(4, requires_grad=True)
    with runtime.poison_outputs():
        o, lse = mod.attention(q, k, v, slopes=slopes, return_lse=True)
        assert torch.equal(lse, torch.full_like(lse, -math.inf))
        o.float().sum().backward()
    assert torch.equal(slopes.grad, torch.zeros(4))


@pytest.mark.kernel
def test_score_mod_changes_the_result():
    """The comparison is not vacuous for score_mod specs: the plain causal result fails against
    the ALiBi reference with large slopes."""
    from attngen.reference.dense import attention_reference
    from attngen.testing import compare, reference_score_mod

    mod, q, k, v = _inputs("alibi", n=20)
    slopes = torch.full((4,), 2.0)
    fn = reference_score_mod(mod, {"slopes": slopes.double()})
    o_ref, _ = attention_reference(q, k, v, mask="causal", score_mod=fn)
    o_base, _ = attention_reference(q, k, v, mask="causal", score_mod=reference_score_mod(mod, {"slopes": slopes}), compute_dtype=None)
    o_plain, _ = attention_reference(q, k, v, mask="causal", compute_dtype=None)
    assert compare("o", mod.attention(q, k, v, slopes=slopes), o_ref, o_base, torch.float16).ok
    assert not compare("o", o_plain, o_ref, o_base, torch.float16).ok


def test_plain_specs_have_no_score_mod_code():
    """A spec without score_mod keeps the plain kernels: no score_mod step and no gradient pass."""
    for name in ("llama3_gqa", "sliding_window", "document"):
        text = (ROOT / "generated" / f"{name}.py").read_text()
        assert "b_z" not in text and "_bwd_param_kernel" not in text, name
    text = (ROOT / "generated" / "softcap.py").read_text()
    assert "b_z = b_s * 0.6931471805599453" in text and "_bwd_param_kernel" not in text  # c: no gradient


def test_default_params_build_tensors_from_the_shapes():
    doc = default_params(generated("document"), batch=2, n_q=7, n_k=9)["doc"]
    assert doc.dtype == torch.int32 and doc.shape == (2, 9) and doc[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    slopes = default_params(generated("alibi"), batch=2, n_q=7, n_k=9)["slopes"]
    assert slopes.shape == (4,) and bool((slopes > 0).all())
    assert default_params(generated("relpos_bias"), batch=2, n_q=7, n_k=9)["rb"].shape == (4, 9)
    assert default_params(generated("softcap"), batch=2, n_q=7, n_k=9) == {"c": 1.0}


@pytest.mark.kernel
def test_verify_runs_specs_with_tensor_parameters(tmp_path, capsys, monkeypatch):
    from attngen.tools import verify as verify
    from attngen.tools.verify import main

    monkeypatch.setattr(verify, "CASES", ((1, 20, 20), (2, 9, 14)))  # smaller than verify's, for time
    rc = main([str(ROOT / "specs" / "relpos_bias.yaml"), str(ROOT / "specs" / "document.yaml")], out=str(tmp_path))
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count(" ok") == 8  # 2 specs x 2 dtypes x 2 cases


def test_index_sum_matches_a_float64_sum_and_repeats_bitwise():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 7, (200_000,), generator=g)
    idx[:5] = 9  # index 8 never appears: stays 0
    val = torch.randn(200_000, generator=g)
    exact = torch.zeros(10, dtype=torch.float64).index_add_(0, idx, val.double())
    runs = [runtime.index_sum_(torch.zeros(10), idx, val) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    torch.testing.assert_close(runs[0].double(), exact, rtol=1e-6, atol=1e-6)
    assert runs[0][8] == 0


@pytest.mark.kernel
def test_forward_only_score_mod_needs_no_derivative(tmp_path):
    """backward: false: a float tensor may be read at several indices (no gradient to define)."""
    from attngen.reference.dense import attention_reference
    from attngen.testing import reference_score_mod

    mod = build_and_import(tmp_path, dense_spec(
        "fwd_bias", q=2, kv=1, d=16, dtypes="[fp32]", tiles={**INTERP_TILES, "num_stages": 2},
        extra="backward: false\nparams: {t: {tensor: fp32, dims: 1}}\nscore_mod: score + t[q_idx] - t[kv_idx]\n",
    ))
    q, k, v = random_inputs(mod, batch=1, n_q=20, n_k=20, dtype=torch.float32, seed=1)
    t = torch.randn(20, generator=torch.Generator().manual_seed(2))
    o_ref, _ = attention_reference(q, k, v, mask="causal", score_mod=reference_score_mod(mod, {"t": t.double()}))
    with torch.no_grad():
        o = mod.attention(q, k, v, t=t)
    torch.testing.assert_close(o.double(), o_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.kernel
def test_score_mod_over_lengths_batch_int_tensor_and_bf16_bias(tmp_path):
    """A score_mod reading b, q_len, an int64 tensor and a learnable bf16 tensor of 3 dims, on an
    fp32 module with a non-affine mask, forward and backward against the float64 reference."""
    mod = build_and_import(tmp_path, dense_spec(
        "mixed", q=2, kv=1, d=16, dtypes="[fp32]", mask="causal or kv_idx < k0", tiles={**INTERP_TILES, "num_stages": 2},
        extra="params:\n  t: {tensor: bf16, dims: 3}\n  sel: {tensor: int64, dims: 1}\n  k0: int\n"
        "score_mod: where(sel[h] > 0, score * 0.5, tanh(score)) + t[b, h, q_len - 1 - q_idx]\n",
    ))
    q, k, v = random_inputs(mod, batch=2, n_q=21, n_k=19, dtype=torch.float32, seed=3, bnhd=True)
    g = torch.Generator().manual_seed(5)
    params = {"t": torch.randn(2, 2, 18, generator=g).to(torch.bfloat16), "sel": torch.tensor([1, 0]), "k0": 4}
    assert_all_ok(check_module(mod, q, k, v, params=params), "mixed")
