"""`attngen report`: kernels compiled ahead of time for a GPU this machine need not have.

The tests compile into a fresh Triton cache, so the timings and ptxas logs are those of a cold run,
and nothing is written to the user's cache.
"""

from __future__ import annotations

import json

import pytest

from attngen.tools import report as report
from attngen.codegen.build import build, derived_specs, output_names, spec_files
from attngen.tools.cli import main as cli_main
from attngen.language.spec import load_spec

from helpers import ROOT, build_spec, dense_spec, write_spec

SHIPPED = spec_files(ROOT / "specs")

@pytest.fixture(scope="module")
def triton_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("triton-cache")))
        yield


# The shipped NSA spec whose modules are also compiled at fp32 (the other dtypes' code paths differ
# from fp16 / bf16 in a few places only: tf32 dots, the block selection's halved row tiles).
FP32_SPEC = ROOT / "specs" / "nsa_tiny.yaml"


def kernel_names(spec) -> tuple[str, ...]:
    """The kernels a module built from `spec` launches (forward and backward)."""
    if spec.sparse is not None:
        topn = "nsa_topn.token_kernel" if spec.sparse.per == "token" else "nsa_topn.block_kernel"
        return (topn, "nsa_selected.fwd_kernel", "nsa_selected.bwd_dq_kernel", "nsa_selected.bwd_dkdv_kernel",
                "nsa_decode.cmp_decode_kernel")
    # each dense kernel but the row-local preprocess also compiles as its packed-sequence
    # (attention_varlen) instantiation, reported as KERNEL[varlen]
    return ("_fwd_kernel", "_bwd_preprocess", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_fwd_kernel[varlen]",
            "_bwd_dkdv_kernel[varlen]", "_bwd_dq_kernel[varlen]", "_decode_kernel")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, triton_cache):
    """The report of every module of every shipped spec at sm_90 through the CLI: the first config of
    each space at the module's first dtype; plus FP32_SPEC's modules at fp32. (Every dtype of every
    module would take minutes; the dtypes share the kernels' code, which compiles or not as a whole.)"""
    tmp = tmp_path_factory.mktemp("shipped")
    rows_file = tmp / "rows.json"
    args = ["report", *map(str, SHIPPED), "--arch", "sm_90", "--configs", "first", "--dtypes", "first"]
    rc = cli_main([*args, "--out", str(tmp / "gen"), "--json", str(rows_file), "--jobs", "2"])
    fp32 = [path for path, _ in build([FP32_SPEC], tmp / "gen")]
    extra = report.run_report(fp32, ["sm_90"], configs="first", dtypes=["fp32"], jobs=2)
    return rc, json.loads(rows_file.read_text()), [r.to_json() for r in extra]


def causal_spec(name: str, *, head_dim: int, tiles: dict, backward: bool) -> str:
    """A causal fp16 spec with 4 query heads over 2 KV heads."""
    return dense_spec(name, d=head_dim, tiles=tiles, extra=f"backward: {'true' if backward else 'false'}\n")


@pytest.mark.aot
def test_shipped_specs_compile_for_sm90(shipped):
    _, cli_rows, fp32_rows = shipped
    rows = cli_rows + fp32_rows
    # an NSA spec builds its own module (block selection, selected attention) and dense branch modules
    modules = [m for spec in map(load_spec, SHIPPED) for m in (spec, *derived_specs(spec))]
    assert "fp32" in load_spec(FP32_SPEC).dtypes
    fp32 = set(output_names(load_spec(FP32_SPEC)))
    expected = {
        (m.name, k, d)
        for m in modules
        for k in kernel_names(m)
        for d in {m.dtypes[0], *(["fp32"] if m.name in fp32 else [])}
    }
    assert {(r["spec"], r["kernel"], r["dtype"]) for r in rows} == expected
    assert len(rows) == len(expected)  # one config each
    assert all(r["arch"] == 90 for r in rows)
    compiled = [r for r in rows if r["error"] is None]
    for r in compiled:
        assert r["regs"] > 0, r
        assert r["smem"] > 0, r
        problems = [p for p, bad in (("spills", r["spills"] > 0), ("smem overflow", r["smem"] > 232448)) if bad]
        assert r["verdict"] == (", ".join(problems) or "ok"), r
        assert r["usable"] == (not problems), r
    # fp16/bf16 matmuls run on tensor cores (NSA's too); the preprocess kernel has no tl.dot
    for r in compiled:
        if r["kernel"] != "_bwd_preprocess" and r["dtype"] != "fp32":
            assert r["tensor_cores"] in ("wgmma", "mma"), r
        if r["kernel"] == "_bwd_preprocess":
            assert r["tensor_cores"] == "none", r
    failed = [r for r in rows if r["error"] is not None]
    assert not failed, [f"{r['spec']} {r['kernel']}: {r['error'].splitlines()[0]}" for r in failed]


@pytest.mark.aot
def test_shipped_exit_code_matches_rows(shipped):
    rc, rows, _ = shipped
    groups: dict[tuple, bool] = {}
    for r in rows:
        key = (r["spec"], r["kernel"], r["dtype"])
        groups[key] = groups.get(key, False) or r["usable"]
    assert rc == (0 if all(groups.values()) else 1)


@pytest.mark.aot
def test_fp16_forward_with_64_row_tiles_uses_wgmma_at_sm90(tmp_path, triton_cache):
    [(module, _)] = build_spec(tmp_path, causal_spec(
        "tc64", head_dim=64, backward=False, tiles={"block_m": [64], "block_n": [64], "num_warps": [4], "num_stages": [2]},
    ))
    rows = report.run_report([module], ["sm_90"], jobs=1)
    # forward only: the forward (a masked spec's: with its one-program-per-tile and its persistent
    # grid), its packed-sequence instantiation (attention_varlen, which ignores the grid choice: once),
    # decoding
    assert sorted(r.kernel for r in rows) == ["_decode_kernel", "_fwd_kernel", "_fwd_kernel", "_fwd_kernel[varlen]"]
    fwd = [r for r in rows if r.kernel == "_fwd_kernel"]
    assert [(r.dtype, r.config) for r in fwd] == [
        ("fp16", {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2, "persistent": p}) for p in (False, True)
    ]
    assert [r.label.endswith(" persistent") for r in fwd] == [False, True]
    for row in fwd:
        assert row.compile_s > 0
        assert row.error is None, row.error
        assert row.tensor_cores == "wgmma"
        assert row.regs > 0 and row.smem > 0 and row.usable


@pytest.mark.aot
def test_oversized_config_is_flagged_and_fails_the_command(tmp_path, triton_cache, capsys):
    # head_dim 256 with 64 x 128 tiles and 4 stages: over half a megabyte of shared memory. (Tiles of
    # 256 x 256 would show it too, but keep LLVM busy for over 15 minutes.)
    spec = write_spec(tmp_path, causal_spec(
        "huge", head_dim=256, backward=False, tiles={"block_m": [64], "block_n": [128], "num_warps": [8], "num_stages": [4]},
    ))
    rows_file = tmp_path / "rows.json"
    argv = ["report", str(spec), "--arch", "sm_90", "--out", str(tmp_path / "gen"), "--json", str(rows_file), "--jobs", "1"]
    rc = cli_main(argv)
    fwd = [r for r in json.loads(rows_file.read_text()) if r["kernel"] == "_fwd_kernel"]
    assert [r["config"]["persistent"] for r in fwd] == [False, True]  # a masked spec's two grids
    for row in fwd:
        assert row["error"] is None, row["error"]
        assert row["smem"] > report.SMEM_LIMIT[90], row
        assert not row["usable"] and "smem overflow" in row["verdict"]
    assert rc == 1
    out, err = capsys.readouterr()
    assert "smem overflow" in out
    assert "huge _fwd_kernel fp16 sm_90: no usable config" in err


@pytest.mark.aot
def test_usable_configs_keeps_only_the_config_that_does_not_spill(tmp_path, triton_cache):
    # dK/dV with 32 x 128 tiles on 4 warps holds a [128, 128] dK and dV accumulator plus K and V
    # per program: thousands of bytes of spills; 32 x 32 tiles fit in registers.
    spec = write_spec(tmp_path, causal_spec(
        "mixed", head_dim=128, backward=True, tiles={"block_m": [32], "block_n": [32, 128], "num_warps": [4], "num_stages": [2]},
    ))
    usable = report.usable_configs(spec, "_bwd_dkdv_kernel", "fp16", "sm_90", jobs=2)
    assert usable == [{"block_m": 32, "block_n": 32, "num_warps": 4, "num_stages": 2}]


@pytest.mark.aot
def test_a_cached_kernel_reports_the_spills_of_its_own_compile(tmp_path, monkeypatch):
    # A kernel already in Triton's cache prints no ptxas log; without the note the report keeps beside
    # it, the report compiles it again into an empty cache and reads Triton's own log (a hand-run
    # ptxas -v, missing Triton's ptxas options, once reported fewer spills than the kernel has).
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    [(module, _)] = build_spec(tmp_path, causal_spec(
        "spilly", head_dim=128, backward=True, tiles={"block_m": [32], "block_n": [128], "num_warps": [4], "num_stages": [2]},
    ))

    def dkdv():
        [row] = [r for r in report.run_report([module], ["sm_90"], jobs=1) if r.kernel == "_bwd_dkdv_kernel"]
        assert row.error is None, row.error
        return row.regs, row.spill_stores, row.spill_loads

    fresh = dkdv()
    assert fresh[1] > 0  # this config spills (see the test above)
    notes = list((tmp_path / "cache").rglob("attngen-ptxas.json"))
    assert notes
    for note in notes:
        note.unlink()
    assert dkdv() == fresh


def test_unknown_dtype_is_refused(capsys):
    assert cli_main(["report", str(SHIPPED[0]), "--dtypes", "fp16,fp8"]) == 2
    assert "--dtypes 'fp16,fp8'" in capsys.readouterr().err


def test_parse_arch():
    assert report.parse_arch("sm_90") == report.parse_arch("90") == report.parse_arch("sm_90a") == 90
    with pytest.raises(ValueError, match="sm_80"):
        report.parse_arch("sm_75")


@pytest.mark.aot
def test_a_call_past_the_time_limit_becomes_an_error_row():
    # a tenth of a second is less than a worker needs to import torch and Triton: the description
    # times out, its worker is killed, and the report still returns
    [row] = report.run_report([ROOT / "generated" / "mqa.py"], ["sm_80"], jobs=1, timeout=0.1)
    assert row.error.startswith("RuntimeError: ran past the 0.1 s time limit")
    assert not row.usable and report.unusable([row]) == [("mqa", "*", "*", 80)]
