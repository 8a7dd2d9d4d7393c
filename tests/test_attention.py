"""Every shipped spec's generated module against the float64 reference, forward and backward."""

import functools
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from attngen import param_values as pv
from attngen import runtime
from attngen.reference.dense import attention_reference
from attngen.language.spec import load_spec
from attngen.testing import check_module, compare, random_inputs

from helpers import SPEC_PATHS, assert_all_ok, generated

# Dense specs; NSA specs (sparse:) and their branch modules are tested in test_nsa.py.
SPECS = [s for s in map(load_spec, SPEC_PATHS) if s.sparse is None]
# The interpreter costs grow with heads x head_dim; keep each spec's share of the suite similar.
# Expression-mask specs run 16x16 tiles in the interpreter (many tiles per call): fewer examples.
EXAMPLES = {s.name: (4 if s.params else 6 if s.q_heads * s.head_dim > 1024 else 15) for s in SPECS}
MAX_LEN = 130


# Mask and score_mod parameters per shipped spec: the values the properties draw (negative and
# oversized included). The pinned examples take theirs from attngen.param_values: the `check` values
# (every row keeps some key) and the `no_key` ones (rows with no key at all, where the spec allows).
# Tensor values are functions of the call's Shape, drawn as recipes and materialized once the sizes are.
PARAM_STRATEGIES = {
    "sliding_window": {"w": st.integers(-3, MAX_LEN + 5)},
    "prefix_lm": {"p": st.integers(-3, MAX_LEN + 5)},
    "chunked_local": {"c": st.integers(1, MAX_LEN + 5)},
    "global_window": {"g": st.integers(-1, 20), "w": st.integers(-1, 60)},
    "alibi": {"slopes": st.builds(functools.partial, st.just(pv.slopes), st.floats(0.0, 2.0))},
    "softcap": {"c": st.floats(0.5, 60.0)},
    "document": {"doc": st.builds(functools.partial, st.just(pv.doc_ids), st.integers(1, 5), st.integers(-20, 5), st.integers(0, 2**16))},
    "relpos_bias": {"rb": st.builds(functools.partial, st.just(pv.bias), st.integers(1, 40), st.floats(0.0, 2.0), st.integers(0, 2**16))},
    "dilated_window": {"w": st.integers(-3, MAX_LEN + 5), "d": st.integers(-4, 12).filter(bool)},
    "natten_2d": {"width": st.integers(-6, 24).filter(bool), "r": st.integers(-1, 6)},
}


def check_params(name: str) -> dict:
    entry = pv.REGISTRY.get(name)
    return entry.check if entry else {}


def materialize(params: dict, mod, batch: int, n_q: int, n_k: int) -> dict:
    return pv.materialize(params, pv.Shape(mod.Q_HEADS, batch, n_q, n_k))


def test_every_parametrised_spec_has_strategies_and_registered_values():
    for s in SPECS:
        mod = generated(s.name)
        assert set(PARAM_STRATEGIES.get(s.name, {})) == set(mod.PARAMS), s.name
        if mod.PARAMS:
            assert pv.entry(s.name, mod.PARAMS) is not None, f"{s.name}: no entry in attngen.param_values"
            assert set(pv.REGISTRY[s.name].check) == set(mod.PARAMS), s.name


def _interp_tiles(mod):
    first = mod._SPACES["_fwd_kernel"][0]
    return first["block_m"], first["block_n"]


@pytest.mark.kernel
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_matches_reference(spec):
    mod = generated(spec.name)
    bm, bn = _interp_tiles(mod)

    @settings(max_examples=EXAMPLES[spec.name])
    @given(
        batch=st.integers(1, 2),
        n_q=st.integers(1, MAX_LEN),
        n_k=st.integers(1, MAX_LEN),
        dtype=st.sampled_from(spec.dtypes),
        # logits up to twice the usual spread; see README "Numerics" for very peaked softmax in bf16
        scale=st.one_of(st.none(), st.floats(0.05, 2.0 / math.sqrt(spec.head_dim))),
        bnhd=st.booleans(),
        seed=st.integers(0, 2**16),
        params=st.fixed_dictionaries(PARAM_STRATEGIES.get(spec.name, {})),
    )
    # length 1, one past a query tile, one short of a key tile, and a square length off the tile grid
    @example(batch=1, n_q=1, n_k=1, dtype=spec.dtypes[0], scale=None, bnhd=False, seed=0, params=check_params(spec.name))
    @example(batch=1, n_q=bm + 1, n_k=bn - 1, dtype=spec.dtypes[-1], scale=None, bnhd=True, seed=1, params=check_params(spec.name))
    @example(batch=2, n_q=3 * bn + 5, n_k=3 * bn + 5, dtype=spec.dtypes[0], scale=0.3, bnhd=False, seed=2, params=check_params(spec.name))
    # parameters that leave rows with no visible key (o = 0, lse = -inf, zero gradients, no NaN)
    @example(batch=1, n_q=3 * bm + 3, n_k=2 * bn + 1, dtype=spec.dtypes[-1], scale=None, bnhd=False, seed=3,
             params=pv.no_key_values(spec.name) or check_params(spec.name))
    def run(batch, n_q, n_k, dtype, scale, bnhd, seed, params):
        q, k, v = random_inputs(
            mod, batch=batch, n_q=n_q, n_k=n_k, dtype=runtime.TORCH_DTYPES[dtype], seed=seed, bnhd=bnhd
        )
        params = materialize(params, mod, batch, n_q, n_k)
        assert_all_ok(
            check_module(mod, q, k, v, scale=scale, seed=seed, params=params),
            f"{spec.name} {dtype} B={batch} Nq={n_q} Nk={n_k} {params}",
        )

    run()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_no_keys_gives_zeros_not_nan(spec):
    """With Nk = 0 every row sees no key: o = 0, lse = -inf, gradients 0, and never NaN."""
    mod = generated(spec.name)
    dtype = runtime.TORCH_DTYPES[spec.dtypes[0]]
    q, k, v = (t.requires_grad_() for t in random_inputs(mod, batch=1, n_q=5, n_k=0, dtype=dtype))
    with runtime.poison_outputs():
        o, lse = mod.attention(q, k, v, return_lse=True, **materialize(check_params(spec.name), mod, 1, 5, 0))
        assert torch.equal(o, torch.zeros_like(o))
        assert torch.equal(lse, torch.full_like(lse, -math.inf))
        o.float().sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


@pytest.mark.kernel
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_gqa_head_mapping(spec):
    """Query head h must read KV head h // group: giving each KV head a distinct constant value
    makes each query head's output that constant."""
    mod = generated(spec.name)
    dtype = runtime.TORCH_DTYPES[spec.dtypes[0]]
    q, k, _ = random_inputs(mod, batch=1, n_q=9, n_k=9, dtype=dtype)
    v = torch.arange(spec.kv_heads, dtype=dtype, device=q.device).view(1, -1, 1, 1).expand(1, spec.kv_heads, 9, spec.v_head_dim)
    o = mod.attention(q, k, v.contiguous(), **materialize(check_params(spec.name), mod, 1, 9, 9))
    expect = (torch.arange(spec.q_heads, device=q.device) // spec.group).float().view(1, -1, 1, 1).expand_as(o)
    # the softmax weights sum to 1 up to rounding, far closer than the 1 between heads
    torch.testing.assert_close(o.float(), expect, atol=0.05, rtol=0.01)


def test_comparison_catches_a_wrong_kernel():
    """The tolerance rule is not vacuous: the non-causal result fails against the causal reference."""
    mod = generated("llama3_gqa")
    q, k, v = random_inputs(mod, batch=1, n_q=20, n_k=20, dtype=torch.float16)
    o_wrong, _ = attention_reference(q, k, v, mask="none", compute_dtype=None)
    o_ref, _ = attention_reference(q, k, v, mask="causal")
    o_base, _ = attention_reference(q, k, v, mask="causal", compute_dtype=None)
    wrong, right = compare("o", o_wrong, o_ref, o_base, torch.float16), compare("o", o_base, o_ref, o_base, torch.float16)
    assert not wrong.ok and wrong.ratio > 1
    assert right.ok and right.ratio <= 1
    # the ratio `attngen verify` prints is the error over the rule's bound
    assert wrong.ratio == wrong.max_err / wrong.tolerance and wrong.tolerance > 0


# document and chunked_local hide keys from the rows past the last key only (each position its own
# document; chunks of one): chunked_local has its own test below
HIDE_ALL = [(n, e.no_key) for n, e in pv.REGISTRY.items() if e.no_key and n not in ("document", "chunked_local")]


@pytest.mark.kernel
@pytest.mark.parametrize("name, params", HIDE_ALL)
def test_parameters_that_hide_every_key_give_zeros(name, params):
    """A mask that no pair passes (window 0, no global tokens): o = 0, lse = -inf, zero grads."""
    mod = generated(name)
    q, k, v = (t.requires_grad_() for t in random_inputs(mod, batch=1, n_q=20, n_k=20, dtype=torch.float16))
    with runtime.poison_outputs():
        o, lse = mod.attention(q, k, v, return_lse=True, **params)
        assert torch.equal(o, torch.zeros_like(o))
        assert torch.equal(lse, torch.full_like(lse, -math.inf))
        o.float().sum().backward()
        assert torch.equal(q.grad, torch.zeros_like(q)) and not torch.isnan(k.grad).any()


@pytest.mark.kernel
def test_chunks_of_one_leave_each_query_its_own_key_only():
    """chunked(c) is causal, so no c >= 1 hides every key (a query always sees its own position).
    With c = 1 query i sees key i alone: o[i] = v[i] exactly (one weight of 1), lse[i] = scale *
    q[i].k[i], and with Nq > Nk the rows past the last key see nothing (o = 0, lse = -inf, dq = 0)."""
    mod = generated("chunked_local")
    n_q, n_k, group = 20, 12, mod.Q_HEADS // mod.KV_HEADS
    q, k, v = (t.requires_grad_() for t in random_inputs(mod, batch=1, n_q=n_q, n_k=n_k, dtype=torch.float16))
    with runtime.poison_outputs():
        o, lse = mod.attention(q, k, v, return_lse=True, **pv.no_key_values("chunked_local"))
        kv_of = torch.arange(mod.Q_HEADS, device=q.device) // group
        assert torch.equal(o[:, :, :n_k], v[:, kv_of].detach())
        assert torch.equal(o[:, :, n_k:], torch.zeros_like(o[:, :, n_k:]))
        own = (q[:, :, :n_k].float() * k[:, kv_of].float()).sum(-1) / math.sqrt(mod.HEAD_DIM)
        torch.testing.assert_close(lse[:, :, :n_k].float(), own, rtol=1e-3, atol=1e-3)
        assert torch.equal(lse[:, :, n_k:], torch.full_like(lse[:, :, n_k:], -math.inf))
        o.float().sum().backward()
    assert torch.equal(q.grad[:, :, n_k:], torch.zeros_like(q.grad[:, :, n_k:]))
    # o[i] = v[i] whatever q and k are: dv[j] counts the query heads reading it, dq and dk vanish
    assert torch.equal(v.grad, torch.full_like(v.grad, group))
    for g in (q.grad, k.grad):
        assert torch.isfinite(g).all() and g.abs().max() < 1e-2


@pytest.mark.parametrize(
    "params, message",
    [
        ({}, "sliding_window: missing parameter w (int)"),
        ({"w": 2.5}, "sliding_window: parameter w must be an int, got float"),
        ({"w": True}, "sliding_window: parameter w must be an int, got bool"),
        ({"w": 2**40}, "sliding_window: parameter w = 1099511627776 is out of range"),
    ],
)
def test_bad_mask_parameters_raise_valueerror_naming_them(params, message):
    mod = generated("sliding_window")
    q, k, v = random_inputs(mod, batch=1, n_q=3, n_k=3, dtype=torch.float16)
    with pytest.raises(ValueError) as info:
        mod.attention(q, k, v, **params)
    assert message in str(info.value)


def test_float_parameter_is_checked():
    from attngen.runtime import check_params

    assert check_params("m", {"t": "float", "n": "int"}, {"t": 2, "n": 3}) == (2.0, 3)
    with pytest.raises(ValueError, match="m: parameter t must be a finite float"):
        check_params("m", {"t": "float"}, {"t": math.inf})
