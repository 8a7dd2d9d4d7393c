"""`attngen show`: the text and PNG views of a spec's mask and tile classes."""

import importlib.util
import re

import pytest

from attngen.tools.cli import main as cli
from attngen.language.spec import load_spec

from helpers import ROOT
from test_classify import brute_tiles, _visible

SPECS = ROOT / "specs"


def _show(capsys, *args):
    rc = cli(["show", *args, "--spec-dir", str(SPECS)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _fractions(text):
    got = {}
    for label in ("forward and dQ", "dK/dV"):
        m = re.search(rf"^{re.escape(label)}: tiles visited (\d+) \([\d.]+%\) of (\d+): full (\d+) \([\d.]+%\), partial (\d+)", text, re.M)
        assert m, text
        got[label] = dict(zip(("visited", "total", "full", "partial"), map(int, m.groups())))
    return got


@pytest.mark.parametrize("spec, params, n_q, n_k, bm, bn", [
    ("chunked_local", {"c": 24}, 40, 36, 16, 16),
    ("prefix_lm", {"p": 20}, 64, 50, 16, 32),
    ("natten_2d", {"width": 8, "r": 1}, 64, 64, 16, 16),
    ("llama3_gqa", {}, 50, 61, 32, 32),
])
def test_text_view_matches_brute_force(capsys, spec, params, n_q, n_k, bm, bn):
    args = [spec, "--n", str(n_q), "--n-k", str(n_k), "--block-m", str(bm), "--block-n", str(bn)]
    rc, out, err = _show(capsys, *args, *(f"--param={k}={v}" for k, v in params.items()))
    assert rc == 0, err
    vis = _visible(load_spec(SPECS / f"{spec}.yaml").mask, params, params, n_q, n_k, 0)
    any_vis, all_vis = brute_tiles(vis, bm, bn)
    fr = _fractions(out)
    for label in fr:
        assert fr[label]["total"] == any_vis.numel()
        assert fr[label]["visited"] == fr[label]["full"] + fr[label]["partial"]
        assert fr[label]["visited"] >= int(any_vis.sum()) and fr[label]["full"] <= int(all_vis.sum())
    # the pair grid: one row per query, '#'/'+' exactly where the mask is true, nothing visible skipped
    rows = re.findall(r"^ *(\d+) \|(.*)\|$", out, re.M)
    assert [int(r) for r, _ in rows] == list(range(n_q))
    for q, cells in rows:
        assert len(cells) == n_k and "!" not in cells and "X" not in cells
        assert [c in "#+" for c in cells] == vis[int(q)].tolist()
    assert f"visible pairs: {int(vis.sum())} of {n_q * n_k}" in out
    assert "forward and dQ" in out and "dK/dV" in out


def test_tight_masks_visit_exactly_the_needed_tiles(capsys):
    rc, out, _ = _show(capsys, "sliding_window", "--param", "w=9", "--n", "64", "--block-m", "16", "--block-n", "16")
    assert rc == 0
    any_vis, all_vis = brute_tiles(_visible("sliding_window(w)", {"w": 9}, {"w": 9}, 64, 64, 0), 16, 16)
    for counts in _fractions(out).values():
        assert counts["visited"] == int(any_vis.sum())


def test_png(capsys, tmp_path):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib (the `bench` extra) is not installed")
    png = tmp_path / "mask.png"
    rc, out, err = _show(capsys, "global_window", "--param", "g=2", "--param", "w=5", "--n", "96", "--out", str(png))
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert "pairs not printed above N = 64" in out and f"wrote {png}" in out


@pytest.mark.parametrize("args, message", [
    (["chunked_local"], "missing --param c=VALUE (int)"),
    (["chunked_local", "--param", "c=x"], "--param c: 'x' is not an int"),
    (["chunked_local", "--param", "k=3", "--param", "c=2"], "no parameter 'k' (declared: c)"),
    (["chunked_local", "--param", "c"], "expected name=value"),
    (["chunked_local", "--param", "c=2", "--block-m", "24"], "--block-m must be a power of two"),
    (["chunked_local", "--param", "c=2", "--n", "0"], "--n must be in [1, 4096]"),
    (["no_such_spec"], "no spec 'no_such_spec'"),
])
def test_bad_arguments_are_named(capsys, args, message):
    rc, out, err = _show(capsys, *args)
    assert rc == 2 and message in err and not out
