#!/usr/bin/env python
"""Context parallelism end to end: launched with `torchrun --nproc_per_node P`, each rank takes its
zigzag shard of one sequence, runs attngen.distributed.context_parallel_attention (ring, causal,
GQA) forward and backward, and rank 0 compares the gathered output and gradients with the same
module on the whole sequence in one process.

    torchrun --nproc_per_node 2 scripts/context_parallel_demo.py            # CPU: gloo, Triton's interpreter
    torchrun --nproc_per_node 4 scripts/context_parallel_demo.py --seq-len 4096   # one GPU per rank: NCCL

Options: --module (a generated dense module, default gqa_hd80), --seq-len (sequence length, default 64), --mode,
--layout, --dtype.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attngen import runtime  # noqa: E402  (first: selects Triton's interpreter when there is no GPU)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from attngen import distributed as cp  # noqa: E402
from attngen.param_values import check_values  # noqa: E402
from attngen.tools.verify import import_generated  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--module", default="gqa_hd80")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--mode", default="ring", choices=cp.MODES)
    ap.add_argument("--layout", default="zigzag", choices=cp.LAYOUTS)
    ap.add_argument("--dtype", default=None, help="fp16 | bf16 | fp32 (default: the module's first)")
    args = ap.parse_args()
    if "RANK" not in os.environ:
        print("run me with torchrun --nproc_per_node P", file=sys.stderr)
        return 2
    if runtime.INTERPRET:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    try:
        mod = import_generated(ROOT / "generated" / f"{args.module}.py")
        dtype = runtime.TORCH_DTYPES[args.dtype or ("fp32" if "fp32" in mod.DTYPES else mod.DTYPES[0])]
        # the mask's parameters (the registry's check values), whole on every rank
        params = check_values(mod, batch=1, n_q=args.seq_len, n_k=args.seq_len, device=device)
        g = torch.Generator().manual_seed(0)  # the same full tensors on every rank
        full = [torch.randn(1, h, args.seq_len, d, generator=g).to(device, dtype)
                for h, d in ((mod.Q_HEADS, mod.HEAD_DIM), (mod.KV_HEADS, mod.HEAD_DIM), (mod.KV_HEADS, mod.V_HEAD_DIM))]
        q, k, v = (cp.shard(t, 2, args.layout).requires_grad_() for t in full)
        o = cp.context_parallel_attention(mod, q, k, v, mode=args.mode, layout=args.layout, **params)
        o.float().square().sum().backward()
        gathered = [cp.unshard(t, 2, args.layout) for t in (o, q.grad, k.grad, v.grad)]
        if dist.get_rank() == 0:
            ref = [t.clone().requires_grad_() for t in full]
            o1 = mod.attention(*ref, **params)
            o1.float().square().sum().backward()
            for name, a, b in zip(("o", "dq", "dk", "dv"), gathered, (o1, *(t.grad for t in ref))):
                err = (a.float() - b.float()).abs().max().item()
                print(f"{name}: max |context parallel - one process| = {err:.3g} (max |value| {b.float().abs().max().item():.3g})")
            print(f"{mod.NAME} {dtype} N={args.seq_len} over {dist.get_world_size()} ranks ({args.mode}, {args.layout}, "
                  f"{dist.get_backend()}, {runtime.backend()})")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
