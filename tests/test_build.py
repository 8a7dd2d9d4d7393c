"""The generator: deterministic, atomic, nothing written for a bad spec, and generated/ fresh."""

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attngen import __version__
from attngen.codegen.build import build, check, render, spec_files
from attngen.tools.cli import main as cli
from attngen.language.spec import load_spec
from attngen.testing import check_module, random_inputs

from helpers import ROOT, SPEC_PATHS, assert_all_ok, build_and_import, dense_spec, write_spec


def test_generated_is_fresh():
    """generated/ equals a fresh build of specs/ (regenerate with `attngen build`)."""
    assert SPEC_PATHS, "no specs shipped"
    assert check(ROOT / "specs", ROOT / "generated") == []


def test_check_cli_passes_on_a_fresh_build(tmp_path):
    # the CLI over a small tree (test_generated_is_fresh checks the checkout's own through check())
    (tmp_path / "specs").mkdir()
    write_spec(tmp_path / "specs", dense_spec())
    build(spec_files(tmp_path / "specs"), tmp_path / "gen")
    assert cli(["check", "--spec-dir", str(tmp_path / "specs"), "--out", str(tmp_path / "gen")]) == 0
    (tmp_path / "gen" / "user_attn.py").write_text("# stale\n")
    assert cli(["check", "--spec-dir", str(tmp_path / "specs"), "--out", str(tmp_path / "gen")]) == 1


def test_build_is_deterministic_and_writes_only_when_changed(tmp_path):
    spec = write_spec(tmp_path, dense_spec())
    out = tmp_path / "out"
    [(path, changed)] = build([spec], out)
    assert changed and path == out / "user_attn.py"
    first = path.read_bytes()
    mtime = path.stat().st_mtime_ns
    [(_, changed)] = build([spec], out)
    assert not changed and path.read_bytes() == first and path.stat().st_mtime_ns == mtime
    assert render(load_spec(spec)) == first.decode()
    assert [p.name for p in out.iterdir()] == ["user_attn.py"], "no temporary files left behind"


def test_header_names_spec_hash_version_and_command(tmp_path):
    spec = write_spec(tmp_path, dense_spec())
    text = render(load_spec(spec))
    s = load_spec(spec)
    assert f"attngen {__version__}" in text.splitlines()[0]
    assert f"# spec-sha256: {s.sha256}" in text
    assert "# regenerate: attngen build " in text


def test_bad_spec_writes_nothing_and_exits_nonzero(tmp_path, capsys):
    good = write_spec(tmp_path, dense_spec("good_one"))
    bad = write_spec(tmp_path, dense_spec("bad_one", kv=3))
    out = tmp_path / "out"
    assert cli(["build", str(good), str(bad), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2: heads.kv: 3 does not divide heads.q = 4" in err
    assert not out.exists() or not any(out.iterdir())


def test_duplicate_names_are_rejected(tmp_path):
    a = write_spec(tmp_path, dense_spec("same"))
    b = tmp_path / "other.yaml"
    b.write_text(a.read_text())
    assert cli(["build", str(a), str(b), "--out", str(tmp_path / "out")]) == 1


def test_check_reports_stale_missing_and_orphan(tmp_path):
    specs, out = tmp_path / "specs", tmp_path / "out"
    specs.mkdir()
    write_spec(specs, dense_spec("one"))
    write_spec(specs, dense_spec("two"))
    build(spec_files(specs), out)
    assert check(specs, out) == []
    (out / "one.py").write_text((out / "one.py").read_text() + "# edited\n")
    (out / "two.py").unlink()
    (out / "three.py").write_text("")
    problems = "\n".join(check(specs, out))
    assert "one.py: stale" in problems and "two.py: missing" in problems and "three.py: no spec" in problems
    assert cli(["check", "--spec-dir", str(specs), "--out", str(out)]) == 1


def test_module_entry_point_builds(tmp_path):
    spec = write_spec(tmp_path, dense_spec())
    env = dict(os.environ)
    run = lambda *a: subprocess.run([sys.executable, "-m", "attngen.tools.cli", *a], capture_output=True, text=True, cwd=tmp_path, env=env)  # noqa: E731
    r = run("build", str(spec), "--out", "gen")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "gen" / "user_attn.py").exists()


@pytest.mark.kernel
@settings(max_examples=6)
@given(
    kv=st.sampled_from([1, 2, 3]),
    group=st.sampled_from([1, 2, 3, 4, 5, 8]),
    d=st.sampled_from([16, 24, 40, 64]),
    mask=st.sampled_from(["none", "causal"]),
    n_q=st.integers(1, 40),
    n_k=st.integers(1, 40),
)
def test_a_new_spec_builds_imports_and_matches_reference(tmp_path_factory, kv, group, d, mask, n_q, n_k):
    """The user's path: write a YAML with some head grouping and head_dim, build, import, check."""
    tmp = tmp_path_factory.mktemp("user")
    mod = build_and_import(tmp, dense_spec(q=kv * group, kv=kv, d=d, mask=mask, extra=f"v_head_dim: {d + 8}\n"))
    import torch

    q, k, v = random_inputs(mod, batch=1, n_q=n_q, n_k=n_k, dtype=torch.float16, seed=n_q)
    assert_all_ok(check_module(mod, q, k, v), f"q={kv * group} kv={kv} d={d} {mask} {n_q}x{n_k}")


def test_shipped_specs_cover_the_groupings():
    specs = [load_spec(p) for p in SPEC_PATHS]
    groupings = {s.grouping for s in specs}
    assert groupings == {"MHA", "MQA", "GQA"}
    assert any(s.head_dim & (s.head_dim - 1) for s in specs), "a head_dim that is not a power of two"
    llama = next(s for s in specs if s.name == "llama3_gqa")
    assert (llama.q_heads, llama.kv_heads, llama.head_dim, llama.mask) == (32, 8, 128, "causal")
    assert set(llama.dtypes) == {"bf16", "fp16"}


def test_cli_build_with_no_specs_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    assert cli(["build", "--spec-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2


@pytest.mark.kernel
@pytest.mark.parametrize(
    "mask, params, values",
    [
        # affine, one conjunction, reading the head, the batch index and a length: closed-form bounds
        ("kv_idx >= q_idx - w - h and kv_idx <= q_idx + 3 and kv_idx < kv_len - b", "{w: int}", {"w": 5}),
        # floor division of a length or a float parameter: bounds from the first disjunct only
        ("q_idx < q_len // 2 or kv_idx * t < 20.5", "{t: float}", {"t": 1.5}),
    ],
)
def test_expression_mask_spec_builds_and_matches_reference(tmp_path, mask, params, values):
    """Index symbols b, h, q_len, kv_len and int/float parameters reach the kernels' bounds and
    predicates (forward, dQ and dK/dV) under the names the plan gives them."""
    import torch

    mod = build_and_import(tmp_path, dense_spec("expr_attn", mask=f'"{mask}"', extra=f"params: {params}\n"))
    doc = mod.__doc__
    assert ("one conjunction" in doc) == ("w" in values) and ("disjunction of 2" in doc) != ("w" in values)
    for n_q, n_k, seed in ((40, 37, 0), (19, 45, 1)):
        q, k, v = random_inputs(mod, batch=2, n_q=n_q, n_k=n_k, dtype=torch.float16, seed=seed)
        assert_all_ok(check_module(mod, q, k, v, params=values, seed=seed), f"{mask} {n_q}x{n_k}")
