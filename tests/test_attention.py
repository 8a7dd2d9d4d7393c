"""Every shipped spec's generated module against the float64 reference, forward and backward."""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from attngen import runtime
from attngen.reference import attention_reference
from attngen.spec import load_spec
from attngen.testing import check_module, compare, random_inputs

from helpers import SPEC_PATHS, assert_all_ok, generated

SPECS = [load_spec(p) for p in SPEC_PATHS]
# The interpreter costs grow with heads x head_dim; keep each spec's share of the suite similar.
EXAMPLES = {s.name: (6 if s.q_heads * s.head_dim > 1024 else 15) for s in SPECS}
MAX_LEN = 130


def _interp_tiles(mod):
    first = mod._SPACES["_fwd_kernel"][0]
    return first["block_m"], first["block_n"]


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
    )
    # length 1, one past a query tile, one short of a key tile, and a square length off the tile grid
    @example(batch=1, n_q=1, n_k=1, dtype=spec.dtypes[0], scale=None, bnhd=False, seed=0)
    @example(batch=1, n_q=bm + 1, n_k=bn - 1, dtype=spec.dtypes[-1], scale=None, bnhd=True, seed=1)
    @example(batch=2, n_q=3 * bn + 5, n_k=3 * bn + 5, dtype=spec.dtypes[0], scale=0.3, bnhd=False, seed=2)
    def run(batch, n_q, n_k, dtype, scale, bnhd, seed):
        q, k, v = random_inputs(
            mod, batch=batch, n_q=n_q, n_k=n_k, dtype=runtime.TORCH_DTYPES[dtype], seed=seed, bnhd=bnhd
        )
        assert_all_ok(check_module(mod, q, k, v, scale=scale, seed=seed), f"{spec.name} {dtype} B={batch} Nq={n_q} Nk={n_k}")

    run()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_no_keys_gives_zeros_not_nan(spec):
    """With Nk = 0 every row sees no key: o = 0, lse = -inf, gradients 0, and never NaN."""
    mod = generated(spec.name)
    dtype = runtime.TORCH_DTYPES[spec.dtypes[0]]
    q, k, v = (t.requires_grad_() for t in random_inputs(mod, batch=1, n_q=5, n_k=0, dtype=dtype))
    with runtime.poison_outputs():
        o, lse = mod.attention(q, k, v, return_lse=True)
        assert torch.equal(o, torch.zeros_like(o))
        assert torch.equal(lse, torch.full_like(lse, -math.inf))
        o.float().sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_gqa_head_mapping(spec):
    """Query head h must read KV head h // group: giving each KV head a distinct constant value
    makes each query head's output that constant."""
    mod = generated(spec.name)
    dtype = runtime.TORCH_DTYPES[spec.dtypes[0]]
    q, k, _ = random_inputs(mod, batch=1, n_q=9, n_k=9, dtype=dtype)
    v = torch.arange(spec.kv_heads, dtype=dtype, device=q.device).view(1, -1, 1, 1).expand(1, spec.kv_heads, 9, spec.v_head_dim)
    o = mod.attention(q, k, v.contiguous())
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
    assert not compare("o", o_wrong, o_ref, o_base, torch.float16).ok
    assert compare("o", o_base, o_ref, o_base, torch.float16).ok
