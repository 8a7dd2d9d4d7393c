"""LSE merge of partial attention results (attngen.kernels.merge) against a float64 torch formula,
and against attention itself: merging the attention over two halves of the keys gives the attention
over all of them."""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from attngen import runtime
from attngen.kernels.merge import merge
from attngen.reference.dense import attention_reference

pytestmark = pytest.mark.kernel  # every test runs the merge kernel

F64 = torch.float64
DTYPES = runtime.TORCH_DTYPES
EPS32 = torch.finfo(torch.float32).eps


def formula(o_parts, lse_parts):
    """float64: lse = logsumexp_i lse_i, o = sum_i exp(lse_i - lse) o_i over the parts whose lse_i is
    finite; rows with no such part: o = 0, lse = -inf."""
    lse = torch.stack([x.to(F64) for x in lse_parts])  # [P, ..., N]
    o = torch.stack([x.to(F64) for x in o_parts])  # [P, ..., N, Dv]
    total = torch.logsumexp(lse, dim=0)
    seen = torch.isfinite(total)
    w = torch.where(torch.isfinite(lse), torch.exp(lse - torch.where(seen, total, 0.0)), 0.0)
    o = torch.where(w.unsqueeze(-1) > 0, o, 0.0)  # a part that saw nothing contributes nothing
    return (w.unsqueeze(-1) * o).sum(0), total


def assert_close(got_o, got_lse, o_parts, lse_parts, out_dtype):
    """Against the formula with a bound from float32 accumulation and the output's rounding:
    a weight exp(lse_i - m) is off by about (|lse_i - m| + 2) float32 ulps, the sums add P more."""
    want_o, want_lse = formula(o_parts, lse_parts)
    assert got_o.dtype == out_dtype and got_lse.dtype == torch.float32
    assert got_o.shape == want_o.shape and got_lse.shape == want_lse.shape
    seen = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(got_lse), seen), "rows with and without a finite lse differ"
    assert (got_lse[~seen] == -math.inf).all()
    assert (got_o[~seen] == 0).all(), "a row every part missed is not 0"
    lse = torch.stack([x.to(F64) for x in lse_parts])
    spread = torch.where(torch.isfinite(lse), (lse - torch.where(seen, want_lse, 0.0)).abs(), 0.0).amax(0)  # [..., N]
    parts = len(o_parts)
    # lse: m + log(l) in float32, l in [1, P]
    lse_err = (got_lse[seen].to(F64) - want_lse[seen]).abs()
    assert (lse_err <= 4 * EPS32 * (want_lse[seen].abs() + parts + 1)).all(), lse_err.max()
    # o: relative to the largest |o_i| of the row, plus the output dtype's rounding of the result
    o_abs = torch.stack([x.to(F64).abs() for x in o_parts])
    top = torch.where(torch.isfinite(lse).unsqueeze(-1), o_abs, 0.0).amax(0).amax(-1)  # [..., N], NaN holes left out
    bound = 4 * EPS32 * (spread + parts + 2) * top
    eps_out = torch.finfo(out_dtype).eps
    err = (got_o.to(F64) - want_o).abs()
    allowed = bound.unsqueeze(-1) + eps_out * want_o.abs()
    assert (err <= allowed).all(), f"max error {err.max():.3g}, worst excess {(err - allowed).max():.3g}"


def make_parts(gen, parts, lead, n, dv, dtype, *, spread=10.0, offset=0.0, holes=0.0):
    """Random o_i (NaN where lse_i = -inf: such entries must not be read) and lse_i in
    offset + [-spread, spread]; a fraction `holes` of the lse entries is -inf."""
    o_parts, lse_parts = [], []
    for _ in range(parts):
        o = torch.randn(*lead, n, dv, generator=gen, dtype=F64)
        lse = offset + spread * (2 * torch.rand(*lead, n, generator=gen, dtype=F64) - 1)
        hole = torch.rand(*lead, n, generator=gen) < holes
        lse = torch.where(hole, -math.inf, lse)
        o = torch.where(hole.unsqueeze(-1), math.nan, o)
        o_parts.append(o.to(runtime.DEVICE, DTYPES[dtype]))
        lse_parts.append(lse.to(runtime.DEVICE, torch.float32))
    return o_parts, lse_parts


@settings(max_examples=20)
@given(
    parts=st.integers(1, 5),
    lead=st.sampled_from([(), (1,), (2, 3), (1, 2, 1)]),
    n=st.integers(1, 70),
    dv=st.sampled_from([1, 16, 24, 64, 80]),
    dtype=st.sampled_from(sorted(DTYPES)),
    out=st.sampled_from([None, "fp32"]),
    stacked=st.booleans(),
    spread=st.sampled_from([0.0, 1.0, 10.0]),
    offset=st.sampled_from([0.0, -50.0, 1000.0]),
    holes=st.sampled_from([0.0, 0.3, 0.9]),
    seed=st.integers(0, 2**16),
)
@example(parts=3, lead=(2, 3), n=33, dv=80, dtype="bf16", out=None, stacked=False, spread=10.0, offset=0.0,
         holes=0.5, seed=1)
@example(parts=1, lead=(), n=5, dv=1, dtype="fp32", out=None, stacked=True, spread=1.0, offset=0.0, holes=0.3, seed=2)
def test_matches_float64_formula(parts, lead, n, dv, dtype, out, stacked, spread, offset, holes, seed):
    o_parts, lse_parts = make_parts(torch.Generator().manual_seed(seed), parts, lead, n, dv, dtype,
                                    spread=spread, offset=offset, holes=holes)
    out_dtype = DTYPES[out] if out else DTYPES[dtype]
    args = (torch.stack(o_parts), torch.stack(lse_parts)) if stacked else (o_parts, lse_parts)
    with runtime.poison_outputs():
        o, lse = merge(*args, out_dtype=None if out is None else out_dtype)
    assert_close(o, lse, o_parts, lse_parts, out_dtype)


def test_rows_that_no_part_saw_and_a_part_that_saw_nothing():
    """Rows with lse = -inf in every part give o = 0, lse = -inf; a part whose lse is -inf everywhere
    (its o all NaN) changes nothing, bit for bit, against merging the other parts alone."""
    gen = torch.Generator().manual_seed(3)
    o_parts, lse_parts = make_parts(gen, 3, (2,), 40, 24, "fp16", holes=0.2)
    for lse in lse_parts:
        lse[:, 7] = -math.inf  # row 7: seen by no part
    o_parts[1] = torch.full_like(o_parts[1], math.nan)
    lse_parts[1] = torch.full_like(lse_parts[1], -math.inf)
    with runtime.poison_outputs():
        o, lse = merge(o_parts, lse_parts)
        o2, lse2 = merge([o_parts[0], o_parts[2]], [lse_parts[0], lse_parts[2]])
    assert_close(o, lse, o_parts, lse_parts, torch.float16)
    assert (o[:, 7] == 0).all() and (lse[:, 7] == -math.inf).all()
    assert not o.isnan().any()
    assert torch.equal(o, o2) and torch.equal(lse, lse2)
    # every part saw nothing anywhere
    with runtime.poison_outputs():
        o, lse = merge([o_parts[1]] * 2, [lse_parts[1]] * 2, out_dtype=torch.float32)
    assert torch.equal(o, torch.zeros_like(o)) and torch.equal(lse, lse_parts[1])


def test_one_part_is_returned_unchanged():
    """P = 1: weight exactly 1 for every row that saw a key, so o and lse come back bit for bit."""
    o_parts, lse_parts = make_parts(torch.Generator().manual_seed(4), 1, (3,), 21, 16, "bf16", holes=0.2)
    o, lse = merge(o_parts, lse_parts)
    seen = torch.isfinite(lse_parts[0])
    assert torch.equal(lse, lse_parts[0])
    assert torch.equal(o[seen], o_parts[0][seen]) and (o[~seen] == 0).all()


def test_merged_halves_equal_attention_over_all_keys():
    """What the merge is for: attention over keys 0..M-1 and M..N-1 separately (float64 reference),
    merged, equals attention over all N keys; with a causal mask, early rows see only the first
    half (the second half's lse is -inf there)."""
    gen = torch.Generator().manual_seed(5)
    b, h, n, d, dv, split = 2, 3, 50, 16, 24, 20
    q = torch.randn(b, h, n, d, generator=gen, dtype=F64)
    k = torch.randn(b, h, n, d, generator=gen, dtype=F64)
    v = torch.randn(b, h, n, dv, generator=gen, dtype=F64)
    causal = torch.arange(n).view(n, 1) >= torch.arange(n).view(1, n)
    o_all, lse_all = attention_reference(q, k, v, scale=0.3, mask=causal, compute_dtype=None)
    halves = [
        attention_reference(q, k[:, :, s], v[:, :, s], scale=0.3, mask=causal[:, s], compute_dtype=None)
        for s in (slice(0, split), slice(split, n))
    ]
    assert (halves[1][1][:, :, :split] == -math.inf).all()
    o, lse = merge([x[0].to(runtime.DEVICE, torch.float32) for x in halves], [x[1].to(runtime.DEVICE, torch.float32) for x in halves])
    assert (o.cpu().double() - o_all).abs().max() < 1e-5
    assert (lse.cpu().double() - lse_all).abs().max() < 1e-5


def test_strided_and_stacked_inputs_give_the_same_bits():
    """Parts seen through transpose(1, 2) of [B, N, H, Dv] storage, a stacked [P, ...] tensor and a
    list of contiguous parts: one result."""
    o_parts, lse_parts = make_parts(torch.Generator().manual_seed(6), 3, (2, 4), 30, 16, "fp32", holes=0.1)
    want = merge(o_parts, lse_parts)
    strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in o_parts]
    assert not strided[0].is_contiguous()
    for got in (merge(strided, lse_parts), merge(torch.stack(o_parts), torch.stack(lse_parts))):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_empty_rows():
    dev = runtime.DEVICE
    o, lse = merge([torch.zeros(2, 0, 16, device=dev)] * 2, [torch.zeros(2, 0, device=dev)] * 2)
    assert o.shape == (2, 0, 16) and lse.shape == (2, 0)


@pytest.mark.parametrize(
    "o, lse, kw, message",
    [
        ([], [], {}, "o holds no part"),
        (torch.zeros(2, 4, 8), [torch.zeros(4)] * 2, {}, "both be sequences of parts or both stacked"),
        ([torch.zeros(4, 8), torch.zeros(5, 8)], [torch.zeros(4)] * 2, {}, r"o\[1\] is"),
        ([torch.zeros(4, 8)] * 2, [torch.zeros(4, 8)] * 2, {}, "lse has shape"),
        ([torch.zeros(4, 8)] * 2, [torch.zeros(4, dtype=F64)] * 2, {}, "lse has dtype"),
        ([torch.zeros(4, 8, dtype=F64)] * 2, [torch.zeros(4)] * 2, {}, "o has dtype"),
        ([torch.zeros(4, 8)] * 2, [torch.zeros(4)] * 2, {"out_dtype": torch.int32}, "out_dtype"),
        ([torch.zeros(8)] * 2, [torch.zeros(())] * 2, {}, r"\[\.\.\., N, Dv\]"),
        ([torch.zeros(4, 8), "x"], [torch.zeros(4)] * 2, {}, r"o\[1\] is a str"),
    ],
)
def test_bad_arguments_raise_valueerror(o, lse, kw, message):
    with pytest.raises(ValueError, match=message):
        merge(o, lse, **kw)
