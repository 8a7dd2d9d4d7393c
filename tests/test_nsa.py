"""NSA specs: the three generated modules, nsa_attention against the float64 oracle
(attngen.reference.nsa), the selection against the oracle's, and every query-head group size."""

import math
import types
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from attngen.reference import nsa as nr
from attngen import runtime
from attngen.codegen.build import build, check, render_all, spec_files
from attngen.tools.cli import main as cli
from attngen.language.spec import SpecError, load_spec
from attngen.testing import check_module, check_nsa_module, nsa_composed, random_inputs, random_nsa_inputs, reference_mask
from attngen.tools.verify import import_generated

from helpers import assert_all_ok, build_and_import, generated, write_spec

DTYPES = runtime.TORCH_DTYPES


def check_property(mod, dtype, max_n, max_examples, pinned):
    """Hypothesis over batch, N (1..max_n), scale, strides and given/pooled k_cmp at one dtype,
    with the `pinned` examples (dicts of those arguments) run first."""

    @settings(max_examples=max_examples)
    @given(
        batch=st.integers(1, 2),
        n=st.integers(1, max_n),
        scale=st.one_of(st.none(), st.floats(0.05, 2.0 / math.sqrt(mod.HEAD_DIM))),
        bnhd=st.booleans(),
        compressed=st.booleans(),
        seed=st.integers(0, 2**16),
    )
    def run(batch, n, scale, bnhd, compressed, seed):
        run_check(mod, batch, n, dtype, scale, bnhd, compressed, seed)

    for ex in pinned:
        run = example(**{"batch": 1, "scale": None, "bnhd": False, "compressed": False, "seed": 0, **ex})(run)
    run()


def run_check(mod, batch, n, dtype, scale, bnhd, compressed, seed):
    ins = random_nsa_inputs(mod, batch=batch, n=n, dtype=DTYPES[dtype], seed=seed, bnhd=bnhd, compressed=compressed)
    assert_all_ok(
        check_nsa_module(mod, *ins, scale=scale, seed=seed),
        f"{mod.NAME} {dtype} B={batch} N={n} scale={scale} bnhd={bnhd} given k_cmp={compressed}",
    )


TINY = generated("nsa_tiny")
# One token; shorter than a compression block (no complete block: o_cmp = 0, lse_cmp = -inf);
# between the block and the selection block; off every grid and past the window.
TINY_PINNED = {
    "fp16": [{"n": 1}, {"n": 61, "compressed": True, "seed": 3}],
    "bf16": [{"n": 7, "bnhd": True, "compressed": True, "seed": 1}],
    "fp32": [{"n": 13, "batch": 2, "scale": 0.3, "seed": 2}],
}


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", TINY.DTYPES)
def test_nsa_tiny_matches_reference(dtype):
    check_property(TINY, dtype, 100, 1, TINY_PINNED[dtype])


MOBA = generated("moba")


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", MOBA.DTYPES)
def test_moba_matches_reference(dtype):
    """Selection per query block, scored by q.k_cmp, no window branch."""
    check_property(MOBA, dtype, 100, 1, [{"n": 15}, {"n": 83, "batch": 2, "bnhd": True, "seed": 1}])


def test_composed_reference_is_the_oracle():
    """The tests' reference (oracle masks + dense reference, given indices) is nsa_reference."""
    mod = TINY
    q, k, v, gates, _, _ = random_nsa_inputs(mod, batch=2, n=45, dtype=torch.float32, seed=5)
    o, aux = nr.nsa_reference(
        q, k, v, gates, block=mod.BLOCK, stride=mod.STRIDE, select_block=mod.SELECT_BLOCK, top_n=mod.TOP_N,
        initial=mod.INITIAL, local=mod.LOCAL, window=mod.WINDOW, score=mod.SCORE, per=mod.PER,
    )
    o2, lse = nsa_composed(mod, q, k, v, gates, None, None, aux["block_indices"])
    torch.testing.assert_close(o2, o, rtol=0, atol=1e-12)
    for name in ("lse_cmp", "lse_slc", "lse_win"):
        torch.testing.assert_close(lse[name], aux[name], rtol=0, atol=1e-12)


@pytest.mark.kernel
def test_check_catches_a_wrong_module():
    """The comparison is not vacuous: a module that drops the window branch fails it."""
    def without_window(q, k, v, gates, **kw):
        return TINY.nsa_attention(q, k, v, gates * torch.tensor([1.0, 1.0, 0.0], dtype=gates.dtype, device=gates.device), **kw)

    wrong = types.SimpleNamespace(**{n: getattr(TINY, n) for n in dir(TINY) if n.isupper()}, nsa_attention=without_window)
    ins = random_nsa_inputs(TINY, batch=1, n=40, dtype=torch.float16, seed=9)
    bad = {r.name for r in check_nsa_module(wrong, *ins) if not r.ok}
    assert {"o", "dgates"} <= bad
    assert_all_ok(check_nsa_module(TINY, *ins))


def group_scores(mod, q, k_cmp):
    """The oracle's scores of each selection block per (position, KV head), [B, Hkv, N, S]."""
    s = nr.importance_scores(q, k_cmp, block=mod.BLOCK, stride=mod.STRIDE, score=mod.SCORE)
    s = nr.map_to_selection_blocks(s, block=mod.BLOCK, stride=mod.STRIDE, select_block=mod.SELECT_BLOCK, n=q.shape[2])
    return nr.group_scores(s, mod.KV_HEADS)


def ranked_scores(mod, s):
    """What the selection ranks, from group scores s: forced blocks +inf, future blocks -inf; per
    "block", the sums over each query block (one row per position)."""
    n, sb, nb = s.shape[2], mod.SELECT_BLOCK, s.shape[-1]
    own = (torch.arange(n, device=s.device) // sb).view(n, 1)
    if mod.PER == "block":
        s = torch.cat([s, s.new_zeros(*s.shape[:2], nb * sb - n, nb)], dim=2)
        s = s.view(*s.shape[:2], nb, sb, nb).sum(dim=3).repeat_interleave(sb, dim=2)[:, :, :n]
    j = torch.arange(nb, device=s.device)
    s = torch.where(((j < mod.INITIAL) | (j > own - mod.LOCAL)) & (j <= own), math.inf, s)
    return torch.where(j > own, -math.inf, s)


@pytest.mark.kernel
@pytest.mark.parametrize("name", ["nsa_tiny", "moba"])
def test_indices_equal_the_reference_selection(name):
    """On rows whose top_n-th and next score are well apart, the module picks the oracle's blocks;
    forced blocks are always there and no index is in the future."""
    mod = generated(name)
    n = 96
    q, k, v, gates, _, _ = random_nsa_inputs(mod, batch=2, n=n, dtype=torch.float16, seed=11)
    q = q * 3  # a spread of logits, so that most rows have no near-tie
    _, aux = mod.nsa_attention(q, k, v, gates, return_aux=True)
    idx = aux["block_indices"]
    # the module's own compressed keys: the selection is checked, not the pooling's rounding
    qd, k_cmp = q.double(), aux["k_cmp"].double()
    s = group_scores(mod, qd, k_cmp)
    ref = nr.select_blocks(s, select_block=mod.SELECT_BLOCK, top_n=mod.TOP_N, initial=mod.INITIAL, local=mod.LOCAL, per=mod.PER)
    assert idx.dtype == torch.int64 and idx.shape == (2, mod.KV_HEADS, n, mod.TOP_N)
    own = (torch.arange(n, device=idx.device) // mod.SELECT_BLOCK).view(1, 1, n, 1)
    assert bool((idx <= own).all()), "a future block was selected"
    for j in range(mod.INITIAL):
        assert bool(((idx == j).any(-1) | (own[..., 0] < j)).all()), "an initial block is missing"
    if mod.LOCAL:
        assert bool((idx == own).any(-1).all()), "the own block is missing"
    top = ranked_scores(mod, s).sort(dim=-1, descending=True).values
    top = torch.cat([top, torch.full_like(top[..., :1], -math.inf)], dim=-1)  # a next score always exists
    kth, nxt = top[..., mod.TOP_N - 1], top[..., mod.TOP_N]
    # a near-tie needs two finite scores; forced (+inf) and ineligible (-inf) blocks never tie
    finite = torch.isfinite(kth) & torch.isfinite(nxt)
    clear = ~finite | (torch.where(finite, kth - nxt, 0.0) > 1e-3 * kth.abs().clamp_min(1e-3))
    assert clear.float().mean() > 0.8, "the inputs should leave most rows without a near-tie"
    assert torch.equal(idx[clear], ref[clear])


@pytest.mark.kernel
def test_rows_without_a_complete_block_give_zero_not_nan():
    """N < block: no compressed key at all; o_cmp = 0, lse_cmp = -inf, gradients finite."""
    mod = TINY
    q, k, v, gates, _, _ = (t if t is None else t.requires_grad_() for t in random_nsa_inputs(mod, batch=1, n=mod.BLOCK - 1, dtype=torch.float16))
    with runtime.poison_outputs():
        o, aux = mod.nsa_attention(q, k, v, gates, return_aux=True)
        assert aux["k_cmp"].shape[2] == 0
        assert torch.equal(aux["o_cmp"], torch.zeros_like(aux["o_cmp"]))
        assert torch.equal(aux["lse_cmp"], torch.full_like(aux["lse_cmp"], -math.inf))
        o.float().sum().backward()
    for t in (q, k, v, gates):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(gates.grad[..., 0], torch.zeros_like(gates.grad[..., 0]))


@pytest.mark.kernel
@pytest.mark.parametrize("branch", ["cmp", "win"])
def test_branch_modules_match_the_dense_reference(branch):
    """The derived modules are ordinary dense modules: their masks against the dense reference."""
    mod = generated(f"nsa_tiny_{branch}")
    n_k = nr.num_compressed(50, TINY.BLOCK, TINY.STRIDE) if branch == "cmp" else 50
    q, k, v = random_inputs(mod, batch=1, n_q=50, n_k=n_k, dtype=torch.float16, seed=4)
    assert_all_ok(check_module(mod, q, k, v), branch)
    # the mask is the oracle's
    mask = {"cmp": nr.compressed_visibility(50, n_k, block=TINY.BLOCK, stride=TINY.STRIDE), "win": nr.window_mask(50, TINY.WINDOW)}[branch]
    fn = reference_mask(mod)
    got = fn(torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1, 1, dtype=torch.long),
             torch.arange(50).view(1, 1, 50, 1), torch.arange(n_k).view(1, 1, 1, n_k))
    assert torch.equal(got.expand(1, 1, 50, n_k)[0, 0], mask)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "gates": a["gates"][..., :2]}, "nsa_tiny: gates has shape (1, 4, 20, 2); expected (1, 4, 20, 3)"),
        (lambda a: {**a, "gates": a["gates"].float()}, "nsa_tiny: gates has dtype torch.float32; expected q's dtype torch.float16"),
        (lambda a: {**a, "gates": None}, "nsa_tiny: gates must be a torch.Tensor, got NoneType"),
        (lambda a: {**a, "k": a["k"][:, :, :10], "v": a["v"][:, :, :10]}, "nsa_tiny: k has 10 keys but q has 20 queries"),
        (lambda a: {**a, "k_cmp": a["q"].new_zeros(1, 2, 4, 16)}, "nsa_tiny: give both k_cmp and v_cmp"),
        # N = 20 has C = 4 complete compression blocks
        (lambda a: {**a, "k_cmp": a["q"].new_zeros(1, 2, 5, 16), "v_cmp": a["q"].new_zeros(1, 2, 4, 16)},
         "nsa_tiny: k_cmp has shape (1, 2, 5, 16); expected (1, 2, 4, 16)"),
        (lambda a: {**a, "k_cmp": a["q"].new_zeros(1, 2, 4, 16), "v_cmp": a["q"].new_zeros(1, 2, 4, 16, dtype=torch.float32)},
         "nsa_tiny: v_cmp has dtype torch.float32; expected q's dtype torch.float16"),
        (lambda a: {**a, "q": a["q"][:, :2]}, "nsa_tiny: q has 2 heads"),
        (lambda a: {**a, "v": a["v"].float()}, "nsa_tiny: q, k, v must share one dtype"),
    ],
)
def test_bad_inputs_raise_valueerror_naming_them(change, message):
    q, k, v, gates, _, _ = random_nsa_inputs(TINY, batch=1, n=20, dtype=torch.float16)
    args = change({"q": q, "k": k, "v": v, "gates": gates})
    with pytest.raises(ValueError) as info:
        TINY.nsa_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("gates"), **args)
    assert message in str(info.value)


def test_module_calls_the_kernel_library():
    """The selection kernels are imported from attngen.kernels, not copied: the module defines no
    Triton function of its own."""
    from triton.runtime.jit import JITFunction

    from attngen.kernels import nsa_selected, nsa_topn

    assert TINY.nsa_topn is nsa_topn and TINY.nsa_selected is nsa_selected
    assert not [n for n, o in vars(TINY).items() if isinstance(o, JITFunction)]


# ----------------------------------------------------------------------------- every group size

G_SPEC = """\
name: {name}
heads: {{q: {q}, kv: 1}}
head_dim: 16
dtypes: [fp16]
sparse:
  kind: nsa
  compress: {{block: 8, stride: 4}}
  select: {{block: 16, top_n: 2, initial: 1, local: 1}}
  window: 16
tiles: {{block_m: 16, block_n: 16, num_warps: 4, num_stages: 1}}
"""


@pytest.mark.kernel
@pytest.mark.parametrize("group", [1, 2, 3, 4, 8, 16, 32])
def test_every_group_size_matches_reference(tmp_path, group):
    """G = Hq / Hkv from 1 to 32, powers of two or not: forward and backward once."""
    mod = build_and_import(tmp_path, nsa_spec(f"nsa_g{group}", q=group))
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == [f"nsa_g{group}.py", f"nsa_g{group}_cmp.py", f"nsa_g{group}_win.py"]
    assert mod.GROUP == group
    # 37: past the window, two selection blocks and a partial one; the interpreter runs heads one by one
    run_check(mod, 1, 37 if group < 16 else 21, "fp16", None, False, group % 2 == 0, group)


# ----------------------------------------------------------------------------- the build


def nsa_spec(name="user_nsa", window=16, q=4):
    """G_SPEC's text for `name` with q query heads, without the window branch when window=0."""
    text = G_SPEC.format(name=name, q=q)
    return text if window else text.replace("  window: 16\n", "")


def write_nsa_spec(dirpath, name="user_nsa", window=16, q=4):
    return write_spec(dirpath, nsa_spec(name, window, q))


def test_nsa_spec_builds_three_files_and_headers_name_the_spec(tmp_path):
    out = tmp_path / "out"
    built = build([write_nsa_spec(tmp_path), write_nsa_spec(tmp_path, "no_win", window=0)], out)
    assert [p.name for p, changed in built if changed] == ["user_nsa.py", "user_nsa_cmp.py", "user_nsa_win.py", "no_win.py", "no_win_cmp.py"]
    cmp_text = (out / "user_nsa_cmp.py").read_text()
    assert "A branch of the NSA spec user_nsa" in cmp_text and "4*kv_idx + 7 <= q_idx" in cmp_text
    assert "MASK = 'kv_idx <= q_idx and kv_idx > q_idx - 16'" in (out / "user_nsa_win.py").read_text()
    assert "A branch of the NSA spec" not in (out / "user_nsa.py").read_text()
    mod = import_generated(out / "no_win.py")
    assert mod.WINDOW == 0 and not hasattr(mod, "_WIN")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p, _ in built), "no temporary files left behind"
    # unchanged on a rebuild
    assert not any(changed for _, changed in build([tmp_path / "user_nsa.yaml"], out))


def test_check_knows_every_nsa_output(tmp_path):
    specs, out = tmp_path / "specs", tmp_path / "out"
    specs.mkdir()
    write_nsa_spec(specs, "one")
    write_nsa_spec(specs, "two")
    build(spec_files(specs), out)
    assert check(specs, out) == [], "no false orphans: every branch file is known"
    (out / "one_cmp.py").write_text((out / "one_cmp.py").read_text() + "# edited\n")
    (out / "two_win.py").unlink()
    (out / "three_cmp.py").write_text("")
    problems = "\n".join(check(specs, out))
    assert "one_cmp.py: stale" in problems and "two_win.py: missing" in problems and "three_cmp.py: no spec" in problems
    assert "one.py" not in problems and "two.py" not in problems
    assert cli(["check", "--spec-dir", str(specs), "--out", str(out)]) == 1


def test_bad_nsa_spec_writes_nothing(tmp_path, capsys):
    good = write_nsa_spec(tmp_path, "good_nsa")
    bad = write_nsa_spec(tmp_path, "bad_nsa")
    bad.write_text(bad.read_text().replace("top_n: 2", "top_n: 1"))
    out = tmp_path / "out"
    assert cli(["build", str(good), str(bad), "--out", str(out)]) == 1
    assert f"{bad}:8: sparse.select: initial + local = 1 + 1 forced blocks exceed top_n 1" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_output_names_colliding_with_another_spec_are_an_error(tmp_path):
    nsa = write_nsa_spec(tmp_path, "attn")
    dense = tmp_path / "dense.yaml"
    dense.write_text("name: attn_cmp\nheads: {q: 4, kv: 1}\nhead_dim: 16\ndtypes: [fp16]\n")
    with pytest.raises(SpecError, match="'attn_cmp' is also the name in|builds attn_cmp.py, which"):
        build([nsa, dense], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shipped_nsa_specs():
    specs = {s.name: s for s in map(load_spec, spec_files("specs")) if s.sparse}
    assert set(specs) == {"nsa_paper", "nsa_tiny", "nsa_g4_weighted", "moba"}
    paper = specs["nsa_paper"]
    sp = paper.sparse
    assert (sp.block, sp.stride, sp.select_block, sp.top_n, sp.initial, sp.local, sp.window) == (32, 16, 64, 16, 1, 2, 512)
    assert (paper.group, paper.head_dim, paper.v_head_dim, sp.method, sp.score, sp.per) == (16, 192, 128, "mlp", "probs", "token")
    assert specs["nsa_g4_weighted"].group == 4 and specs["nsa_g4_weighted"].sparse.method == "weighted"
    moba = specs["moba"].sparse
    assert (moba.per, moba.score, moba.method, moba.window) == ("block", "dot", "mean", 0)
    assert [n for n, _ in render_all(paper)] == ["nsa_paper.py", "nsa_paper_cmp.py", "nsa_paper_win.py"]


@pytest.mark.kernel
def test_verify_checks_nsa_specs(tmp_path, capsys):
    """`attngen verify` has one NSA row per dtype, forward and backward against the oracle."""
    assert cli(["verify", "specs/nsa_tiny.yaml", "--out", str(tmp_path)]) == 0
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("nsa_tiny")]
    assert [(r[0], r[1], r[-1]) for r in rows] == [("nsa_tiny", d, "ok") for d in ("fp16", "bf16", "fp32")]
    assert all(r[6] != "-" for r in rows), "backward is checked"
    # err/tol of forward and backward: a passing row is at most 1 in both
    assert all(0 <= float(r[4]) <= 1 and 0 <= float(r[6]) <= 1 for r in rows), rows


def test_nsa_module_without_its_branch_files_says_so(tmp_path):
    """The main module imports its branches from its own directory; a missing one is named."""
    (tmp_path / "nsa_tiny.py").write_text(Path(TINY.__file__).read_text())
    with pytest.raises(ImportError, match=r"nsa_tiny_cmp.py is missing; it is built with nsa_tiny.py"):
        import_generated(tmp_path / "nsa_tiny.py")
