"""benchmarks/goals.py reads gpu_check's CSVs into the goal table: ratios and verdicts."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _goals():
    spec = importlib.util.spec_from_file_location("attngen_goals", ROOT / "benchmarks" / "goals.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(path: Path, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)


def _t(impl, pass_, n, *, tflops="", ms="", status="ok", section="timing"):
    return {"section": section, "impl": impl, "pass": pass_, "n": n, "tflops": tflops, "median_ms": ms,
            "status": status, "dtype": "bf16"}


def test_goal_table_from_gpu_check_output(tmp_path, capsys):
    g = _goals()
    _write(tmp_path / "bench_llama3_gqa" / "bench.csv", [
        _t("attngen", "fwd", 8192, tflops=300.0), _t("attngen", "fwd", 8192, tflops=310.0),  # best of two
        _t("sdpa_flash", "fwd", 8192, tflops=310.0), _t("flex", "fwd", 8192, tflops=260.0),
        _t("attngen", "bwd", 8192, tflops=200.0), _t("sdpa_flash", "bwd", 8192, tflops=250.0),
        _t("flex", "fwd", 8192, tflops=999.0, status="error"),  # failed rows do not count
        _t("attngen", "fwd", 1024, tflops=100.0),  # no baseline at this length
    ])
    _write(tmp_path / "bench_sliding_window" / "bench.csv", [
        _t("attngen", "fwd", 16384, ms=2.0), _t("attngen_causal", "fwd", 16384, ms=8.0),
        _t("sdpa_flash_causal", "fwd", 16384, ms=6.0),
    ])
    _write(tmp_path / "nsa_model" / "nsa.csv", [
        {"section": "model", "n": 8192, "impl": "", "pass": "", "median_ms": ""},
        {"section": "timing", "n": 4096, "impl": "nsa", "pass": "fwd", "median_ms": 3.0},
        {"section": "timing", "n": 4096, "impl": "sdpa_flash", "pass": "fwd", "median_ms": 1.0},
        {"section": "timing", "n": 8192, "impl": "nsa", "pass": "fwd", "median_ms": 2.0},
        {"section": "timing", "n": 8192, "impl": "sdpa_flash", "pass": "fwd", "median_ms": 3.0},
    ])
    cache = tmp_path / "autotune-cache" / "autotune.json"
    cache.parent.mkdir()
    cache.write_text(json.dumps({"version": 1, "entries": {"llama3_gqa._fwd_kernel@x|H200|3.6.0|torch.bfloat16|N=8192":
                                                             {"BLOCK_M": 128, "BLOCK_N": 64}}}))
    assert g.main([str(tmp_path), "--csv", str(tmp_path / "goals.csv")]) == 0
    printed = capsys.readouterr().out
    with open(tmp_path / "goals.csv", newline="") as f:
        rows = {(r["table"], r["n"], r["pass"], r["other"]): r for r in csv.DictReader(f)}

    def ratio(key):
        return float(rows[key]["ratio"])

    assert math.isclose(ratio(("llama3_gqa", "8192", "fwd", "sdpa_flash")), 1.0)
    assert rows[("llama3_gqa", "8192", "fwd", "sdpa_flash")]["verdict"] == "met"  # 1.0 >= 1.0
    assert math.isclose(ratio(("llama3_gqa", "8192", "fwd", "flex")), 310 / 260)
    assert rows[("llama3_gqa", "8192", "fwd", "flex")]["verdict"] == "MISSED"  # 1.19 < 1.2
    assert math.isclose(ratio(("llama3_gqa", "8192", "bwd", "sdpa_flash")), 0.8)
    assert rows[("llama3_gqa", "8192", "bwd", "sdpa_flash")]["verdict"] == "MISSED"
    assert rows[("llama3_gqa", "1024", "fwd", "sdpa_flash")]["verdict"] == "not measured"
    assert math.isclose(ratio(("sliding_window", "16384", "fwd", "attngen_causal")), 4.0)
    assert math.isclose(ratio(("sliding_window", "16384", "fwd", "sdpa_flash_causal")), 3.0)
    # NSA's goal applies from 8k: slower at 4k carries no verdict, faster at 8k is met
    assert rows[("nsa_paper", "4096", "fwd", "sdpa_flash")]["verdict"] == ""
    assert math.isclose(ratio(("nsa_paper", "8192", "fwd", "sdpa_flash")), 1.5)
    assert rows[("nsa_paper", "8192", "fwd", "sdpa_flash")]["verdict"] == "met"
    assert "llama3_gqa._fwd_kernel@x|H200" in printed and '"BLOCK_M": 128' in printed


def test_missing_steps_are_said_not_invented(tmp_path, capsys):
    assert _goals().main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("(no rows: the step did not run or measured nothing)") == 3
    assert "(none recorded)" in printed
