"""The benchmark harness runs on the CPU and its tile arithmetic is right; the GPU script parses."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench.py"
GPU_CHECK = ROOT / "scripts" / "gpu_check.sh"

REQUIRED_COLUMNS = {
    "section", "spec", "impl", "pass", "mask", "q_heads", "kv_heads", "head_dim", "v_head_dim", "dtype",
    "batch", "n", "config", "block_m", "block_n", "tiles_full", "tiles_partial", "tiles_visited", "tiles_min",
    "tiles_total", "unmasked_pairs", "flops", "median_ms", "tflops", "peak_mem_mib", "first_call_s", "seconds",
    "status", "note", "device", "torch", "triton", "date", "command", "flop_rule",
}


def _bench_module():
    spec = importlib.util.spec_from_file_location("attngen_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_on_cpu(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the CPU report even on a GPU machine
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--device", "cpu", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(tmp_path / "bench.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert REQUIRED_COLUMNS <= set(reader.fieldnames)
        rows = list(reader)

    tiles = [r for r in rows if r["section"] == "tiles"]
    causal = [r for r in tiles if r["mask"] == "causal"]
    assert causal, "no causal spec in specs/"
    for r in causal:
        visited, need, total = int(r["tiles_visited"]), int(r["tiles_min"]), int(r["tiles_total"])
        assert need <= visited < total, r
        assert int(r["tiles_full"]) + int(r["tiles_partial"]) == visited
    assert {r["config"].split(":")[0] for r in causal} == {"first", "largest"}

    spec_to_module = [r for r in rows if r["section"] == "compile" and r["pass"] == "spec_to_module"]
    assert spec_to_module and all(r["status"] == "ok" and float(r["seconds"]) > 0 for r in spec_to_module)
    for r in rows:
        assert r["device"] and r["torch"] and r["triton"] and r["date"] and "bench.py" in r["command"]

    meta = json.loads((tmp_path / "meta.json").read_text())
    assert {"device", "torch", "triton", "date", "command", "flop_rule", "columns"} <= set(meta)
    assert "2.5" in meta["flop_rule"]
    if importlib.util.find_spec("matplotlib") is not None:  # the `bench` extra, installed by the Makefile
        assert list(tmp_path.glob("*.png")), "matplotlib is installed but no plot was written"


@pytest.mark.parametrize("n_q,n_k", [(1, 1), (77, 77), (64, 64), (33, 50), (50, 33), (300, 129)])
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 16), (16, 64), (128, 32)])
def test_min_tiles_and_pairs_match_brute_force(n_q, n_k, block_m, block_n):
    from attngen.plan import MASK_RULES, tile_counts

    bench = _bench_module()
    for mask, rule in MASK_RULES.items():
        need = bench.min_tiles(mask, n_q, n_k, block_m, block_n)
        pairs = bench.unmasked_pairs(mask, n_q, n_k)
        if need is None or pairs is None:
            continue  # a mask without a closed form: the harness says so in the CSV
        brute_tiles, brute_pairs = bench.brute_min_tiles(rule.visible, n_q, n_k, block_m, block_n)
        assert (need, pairs) == (brute_tiles, brute_pairs), mask
        assert tile_counts(mask, n_q, n_k, block_m, block_n)["visited"] >= need, mask


def test_flop_convention():
    bench = _bench_module()
    # causal N=4: 10 visible pairs; B=2, Hq=3, D=8, Dv=4 -> 2*2*3*10*8 + 2*2*3*10*4
    assert bench.unmasked_pairs("causal", 4, 4) == 10
    assert bench.flops_fwd(2, 3, 10, 8, 4) == 960 + 480
    assert bench.PASS_FLOP_FACTOR == {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
    assert bench.parse_lengths("512,1k,64k") == [512, 1024, 65536]


def test_gpu_check_script_parses():
    assert os.access(GPU_CHECK, os.X_OK), f"{GPU_CHECK} is not executable"
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not installed")
    proc = subprocess.run([bash, "-n", str(GPU_CHECK)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
