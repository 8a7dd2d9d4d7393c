"""Context parallelism (attngen.distributed) on 2 and 4 CPU processes over gloo.

Each spawn runs a batch of cases (tests/dist_worker.py): the ranks shard full tensors made here,
run context_parallel_attention forward and backward, and gather o, lse and the gradients, which are
compared here with the float64 reference on the whole sequence under the project's tolerance rule
(attngen.testing). The kernel calls each rank made are counted (a wrapper around the module's
_forward / _backward) and checked against the chunk pairs the mask leaves visible, found by brute
force over the pairs' positions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from attngen import distributed as cp
from attngen.reference.dense import attention_reference
from attngen.testing import compare, reference_mask, reference_score_mod

from dist_worker import spawn
from helpers import generated

ROOT = Path(__file__).resolve().parent.parent
B, N = 2, 32
SPECS = {  # name: (dtype, params(batch, n) -> dict, learnable tensors)
    "gqa_hd80": (torch.float32, lambda: {}, ()),  # causal, GQA 6 / 2, head dims 80 / 48
    "mha": (torch.float32, lambda: {}, ()),  # no mask
    "sliding_window": (torch.float16, lambda: {"w": 5}, ()),
    "document": (torch.float16, lambda: {"doc": _packed_docs((5, 9, 3, 11, 4), (14, 18))}, ()),
    "relpos_bias": (torch.bfloat16, lambda: {"rb": torch.randn(4, 32, generator=torch.Generator().manual_seed(3)) * 0.5},
                    ("rb",)),
}


def _packed_docs(*lengths) -> torch.Tensor:
    """int32 [B, N] ids of consecutive documents of the given lengths (per batch row; the last
    one runs to the end)."""
    rows = []
    for lens in lengths:
        ids = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lens)])
        ids = torch.cat([ids, torch.full((N,), len(lens), dtype=torch.int32)])[:N]
        rows.append(ids)
    return torch.stack(rows)


def _case(name: str, mode: str, layout: str, seed: int, **extra) -> dict:
    mod = generated(name)
    dtype, make_params, learn = SPECS[name]
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(B, h, N, d, generator=g).to(dtype)
           for h, d in ((mod.Q_HEADS, mod.HEAD_DIM), (mod.KV_HEADS, mod.HEAD_DIM), (mod.KV_HEADS, mod.V_HEAD_DIM))]
    do = torch.randn(B, mod.Q_HEADS, N, mod.V_HEAD_DIM, generator=g).to(dtype)
    dlse = torch.randn(B, mod.Q_HEADS, N, generator=g)
    return dict(kind="check", module=name, mode=mode, layout=layout, qkv=qkv, do=do, dlse=dlse,
                params=make_params(), learn=learn, **extra)


def _visible_pairs(case: dict, world: int) -> list[list[bool]]:
    """[query chunk][key chunk]: whether the mask shows any pair of the two chunks, by brute force."""
    mod = generated(case["module"])
    chunks = cp.chunk_count(case["layout"], world)
    size = N // chunks
    fn = reference_mask(mod, case["params"])
    if isinstance(fn, str):
        if fn == "none":
            return [[True] * chunks for _ in range(chunks)]
        seen = torch.ones(N, N, dtype=torch.bool).tril()[None, None]
    else:
        i = torch.arange(N)
        seen = fn(torch.arange(B)[:, None, None, None], torch.arange(mod.Q_HEADS)[None, :, None, None],
                  i[None, None, :, None], i[None, None, None, :])
        seen = seen.expand(B, mod.Q_HEADS, N, N)
    return [[bool(seen[..., a * size:(a + 1) * size, c * size:(c + 1) * size].any()) for c in range(chunks)]
            for a in range(chunks)]


def _expected_calls(case: dict, world: int, rank: int) -> int:
    vis = _visible_pairs(case, world)
    mine = cp.rank_chunks(case["layout"], rank, world)
    if case["mode"] == "allgather":
        return sum(any(vis[a]) for a in mine)
    return sum(vis[a][c] for a in mine for c in range(len(vis)))


def _check(case: dict, got: dict) -> list[str]:
    """Problems of rank 0's gathered results against the float64 reference (tolerance rule:
    PyTorch at the input dtype is the baseline)."""
    mod = generated(case["module"])
    dtype = case["qkv"][0].dtype
    results = {}
    for label, cdt in (("ref", torch.float64), ("base", None)):
        ins = [t.clone().requires_grad_() for t in case["qkv"]]
        params = dict(case["params"])
        for n in case["learn"]:
            params[n] = params[n].detach().to(cdt or params[n].dtype).requires_grad_()
            ins.append(params[n])
        o, lse = attention_reference(*ins[:3], mask=reference_mask(mod, params), compute_dtype=cdt,
                                     score_mod=reference_score_mod(mod, params))
        loss = (o * case["do"].to(o.dtype)).sum() + (torch.where(torch.isfinite(lse), lse, 0) * case["dlse"].to(lse.dtype)).sum()
        results[label] = (o, lse, *torch.autograd.grad(loss, ins))
    names = ("o", "lse", "dq", "dk", "dv", *(f"d{n}" for n in case["learn"]))
    out = []
    for i, name in enumerate(names):
        c = compare(name, got[name], results["ref"][i], results["base"][i], dtype)
        if not c.ok:
            out.append(str(c))
    return out


def _run(world: int, cases: list, tmp_path, timeout_s: float) -> list:
    results = spawn(world, cases, tmp_path, timeout_s)
    problems = []
    for i, case in enumerate(cases):
        if case["kind"] != "check":
            continue
        label = f"{case['module']} {case['mode']} {case['layout']} P={world}"
        problems += [f"{label}: {p}" for p in _check(case, results[0][i])]
        for r in range(world):
            want = _expected_calls(case, world, r)
            fwd, bwd = results[r][i]["calls"]
            # exact for these masks: sorted document ids share an id wherever their ranges meet
            if fwd != want:
                problems.append(f"{label}: rank {r} made {fwd} forward kernel calls; the visible chunk pairs need {want}")
            if bwd != fwd:
                problems.append(f"{label}: rank {r} made {bwd} backward calls for {fwd} forward calls")
            if "same_twice" in results[r][i] and not results[r][i]["same_twice"]:
                problems.append(f"{label}: rank {r}: a second run differs (not deterministic)")
    assert not problems, "\n".join(problems)
    return results


@pytest.mark.kernel
def test_two_ranks_every_mode_and_layout(tmp_path):
    """P = 2: both modes and layouts over causal GQA (fp32), no mask (fp32), sliding window and
    packed documents (fp16); a learnable bias (bf16, gradients summed over the ranks), run twice
    for determinism."""
    cases = [_case(name, mode, layout, seed)
             for seed, (name, mode, layout) in enumerate(
                 (n, m, lay) for n in ("gqa_hd80", "mha", "sliding_window", "document")
                 for m in cp.MODES for lay in cp.LAYOUTS)]
    cases += [_case("relpos_bias", "ring", "zigzag", 50, twice=True),
              _case("relpos_bias", "allgather", "contiguous", 51, twice=True)]
    _run(2, cases, tmp_path, timeout_s=420)


@pytest.mark.kernel
def test_four_ranks(tmp_path):
    cases = [_case("gqa_hd80", "ring", "zigzag", 60, twice=True), _case("gqa_hd80", "ring", "contiguous", 61),
             _case("sliding_window", "ring", "zigzag", 62), _case("document", "allgather", "zigzag", 63)]
    _run(4, cases, tmp_path, timeout_s=420)


def test_causal_ring_skips_the_future_half():
    """The visibility the ring uses (no kernel here): causal zigzag over P ranks computes
    P(2P+1) of the (2P)^2 chunk pairs, the same on every rank; contiguous leaves rank r r+1."""
    mod = generated("gqa_hd80")
    for p in (2, 4, 8):
        vis = cp.pair_visibility(mod, world_size=p, n=64 * p, layout="zigzag")
        per_rank = [sum(vis[a][c] for a in cp.rank_chunks("zigzag", r, p) for c in range(2 * p)) for r in range(p)]
        assert per_rank == [2 * p + 1] * p
        vis = cp.pair_visibility(mod, world_size=p, n=64 * p, layout="contiguous")
        assert [sum(vis[r]) for r in range(p)] == [r + 1 for r in range(p)]


@pytest.mark.kernel
def test_bad_calls_raise_on_every_rank(tmp_path):
    """Unequal shards, an odd zigzag shard, parameters that differ across ranks, an NSA module and a
    length the layout cannot cut: the same ValueError on every rank, and the group still works."""
    base = _case("sliding_window", "ring", "zigzag", 70)
    cases = [
        {**base, "kind": "error", "what": "unequal", "layout": "contiguous"},
        {**base, "kind": "error", "what": "odd", "layout": "zigzag"},
        {**base, "kind": "error", "what": "param", "layout": "contiguous", "mode": "allgather"},
        {**base, "kind": "error", "what": "nsa", "module": "nsa_tiny", "layout": "contiguous", "params": {}},
        {**base, "kind": "error", "what": "shard", "layout": "zigzag",
         "qkv": [t[:, :, :30] for t in base["qkv"]]},
    ]
    results = spawn(2, cases, tmp_path, timeout_s=240)
    wanted = ["disagree on shapes", "must be even", "disagree on params", "not a dense attngen module", "not divisible"]
    for i, want in enumerate(wanted):
        messages = [results[r][i]["error"] for r in range(2)]
        assert all(m is not None and want in m for m in messages), (cases[i]["what"], messages)
        if cases[i]["what"] != "shard":
            assert messages[0] == messages[1]
            assert all(results[r][i]["after"] == 2.0 for r in range(2))


def _bench():
    spec = importlib.util.spec_from_file_location("context_parallel_bench", ROOT / "benchmarks" / "context_parallel.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_bench_bytes_by_hand():
    b = _bench()
    mod = generated("gqa_hd80")  # 2 KV heads, head dims 80 + 48
    # P 4, N 64, batch 1: a shard's K and V are 2 * 16 * 128 = 4096 elements; fp16
    assert b.comm_bytes(mod, p=4, n=64, batch=1, elem=2, mode="ring") == {
        "fwd_bytes": 3 * 4096 * 2, "bwd_bytes": 3 * 4096 * 2 + 4 * 4096 * 4}
    assert b.comm_bytes(mod, p=4, n=64, batch=1, elem=2, mode="allgather") == {
        "fwd_bytes": 3 * 4096 * 2, "bwd_bytes": 3 * 4096 * 4}


@pytest.mark.slow
def test_bench_runs_on_the_cpu(capsys):
    b = _bench()
    assert b.main(["--spec", "llama3_gqa,mha", "--n", "2k", "--world-size", "2,4", "--mode", "ring,allgather"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert len(rows) == 2 * 2 * 2 * 2
    for spec, p, n, layout, mode, _, _, calls, skipped, tiles, single, dense, frac, balance in rows:
        p = int(p)
        calls = [int(c) for c in calls.split("/")]
        if spec == "mha":  # nothing to skip
            assert float(frac) == 0 and int(tiles) == int(single) == int(dense)
        else:  # causal: the kernels visit the triangle's tiles, however the sequence is cut
            assert int(tiles) == int(single) and 0.45 < float(frac) < 0.5
            if layout == "zigzag":
                assert float(balance) == 1.0
                assert calls == ([2 * p + 1] * p if mode == "ring" else [2] * p)
            elif mode == "ring":
                assert calls == [r + 1 for r in range(p)]
    assert b.main(["--n", "102", "--world-size", "2", "--spec", "mha"]) == 0  # 102 / 4 zigzag chunks: skipped, said
    assert "not divisible" in capsys.readouterr().err
