"""Masks that read an integer tensor inside an inequality (issue 14): a per-head window, a per-batch
key length (padding), both combined with affine atoms through and / or / not, abs, min / max.

Each is built into a module, imported, and its forward and backward are compared with the float64
reference, including batches whose rows see no key at all (lens[b] = 0). The tile bounds of such a
mask come from its other atoms only (the tensor read bounds nothing at build time); the brute-force
soundness of those bounds is checked in test_classify.py.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from attngen.planning.classify import classify_tiles
from attngen.tools.cli import main as cli
from mirror import rule_for as expr_rule
from attngen.runtime import DEVICE
from attngen.testing import check_module, random_inputs

from helpers import assert_all_ok, build_and_import, dense_spec, write_spec

WIN = "  win: {tensor: int32, dims: 1}"
LENS = "  lens: {tensor: int64, dims: 1}"
# (mask, declarations): the masks of the issue, then tensor reads inside abs, min / max and not
MASKS = [
    ("abs(q_idx - kv_idx) <= win[h]", WIN),
    ("q_idx - kv_idx <= win[h] and kv_idx <= q_idx", WIN),
    ("abs(q_idx - kv_idx) <= 4 and kv_idx < win[h]", WIN),
    ("kv_idx < win[b]", WIN),
    ("kv_idx < lens[b] and q_idx >= kv_idx", LENS),
    ("q_idx - kv_idx <= win[h] or kv_idx == 0", WIN),
    ("kv_idx < min(lens[b], q_idx + 1) and abs(kv_idx - q_idx) < max(win[h], 2)", f"{WIN}\n{LENS}"),
    ("not (kv_idx >= lens[b] or abs(q_idx - kv_idx) > win[h] + 1)", f"{WIN}\n{LENS}"),
]

_NAMES = (f"tensor_mask_{i}" for i in itertools.count())


def _spec(name, mask, decls):
    return dense_spec(name, q=4, kv=2, d=16, dtypes="[fp32]", mask=f'"{mask}"', extra=f"params:\n{decls}\n")


def _build(tmp_path, mask, decls):
    return build_and_import(tmp_path, _spec(next(_NAMES), mask, decls))


def _params(decls, batch, heads, n_k):
    out = {}
    if "win" in decls:
        # one window per head and per batch entry (the masks index it by h or by b)
        out["win"] = torch.tensor([0, 3, 17, -1][: max(batch, heads)], dtype=torch.int32, device=DEVICE)
    if "lens" in decls:
        out["lens"] = torch.tensor([n_k, 0, 5][:batch], dtype=torch.int64, device=DEVICE)  # lens 0: no key seen
    return out


@pytest.mark.kernel
@pytest.mark.parametrize("mask, decls", MASKS, ids=[m for m, _ in MASKS])
def test_tensor_inequality_masks_build_and_match_the_reference(tmp_path, mask, decls):
    mod = _build(tmp_path, mask, decls)
    assert "not bounded:" in mod.__doc__  # the tensor read is named as what bounds nothing
    batch, n_q, n_k = 3, 37, 29
    q, k, v = random_inputs(mod, batch=batch, n_q=n_q, n_k=n_k, dtype=torch.float32, seed=1)
    params = _params(decls, batch, mod.Q_HEADS, n_k)
    assert_all_ok(check_module(mod, q, k, v, params=params, seed=1), f"{mask} {params}")


@pytest.mark.kernel
def test_rows_that_see_no_key_give_zero_and_minus_infinity(tmp_path):
    """Key padding with lens[b] = 0: every row of that batch sees nothing: o = 0, lse = -inf, and
    the gradients of its inputs are 0 (not NaN)."""
    mod = _build(tmp_path, "kv_idx < lens[b] and q_idx >= kv_idx", LENS)
    q, k, v = (t.requires_grad_() for t in random_inputs(mod, batch=2, n_q=20, n_k=20, dtype=torch.float32, seed=3))
    lens = torch.tensor([7, 0], dtype=torch.int64, device=DEVICE)
    o, lse = mod.attention(q, k, v, lens=lens, return_lse=True)
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    assert torch.equal(lse[1], torch.full_like(lse[1], -torch.inf))
    assert bool(torch.isfinite(lse[0]).all())
    o.sum().backward()
    for t in (q, k, v):
        assert torch.equal(t.grad[1], torch.zeros_like(t.grad[1]))
        assert bool(torch.isfinite(t.grad).all())
    # batch 0 sees keys < 7 only: keys 7.. get no gradient
    assert torch.equal(k.grad[0, :, 7:], torch.zeros_like(k.grad[0, :, 7:]))


def test_the_other_atoms_still_bound_the_tiles():
    """`kv_idx < lens[b] and q_idx >= kv_idx`: the causal atom bounds the tiles as for causal alone,
    and no tile runs unmasked (the tensor read decides each pair at run time)."""
    decls = (("lens", {"tensor": "int64", "dims": 1}),)
    rule = expr_rule("kv_idx < lens[b] and q_idx >= kv_idx", decls)
    assert rule.path.startswith("closed-form visited range") and "lens[b]" in rule.path
    n = 64
    classes = classify_tiles(rule, n, n, 16, 16)
    causal = classify_tiles(expr_rule("q_idx >= kv_idx"), n, n, 16, 16)
    for kernel in ("fwd", "dkdv"):
        assert classes.counts(kernel)["visited"] == causal.counts(kernel)["visited"] < classes.counts(kernel)["total"]
        assert classes.counts(kernel)["full"] == 0
    # a disjunction: the tensor side visits everything, the other side's full tiles stay full
    rule = expr_rule("q_idx - kv_idx <= win[h] or kv_idx == 0", (("win", {"tensor": "int32", "dims": 1}),))
    classes = classify_tiles(rule, n, n, 16, 16)
    assert classes.counts("fwd")["visited"] == classes.counts("fwd")["total"]


def _spec_file(tmp_path, mask, decls, name="tmask"):
    return write_spec(tmp_path, _spec(name, mask, decls))


def test_show_takes_tensor_parameters_as_json(tmp_path, capsys):
    """`attngen show` on a tensor-reading mask: the pair grid is the mask at batch 0, head 0."""
    spec = _spec_file(tmp_path, "abs(q_idx - kv_idx) <= win[h] and kv_idx < lens[b]", f"{WIN}\n{LENS}")
    rc = cli(["show", str(spec), "--n", "20", "--block-m", "16", "--block-n", "16", "--param", "win=[2,9]",
              "--param", "lens=[13]"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "with win=[2,9], lens=[13]" in out.out and "not bounded:" in out.out
    rows = re.findall(r"^ *(\d+) \|(.*)\|$", out.out, re.M)
    assert len(rows) == 20
    for q, cells in rows:
        q = int(q)
        assert [c in "#+" for c in cells] == [abs(q - k) <= 2 and k < 13 for k in range(20)], q
        assert "#" not in cells and " " not in cells  # every tile visited, with the mask applied


@pytest.mark.parametrize("args, message", [
    ([], "missing --param win=[...] (int32 tensor, 1 dim, as a JSON list)"),
    (["--param", "win=3"], "--param win: expected [...] (int32 tensor, 1 dim, as a JSON list), got '3'"),
    (["--param", "win=[1.5]"], "--param win: expected [...]"),
    (["--param", "win=[[1]]"], "--param win: expected [...]"),
    (["--param", "win=[]"], "--param win: expected [...]"),
    (["--param", "win=[1,"], "--param win: expected [...]"),
    (["--param", "win=[4294967296]"], "--param win: elements must fit in 32 bits"),
])
def test_show_names_bad_tensor_parameters(tmp_path, capsys, args, message):
    spec = _spec_file(tmp_path, "abs(q_idx - kv_idx) <= win[h]", WIN)
    rc = cli(["show", str(spec), *args])
    out = capsys.readouterr()
    assert rc == 2 and message in out.err and not out.out and "Traceback" not in out.err


def test_undeclared_tensor_is_a_located_build_error(tmp_path, capsys):
    spec = write_spec(tmp_path, _spec("undeclared", "kv_idx < lens[b] and q_idx >= kv_idx", WIN))
    rc = cli(["build", str(spec), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and f"{spec}:5: mask: unknown name 'lens'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target, key, line", [
    ("attngen.planning.masks.classify", "mask", 5),  # the tile classification of the mask (as masks calls it)
    ("attngen.planning.plan.score_mod_plan", "score_mod", 7),
    ("attngen.planning.plan.autotune_spaces", "tiles", 6),
])
def test_internal_errors_are_located_at_the_spec_key(tmp_path, capsys, monkeypatch, target, key, line):
    """A bug inside the generator (simulated: the step raises) is reported at the line of the key
    being planned, with a bug-report hint, never as a traceback; nothing is written."""
    text = dense_spec("buggy", q=4, kv=2, d=16, dtypes="[fp32]", mask='"kv_idx < win[h]"',
                      extra=f"score_mod: score * 0.5\nparams:\n{WIN}\n")
    spec = write_spec(tmp_path, text)

    def broken(*args, **kwargs):
        raise KeyError("win")

    monkeypatch.setattr(target, broken)
    rc = cli(["build", str(spec), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert f"{spec}:{line}: {key}: internal error while generating buggy.py (KeyError: 'win'); this is a bug in attngen" in err
    assert "please report it" in err and not (tmp_path / "out").exists()
