"""Driver side: which jobs to compile, running them, and the table and command around the rows."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Collection, Iterable

from attngen.tools.report import sass
from attngen.tools.report.compile import run_job
from attngen.tools.report.pool import Pool
from attngen.tools.report.record import VARLEN_SUFFIX, describe
from attngen.tools.report.rows import DEFAULT_TIMEOUT, SMEM_LIMIT, Job, Row, parse_arch


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


def _timed_out_job(job: Job, reason: str) -> Row:
    return job.row(error=f"TimeoutError: {reason}")


def _failed_describe(path: str, reason: str) -> dict:
    return {"name": Path(path).stem, "dtypes": [], "kernels": [], "error": f"RuntimeError: {reason}"}


def _jobs_for(path: str, described: dict, archs: list[int], configs, dtypes, kernels) -> list[Job]:
    jobs = []
    if dtypes == "first":
        dtypes = described["dtypes"][:1]
    for kernel, space in described["kernels"]:
        for dtype in described["dtypes"]:
            if (kernels is None or kernel in kernels) and (dtypes is None or dtype in dtypes):
                for arch in archs:
                    for i in _selected(space, configs):
                        if i is not None and kernel.endswith(VARLEN_SUFFIX) and space[i].get("persistent"):
                            continue  # packed sequences ignore the grid choice: its non-persistent twin's code
                        config = None if i is None else dict(space[i])
                        jobs.append(Job(described["name"], path, kernel, dtype, arch, i, config))
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
    tasks: list[Job] = []
    with Pool(jobs or os.cpu_count() or 1, timeout) as pool:
        for path, d in zip(paths, pool.map(describe, paths, _failed_describe)):
            if d["error"]:
                rows += [Row(d["name"], path, "*", "*", a, None, "-", error=d["error"]) for a in arch_list]
            else:
                tasks += _jobs_for(path, d, arch_list, configs, dtypes, kernels)
        rows += pool.map(run_job, tasks, _timed_out_job, progress)
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
            from attngen.codegen.build import build

            out = stack.enter_context(tempfile.TemporaryDirectory(prefix="attngen-report-"))
            source = build([source], out)[0][0]
        rows = run_report([source], [arch], dtypes=[dtype], kernels=[kernel], jobs=jobs, timeout=timeout)
    if not rows:
        raise ValueError(f"{source}: no kernel {kernel!r} with dtype {dtype!r}")
    return [dict(r.config or {}) for r in rows if r.usable]


def format_table(rows: list[Row]) -> str:
    header = ("spec", "kernel", "dtype", "arch", "config", "regs", "spills", "smem", "tensor cores",
              "loop products (S | acc)", "loop loads", "STL/LDL", "compile", "verdict")

    def dash(x):
        return "-" if x is None else str(x)

    def facts(r, describe):
        return "-" if r.sass is None else describe(r.sass)

    body = [
        (r.spec, r.kernel, r.dtype, f"sm_{r.arch}", r.label, dash(r.regs), dash(None if r.regs is None else r.spills),
         dash(r.smem), dash(r.tensor_cores), facts(r, sass.describe_products), facts(r, sass.describe_loads),
         facts(r, sass.describe_local), f"{r.compile_s:.1f}s", r.verdict)
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
    from attngen.codegen.build import build, spec_files
    from attngen.language.spec import DTYPES, SpecError

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
    print("tensor cores = the PTX's family; from the SASS: loop products = tensor-core instructions in the main")
    print("loops (those with one), computing from zero (S: Q K^T, dO V^T) | adding to a carried accumulator")
    print("(P V, dS K, P^T dO, dS^T Q), as opcode [M x N x K] x count; loop loads = TMA (UTMALDG) and plain")
    print("global loads (LDG, LDGSTS) there; STL/LDL = local-memory stores / loads in the kernel;")
    print("compile = wall time of triton.compile, near 0 when Triton's cache already holds the kernel")
    if json_path:
        Path(json_path).write_text(json.dumps([r.to_json() for r in rows], indent=1) + "\n", encoding="utf-8")
    bad = unusable(rows)
    for spec, kernel, dtype, arch in bad:
        print(f"attngen report: {spec} {kernel} {dtype} sm_{arch}: no usable config", file=sys.stderr)
    return 1 if bad else 0
