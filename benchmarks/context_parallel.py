#!/usr/bin/env python
"""Context parallelism (attngen.distributed.context_parallel_attention): a CPU model of what each
rank sends and computes, for P ranks, a sequence of N positions and a generated dense module; and,
launched with torchrun on a machine with P GPUs, the time of a step.

The model, per rank, for one attention call (forward) and its backward:

* communication: ring mode receives the other P-1 K/V shards in the forward and again in the
  backward, plus P hops of the float32 dK/dV accumulators; allgather mode receives the same P-1
  K/V shards once (and keeps the whole K/V), and in the backward exchanges float32 dK/dV shards
  with every other rank. Bytes received per rank (as many are sent); the small collective check of
  shapes is left out.
* work: tile pairs (BLOCK_M x BLOCK_N) that the forward kernel visits, from the kernels' own tile
  bounds (attngen.planning.classify.classify_tiles) at the chunk pairs' true positions; the chunk
  pairs the mask hides are not called at all (skipped). "dense" is every tile pair of the N x N
  attention; "single" what one device's kernel visits; "skipped by the mask" is 1 - CP / dense.
  The id-range runtime skip of a document mask is not counted here (tile bounds only; it is
  counted at chunk level, which is what the ring skips). Balance is the busiest rank's tile pairs
  over the mean.

Run `python benchmarks/context_parallel.py --help`; `--gpu` under `torchrun --nproc_per_node P`
(NCCL, one GPU per rank) times forward and forward+backward (not run yet: no multi-GPU machine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ELEM_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


def parse_list(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = 1024 if part.endswith("k") else 1
        value = int(part.rstrip("k")) * mult
        if value < 1:
            raise ValueError(f"expected positive sizes, got {text!r}")
        out.append(value)
    return out


def comm_bytes(mod, *, p: int, n: int, batch: int, elem: int, mode: str) -> dict:
    """Bytes one rank receives, forward and backward."""
    shard = batch * mod.KV_HEADS * (n // p) * (mod.HEAD_DIM + mod.V_HEAD_DIM)  # K and V elements of a shard
    if mode == "ring":
        fwd = (p - 1) * shard * elem
        bwd = (p - 1) * shard * elem + p * shard * 4 if p > 1 else 0
    else:
        fwd = (p - 1) * shard * elem
        bwd = (p - 1) * shard * 4
    return {"fwd_bytes": fwd, "bwd_bytes": bwd}


def work(mod, *, p: int, n: int, layout: str, mode: str, params: dict, block_m: int, block_n: int) -> dict:
    """Tile pairs the forward kernel visits, per rank and overall, against dense and one device."""
    from attngen import distributed as cp
    from attngen.planning.classify import classify_tiles

    info = cp._spec_info(mod)
    chunks = cp.chunk_count(layout, p)
    size = n // chunks
    scalars = {k: v for k, v in params.items() if not hasattr(v, "shape")}
    vis = cp.pair_visibility(mod, world_size=p, n=n, layout=layout, batch=1, **params)

    def visited(n_q, n_k, q_off, kv_off):
        return classify_tiles(info.rule, n_q, n_k, block_m, block_n, params=scalars,
                              q_offset=q_off, kv_offset=kv_off).counts("fwd")["visited"]

    per_rank, calls, skipped = [], [], []
    for r in range(p):
        mine = cp.rank_chunks(layout, r, p)
        if mode == "ring":
            pairs = [(a, c) for a in mine for c in range(chunks)]
            todo = [(a, c) for a, c in pairs if vis[a][c]]
            per_rank.append(sum(visited(size, size, a * size, c * size) for a, c in todo))
        else:
            pairs = list(mine)
            todo = [a for a in mine if any(vis[a])]
            per_rank.append(sum(visited(size, n, a * size, 0) for a in todo))
        calls.append(len(todo))
        skipped.append(len(pairs) - len(todo))
    dense = -(-n // block_m) * -(-n // block_n)
    single = visited(n, n, 0, 0)
    total = sum(per_rank)
    return {"chunk_calls": calls, "chunk_calls_skipped": skipped, "tile_pairs_per_rank": per_rank,
            "tile_pairs": total, "tile_pairs_single": single, "tile_pairs_dense": dense,
            "skipped_by_mask": 1 - total / dense, "balance": max(per_rank) / (total / p) if total else 1.0}


def time_gpu(mod, *, n: int, layout: str, mode: str, params: dict, batch: int, dtype_name: str, rep_ms: int) -> dict:
    """Under torchrun with NCCL: ms of forward and of forward + backward on every rank (rank 0 prints)."""
    import torch
    import torch.distributed as dist
    import triton.testing

    from attngen import distributed as cp
    from attngen.runtime import TORCH_DTYPES

    dtype, dev = TORCH_DTYPES[dtype_name], torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator(device="cpu").manual_seed(0)
    full = [torch.randn(batch, h, n, d, generator=g).to(dev, dtype)
            for h, d in ((mod.Q_HEADS, mod.HEAD_DIM), (mod.KV_HEADS, mod.HEAD_DIM), (mod.KV_HEADS, mod.V_HEAD_DIM))]
    q, k, v = (cp.shard(t, 2, layout).requires_grad_() for t in full)

    def fwd():
        return cp.context_parallel_attention(mod, q, k, v, mode=mode, layout=layout, **params)

    def both():
        fwd().sum().backward()

    out = {"ms_fwd": triton.testing.do_bench(fwd, rep=rep_ms), "ms_fwd_bwd": triton.testing.do_bench(both, rep=rep_ms)}
    dist.barrier()
    return out


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="context parallelism: bytes and work per rank",
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default="llama3_gqa,sliding_window,document,mha",
                   help="generated dense modules by name, comma-separated (default llama3_gqa,sliding_window,document,mha)")
    p.add_argument("--world-size", default="2,4,8", help="P values, comma-separated (default 2,4,8)")
    p.add_argument("--n", default="32k", help="sequence length(s), e.g. 32k (default 32k)")
    p.add_argument("--layout", default="zigzag,contiguous", help="layouts (default zigzag,contiguous)")
    p.add_argument("--mode", default="ring", help="modes: ring, allgather (default ring)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=tuple(ELEM_BYTES))
    p.add_argument("--block", default="128,64", help="BLOCK_M,BLOCK_N of the modelled forward kernel (default 128,64)")
    p.add_argument("--gpu", action="store_true", help="under torchrun: time the call on P GPUs (NCCL)")
    p.add_argument("--rep-ms", type=int, default=200)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        ps, ns = parse_list(args.world_size), parse_list(args.n)
        bm, bn = parse_list(args.block)
    except ValueError as e:
        print(f"context_parallel: {e}", file=sys.stderr)
        return 2
    layouts, modes = args.layout.split(","), args.mode.split(",")
    from attngen import distributed as cp
    from attngen.param_values import long_values
    from attngen.tools.verify import import_generated

    bad = [x for x in layouts if x not in cp.LAYOUTS] + [x for x in modes if x not in cp.MODES]
    if bad:
        print(f"context_parallel: unknown layout or mode {bad}", file=sys.stderr)
        return 2
    mods = []
    for name in args.spec.split(","):
        path = ROOT / "generated" / f"{name.strip()}.py"
        if not path.exists():
            print(f"context_parallel: no module {path}", file=sys.stderr)
            return 2
        mod = import_generated(path)
        why = cp._serves(mod, "ring")
        if why:
            print(f"context_parallel: {why}", file=sys.stderr)
            return 2
        mods.append(mod)
    if args.gpu:
        return _gpu(args, mods, ns, layouts, modes)
    cols = ("spec", "P", "N", "layout", "mode", "MiB_recv_fwd", "MiB_recv_bwd", "calls/rank", "skipped/rank",
            "tiles_cp", "tiles_single", "tiles_dense", "skipped_by_mask", "balance")
    print(" ".join(f"{c:>14}" for c in cols))
    for mod in mods:
        for n in ns:
            params, _ = long_values(mod.NAME, dict(mod.PARAMS), mod.Q_HEADS, n, args.batch)
            for p in ps:
                for layout in layouts:
                    if n % cp.chunk_count(layout, p):
                        print(f"context_parallel: N = {n} is not divisible by the {cp.chunk_count(layout, p)} chunks "
                              f"of {layout} over {p} ranks; skipped", file=sys.stderr)
                        continue
                    for mode in modes:
                        c = comm_bytes(mod, p=p, n=n, batch=args.batch, elem=ELEM_BYTES[args.dtype], mode=mode)
                        w = work(mod, p=p, n=n, layout=layout, mode=mode, params=params, block_m=bm, block_n=bn)
                        calls = "/".join(map(str, w["chunk_calls"]))
                        skipped = "/".join(map(str, w["chunk_calls_skipped"]))
                        row = (mod.NAME, p, n, layout, mode, f"{c['fwd_bytes'] / 2**20:.1f}", f"{c['bwd_bytes'] / 2**20:.1f}",
                               calls, skipped, w["tile_pairs"], w["tile_pairs_single"], w["tile_pairs_dense"],
                               f"{w['skipped_by_mask']:.3f}", f"{w['balance']:.3f}")
                        print(" ".join(f"{str(x):>14}" for x in row))
    return 0


def _gpu(args, mods, ns, layouts, modes) -> int:
    import os

    import torch
    import torch.distributed as dist

    from attngen.param_values import long_values

    if "RANK" not in os.environ or not torch.cuda.is_available():
        print("context_parallel: --gpu runs under torchrun on a CUDA machine (one GPU per rank)", file=sys.stderr)
        return 2
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    try:
        for mod in mods:
            for n in ns:
                params, _ = long_values(mod.NAME, dict(mod.PARAMS), mod.Q_HEADS, n, args.batch, device="cuda")
                for layout in layouts:
                    for mode in modes:
                        t = time_gpu(mod, n=n, layout=layout, mode=mode, params=params, batch=args.batch,
                                     dtype_name=args.dtype, rep_ms=args.rep_ms)
                        if dist.get_rank() == 0:
                            print(f"{mod.NAME} P={dist.get_world_size()} N={n} {layout} {mode} {args.dtype}: "
                                  f"fwd {t['ms_fwd']:.3f} ms, fwd+bwd {t['ms_fwd_bwd']:.3f} ms "
                                  f"({torch.cuda.get_device_name()})")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
