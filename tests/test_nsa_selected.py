"""NSA selected-block attention (attngen.kernels.nsa_selected) against the float64 oracle
attngen.reference.nsa.selected_attention: o, lse, dq, dk, dv under the project's tolerance rule."""

import math
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from attngen.reference import nsa
from attngen import runtime
from attngen.kernels import nsa_selected
from attngen.reference.dense import attention_reference
from attngen.testing import _loss, compare

from helpers import assert_all_ok


# ----------------------------------------------------------------------------- index lists


def random_lists(gen, b, hkv, n, select_block, top_n, *, force_own=True):
    """Random valid lists [B, Hkv, N, top_n] int64: for position t a random number (1..top_n) of
    distinct blocks among 0..t // select_block, the own block included when force_own,
    ascending, -1 padded."""
    nb = nsa.num_selection_blocks(n, select_block)
    own = (torch.arange(n) // select_block).view(1, 1, n, 1)
    j = torch.arange(nb).view(1, 1, 1, nb)
    r = torch.rand(b, hkv, n, nb, generator=gen, dtype=torch.float64)
    r = torch.where(j > own, -1.0, r)  # future blocks never picked
    if force_own:
        r = torch.where(j == own, 2.0, r)
    if nb < top_n:
        r = torch.cat([r, r.new_full((b, hkv, n, top_n - nb), -1.0)], dim=3)
    vals, order = torch.topk(r, top_n, dim=3)
    count = torch.randint(1, top_n + 1, (b, hkv, n, 1), generator=gen)
    keep = (vals >= 0) & (torch.arange(top_n).view(1, 1, 1, top_n) < count)
    big = nb + top_n
    picked = torch.sort(torch.where(keep, order, big), dim=3).values
    return torch.where(picked == big, -1, picked)


def lists_with_holes(gen, b, hkv, n, select_block, top_n):
    """Random lists where some rows see no key at all: rows with only -1, and rows whose only
    block lies after them (a caller's indices need not be causal); plus rows in any order with a
    repeated entry, which count once."""
    idx = random_lists(gen, b, hkv, n, select_block, top_n, force_own=False)
    nb = nsa.num_selection_blocks(n, select_block)
    t = torch.arange(n)
    kind = torch.randint(0, 4, (b, hkv, n), generator=gen)
    idx[kind == 0] = -1
    future = torch.where((t // select_block + 1 < nb).view(1, 1, n), t // select_block + 1, -1).expand(b, hkv, n)
    idx[..., 0] = torch.where(kind == 1, future, idx[..., 0])
    idx[..., 1:] = torch.where((kind == 1).unsqueeze(-1), -1, idx[..., 1:])
    shuffled = torch.flip(idx, dims=[3])
    shuffled[..., -1] = shuffled[..., 0]
    return torch.where((kind == 2).unsqueeze(-1), shuffled, idx)


def selected_lists(gen, b, hkv, n, select_block, top_n):
    """The reference's own top-n selection on random block scores (1 initial, 1 local block)."""
    nb = nsa.num_selection_blocks(n, select_block)
    scores = torch.rand(b, hkv, n, nb, generator=gen, dtype=torch.float64)
    forced = min(top_n, 2)
    return nsa.select_blocks(scores, select_block=select_block, top_n=top_n, initial=forced // 2, local=forced - forced // 2)


INDEX_KINDS = {"selection": selected_lists, "random": random_lists, "holes": lists_with_holes}


# ----------------------------------------------------------------------------- the check


def check_selected(q, k, v, idx, select_block, scale, seed, backward=True):
    """Kernel vs float64 reference (PyTorch at the input dtype as the tolerance baseline), o, lse and
    the three gradients; also: keys no query sees get exactly zero dk, dv."""
    dtype = q.dtype
    group = q.shape[1] // k.shape[1]
    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    with runtime.poison_outputs():
        o, lse = nsa_selected.selected_attention(*leaves, idx, select_block, scale)
    gen = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    dlse = torch.randn(lse.shape, generator=gen, dtype=torch.float64)
    visible = nsa.selection_mask(idx.long(), select_block=select_block, n_keys=k.shape[2])
    mask = visible.repeat_interleave(group, dim=1)
    results = {}
    for label in ("ref", "base"):
        ins = [t.detach().clone().requires_grad_(backward) for t in (q, k, v)]
        if label == "ref":
            ro, rlse = nsa.selected_attention(*ins, idx.long(), select_block=select_block, scale=scale)
        else:
            ro, rlse = attention_reference(*ins, scale=scale, mask=mask, compute_dtype=None)
        grads = [None] * 3
        if backward:
            grads = torch.autograd.grad(_loss(ro, rlse, do.to(ro.dtype), dlse.to(rlse.dtype)), ins, allow_unused=True)
        results[label] = (ro, rlse, *grads)
    out = [compare("o", o, results["ref"][0], results["base"][0], dtype),
           compare("lse", lse, results["ref"][1], results["base"][1], dtype)]
    if not backward:
        return out, None
    with runtime.poison_outputs():
        grads = torch.autograd.grad(_loss(o, lse, do.to(o.dtype), dlse.float()), leaves)
    for name, kg, rg, bg in zip(("dq", "dk", "dv"), grads, results["ref"][2:], results["base"][2:]):
        out.append(compare(name, kg, rg, bg, dtype))
    unseen = ~visible.any(dim=2)  # [B, Hkv, Nk]: keys no query sees
    for name, g in (("dk", grads[1]), ("dv", grads[2])):
        assert torch.equal(g[unseen], torch.zeros_like(g[unseen])), f"{name} of keys no query sees is not exactly zero"
    return out, grads


def make_case(batch, hkv, group, n, d, dv, select_block, top_n, dtype, kind, idx_int32, seed):
    gen = torch.Generator().manual_seed(seed)
    dt = runtime.TORCH_DTYPES[dtype]
    q = torch.randn(batch, hkv * group, n, d, generator=gen).to(runtime.DEVICE, dt)
    k = torch.randn(batch, hkv, n, d, generator=gen).to(runtime.DEVICE, dt)
    v = torch.randn(batch, hkv, n, dv, generator=gen).to(runtime.DEVICE, dt)
    idx = INDEX_KINDS[kind](gen, batch, hkv, n, select_block, top_n)
    return q, k, v, idx.to(torch.int32 if idx_int32 else torch.int64)


# The interpreter's cost grows with (query rows) x (blocks visited): large groups get short sequences.
MAX_ROWS = 512


@st.composite
def cases(draw, kinds=tuple(INDEX_KINDS)):
    group = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32]))
    batch = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 2))
    n = draw(st.integers(1, max(2, min(200, MAX_ROWS // (batch * hkv * group)))))
    return dict(
        batch=batch, hkv=hkv, group=group, n=n,
        d=draw(st.sampled_from([16, 24, 32, 48])), dv=draw(st.sampled_from([16, 24, 32, 48])),
        select_block=draw(st.sampled_from([16, 32, 64])), top_n=draw(st.integers(1, 6)),
        dtype=draw(st.sampled_from(["fp16", "bf16", "fp32"])), kind=draw(st.sampled_from(kinds)),
        idx_int32=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
    )


def run_case(case, scale=None):
    q, k, v, idx = make_case(**case)
    scale = q.shape[3] ** -0.5 if scale is None else scale
    results, _ = check_selected(q, k, v, idx, case["select_block"], scale, case["seed"])
    assert_all_ok(results, str(case))


def pinned(group, n, **kw):
    base = dict(batch=1, hkv=2, group=group, n=n, d=24, dv=16, select_block=16, top_n=3, dtype="fp16",
                kind="selection", idx_int32=False, seed=group * 1000 + n)
    return base | kw


@pytest.mark.kernel
@settings(max_examples=8)
@given(case=cases(kinds=("selection",)))
@example(case=pinned(1, 1))
@example(case=pinned(1, 83, select_block=32, top_n=4, dtype="bf16"))
@example(case=pinned(3, 70, dtype="fp32", idx_int32=True))
@example(case=pinned(16, 21, hkv=1, select_block=16, d=16, dv=32))
@example(case=pinned(32, 10, hkv=1, select_block=64, dtype="bf16"))
def test_matches_reference_on_selected_blocks(case):
    """Indices from the reference's own top-n selection (forced first and own blocks)."""
    run_case(case)


@pytest.mark.kernel
@settings(max_examples=6)
@given(case=cases(kinds=("random", "holes")))
# rows that see no key: o = 0, lse = -inf, zero gradients, no NaN
@example(case=pinned(2, 45, kind="holes", dtype="bf16"))
@example(case=pinned(5, 37, kind="holes", select_block=32, top_n=2))
@example(case=pinned(12, 12, kind="random", hkv=1, d=48, dv=24, dtype="fp32"))
# blocks shorter than a key tile, and a block length that is not a power of two (a partial tile)
@example(case=pinned(4, 53, kind="random", select_block=8, top_n=5))
@example(case=pinned(2, 130, kind="random", select_block=48, top_n=2, hkv=1, dtype="bf16"))
# the paper's head dims (192 / 128) with a group that is not a power of two above 16
@example(case=pinned(24, 14, kind="random", hkv=1, d=192, dv=128, select_block=32, dtype="bf16"))
def test_matches_reference_on_given_blocks(case):
    """Caller-supplied lists: random valid sets, and sets with empty, future-only, unordered and
    repeated entries."""
    run_case(case)


@pytest.mark.kernel
def test_every_row_empty_gives_zeros():
    q, k, v, idx = make_case(**pinned(3, 20))
    idx = torch.full_like(idx, -1)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with runtime.poison_outputs():
        o, lse = nsa_selected.selected_attention(*leaves, idx, 16, 0.3)
        assert torch.equal(o, torch.zeros_like(o))
        assert torch.equal(lse, torch.full_like(lse, -math.inf))
        grads = torch.autograd.grad(o.float().sum() + torch.where(lse.isinf(), 0, lse).sum(), leaves)
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.kernel
def test_backward_is_deterministic():
    """dK/dV come from per-block programs with a fixed order (no atomics): two runs agree bitwise."""
    q, k, v, idx = make_case(**pinned(3, 75, select_block=16, top_n=5, kind="random", dtype="bf16"))
    runs = []
    for _ in range(2):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        o, lse = nsa_selected.selected_attention(*leaves, idx, 16, 0.25)
        runs.append(torch.autograd.grad((o.float() * torch.linspace(-1, 1, o.shape[-1])).sum() + lse.sum(), leaves))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.kernel
def test_wrong_kernel_is_caught():
    """The check is not vacuous: the right output under other indices fails it."""
    case = pinned(2, 50, top_n=2, kind="random")
    q, k, v, idx = make_case(**case)
    other = make_case(**(case | {"seed": 7}))[3]
    o, _ = nsa_selected.selected_attention(q, k, v, other, 16, 0.3)
    o_ref, _ = nsa.selected_attention(q, k, v, idx.long(), select_block=16, scale=0.3)
    mask = nsa.selection_mask(idx.long(), select_block=16).repeat_interleave(2, dim=1)
    o_base, _ = attention_reference(q, k, v, scale=0.3, mask=mask, compute_dtype=None)
    assert not compare("o", o, o_ref, o_base, q.dtype).ok


@pytest.mark.kernel
def test_strided_inputs():
    """q, k, v as [B, N, H, D] storage seen through transpose(1, 2)."""
    case = pinned(4, 40, batch=2, select_block=32, top_n=3, kind="random")
    q, k, v, idx = make_case(**case)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    results, _ = check_selected(q, k, v, idx, 32, 0.2, case["seed"])
    assert_all_ok(results, "strided")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(idx=lambda i: i.float()), "block_idx must be int32 or int64"),
        (dict(idx=lambda i: i[:, :, :-1]), "block_idx has shape"),
        (dict(idx=lambda i: i.clamp(max=0) + 5), "block_idx entries must be -1 or in 0..2"),
        (dict(idx=lambda i: i.clamp(min=-2) - 1), "block_idx entries must be -1 or in 0..2"),
        (dict(k=lambda t: t[:, :1].repeat(1, 3, 1, 1)), "k has 3 heads, which do not divide q's 4"),
        (dict(v=lambda t: t.half() if t.dtype != torch.float16 else t.float()), "q, k, v must share one of"),
        (dict(select_block=0), "select_block must be a positive int"),
        (dict(scale=math.nan), "scale must be a finite float"),
    ],
)
def test_bad_arguments_raise_valueerror_naming_them(change, message):
    q, k, v, idx = make_case(**pinned(2, 40, top_n=2, dtype="fp32"))
    args = dict(q=q, k=k, v=v, idx=idx, select_block=16, scale=0.3)
    for key, fn in change.items():
        args[key] = fn(args[key]) if callable(fn) else fn
    with pytest.raises(ValueError, match=message):
        nsa_selected.selected_attention(args["q"], args["k"], args["v"], args["idx"], args["select_block"], args["scale"])


def nsa_spec(tmp_path: Path, group: int, d: int, dv: int, dtype: str) -> Path:
    """An NSA spec of 2 KV heads with `group` query heads each, the paper's selection (16 blocks of 64)."""
    name = f"slc_g{group}_d{d}_{dv}_{dtype}"
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(
        f"name: {name}\nheads: {{q: {2 * group}, kv: 2}}\nhead_dim: {d}\nv_head_dim: {dv}\ndtypes: [{dtype}]\n"
        "sparse:\n  kind: nsa\n  compress: {block: 32, stride: 16}\n  select: {block: 64, top_n: 16}\n"
    )
    return spec


@pytest.mark.aot
def test_kernels_compile_for_sm90_without_spills(tmp_path, monkeypatch):
    """Registers: the tile rule keeps every kernel spill-free at sm_90 (compiled ahead of time by
    `attngen report`, which records the tiles nsa_selected's wrappers launch) for the paper's
    head dims and the group sizes around the packing boundary."""
    from attngen.codegen.build import build
    from attngen.tools.report import SMEM_LIMIT, run_report

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    configs = [(1, 192, 128, "fp16"), (16, 192, 128, "bf16"), (3, 128, 128, "fp16"), (32, 40, 40, "fp16")]
    specs = [nsa_spec(tmp_path, *c) for c in configs]
    modules = [path for path, _ in build(specs, tmp_path / "gen") if path.stem in {s.stem for s in specs}]
    kernels = {"nsa_selected.fwd_kernel", "nsa_selected.bwd_dq_kernel", "nsa_selected.bwd_dkdv_kernel"}
    rows = run_report(modules, ["sm_90"], kernels=kernels, jobs=2)
    assert {(r.spec, r.kernel) for r in rows} == {(s.stem, k) for s in specs for k in kernels}
    for r in rows:
        assert r.error is None, r.error
        assert r.spill_stores == 0 and r.spill_loads == 0, r
        assert r.smem <= SMEM_LIMIT[90] and r.tensor_cores != "none", r
