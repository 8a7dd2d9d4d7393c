#!/usr/bin/env python
"""Packed (variable-length) batches against the padded equivalent: how much work padding adds and,
with --gpu on a CUDA machine, the time of a generated module's attention_varlen against its
attention() on the batch padded to the longest sequence.

The model counts (query, key) pairs per head, the work both kernels do per visible pair being the
same: packed, the sum over sequences of Nq_b * Nk_b (each sequence attends to itself only; mask
none, or the causal triangle with --causal); padded, B * max Nq * max Nk (every padded row and key
is computed, then masked or dropped). Lengths are drawn uniformly from [--min-len, --max-len] with
--seed, as a batch of chat turns or documents would vary.

Run `python benchmarks/varlen.py --help`.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODULE = ROOT / "generated" / "llama3_gqa.py"


def draw_lengths(batch: int, lo: int, hi: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(batch)]


def pairs(n_q: int, n_k: int, causal: bool) -> int:
    """Visible (query, key) pairs of one sequence: all, or the top-left causal triangle."""
    if not causal:
        return n_q * n_k
    return sum(min(i + 1, n_k) for i in range(n_q))


def model(lengths: list[int], causal: bool) -> dict:
    packed = sum(pairs(n, n, causal) for n in lengths)
    longest = max(lengths)
    padded = len(lengths) * pairs(longest, longest, causal)
    return {"batch": len(lengths), "tokens": sum(lengths), "max_len": longest, "pairs_packed": packed,
            "pairs_padded": padded, "padded_over_packed": padded / packed if packed else float("nan")}


def time_gpu(mod, lengths: list[int], dtype_name: str, rep_ms: int) -> dict:
    """ms of attention_varlen over the packed batch and of attention() over the padded one (CUDA)."""
    import torch
    import triton.testing

    from attngen.runtime import TORCH_DTYPES

    if dict(mod.PARAMS):
        raise ValueError(f"{mod.NAME}: choose a spec without mask parameters for this comparison")
    dtype, dev = TORCH_DTYPES[dtype_name], torch.device("cuda")
    total, longest, b = sum(lengths), max(lengths), len(lengths)
    q = torch.randn(total, mod.Q_HEADS, mod.HEAD_DIM, device=dev, dtype=dtype)
    k = torch.randn(total, mod.KV_HEADS, mod.HEAD_DIM, device=dev, dtype=dtype)
    v = torch.randn(total, mod.KV_HEADS, mod.V_HEAD_DIM, device=dev, dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    qp = torch.zeros(b, mod.Q_HEADS, longest, mod.HEAD_DIM, device=dev, dtype=dtype)
    kp = torch.zeros(b, mod.KV_HEADS, longest, mod.HEAD_DIM, device=dev, dtype=dtype)
    vp = torch.zeros(b, mod.KV_HEADS, longest, mod.V_HEAD_DIM, device=dev, dtype=dtype)
    for i, (s, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        qp[i, :, :n] = q[s:s + n].transpose(0, 1)
        kp[i, :, :n] = k[s:s + n].transpose(0, 1)
        vp[i, :, :n] = v[s:s + n].transpose(0, 1)
    packed = triton.testing.do_bench(lambda: mod.attention_varlen(q, k, v, cu, cu, longest, longest), rep=rep_ms)
    padded = triton.testing.do_bench(lambda: mod.attention(qp, kp, vp), rep=rep_ms)
    return {"ms_varlen": packed, "ms_padded": padded, "padded_over_varlen": padded / packed}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="packed (varlen) batches against padded ones",
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--module", default=str(DEFAULT_MODULE), help="generated dense module (default llama3_gqa)")
    p.add_argument("--batch", type=int, default=16, help="sequences per batch (default 16)")
    p.add_argument("--min-len", type=int, default=128, help="shortest sequence (default 128)")
    p.add_argument("--max-len", type=int, default=4096, help="longest sequence (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="seed of the drawn lengths (default 0)")
    p.add_argument("--dtype", default="bf16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--gpu", action="store_true", help="time attention_varlen against padded attention() (CUDA)")
    p.add_argument("--rep-ms", type=int, default=200, help="--gpu: milliseconds of timed calls (default 200)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if not 1 <= args.min_len <= args.max_len or args.batch < 1:
        print("varlen: need 1 <= --min-len <= --max-len and --batch >= 1", file=sys.stderr)
        return 2
    from attngen.tools.verify import import_generated

    mod = import_generated(Path(args.module))
    if not hasattr(mod, "attention_varlen"):
        print(f"varlen: {args.module} has no attention_varlen (not a dense module)", file=sys.stderr)
        return 2
    lengths = draw_lengths(args.batch, args.min_len, args.max_len, args.seed)
    row = {"spec": mod.NAME, "mask": mod.MASK, **model(lengths, mod.MASK == "causal")}
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print("varlen: --gpu needs a CUDA device", file=sys.stderr)
            return 2
        row.update(device=torch.cuda.get_device_name(0), **time_gpu(mod, lengths, args.dtype, args.rep_ms))
    for key, value in row.items():
        print(f"{key:20} {value:.4g}" if isinstance(value, float) else f"{key:20} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
