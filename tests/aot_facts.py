"""Test-only: compile one kernel config of a generated module ahead of time (the report's recording
path, for a GPU architecture this machine need not have) and print, as JSON, what the compiled code
says about it: registers and spills (Triton's own ptxas log, from a fresh Triton cache), shared
memory, the tensor-core and TMA instructions of the PTX and the SASS, and the loads inside each
main loop of the TTGIR.

    python tests/aot_facts.py MODULE.py KERNEL DTYPE BM,BN,WARPS,STAGES[,PERSISTENT] [--arch 90]

Runs in a process of its own: the compiling process must not have selected Triton's interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def _sass(cubin: bytes) -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout


def _loops(ttgir: str) -> list[str]:
    """The text of each scf.for body (by indentation) of the TTGIR."""
    lines, bodies = ttgir.splitlines(), []
    for i, line in enumerate(lines):
        if " scf.for " in line:
            indent = len(line) - len(line.lstrip())
            body = []
            for inner in lines[i + 1:]:
                if len(inner) - len(inner.lstrip()) <= indent:
                    break
                body.append(inner)
            bodies.append("\n".join(body))
    return bodies


def facts(path: str, kernel: str, dtype: str, config: tuple[int, int, int, int], arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from attngen.tools.report.compile import _ptxas_stats, _signature, _target_values
    from attngen.tools.report.record import recorded_launches

    launch = recorded_launches(str(Path(path).resolve()), dtype)[kernel]
    bm, bn, warps, stages, *persistent = config
    chosen = {"BLOCK_M": bm, "BLOCK_N": bn}
    if "PERSISTENT" in launch.fn.arg_names:  # a masked spec's forward: the grid is a config choice too
        chosen["PERSISTENT"] = bool(persistent and persistent[0])
    values = _target_values({**launch.values, **chosen}, arch)
    options = {**launch.options, "num_warps": warps, "num_stages": stages}
    sig, consts, attrs = _signature(launch.fn, values)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(
            ASTSource(fn=launch.fn, signature=sig, constexprs=consts, attrs=attrs),
            target=GPUTarget("cuda", arch, 32), options=options,
        )
    ptx, ttgir, sass = compiled.asm["ptx"], compiled.asm["ttgir"], _sass(compiled.asm["cubin"])
    stats = _ptxas_stats(log.getvalue())
    wgmma = re.findall(r"wgmma\.mma_async[^;]*;", ptx, re.S)
    # the A operand of a wgmma is a register list {..} (from registers) or a shared-memory descriptor
    from_regs = [w for w in wgmma if re.match(r"wgmma\.mma_async[^{]*\{[^}]*\}\s*,\s*\{", w)]
    count = lambda pattern, text: len(re.findall(pattern, text))  # noqa: E731
    return {
        "triton": triton.__version__,
        "use_tma": bool(values.get("USE_TMA")),
        "persistent": bool(values.get("PERSISTENT")),
        "regs": stats["regs"],
        "spills": stats["spill_stores"] + stats["spill_loads"],
        "smem": int(compiled.metadata.shared),
        "wgmma": len(wgmma),
        "wgmma_a_from_registers": len(from_regs),
        "wgmma_a_from_shared": len(wgmma) - len(from_regs),
        "ptx_tma_loads": count(r"cp\.async\.bulk\.tensor\.\dd\.shared::\w+\.global", ptx),
        "ptx_cp_async": count(r"cp\.async\.c[ag]\.", ptx),
        "sass_HGMMA": count(r"\bHGMMA\b", sass),
        "sass_UTMALDG": count(r"\bUTMALDG\b", sass),
        "sass_LDG": count(r"\bLDG\.", sass),
        "sass_LDGSTS": count(r"\bLDGSTS\b", sass),
        "loops": [
            {"tma_loads": count(r"async_tma_copy_global_to_local", b), "loads": count(r"\btt\.load\b", b),
             "async_copies": count(r"\bttg\.async_copy_global_to_local\b", b),
             "wgmma": count(r"warp_group_dot ", b)}
            for b in _loops(ttgir)
        ],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("module")
    ap.add_argument("kernel")
    ap.add_argument("dtype")
    ap.add_argument("config", help="BM,BN,WARPS,STAGES[,PERSISTENT (0 or 1)]")
    ap.add_argument("--arch", type=int, default=90)
    a = ap.parse_args(argv)
    from attngen.tools.report.record import worker_init

    worker_init()
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="attngen-aot-facts-")  # a cold compile: ptxas's log
    config = tuple(int(x) for x in a.config.split(","))
    print(json.dumps(facts(a.module, a.kernel, a.dtype, config, a.arch)))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
