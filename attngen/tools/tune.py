"""`attngen tune`: run each kernel's autotuning on this GPU so later processes reuse the winners."""

from __future__ import annotations

import sys

DEFAULT_LENGTHS = (1024, 4096, 8192, 16384)


def main(specs: list[str], *, spec_dir: str = "specs", out: str = "generated", lengths=DEFAULT_LENGTHS, batch: int = 1) -> int:
    import torch

    from attngen import runtime
    from attngen.codegen.build import build, spec_files
    from attngen.language.spec import SpecError
    from attngen.testing import default_params
    from attngen.tools.verify import import_generated

    try:
        built = build(specs or spec_files(spec_dir), out)
    except SpecError as e:
        print(e, file=sys.stderr)
        return 1
    for path, _ in built:
        mod = import_generated(path)
        if not hasattr(mod, "_SPACES"):  # an NSA module: its dense branches are tuned as modules of their own
            continue
        if runtime.INTERPRET:
            c = mod._SPACES["_fwd_kernel"][0]
            print(
                f"{mod.NAME}: kernels run in Triton's interpreter with one config "
                f"(block_m {c['block_m']}, block_n {c['block_n']}); nothing to tune without a GPU"
            )
            continue
        kernels = [k for k in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel") if hasattr(mod, k)]
        for dname in mod.DTYPES:
            dtype = runtime.TORCH_DTYPES[dname]
            for n in lengths:
                q = torch.randn(batch, mod.Q_HEADS, n, mod.HEAD_DIM, device="cuda", dtype=dtype)
                k = torch.randn(batch, mod.KV_HEADS, n, mod.HEAD_DIM, device="cuda", dtype=dtype)
                v = torch.randn(batch, mod.KV_HEADS, n, mod.V_HEAD_DIM, device="cuda", dtype=dtype)
                grad = hasattr(mod, "_backward")
                for t in (q, k, v):
                    t.requires_grad_(grad)
                o = mod.attention(q, k, v, **default_params(mod, batch=batch, n_q=n, n_k=n))
                if grad:
                    o.backward(torch.randn_like(o))
                torch.cuda.synchronize()
                chosen = []
                for name in kernels:
                    c = getattr(mod, name).best_config
                    grid = " persistent" if c.kwargs.get("PERSISTENT") else ""
                    chosen.append(f"{name} {c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}{grid}")
                print(f"{mod.NAME} {dname} N={n}: " + "; ".join(chosen))
    if not runtime.INTERPRET:
        print(f"winners saved in {runtime.cache_path()}")
    return 0
