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

import numpy as np
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


@pytest.mark.slow
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
    from mirror import tile_counts

    bench = _bench_module()
    visible = {"none": lambda q, kv: q >= 0, "causal": lambda q, kv: q >= kv}  # written out, not the generator's
    for mask in ("none", "causal"):
        need = bench.min_tiles(mask, n_q, n_k, block_m, block_n)
        pairs = bench.unmasked_pairs(mask, n_q, n_k)
        if need is None or pairs is None:
            continue  # a mask without a closed form: the harness says so in the CSV
        brute_tiles, brute_pairs = bench.brute_min_tiles(visible[mask], n_q, n_k, block_m, block_n)
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


# ----------------------------------------------------------------------------- expression masks, score_mods

# the shipped masks written out independently of attngen's expression language (numpy, index grids)
def _window(q, kv, w):
    return (q >= kv) & (q - kv < w)


def _natten(q, kv, width, r):
    return (abs(q // width - kv // width) <= r) & (abs(q % width - kv % width) <= r)


def _document(q, kv, doc_len):
    return (q // doc_len == kv // doc_len) & (q >= kv)


def _run_cli(tmp_path, *args, timeout=120):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--no-plots", "--out", str(tmp_path), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(tmp_path / "bench.csv", newline="", encoding="utf-8") as f:
        return proc.stdout, list(csv.DictReader(f))


@pytest.mark.parametrize("n,block_m,block_n", [(1, 16, 16), (100, 16, 32), (257, 64, 16)])
def test_mask_counts_match_brute_force(n, block_m, block_n):
    """Tiles with a visible pair and visible pairs, from the spec's own expression evaluated in row
    chunks, equal a brute-force count over an independently written predicate."""
    import torch

    bench = _bench_module()
    cases = [
        ("sliding_window(w)", {"w": "int"}, {"w": 37}, lambda q, kv: _window(q, kv, 37)),
        ("abs(q_idx // width - kv_idx // width) <= r and abs(q_idx % width - kv_idx % width) <= r",
         {"width": "int", "r": "int"}, {"width": 16, "r": 2}, lambda q, kv: _natten(q, kv, 16, 2)),
        ("document(doc) and causal", {"doc": {"tensor": "int32", "dims": 2}},
         {"doc": (torch.arange(n) // 40).to(torch.int32).view(1, n)}, lambda q, kv: _document(q, kv, 40)),
        ("prefix_lm(p)", {"p": "int"}, {"p": 50}, lambda q, kv: (kv < 50) | (q >= kv)),
    ]
    for mask, decls, params, brute in cases:
        visible, _ = bench.expr_fns(mask, "", decls)
        # small chunks: several query tiles per chunk and a short last chunk
        blocks = [(block_m, block_n), (block_n, block_m)]
        tiles, pairs, above = bench.mask_counts(visible, n, n, blocks, params=params, chunk_elems=3 * 64 * n)
        for (bm, bn), t in zip(blocks, tiles):
            assert (t, pairs) == bench.brute_min_tiles(brute, n, n, bm, bn), (mask, bm, bn)
        q, kv = np.arange(n)[:, None], np.arange(n)[None, :]
        assert above == int((np.broadcast_to(brute(q, kv), (n, n)) & (kv > q)).sum()), mask





@pytest.mark.slow
def test_cli_rows_for_expression_specs(tmp_path):
    """The CLI on the CPU writes tile rows for expression-mask and score_mod specs with their parameter
    values, the counts agreeing with brute force over independent predicates; its timing rows (the
    harness exercised on CPU tensors) give a mask inside the causal triangle the dense causal
    baseline and one outside it the unmasked one, each credited with its own pairs; NSA specs are
    sent to benchmarks/nsa_model.py."""
    n, small = 1024, 64
    specs = ["sliding_window", "natten_2d", "document", "alibi", "nsa_tiny"]
    out, rows = _run_cli(tmp_path, "--sections", "tiles,timing", "--timing-on-cpu", "--lengths", f"{small},{n}",
                         "--batch", "1", "--warmup", "1", "--repeats", "3", "--seconds-per-measure", "0.01",
                         "--impls", "sdpa_flash", "--specs", *[f"specs/{s}.yaml" for s in specs])
    assert "nsa_tiny" in out and "benchmarks/nsa_model.py --gpu" in out
    tiles = [r for r in rows if r["section"] == "tiles" and r["n"] == str(n)]
    assert {r["spec"] for r in tiles} == set(specs) - {"nsa_tiny"}
    brute = {
        "sliding_window": ("w=1024", lambda q, kv: _window(q, kv, 1024)),
        "natten_2d": ("width=32 r=3", lambda q, kv: _natten(q, kv, 32, 3)),
        "document": ("2048-token documents", lambda q, kv: _document(q, kv, 2048)),
        "alibi": ("slopes=tensor[4]", lambda q, kv: q >= kv),
    }
    bench = _bench_module()
    for r in tiles:
        shown, pred = brute[r["spec"]]
        assert shown in r["params"], r
        bm, bn = int(r["block_m"]), int(r["block_n"])
        need, pairs = bench.brute_min_tiles(pred, n, n, bm, bn)
        assert (int(r["tiles_min"]), int(r["unmasked_pairs"])) == (need, pairs), r
        assert need <= int(r["tiles_visited"]) <= int(r["tiles_total"]), r
        assert int(r["tiles_full"]) + int(r["tiles_partial"]) == int(r["tiles_visited"])
        assert r["score_mod"] == ("alibi(slopes)" if r["spec"] == "alibi" else "")
    # a window of 1024 at N = 1024 is all of causal: the kernel visits no tile in vain
    assert all(r["tiles_visited"] == r["tiles_min"] for r in tiles if r["spec"] == "sliding_window")

    timing = [r for r in rows if r["section"] == "timing" and r["n"] == str(small)]
    by_spec = {s: [r for r in timing if r["spec"] == s] for s in ("sliding_window", "natten_2d", "alibi")}
    assert {r["impl"] for r in by_spec["sliding_window"]} == {"sdpa_flash_causal"}
    assert {r["impl"] for r in by_spec["alibi"]} == {"sdpa_flash_causal"}
    assert {r["impl"] for r in by_spec["natten_2d"]} == {"sdpa_flash_dense"}
    assert all(int(r["unmasked_pairs"]) == small * (small + 1) // 2 for r in by_spec["sliding_window"])
    assert all(int(r["unmasked_pairs"]) == small * small for r in by_spec["natten_2d"])
    assert all(r["params"] == "w=1024" for r in by_spec["sliding_window"])
    assert all(r["params"] == "width=8 r=3" for r in by_spec["natten_2d"])
    assert {r["pass"] for r in timing if r["status"] == "ok"} == {"fwd", "bwd", "fwd_bwd"}


@pytest.mark.slow
def test_flex_runner_follows_the_expressions():
    """FlexAttention with the mask_mod and score_mod the harness builds from a spec's expressions
    (tensor parameters read in both) matches the float64 reference (forward, on the CPU)."""
    import torch

    import attngen.runtime  # noqa: F401  (before triton)
    from attngen.reference.dense import attention_reference

    flex_mod = pytest.importorskip("torch.nn.attention.flex_attention")
    bench = _bench_module()
    n, hq, hkv, d = 80, 4, 2, 16
    decls = {"doc": {"tensor": "int32", "dims": 2}, "slopes": {"tensor": "fp32", "dims": 1}}
    params = {"doc": (torch.arange(n) // 24).to(torch.int32).view(1, n),
              "slopes": torch.tensor([0.5, 0.25, 0.125, 0.0625])}
    visible, score = bench.expr_fns("document(doc) and causal", "alibi(slopes)", decls)
    runner = bench.FlexRunner(hq, hkv, flex_mod.flex_attention, flex_mod.create_block_mask, visible, score, params)
    runner.make_block_mask(n, "cpu")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, d, generator=g) for h in (hq, hkv, hkv))
    out = runner(q, k, v)
    doc = params["doc"][0].long()
    slopes = params["slopes"].double()
    ref, _ = attention_reference(
        q.double(), k.double(), v.double(),
        mask=lambda b, h, qi, ki: (doc[qi] == doc[ki]) & (qi >= ki),
        score_mod=lambda s, b, h, qi, ki: s - slopes[h] * (qi - ki).abs(),
    )
    assert (out.double() - ref).abs().max().item() < 1e-4
