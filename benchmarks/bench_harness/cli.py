"""The command line: options, sections and the run's metadata."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from . import BENCH_SCRIPT, ROOT
from .compile_probe import probe_main, run_compile
from .counts import FLOP_RULE
from .impls import OPTIONAL_MODULES, optional_available
from .measure import run_tiles, run_timing
from .output import COLUMNS, Report, device_name
from .plots import write_plots
from .specs import NSA_NOTE, load_modules


DEFAULT_LENGTHS = "512,1k,2k,4k,8k,16k,32k,64k"
QUICK_LENGTHS = "512,2k"


EPILOG = (
    "FLOP convention: " + FLOP_RULE + ". Only unmasked pairs count, so causal and full attention "
    "are compared on the work they must do.\n\nCSV columns (bench.csv, one row per measurement; "
    "meta.json holds the same documentation and the run's metadata):\n"
    + "\n".join(f"  {k:17s} {v}" for k, v in COLUMNS.items())
)


def parse_lengths(text: str) -> list[int]:
    """'512,1k,64k' -> [512, 1024, 65536]."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1024 if part.endswith("k") else 1
        value = int(float(part[:-1]) * mult) if mult > 1 else int(part)
        if value < 1:
            raise argparse.ArgumentTypeError(f"--lengths: {part!r} is not a positive length")
        out.append(value)
    if not out:
        raise argparse.ArgumentTypeError("--lengths: no length given")
    return out


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/bench.py",
        description="Benchmark attngen modules against torch SDPA (flash backend), FlexAttention and, "
        "when installed, flash_attn and fla NSA. With CUDA: forward, backward and forward+backward "
        "time, TFLOP/s and peak memory. Without CUDA: tile work efficiency, and spec-to-module time "
        "next to FlexAttention's first-call compile time.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--specs", nargs="*", default=None, help="spec files (default: every spec in specs/)")
    p.add_argument("--lengths", default=None, help=f"sequence lengths, k = 1024 (default {DEFAULT_LENGTHS}; "
                   f"--quick: {QUICK_LENGTHS})")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="input dtype (default bf16)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out"), help="output directory (default benchmarks/out/)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA when available; cpu: hide CUDA and report the CPU sections")
    p.add_argument("--sections", default=None,
                   help="comma list of tiles, compile, timing (default: tiles,compile without CUDA; "
                        "tiles,timing,compile with CUDA)")
    p.add_argument("--tokens", type=int, default=16384, help="batch = max(1, tokens // N) unless --batch (default 16384)")
    p.add_argument("--batch", type=int, default=None, help="fixed batch size")
    p.add_argument("--warmup", type=int, default=3, help="warmup calls before timing (default 3)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls at most (default 20; fewer when a "
                   "call is slow, see --seconds-per-measure)")
    p.add_argument("--seconds-per-measure", type=float, default=2.0, help="time to spend on the repeats of one "
                   "measurement, at least 3 repeats (default 2)")
    p.add_argument("--impls", default="attngen,attngen_causal,sdpa_flash,flex,flash_attn,fla_nsa",
                   help="implementations to time (default: all). For a spec with an expression mask or a "
                   "score_mod, sdpa_flash times the dense baseline (sdpa_flash_causal or sdpa_flash_dense) and "
                   "attngen_causal the spec rebuilt with mask causal; flash_attn and fla_nsa are not timed")
    p.add_argument("--max-configs", type=int, default=0, help="autotune attngen over at most this many configs "
                   "of its space, spread evenly, largest included (default 0: all); recorded in the note")
    p.add_argument("--probe-n", type=int, default=256, help="sequence length of the compile probes (default 256)")
    p.add_argument("--probe-timeout", type=float, default=300.0, help="seconds before a compile probe is abandoned")
    p.add_argument("--budget", type=float, default=0.0, help="stop starting measurements after this many seconds "
                   "(0: no limit); the rest are recorded as skipped")
    p.add_argument("--quick", action="store_true", help="tiny run: lengths 512 and 2k, one spec's compile probe, "
                   "no FlexAttention compile on the CPU, 1 warmup and 3 repeats")
    p.add_argument("--no-plots", action="store_true", help="write the CSV only")
    p.add_argument("--probe", choices=("attngen", "flex"), help=argparse.SUPPRESS)
    # exercises the timing code on CPU tensors (kernels interpreted, numbers meaningless): for
    # checking the harness itself on a machine without a GPU
    p.add_argument("--timing-on-cpu", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--probe-spec", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported
    if args.probe:
        return probe_main(args)
    t_start = time.perf_counter()
    import torch

    import attngen.runtime  # noqa: F401  (picks the interpreter without CUDA, before triton kernels exist)
    import triton

    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        print("bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.quick:
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 3)
    lengths = parse_lengths(args.lengths or (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS))
    sections = [s.strip() for s in (args.sections or ("tiles,timing,compile" if cuda else "tiles,compile")).split(",") if s.strip()]
    bad = set(sections) - {"tiles", "compile", "timing"}
    if bad:
        print(f"bench: unknown sections {sorted(bad)}", file=sys.stderr)
        return 2
    if "timing" in sections and not cuda and not args.timing_on_cpu:
        print("bench: no CUDA device: the timing section is skipped (interpreter timings mean nothing)")
        sections.remove("timing")

    from attngen.codegen.build import spec_files

    spec_paths = [Path(p) for p in (args.specs or spec_files(ROOT / "specs"))]
    from attngen.language.spec import load_spec

    skipped = [p for p in spec_paths if load_spec(p).sparse]
    if skipped:
        print(f"bench: skipping {', '.join(p.stem for p in skipped)}: {NSA_NOTE}")
    spec_paths = [p for p in spec_paths if p not in skipped]
    out = Path(args.out)
    meta = {
        "device": device_name(cuda),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": shlex.join([sys.executable, *sys.argv] if argv is None else [sys.executable, str(BENCH_SCRIPT), *argv]),
        "dtype": args.dtype,
        "backend": "cuda" if cuda else "triton-interpreter (CPU)",
        "sections": sections,
        "lengths": lengths,
        "specs": [str(p) for p in spec_paths],
        "flop_rule": FLOP_RULE,
        "columns": COLUMNS,
        "optional": {},
        "notes": [NSA_NOTE] if skipped else [],
    }
    report = Report(out, meta)
    try:
        for name, module in OPTIONAL_MODULES.items():
            ok, err = optional_available(module)
            meta["optional"][name] = "installed" if ok else "not installed"
            report.add(section="env", impl=name, status="ok" if ok else "not installed",
                       note="" if ok else f"{module}: {err}")
        infos = load_modules(spec_paths, out)
        deadline = t_start + args.budget if args.budget > 0 else float("inf")
        if "tiles" in sections:
            run_tiles(report, infos, lengths, "cuda" if cuda else "cpu")
        for section in sections:
            if section == "timing":
                run_timing(report, args, infos, lengths, deadline, cuda)
            elif section == "compile":
                run_compile(report, args, infos, cuda, deadline)
    finally:
        report.close()
        plots = [] if args.no_plots else write_plots(report, out)
        if plots is None:
            plots = []
            meta["notes"].append("matplotlib not importable: CSV only, no plots")
            print("bench: matplotlib not importable: wrote the CSV only, no plots")
        meta["plots"] = plots
        meta["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"bench: {len(report.rows)} rows -> {out / 'bench.csv'}; meta -> {out / 'meta.json'}"
          + (f"; plots: {', '.join(plots)}" if plots else "") + f"; {meta['elapsed_s']} s")
    return 0
