"""`attngen report`: compile every kernel of a generated module ahead of time for GPU architectures
that need not be present, and say which autotune configs are usable there.

For each kernel the module launches, each config of its autotune space (kernels launched with fixed
tiles have one), each dtype and each architecture, Triton compiles the kernel down to a cubin for
that architecture; the report gives registers per thread and spill bytes (from ptxas -v), shared
memory per block (from Triton's metadata), whether tensor-core instructions were emitted (from the
PTX) and the compile time. A config is usable when it compiles, spills nothing and fits the
architecture's shared memory per block.

The signature each kernel is compiled with is taken from a recorded launch: the module's `_forward`
and `_backward` run on contiguous [1, H, N, D] CPU tensors (N = RECORD_LEN) with every kernel
replaced by a recorder, so the constexprs, argument types and Triton's launch-time specialisation
(integers equal to 1 become constants, 16-byte aligned pointers and multiples of 16 get divisibility
hints) match what the module would compile on a GPU for such inputs. An NSA module's kernels (block
selection and selected-block attention) live in the kernel library (attngen.kernels); they are
recorded the same way from the library's wrappers, nsa_topn.topn_select and
nsa_selected.selected_attention (forward and backward), called with the module's constants at
N = NSA_RECORD_LEN, and reported under the module's spec as `nsa_topn.<kernel>` and
`nsa_selected.<kernel>`. Its dense branch modules (<name>_cmp, <name>_win) are reported as modules
of their own.

Compilation runs in worker processes with TRITON_INTERPRET=0, since importing a generated module
on a machine without a GPU otherwise selects Triton's CPU interpreter (see attngen.runtime).
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable, Collection, Iterable

# Largest shared memory one block may use (the opt-in maximum), in bytes, per compute capability.
SMEM_LIMIT = {
    80: 166912,  # A100: 163 KB
    86: 101376,  # RTX 30xx, A40: 99 KB
    87: 166912,  # Jetson Orin
    89: 101376,  # RTX 40xx, L4, L40: 99 KB
    90: 232448,  # H100, H200: 227 KB
    100: 232448,  # B200: 227 KB
    120: 101376,  # RTX 50xx: 99 KB
}

RECORD_LEN = 1024
"""Sequence length of the recorded launch: a multiple of 16, as in most runs, so sequence lengths
carry Triton's divisibility hint as they would on a GPU."""

NSA_RECORD_LEN = 4096
"""Sequence length of an NSA module's recorded launch: its block selection sizes a tile by the number
of selection blocks (up to a chunk of them), which a long sequence fills as real runs do."""

# Triton's names of the element types a launch passes tensors of (the pointer type is "*" + name).
_TRITON_TYPES = {
    "float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64",
    "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8", "bool": "i1",
}

DEFAULT_TIMEOUT = 300.0
"""Seconds one compilation may take; some oversized tiles keep LLVM busy for many minutes."""

_PTXAS_STATS_FILE = "attngen-ptxas.json"  # kept beside Triton's cached kernel, for cache hits


def parse_arch(arch: str | int) -> int:
    """Compute capability from 'sm_90', 'sm90', 'sm_90a' or 90."""
    m = re.fullmatch(r"(?:sm_?)?(\d+)a?", str(arch).strip().lower())
    if not m or int(m.group(1)) not in SMEM_LIMIT:
        known = ", ".join(f"sm_{a}" for a in SMEM_LIMIT)
        raise ValueError(f"unknown GPU architecture {arch!r}; known: {known}")
    return int(m.group(1))


@dataclass
class Row:
    """One kernel compiled for one (dtype, architecture, config)."""

    spec: str
    module: str
    kernel: str
    dtype: str
    arch: int
    config: dict | None  # the module's _SPACES[kernel] entry; None for a kernel launched with fixed tiles
    label: str = ""  # the config as the table shows it
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    smem: int | None = None
    tensor_cores: str | None = None  # 'wgmma', 'mma', 'tcgen05' or 'none'
    compile_s: float = 0.0
    error: str | None = None

    @property
    def spills(self) -> int:
        return (self.spill_stores or 0) + (self.spill_loads or 0)

    @property
    def problems(self) -> list[str]:
        if self.error is not None:
            return ["error: " + self.error.splitlines()[0]]
        out = []
        if self.spills > 0:
            out.append("spills")
        if self.smem is not None and self.smem > SMEM_LIMIT[self.arch]:
            out.append("smem overflow")
        return out

    @property
    def usable(self) -> bool:
        return not self.problems

    @property
    def verdict(self) -> str:
        return ", ".join(self.problems) or "ok"

    def to_json(self) -> dict:
        return {**asdict(self), "spills": self.spills, "verdict": self.verdict, "usable": self.usable}


@dataclass(frozen=True)
class _Job:
    spec: str
    module: str
    kernel: str
    dtype: str
    arch: int
    index: int | None  # into the module's _SPACES[kernel]; None for a kernel launched with fixed tiles
    config: dict | None

    def row(self, **fields) -> Row:
        label = "fixed" if self.config is None else _space_label(self.config)
        return Row(self.spec, self.module, self.kernel, self.dtype, self.arch, self.config, label, **fields)


# ----------------------------------------------------------------------------- worker side


def _worker_init() -> None:
    # Before Triton or any generated module is imported in this process: compile, don't interpret;
    # autotune over the whole space (runtime.configs); have Triton print ptxas's -v log (registers,
    # spills) after each compilation.
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["ATTNGEN_CONFIGS"] = "all"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    import warnings

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION")


@dataclass
class _Launch:
    fn: object  # the JITFunction
    configs: list | None  # the autotuner's triton.Config list; None when launched directly
    values: dict  # parameter name -> value at the recorded launch
    options: dict  # launch options given at the call (num_warps, ...)


_MODULES: dict[str, object] = {}
_LAUNCHES: dict[tuple[str, str], dict[str, _Launch]] = {}


def _module(path: str):
    if path not in _MODULES:
        from .verify import import_generated

        _MODULES[path] = import_generated(path)
    return _MODULES[path]


def _jit_function(obj):
    from triton.runtime.jit import JITFunction

    while not isinstance(obj, JITFunction):  # autotuner / heuristics wrappers
        obj = obj.fn
    return obj


def _is_nsa(mod) -> bool:
    return hasattr(mod, "nsa_attention")


def _kernel_homes(mod) -> dict[str, object]:
    """The modules defining the kernels `mod` launches, by the prefix of their report names: a dense
    module's own kernels (no prefix); for an NSA module, the kernel library modules it calls."""
    if _is_nsa(mod):
        from .kernels import nsa_selected, nsa_topn

        return {"nsa_topn.": nsa_topn, "nsa_selected.": nsa_selected}
    return {"": mod}


def _record_launches(mod, dtype: str) -> dict[str, _Launch]:
    """Run the module's wrappers with each kernel replaced by a recorder (in the module that defines
    it); return the first launch of each kernel, in launch order."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    homes = _kernel_homes(mod)
    # report name -> (defining module, attribute, kernel)
    found = {
        prefix + n: (home, n, o)
        for prefix, home in homes.items()
        for n, o in vars(home).items()
        if isinstance(o, (Autotuner, JITFunction))
    }
    kernels = {name: o for name, (_, _, o) in found.items()}
    calls: dict[str, tuple] = {}

    class _Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.setdefault(self.name, (args, kwargs))

    try:
        for name, (home, attr, _) in found.items():
            setattr(home, attr, _Recorder(name))
        (_run_nsa if _is_nsa(mod) else _run_dense)(mod, dtype)
    finally:
        for home, attr, obj in found.values():
            setattr(home, attr, obj)

    launches = {}
    for name, (args, kwargs) in calls.items():
        obj = kernels[name]
        fn = _jit_function(obj)
        values = dict(zip(fn.arg_names, args))
        values.update({a: x for a, x in kwargs.items() if a in fn.arg_names})
        options = {a: x for a, x in kwargs.items() if a not in fn.arg_names}
        configs = list(obj.configs) if isinstance(obj, Autotuner) else None
        launches[name] = _Launch(fn, configs, values, options)
    return launches


def _qkv(mod, dtype: str, n: int):
    """Contiguous q, k, v [1, H, n, D] of the module's shapes (contents never read)."""
    import torch

    from .runtime import TORCH_DTYPES

    t = TORCH_DTYPES[dtype]
    q = torch.empty(1, mod.Q_HEADS, n, mod.HEAD_DIM, dtype=t)
    k = torch.empty(1, mod.KV_HEADS, n, mod.HEAD_DIM, dtype=t)
    v = torch.empty(1, mod.KV_HEADS, n, mod.V_HEAD_DIM, dtype=t)
    return q, k, v


def _run_dense(mod, dtype: str) -> None:
    """A dense module's forward and backward, as attention() calls them."""
    import torch

    from .testing import default_params

    n = RECORD_LEN
    q, k, v = _qkv(mod, dtype, n)
    scale = mod.HEAD_DIM**-0.5
    # parameters: scalars are never specialised on and tensors only by dtype: any representative value
    params = tuple(default_params(mod, batch=1, n_q=n, n_k=n, device="cpu").values())
    o, lse = mod._forward(q, k, v, scale, params)
    if hasattr(mod, "_backward"):
        mod._backward(q, k, v, o, lse, torch.empty_like(o), torch.zeros_like(lse), scale, params)


def _run_nsa(mod, dtype: str) -> None:
    """An NSA module's selection kernels, as nsa_attention calls them from the kernel library: the
    block selection with the module's parameters, then selected-block attention forward and backward
    over int64 index lists (valid ones: every position selects block 0)."""
    import torch

    from .kernels import nsa_selected, nsa_topn

    n = NSA_RECORD_LEN
    q, k, v = _qkv(mod, dtype, n)
    scale = mod.HEAD_DIM**-0.5
    n_cmp = max(0, (n - mod.BLOCK) // mod.STRIDE + 1)
    k_cmp = torch.zeros(1, mod.KV_HEADS, n_cmp, mod.HEAD_DIM, dtype=q.dtype)
    lse_cmp = torch.zeros(1, mod.Q_HEADS, n, dtype=torch.float32)
    # check=False: in a compiling process the checks demand CUDA tensors (the module's are CPU ones)
    nsa_topn.topn_select(
        q, k_cmp, lse_cmp, block=mod.BLOCK, stride=mod.STRIDE, select_block=mod.SELECT_BLOCK,
        top_n=mod.TOP_N, initial=mod.INITIAL, local=mod.LOCAL, score=mod.SCORE, per=mod.PER, scale=scale,
        check=False,
    )
    block_idx = torch.zeros(1, mod.KV_HEADS, n, mod.TOP_N, dtype=torch.int64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o, lse = nsa_selected.selected_attention(q, k, v, block_idx, mod.SELECT_BLOCK, scale)
    torch.autograd.backward((o, lse), (torch.empty_like(o), torch.zeros_like(lse)))


def _launches(path: str, dtype: str) -> dict[str, _Launch]:
    if (path, dtype) not in _LAUNCHES:
        _LAUNCHES[path, dtype] = _record_launches(_module(path), dtype)
    return _LAUNCHES[path, dtype]


def _describe(path: str) -> dict:
    """What to compile for one module: its dtypes, and each kernel with its configs."""
    try:
        mod = _module(path)
        launches = _launches(path, mod.DTYPES[0])
        kernels = []
        for name, launch in launches.items():
            space = list(getattr(mod, "_SPACES", {}).get(name, ())) if launch.configs is not None else []
            if launch.configs is None:
                kernels.append((name, [None]))
            elif len(launch.configs) != len(space):
                raise RuntimeError(
                    f"{name} autotunes over {len(launch.configs)} configs but _SPACES has {len(space)}"
                )
            else:
                kernels.append((name, space))
        return {"name": mod.NAME, "dtypes": list(mod.DTYPES), "kernels": kernels, "error": None}
    except Exception as e:  # noqa: BLE001 - reported as a row, the report goes on
        return {"name": Path(path).stem, "dtypes": [], "kernels": [], "error": _describe_error(e)}


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


def _run_ptxas(ptx: str, arch: int) -> str:
    """ptxas -v's log for PTX that Triton compiled earlier (a cache hit prints no log)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(src) + ".o"]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def _kernel_stats(compiled, log: str, arch: int) -> dict:
    """Registers and spills: from the log Triton printed, else from the note kept beside the cached
    kernel, else by running ptxas -v on its PTX again."""
    from triton.runtime.cache import get_cache_manager

    cache = get_cache_manager(compiled.hash)
    stats = _ptxas_stats(log)
    if stats is None:
        kept = cache.get_file(_PTXAS_STATS_FILE)
        if kept:
            return json.loads(Path(kept).read_text())
        stats = _ptxas_stats(_run_ptxas(compiled.asm["ptx"], arch))
        if stats is None:
            raise RuntimeError("ptxas -v printed no register count")
    cache.put(json.dumps(stats), _PTXAS_STATS_FILE, binary=False)
    return stats


def tensor_core_kind(ptx: str) -> str:
    """The tensor-core instruction family in PTX: 'tcgen05', 'wgmma', 'mma' or 'none'."""
    for kind, pattern in (("tcgen05", r"\btcgen05\.mma"), ("wgmma", r"\bwgmma\.mma_async"), ("mma", r"\bmma\.sync")):
        if re.search(pattern, ptx):
            return kind
    return "none"


def _space_label(entry: dict) -> str:
    return f"BM{entry['block_m']} BN{entry['block_n']} w{entry['num_warps']} s{entry['num_stages']}"


def _describe_error(e: BaseException) -> str:
    """A one-line cause first (the innermost exception), then the full text."""
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    text = str(root).strip()
    first = text.splitlines()[0] if text else ""
    ptxas = re.search(r"^ptxas[^\n]*error[^\n]*", text, re.MULTILINE | re.IGNORECASE)
    if ptxas:
        first = ptxas.group(0)
    elif getattr(root, "error_message", None):  # Triton's CompilationError: the cause, not "at L:C:"
        cause = root.error_message.strip().splitlines()[0].split(". ")[0]
        first = f"{cause} (line {getattr(root.node, 'lineno', '?')})"
    head = f"{type(root).__name__}: {first}".rstrip(": ")
    if len(head) > 160:
        head = head[:157] + "..."
    full = str(e) if root is e else f"{e}\n{text}"
    return f"{head}\n{full[:4000]}"


def _run_job(job: _Job) -> Row:
    row = job.row()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        launch = _launches(job.module, job.dtype)[job.kernel]
        values, options = dict(launch.values), dict(launch.options)
        if job.index is not None:
            config = launch.configs[job.index]  # the triton.Config the autotuner builds from _SPACES[kernel]
            values.update(config.kwargs)
            options.update(num_warps=config.num_warps, num_stages=config.num_stages)
        sig, consts, attrs = _signature(launch.fn, values)
        src = ASTSource(fn=launch.fn, signature=sig, constexprs=consts, attrs=attrs)
        log = io.StringIO()
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(log):  # ptxas's log, and Triton's dumps on failure
                compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=options)
        finally:
            row.compile_s = time.perf_counter() - t0
        md = compiled.metadata
        if job.config is None:
            row.label = f"fixed w{md.num_warps} s{md.num_stages}"
        row.smem = int(md.shared)
        row.tensor_cores = tensor_core_kind(compiled.asm["ptx"])
        stats = _kernel_stats(compiled, log.getvalue(), job.arch)
        row.regs, row.spill_stores, row.spill_loads = stats["regs"], stats["spill_stores"], stats["spill_loads"]
    except Exception as e:  # noqa: BLE001 - a failed compile is a row of the report
        row.error = _describe_error(e)
    return row


# ----------------------------------------------------------------------------- driver side


ConfigFilter = Callable[[dict], bool]


def _selected(space: list, configs: str | ConfigFilter) -> list[int | None]:
    if space == [None]:
        return [None]
    if configs == "all":
        return list(range(len(space)))
    if configs == "first":
        return [0] if space else []
    if callable(configs):
        return [i for i, c in enumerate(space) if configs(c)]
    raise ValueError(f"configs must be 'first', 'all' or a predicate, got {configs!r}")


def _worker_main(conn) -> None:
    """Serve (function, argument) calls from the driver until it sends None or goes away."""
    os.setpgid(0, 0)  # its own process group, so a timed-out compile is killed with its ptxas
    _worker_init()
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        fn, arg = task
        conn.send(fn(arg))


class _Worker:
    def __init__(self):
        # spawn, not fork: the worker imports Triton and the modules afresh, with TRITON_INTERPRET=0
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child,), daemon=True)
        self.proc.start()
        child.close()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # not yet in its own group, or gone
            self.proc.kill()
        self.proc.join()

    def close(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.kill()


class _Pool:
    """Worker processes that compute fn(arg) calls, each under a time limit."""

    def __init__(self, jobs: int, timeout: float):
        self.jobs, self.timeout = max(1, jobs), timeout
        self.idle: list[_Worker] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for w in self.idle:
            w.close()
        self.idle = []

    def map(self, fn, args: list, failed, progress=None) -> list:
        """[fn(a) for a in args]. A call that runs past the time limit, or whose worker dies,
        yields failed(a, reason) instead, and its worker is replaced."""
        results: list = [None] * len(args)
        pending = deque(range(len(args)))
        while len(self.idle) < min(self.jobs, len(args)):
            self.idle.append(_Worker())
        busy: dict = {}  # connection -> (worker, index, start time)
        done = 0
        try:
            while pending or busy:
                while self.idle and pending:
                    w, i = self.idle.pop(), pending.popleft()
                    w.conn.send((fn, args[i]))
                    busy[w.conn] = (w, i, time.monotonic())
                deadline = min(t for _, _, t in busy.values()) + self.timeout
                finished = 0
                for conn in wait(list(busy), timeout=max(0.0, deadline - time.monotonic())):
                    w, i, _ = busy.pop(conn)
                    try:
                        results[i] = conn.recv()
                        self.idle.append(w)
                    except EOFError:
                        w.kill()
                        results[i] = failed(args[i], f"worker process died (exit code {w.proc.exitcode})")
                        self.idle.append(_Worker())
                    finished += 1
                now = time.monotonic()
                for conn, (w, i, t) in list(busy.items()):
                    if now - t > self.timeout:
                        del busy[conn]
                        w.kill()
                        results[i] = failed(args[i], f"ran past the {self.timeout:g} s time limit")
                        self.idle.append(_Worker())
                        finished += 1
                done += finished
                if progress and finished:
                    progress(done, len(args))
        finally:
            for w, _, _ in busy.values():  # interrupted: nothing may outlive the report
                w.kill()
        return results


def _timed_out_job(job: _Job, reason: str) -> Row:
    return job.row(error=f"TimeoutError: {reason}")


def _failed_describe(path: str, reason: str) -> dict:
    return {"name": Path(path).stem, "dtypes": [], "kernels": [], "error": f"RuntimeError: {reason}"}


def _jobs_for(path: str, described: dict, archs: list[int], configs, dtypes, kernels) -> list[_Job]:
    jobs = []
    if dtypes == "first":
        dtypes = described["dtypes"][:1]
    for kernel, space in described["kernels"]:
        for dtype in described["dtypes"]:
            if (kernels is None or kernel in kernels) and (dtypes is None or dtype in dtypes):
                for arch in archs:
                    for i in _selected(space, configs):
                        config = None if i is None else dict(space[i])
                        jobs.append(_Job(described["name"], path, kernel, dtype, arch, i, config))
    return jobs


def run_report(
    modules: Iterable[str | Path],
    archs: Iterable[str | int],
    *,
    configs: str | ConfigFilter = "all",
    dtypes: Collection[str] | str | None = None,
    kernels: Collection[str] | None = None,
    jobs: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: Callable[[int, int], None] | None = None,
) -> list[Row]:
    """Compile every selected (kernel, dtype, arch, config) of the generated modules; one Row each.

    configs: 'all', 'first' (the first, smallest, config of the space) or a predicate over the
    module's _SPACES entries. dtypes and kernels restrict the report when given; dtypes='first'
    keeps each module's first dtype (its DTYPES order, the spec's). jobs: worker
    processes (default: one per CPU); timeout: seconds one compilation may take before its row
    becomes an error. Workers are started with multiprocessing's spawn method, so a script calling
    this needs the usual `if __name__ == "__main__":` guard.
    """
    arch_list = [parse_arch(a) for a in archs]
    paths = [str(Path(m).resolve()) for m in modules]
    rows: list[Row] = []
    tasks: list[_Job] = []
    with _Pool(jobs or os.cpu_count() or 1, timeout) as pool:
        for path, d in zip(paths, pool.map(_describe, paths, _failed_describe)):
            if d["error"]:
                rows += [Row(d["name"], path, "*", "*", a, None, "-", error=d["error"]) for a in arch_list]
            else:
                tasks += _jobs_for(path, d, arch_list, configs, dtypes, kernels)
        rows += pool.map(_run_job, tasks, _timed_out_job, progress)
    return rows


def unusable(rows: list[Row]) -> list[tuple[str, str, str, int]]:
    """(spec, kernel, dtype, arch) groups in which no reported config is usable."""
    groups: dict[tuple, bool] = {}
    for r in rows:
        key = (r.spec, r.kernel, r.dtype, r.arch)
        groups[key] = groups.get(key, False) or r.usable
    return [k for k, ok in groups.items() if not ok]


def usable_configs(
    source: str | Path, kernel: str, dtype: str, arch: str | int, *, jobs: int = 1, timeout: float = DEFAULT_TIMEOUT
) -> list[dict]:
    """The _SPACES[kernel] entries with which `kernel` compiles for `arch` at `dtype` without spilling or
    overflowing shared memory. `source` is a generated module (.py) or a spec (.yaml), which is
    built into a temporary directory first. A kernel launched with fixed tiles yields [{}] when
    usable."""
    source = Path(source)
    with contextlib.ExitStack() as stack:
        if source.suffix in (".yaml", ".yml"):
            from .build import build

            out = stack.enter_context(tempfile.TemporaryDirectory(prefix="attngen-report-"))
            source = build([source], out)[0][0]
        rows = run_report([source], [arch], dtypes=[dtype], kernels=[kernel], jobs=jobs, timeout=timeout)
    if not rows:
        raise ValueError(f"{source}: no kernel {kernel!r} with dtype {dtype!r}")
    return [dict(r.config or {}) for r in rows if r.usable]


def format_table(rows: list[Row]) -> str:
    header = ("spec", "kernel", "dtype", "arch", "config", "regs", "spills", "smem", "tensor cores", "compile", "verdict")

    def dash(x):
        return "-" if x is None else str(x)

    body = [
        (r.spec, r.kernel, r.dtype, f"sm_{r.arch}", r.label, dash(r.regs), dash(None if r.regs is None else r.spills),
         dash(r.smem), dash(r.tensor_cores), f"{r.compile_s:.1f}s", r.verdict)
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    lines = [header, tuple("-" * w for w in widths), *body]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def main(
    specs: list[str],
    *,
    spec_dir: str = "specs",
    out: str = "generated",
    archs: str = "sm_80,sm_90",
    configs: str = "all",
    dtypes: str = "all",
    json_path: str | None = None,
    jobs: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> int:
    from .build import build, spec_files
    from .spec import DTYPES, SpecError

    try:
        arch_list = [parse_arch(a) for a in archs.split(",") if a.strip()]
    except ValueError as e:
        print(f"attngen report: {e}", file=sys.stderr)
        return 2
    dtype_choice = None if dtypes == "all" else dtypes if dtypes == "first" else [d.strip() for d in dtypes.split(",")]
    if isinstance(dtype_choice, list) and not set(dtype_choice) <= set(DTYPES):
        print(f"attngen report: --dtypes {dtypes!r}: expected all, first or a list of {', '.join(DTYPES)}", file=sys.stderr)
        return 2
    given = [Path(s) for s in specs] or spec_files(spec_dir)
    if not given:
        print(f"attngen report: no specs given and none in {spec_dir}/", file=sys.stderr)
        return 2
    modules = [p for p in given if p.suffix == ".py"]  # generated modules are reported as they are
    try:
        modules += [path for path, _ in build([p for p in given if p.suffix != ".py"], out)]
    except SpecError as e:
        print(e, file=sys.stderr)
        return 1

    def progress(done, total):
        if sys.stderr.isatty():
            print(f"\rcompiled {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    rows = run_report(
        modules, arch_list, configs=configs, dtypes=dtype_choice, jobs=jobs, timeout=timeout, progress=progress
    )
    print(format_table(rows))
    limits = ", ".join(f"sm_{a} {SMEM_LIMIT[a]} B" for a in arch_list)
    print(f"spills = ptxas spill stores + loads in bytes; smem = shared memory per block (limit: {limits});")
    print("compile = wall time of triton.compile, near 0 when Triton's cache already holds the kernel")
    if json_path:
        Path(json_path).write_text(json.dumps([r.to_json() for r in rows], indent=1) + "\n", encoding="utf-8")
    bad = unusable(rows)
    for spec, kernel, dtype, arch in bad:
        print(f"attngen report: {spec} {kernel} {dtype} sm_{arch}: no usable config", file=sys.stderr)
    return 1 if bad else 0
