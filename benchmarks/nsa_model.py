#!/usr/bin/env python
"""Cost model of Native Sparse Attention against dense causal FlashAttention-2, and (with --gpu on a
CUDA machine) timings of a generated NSA module against torch SDPA's flash backend.

Counts are per batch element unless --batch says otherwise; t is a 0-indexed query position.

Per query t (exact, what each branch's kernel sees):
  cmp  C(t) = max(0, (t + 1 - block) // stride + 1) compressed keys (complete blocks only)
  slc  min(top_n, t // select_block + 1) selected blocks; the visible keys among them are
       (blocks - 1) * select_block + t % select_block + 1 (the own block is forced when local >= 1;
       with local = 0 this is an upper bound)
  win  min(t + 1, window) keys
  dense  t + 1 keys
The paper's decode accounting (the NSA notes, section 9) counts C(t) + top_n * select_block +
window KV tokens per query; `kv_tokens_per_query` gives it next to dense t + 1.

FLOPs: forward 2 * Hq * pairs * (D + Dv) for every attention branch (QK^T and PV over visible
(query, key) pairs, the convention of bench.py), backward 2.5 x forward; the top-n pass recomputes
the compressed scores (2 * Hq * cmp pairs * D) and has no backward; mean pooling and the gated sum
are counted as the adds and multiplies they are.

Bytes (memory traffic a kernel requests, e bytes per element, float32 lse/delta, no cache reuse
across programs):
  FlashAttention-2-style kernels (dense, cmp, win): one program per (query tile of block_m rows,
    query head) reads Q and the union of the keys its rows see (K and V), writes O and lse. K and V
    are thus read once per query head, G times per KV head (no sharing across a GQA group).
    Backward: delta = rowsum(dO * O); a dK/dV pass per (KV tile of block_n keys, KV head) that reads
    K, V once, loads q, dO, lse, delta of every (row, head of the group) that sees the tile, and
    writes dK, dV; a dQ pass that reads like the forward and writes dQ.
  Selection (the paper's kernel): one program per (query position, KV head) holding the group's G
    query heads reads the selected blocks whole (top_n * select_block keys at most) once for the
    group. Backward as above with the dK/dV pass inverted per (selected block, KV head): it loads
    q, dO, lse, delta of every (position, head) that selected the block.
  top-n: reads Q, the compressed keys (FA2 tiling) and lse_cmp, writes int64 indices.
  compress (mean pooling, K and V): reads every token once, writes C compressed tokens; backward
    reads dK_cmp/dV_cmp and accumulates into dK/dV (read + write).
  combine: o = sum of gate * branch output; reads the three outputs and gates, writes o.

Decoding (one new query per sequence at position t = L - 1 over a cache of L tokens; bytes read
per decoded token and layer, per batch element; what nsa_attention_with_kvcache's kernels request):
  dense   the dense decode kernel reads K and V of all L tokens once per KV head (the G query heads
          of a group are packed into one tile) and q.
  cmp     compressed K and V of the C(t) complete blocks, once per KV head, and q.
  topn    q, the compressed keys again (the top-n kernel recomputes q.k_cmp) and lse_cmp.
  slc     the selected blocks' visible keys (K and V), once per KV head (the group shares them), and q.
  win     the last min(L, window) keys (K and V), once per KV head, and q.
  append  the compressed cache's upkeep, amortised: block tokens of K and V read every stride tokens.
  combine the branch outputs and the gates.
"nsa" sums them; "nsa fused" drops the top-n pass's second read of the compressed keys (scores
taken from the compression pass, as the paper's kernel does), which is the paper's accounting.

Run `python benchmarks/nsa_model.py --help`.
"""

from __future__ import annotations

import argparse
import csv
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

DEFAULT_LENGTHS = "8k,16k,32k,64k"
DEFAULT_MODULE = ROOT / "generated" / "nsa_paper.py"
BRANCHES = ("compress", "topn", "cmp", "slc", "win", "combine")


@dataclass(frozen=True)
class NsaShape:
    """Head layout and NSA block sizes; the defaults are the paper's (arXiv 2502.11089)."""

    q_heads: int = 64
    kv_heads: int = 4
    head_dim: int = 192
    v_head_dim: int = 128
    block: int = 32  # compression block l
    stride: int = 16  # compression stride
    select_block: int = 64  # selection block l'
    top_n: int = 16  # selected blocks per (query, KV head), forced ones included
    initial: int = 1
    local: int = 2
    window: int = 512  # 0: no window branch


PAPER = NsaShape()


@dataclass
class Cost:
    flops_fwd: int = 0
    flops_bwd: int = 0
    read_fwd: int = 0  # bytes
    write_fwd: int = 0
    read_bwd: int = 0
    write_bwd: int = 0

    @property
    def bytes_fwd(self) -> int:
        return self.read_fwd + self.write_fwd

    @property
    def bytes_bwd(self) -> int:
        return self.read_bwd + self.write_bwd

    def row(self) -> dict:
        return {**asdict(self), "bytes_fwd": self.bytes_fwd, "bytes_bwd": self.bytes_bwd}

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))

    def scaled(self, k: int) -> "Cost":
        return Cost(*(k * a for a in asdict(self).values()))


# ----------------------------------------------------------------------------- per query


def compressed_keys(t, block: int, stride: int):
    """C(t): complete compression blocks visible to query t (t an int or an int array)."""
    return np.maximum(0, (np.asarray(t, dtype=np.int64) + 1 - block) // stride + 1)


def selected_blocks(t, s: NsaShape):
    """Selection blocks query t attends: min(top_n, t // select_block + 1)."""
    return np.minimum(s.top_n, np.asarray(t, dtype=np.int64) // s.select_block + 1)


def selected_pairs(t, s: NsaShape):
    """Keys query t sees in its selected blocks (exact when local >= 1, an upper bound otherwise)."""
    t = np.asarray(t, dtype=np.int64)
    if s.local >= 1:
        return (selected_blocks(t, s) - 1) * s.select_block + t % s.select_block + 1
    return np.minimum(t + 1, s.top_n * s.select_block)


def window_keys(t, window: int):
    return np.minimum(np.asarray(t, dtype=np.int64) + 1, window)


def kv_tokens_per_query(t: int, s: NsaShape = PAPER) -> dict:
    """The NSA notes' section 9 accounting: C(t) + top_n * select_block + window (the window and the
    selected blocks may overlap; counted separately, as the paper does), and dense t + 1."""
    cmp = int(compressed_keys(t, s.block, s.stride))
    out = {"cmp": cmp, "slc": s.top_n * s.select_block, "win": s.window}
    out["total"] = cmp + out["slc"] + out["win"]
    out["dense"] = t + 1
    out["reduction"] = out["dense"] / out["total"]
    return out


# ----------------------------------------------------------------------------- tiles


def band(kind: str, n: int, s: NsaShape):
    """(lo, hi, n_keys): query t sees keys lo[t]..hi[t] (empty when hi < lo) of n_keys, for the
    branches whose visible keys form one interval; lo and hi never decrease."""
    t = np.arange(n, dtype=np.int64)
    if kind == "dense":
        return np.zeros_like(t), t, n
    if kind == "win":
        return np.maximum(0, t - s.window + 1), t, n
    if kind == "cmp":
        return np.zeros_like(t), compressed_keys(t, s.block, s.stride) - 1, int(compressed_keys(n - 1, s.block, s.stride))
    raise ValueError(f"kind: no interval form for {kind!r}")


def tile_kv_loads(lo, hi, block_m: int) -> int:
    """Sum over query tiles of block_m rows of the keys in the union of their rows' intervals."""
    n = len(lo)
    first = np.arange(0, n, block_m)
    last = np.minimum(first + block_m, n) - 1
    return int(np.maximum(0, hi[last] - lo[first] + 1).sum())


def tile_query_loads(lo, hi, n_keys: int, block_n: int) -> int:
    """Sum over KV tiles of block_n keys of the query rows that see at least one key of the tile."""
    if n_keys == 0:
        return 0
    k0 = np.arange(0, n_keys, block_n)
    k1 = np.minimum(k0 + block_n, n_keys) - 1
    first = np.searchsorted(hi, k0, side="left")  # first row whose interval reaches the tile
    last = np.searchsorted(lo, k1, side="right") - 1  # last row whose interval starts by the tile's end
    return int(np.maximum(0, last - first + 1).sum())


# ----------------------------------------------------------------------------- costs


def _attention_cost(s: NsaShape, n: int, n_keys: int, pairs: int, kv_loads: int, q_loads: int, e: int) -> Cost:
    """An attention branch from its visible pairs and its KV / query load counts (all heads)."""
    hq, hkv, d, dv = s.q_heads, s.kv_heads, s.head_dim, s.v_head_dim
    fwd = 2 * hq * pairs * (d + dv)
    read_fwd = e * (hq * n * d + kv_loads * (d + dv))  # Q, K and V
    write_fwd = e * hq * n * dv + 4 * hq * n  # O, lse
    # delta = rowsum(dO * O); dK/dV pass; dQ pass
    read_bwd = (2 * e * hq * n * dv
                + e * hkv * n_keys * (d + dv) + q_loads * (e * (d + dv) + 8)
                + e * hq * n * (d + dv) + 8 * hq * n + e * kv_loads * (d + dv))
    write_bwd = 4 * hq * n + e * hkv * n_keys * (d + dv) + e * hq * n * d
    return Cost(fwd, fwd * 5 // 2, read_fwd, write_fwd, read_bwd, write_bwd)


def fa2_cost(kind: str, n: int, s: NsaShape = PAPER, *, elem_bytes: int = 2, block_m: int = 128,
             block_n: int = 64) -> Cost:
    """FlashAttention-2-style branch "dense" (causal), "cmp" or "win", per batch element."""
    lo, hi, nk = band(kind, n, s)
    pairs = int(np.maximum(0, hi - lo + 1).sum())
    kv = s.q_heads * tile_kv_loads(lo, hi, block_m)
    ql = s.q_heads * tile_query_loads(lo, hi, nk, block_n)
    return _attention_cost(s, n, nk, pairs, kv, ql, elem_bytes)


def branch_costs(n: int, s: NsaShape = PAPER, *, batch: int = 1, elem_bytes: int = 2, block_m: int = 128,
                 block_n: int = 64) -> dict[str, Cost]:
    """Costs of every NSA step (BRANCHES), their sum "nsa", and "dense" causal FlashAttention-2."""
    if n < 1:
        raise ValueError(f"n: expected a positive length, got {n}")
    e, hq, hkv, d, dv = elem_bytes, s.q_heads, s.kv_heads, s.head_dim, s.v_head_dim
    t = np.arange(n, dtype=np.int64)
    c = int(compressed_keys(n - 1, s.block, s.stride))
    kw = dict(elem_bytes=e, block_m=block_m, block_n=block_n)
    out: dict[str, Cost] = {}
    pool = hkv * c * s.block * (d + dv)
    out["compress"] = Cost(pool, pool, e * hkv * n * (d + dv), e * hkv * c * (d + dv),
                           e * hkv * (c + n) * (d + dv), e * hkv * n * (d + dv))
    cmp_pairs = int(compressed_keys(t, s.block, s.stride).sum())
    lo, hi, _ = band("cmp", n, s)
    out["topn"] = Cost(2 * hq * cmp_pairs * d, 0,
                       e * (hq * n * d + hq * tile_kv_loads(lo, hi, block_m) * d) + 4 * hq * n, 8 * hkv * n * s.top_n)
    out["cmp"] = fa2_cost("cmp", n, s, **kw)
    blocks = int(selected_blocks(t, s).sum())
    out["slc"] = _attention_cost(s, n, n, int(selected_pairs(t, s).sum()), hkv * blocks * s.select_block,
                                 hq * blocks, e)
    out["win"] = fa2_cost("win", n, s, **kw) if s.window else Cost()
    branches = 3 if s.window else 2
    out["combine"] = Cost((2 * branches - 1) * hq * n * dv, 3 * branches * hq * n * dv,
                          e * hq * n * branches * (dv + 1), e * hq * n * dv,  # branch outputs + gates -> o
                          e * hq * n * ((branches + 1) * dv + branches),  # dO, outputs, gates
                          e * hq * n * branches * (dv + 1))  # d(branch outputs), d(gates)
    out["nsa"] = sum((out[b] for b in BRANCHES), Cost())
    out["dense"] = fa2_cost("dense", n, s, **kw)
    return {k: v.scaled(batch) for k, v in out.items()}


# ----------------------------------------------------------------------------- decoding

DECODE_PARTS = ("cmp", "topn", "slc", "win", "append", "combine")


def decode_bytes(n: int, s: NsaShape = PAPER, *, elem_bytes: int = 2) -> dict[str, int]:
    """Bytes read to decode one token at position n - 1 over a cache of n tokens (per batch element
    and layer), per NSA part (DECODE_PARTS), their sum "nsa", "nsa fused" (without the top-n pass's
    re-read of the compressed keys) and "dense" (the dense decode kernel). See the module notes."""
    if n < 1:
        raise ValueError(f"n: expected a positive length, got {n}")
    e, hq, hkv, d, dv = elem_bytes, s.q_heads, s.kv_heads, s.head_dim, s.v_head_dim
    t = n - 1
    q = e * hq * d
    c = int(compressed_keys(t, s.block, s.stride))
    branches = 3 if s.window else 2
    out = {
        "cmp": q + e * hkv * c * (d + dv),
        "topn": q + e * hkv * c * d + 4 * hq,
        "slc": q + e * hkv * int(selected_pairs(t, s)) * (d + dv),
        "win": q + e * hkv * int(window_keys(t, s.window)) * (d + dv) if s.window else 0,
        "append": e * hkv * s.block * (d + dv) // s.stride,
        "combine": e * hq * branches * (dv + 1),
    }
    out["nsa"] = sum(out[p] for p in DECODE_PARTS)
    out["nsa fused"] = out["nsa"] - e * hkv * c * d - q - 4 * hq
    out["dense"] = q + e * hkv * n * (d + dv)
    return out


def decode_rows(lengths: list[int], s: NsaShape, *, elem_bytes: int) -> list[dict]:
    rows = []
    for n in lengths:
        b = decode_bytes(n, s, elem_bytes=elem_bytes)
        rows.append({"n": n, **b, "dense/nsa": b["dense"] / b["nsa"], "dense/nsa fused": b["dense"] / b["nsa fused"]})
    return rows


def print_decode(rows: list[dict]) -> None:
    print("Decoding: bytes read per decoded token and layer (MB = 1e6 bytes), NSA vs dense decode")
    parts = (*DECODE_PARTS, "nsa", "nsa fused", "dense")
    print(f"{'N':>6} " + " ".join(f"{p:>9}" for p in parts) + f" {'dense/nsa':>10} {'fused':>7}")
    for r in rows:
        print(f"{r['n']:>6} " + " ".join(f"{r[p] / 1e6:>9.3f}" for p in parts)
              + f" {r['dense/nsa']:>9.2f}x {r['dense/nsa fused']:>6.2f}x")


# ----------------------------------------------------------------------------- table


def model_rows(lengths: list[int], s: NsaShape, *, batch: int, elem_bytes: int, block_m: int, block_n: int) -> list[dict]:
    rows = []
    for n in lengths:
        costs = branch_costs(n, s, batch=batch, elem_bytes=elem_bytes, block_m=block_m, block_n=block_n)
        for name, cost in costs.items():
            rows.append({"n": n, "part": name, **cost.row()})
        dense, nsa = costs["dense"], costs["nsa"]
        rows.append({"n": n, "part": "dense/nsa", **{k: v / nsa.row()[k] for k, v in dense.row().items()}})
    return rows


def print_model(rows: list[dict], s: NsaShape, args) -> None:
    print(f"NSA cost model, {asdict(s)}")
    print(f"batch {args.batch}, {args.elem_bytes} bytes per element, FA2 tiles block_m={args.block_m} "
          f"block_n={args.block_n}; GFLOP = 1e9 FLOP, GB = 1e9 bytes; bwd FLOP = 2.5 x fwd for attention")
    cols = [("flops_fwd", "fwd GFLOP", 1e9), ("flops_bwd", "bwd GFLOP", 1e9), ("bytes_fwd", "fwd GB", 1e9),
            ("read_fwd", "fwd read", 1e9), ("write_fwd", "fwd write", 1e9), ("bytes_bwd", "bwd GB", 1e9),
            ("read_bwd", "bwd read", 1e9), ("write_bwd", "bwd write", 1e9)]
    head = f"{'N':>6} {'part':>9} " + " ".join(f"{label:>10}" for _, label, _ in cols)
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["part"] == "dense/nsa":  # ratios of the FLOP and total byte columns
            cells = [f"{r[k]:>9.2f}x" if k.startswith(("flops", "bytes")) else " " * 10 for k, _, _ in cols]
        else:
            cells = [f"{r[k] / unit:>10.3f}" for k, _, unit in cols]
        print((f"{r['n']:>6} {r['part']:>9} " + " ".join(cells)).rstrip())
    print()
    print("KV tokens per query at t = N - 1 (section 9 accounting: C(t) + top_n * select_block + window)")
    print(f"{'N':>6} {'C(t)':>6} {'n*l_sel':>8} {'window':>7} {'total':>7} {'dense':>7} {'reduction':>9}")
    for n in dict.fromkeys(r["n"] for r in rows):
        a = kv_tokens_per_query(n - 1, s)
        print(f"{n:>6} {a['cmp']:>6} {a['slc']:>8} {a['win']:>7} {a['total']:>7} {a['dense']:>7} {a['reduction']:>8.2f}x")


# ----------------------------------------------------------------------------- GPU timing


def load_module(path: Path):
    """The generated NSA module at `path`, or a string saying why it cannot be used."""
    if not path.is_file():
        return (f"{path} not found: build the NSA spec first (python -m attngen.tools.cli build), or pass "
                f"--module PATH of a generated NSA module")
    import attngen.runtime  # noqa: F401  (before triton: picks the interpreter without CUDA)
    from attngen.tools.verify import import_generated

    mod = import_generated(path)
    if not hasattr(mod, "nsa_attention"):
        return f"{path}: not an NSA module (no nsa_attention)"
    return mod


def shape_of(mod) -> NsaShape:
    return NsaShape(mod.Q_HEADS, mod.KV_HEADS, mod.HEAD_DIM, mod.V_HEAD_DIM, mod.BLOCK, mod.STRIDE,
                    mod.SELECT_BLOCK, mod.TOP_N, mod.INITIAL, mod.LOCAL, mod.WINDOW)


def run_gpu(args, lengths: list[int]) -> list[dict]:
    """Forward and forward+backward time of nsa_attention and of SDPA flash causal attention."""
    import torch

    if not Path(args.module).is_file():
        print(f"GPU timing: {load_module(Path(args.module))}")
    cuda = torch.cuda.is_available()
    if not cuda and not args.timing_on_cpu:
        print("GPU timing: not measured on a GPU (torch sees no CUDA device)")
        return []
    dev = "cuda" if cuda else "cpu"
    smoke = "" if cuda else "CPU smoke run: times mean nothing"
    mod = load_module(Path(args.module))
    if isinstance(mod, str):
        print(f"GPU timing: {mod}")
        return []
    import torch.nn.functional as F

    from bench import device_name, measure, sdpa_flash, short_error

    s = shape_of(mod)
    dtype = torch.bfloat16
    group = s.q_heads // s.kv_heads
    sdpa, gqa_note = sdpa_flash("causal", group, dev, dtype)
    mopts = SimpleNamespace(warmup=args.warmup, repeats=args.repeats, seconds_per_measure=args.seconds_per_measure)
    print(f"GPU timing on {device_name(cuda)}, torch {torch.__version__}, bf16, batch {args.batch}, module {args.module}")
    print(f"{'N':>6} {'impl':>11} {'pass':>8} {'median ms':>10} {'note'}")
    rows = []
    for n in lengths:
        c = branch_costs(n, s, batch=args.batch, elem_bytes=2, block_m=args.block_m, block_n=args.block_n)
        print(f"{n:>6} model at the module's shape: dense/nsa forward {c['dense'].flops_fwd / c['nsa'].flops_fwd:.2f}x "
              f"FLOPs, {c['dense'].bytes_fwd / c['nsa'].bytes_fwd:.2f}x bytes; forward+backward "
              f"{(c['dense'].flops_fwd + c['dense'].flops_bwd) / (c['nsa'].flops_fwd + c['nsa'].flops_bwd):.2f}x FLOPs")
        g = torch.Generator(device=dev).manual_seed(n)

        def rnd(h, d, g=g, n=n):
            return torch.randn(args.batch, h, n, d, device=dev, dtype=dtype, generator=g)

        q, k, v = rnd(s.q_heads, s.head_dim), rnd(s.kv_heads, s.head_dim), rnd(s.kv_heads, s.v_head_dim)
        gates = torch.rand(args.batch, s.q_heads, n, 3, device=dev, dtype=dtype, generator=g)
        do = rnd(s.q_heads, s.v_head_dim)
        v_dense, note = v, "; ".join(x for x in (gqa_note, smoke) if x)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the backend's reasons; the fallback below is noted
                sdpa(q[:, :, :128], k[:, :, :128], v[:, :, :128])
        except RuntimeError:  # the flash backend wants equal head dims: pad v to D
            v_dense = F.pad(v, (0, s.head_dim - s.v_head_dim))
            note += f"; v padded from {s.v_head_dim} to {s.head_dim} (flash needs equal head dims)"
        do_dense = F.pad(do, (0, v_dense.shape[-1] - s.v_head_dim))
        impls = {"nsa": (lambda q, k, v: mod.nsa_attention(q, k, v, gates), v, do, smoke),
                 "sdpa_flash": (sdpa, v_dense, do_dense, note)}
        for impl, (fn, vv, dout, why) in impls.items():
            for pass_ in ("fwd", "fwd_bwd"):
                try:
                    if pass_ == "fwd":
                        def call(fn=fn, vv=vv):
                            with torch.no_grad():
                                fn(q, k, vv)
                    else:
                        leaves = [t.detach().requires_grad_(True) for t in (q, k, vv)]

                        def call(fn=fn, leaves=leaves, dout=dout):
                            torch.autograd.grad(fn(*leaves), leaves, dout)
                    _, ms, _ = measure(call, mopts, cuda)
                    row = {"n": n, "impl": impl, "pass": pass_, "median_ms": ms, "note": why}
                except Exception as e:  # noqa: BLE001  (out of memory, unsupported: record and go on)
                    row = {"n": n, "impl": impl, "pass": pass_, "median_ms": float("nan"), "note": short_error(e)}
                finally:
                    if cuda:
                        torch.cuda.empty_cache()
                rows.append(row)
                print(f"{n:>6} {impl:>11} {pass_:>8} {row['median_ms']:>10.3f} {row['note']}", flush=True)
    return rows


# ----------------------------------------------------------------------------- main


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/nsa_model.py",
        description="NSA cost model (FLOPs and bytes per branch, forward and backward) against dense causal "
        "FlashAttention-2 at the paper's configuration; --gpu also times a generated NSA module against "
        "SDPA flash on a CUDA machine.",
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help=f"sequence lengths, k = 1024 (default {DEFAULT_LENGTHS})")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--elem-bytes", type=int, default=2, help="bytes per q/k/v/o element (default 2: bf16)")
    p.add_argument("--block-m", type=int, default=128, help="FA2 query tile of the model (default 128)")
    p.add_argument("--block-n", type=int, default=64, help="FA2 key tile of the model's dK/dV pass (default 64)")
    p.add_argument("--csv", default=None, help="also write the model (and timing) rows to this CSV file")
    p.add_argument("--gpu", action="store_true", help="time nsa_attention vs SDPA flash causal (CUDA only)")
    p.add_argument("--module", default=str(DEFAULT_MODULE), help="generated NSA module for --gpu "
                   "(default generated/nsa_paper.py)")
    p.add_argument("--warmup", type=int, default=2, help="--gpu: warmup calls (default 2)")
    p.add_argument("--repeats", type=int, default=10, help="--gpu: timed calls at most (default 10)")
    # runs the timing code on CPU tensors (numbers meaningless): checks the harness without a GPU
    p.add_argument("--timing-on-cpu", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seconds-per-measure", type=float, default=1.0, help="--gpu: seconds per measurement (default 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from bench import parse_lengths

    try:
        lengths = parse_lengths(args.lengths)
    except (argparse.ArgumentTypeError, ValueError) as e:
        print(f"nsa_model: {e}", file=sys.stderr)
        return 2
    for name in ("batch", "elem_bytes", "block_m", "block_n"):
        if getattr(args, name) < 1:
            print(f"nsa_model: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    rows = model_rows(lengths, PAPER, batch=args.batch, elem_bytes=args.elem_bytes, block_m=args.block_m,
                      block_n=args.block_n)
    print_model(rows, PAPER, args)
    print()
    dec = decode_rows(lengths, PAPER, elem_bytes=args.elem_bytes)
    print_decode(dec)
    timing = []
    if args.gpu:
        print()
        timing = run_gpu(args, lengths)
    if args.csv:
        cols = ["section", "n", "part", "flops_fwd", "flops_bwd", "bytes_fwd", "read_fwd", "write_fwd", "bytes_bwd",
                "read_bwd", "write_bwd", "impl", "pass",
                "median_ms", "note"]
        with open(args.csv, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=cols, restval="")
            w.writeheader()
            for r in rows:
                w.writerow({"section": "model", **r})
            for r in dec:
                for part in (*DECODE_PARTS, "nsa", "nsa fused", "dense"):
                    w.writerow({"section": "decode", "n": r["n"], "part": part, "read_fwd": r[part]})
            for r in timing:
                w.writerow({"section": "timing", **r})
    return 0


if __name__ == "__main__":
    sys.exit(main())
