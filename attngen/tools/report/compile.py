"""Worker side, second step: compile one recorded kernel launch for a GPU architecture ahead of
time and read registers, spills (ptxas -v), shared memory, tensor-core use (PTX) and the facts of
its SASS (sass.py) off the result."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
import time
from pathlib import Path

from attngen.tools.report import sass
from attngen.tools.report.record import describe_error, recorded_launches
from attngen.tools.report.rows import Job, Row


_TRITON_TYPES = {
    "float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64",
    "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8", "bool": "i1",
}


_PTXAS_STATS_FILE = "attngen-ptxas.json"  # kept beside Triton's cached kernel, for cache hits


def _signature(fn, values: dict) -> tuple[dict, dict, dict]:
    """ASTSource's signature, constexprs and attrs for these argument values, specialised as
    Triton specialises a launch."""
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.name not in values:
            raise TypeError(f"no value for parameter {p.name} in the recorded launch")
        x = values[p.name]
        specialize = not getattr(p, "do_not_specialize", False)
        align = specialize and not getattr(p, "do_not_specialize_on_alignment", False)
        if p.is_constexpr or x is None:
            sig[p.name], consts[(i,)] = "constexpr", x
            continue
        if hasattr(x, "data_ptr"):
            name = str(x.dtype).removeprefix("torch.")
            if name not in _TRITON_TYPES:
                raise TypeError(f"parameter {p.name}: cannot type a tensor of dtype {x.dtype}")
            sig[p.name] = "*" + _TRITON_TYPES[name]
            aligned = x.data_ptr() % 16 == 0
        elif isinstance(x, bool):
            sig[p.name], aligned = "u1", False
        elif isinstance(x, int):
            if x == 1 and specialize:
                sig[p.name], consts[(i,)] = "constexpr", 1
                continue
            sig[p.name] = "i32" if -(2**31) <= x < 2**31 else "i64"
            aligned = x % 16 == 0
        elif isinstance(x, float):
            sig[p.name], aligned = "fp32", False
        else:
            raise TypeError(f"parameter {p.name}: cannot type a launch argument of type {type(x).__name__}")
        if aligned and align:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _ptxas_stats(text: str) -> dict | None:
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not regs:
        return None
    stores, loads = (int(spills.group(1)), int(spills.group(2))) if spills else (0, 0)
    return {"regs": int(regs.group(1)), "spill_stores": stores, "spill_loads": loads}


def _fresh_log(compile_fn) -> str:
    """Triton's ptxas log of a kernel its cache already held (a cache hit prints no log): the same
    compile again into a private, empty cache, so Triton runs ptxas itself with its own options
    (running ptxas -v by hand on the PTX misses some, e.g. Triton 3.9's --regAllocOptLevel=2, and
    reported fewer spills than the kernel has)."""
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as d:
        old = os.environ.get("TRITON_CACHE_DIR")
        os.environ["TRITON_CACHE_DIR"] = d
        try:
            with contextlib.redirect_stdout(log):
                compile_fn()
        finally:
            if old is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = old
    return log.getvalue()


def _kernel_stats(compiled, log: str, compile_fn) -> dict:
    """Registers and spills: from the log Triton printed, else from the note kept beside the cached
    kernel, else from the log of the same compile into an empty cache."""
    from triton.runtime.cache import get_cache_manager

    cache = get_cache_manager(compiled.hash)
    stats = _ptxas_stats(log)
    if stats is None:
        kept = cache.get_file(_PTXAS_STATS_FILE)
        if kept:
            return json.loads(Path(kept).read_text())
        stats = _ptxas_stats(_fresh_log(compile_fn))
        if stats is None:
            raise RuntimeError("ptxas printed no register count (is TRITON_DUMP_PTXAS_LOG set?)")
    cache.put(json.dumps(stats), _PTXAS_STATS_FILE, binary=False)
    return stats


def tensor_core_kind(ptx: str) -> str:
    """The tensor-core instruction family in PTX: 'tcgen05', 'wgmma', 'mma' or 'none'."""
    for kind, pattern in (("tcgen05", r"\btcgen05\.mma"), ("wgmma", r"\bwgmma\.mma_async"), ("mma", r"\bmma\.sync")):
        if re.search(pattern, ptx):
            return kind
    return "none"


def _target_values(values: dict, arch: int) -> dict:
    """The launch's values as a run on `arch` would pass them: the recorded launch ran on the CPU, so a
    kernel's USE_TMA (runtime.use_tma) is set here as a GPU of that architecture would choose it."""
    if "USE_TMA" in values:
        from attngen import runtime

        tensors = [values[n] for n in ("Q", "K", "V", "DO") if hasattr(values.get(n), "data_ptr")]
        values = {**values, "USE_TMA": runtime.tma_arch(arch) and all(map(runtime.tma_layout_ok, tensors))}
    return values


def run_job(job: Job) -> Row:
    row = job.row()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        launch = recorded_launches(job.module, job.dtype)[job.kernel]
        values, options = dict(launch.values), dict(launch.options)
        if job.index is not None:
            config = launch.configs[job.index]  # the triton.Config the autotuner builds from _SPACES[kernel]
            values.update(config.kwargs)
            options.update(num_warps=config.num_warps, num_stages=config.num_stages)
        options.update(job.options)
        values = _target_values(values, job.arch)
        sig, consts, attrs = _signature(launch.fn, values)
        src = ASTSource(fn=launch.fn, signature=sig, constexprs=consts, attrs=attrs)
        log = io.StringIO()
        t0 = time.perf_counter()

        def compile_fn():
            return triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=options)

        try:
            with contextlib.redirect_stdout(log):  # ptxas's log, and Triton's dumps on failure
                compiled = compile_fn()
        finally:
            row.compile_s = time.perf_counter() - t0
        md = compiled.metadata
        if job.config is None:
            row.label = f"fixed w{md.num_warps} s{md.num_stages}"
        row.smem = int(md.shared)
        row.tensor_cores = tensor_core_kind(compiled.asm["ptx"])
        stats = _kernel_stats(compiled, log.getvalue(), compile_fn)
        row.regs, row.spill_stores, row.spill_loads = stats["regs"], stats["spill_stores"], stats["spill_loads"]
        row.sass = sass.facts(sass.disassemble(compiled.asm["cubin"])).to_json()
    except Exception as e:  # noqa: BLE001 - a failed compile is a row of the report
        row.error = describe_error(e)
    return row
