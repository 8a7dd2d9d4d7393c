"""attngen command line: build, check, verify, report, tune, show."""

from __future__ import annotations

import argparse
import sys

from attngen import __version__


def _cmd_build(args) -> int:
    from attngen.codegen.build import build, spec_files
    from attngen.language.spec import SpecError

    paths = args.specs or spec_files(args.spec_dir)
    if not paths:
        print(f"attngen build: no specs given and none in {args.spec_dir}/", file=sys.stderr)
        return 2
    try:
        results = build(paths, args.out)
    except SpecError as e:
        print(e, file=sys.stderr)
        print("attngen build: nothing written", file=sys.stderr)
        return 1
    for path, changed in results:
        print(f"{'wrote    ' if changed else 'unchanged'} {path}")
    return 0


def _cmd_check(args) -> int:
    from attngen.codegen.build import check
    from attngen.language.spec import SpecError

    try:
        problems = check(args.spec_dir, args.out)
    except SpecError as e:
        print(e, file=sys.stderr)
        return 1
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    print(f"{args.out}/ matches a fresh build of {args.spec_dir}/")
    return 0


def _cmd_verify(args) -> int:
    from attngen.tools.verify import main as verify_main

    return verify_main(args.specs, spec_dir=args.spec_dir, out=args.out, seed=args.seed)


def _cmd_report(args) -> int:
    from attngen.tools.report import main as report_main

    return report_main(
        args.specs, spec_dir=args.spec_dir, out=args.out, archs=args.arch, configs=args.configs,
        dtypes=args.dtypes, json_path=args.json, jobs=args.jobs, timeout=args.timeout,
    )


def _cmd_tune(args) -> int:
    from attngen.tools.tune import main as tune_main

    lengths = tuple(int(x) for x in args.lengths.split(","))
    return tune_main(args.specs, spec_dir=args.spec_dir, out=args.out, lengths=lengths, batch=args.batch)


def _cmd_show(args) -> int:
    from attngen.tools.show import main as show_main

    return show_main(
        args.spec, spec_dir=args.spec_dir, out=args.out, n=args.n, n_k=args.n_k, block_m=args.block_m,
        block_n=args.block_n, params=args.param,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attngen", description="Generate Triton attention kernels from YAML specs.")
    parser.add_argument("--version", action="version", version=f"attngen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="render specs into generated modules")
    p.add_argument("specs", nargs="*", help="spec files (default: every spec in --spec-dir)")
    p.add_argument("--out", default="generated", help="output directory (default: generated)")
    p.add_argument("--spec-dir", default="specs", help="where to find specs when none are given (default: specs)")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("check", help="exit non-zero when generated/ is stale or missing for specs/")
    p.add_argument("--spec-dir", default="specs")
    p.add_argument("--out", default="generated")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser(
        "verify", help="build specs and check each module against the float64 reference on small inputs"
    )
    p.add_argument("specs", nargs="*", help="spec files (default: every spec in --spec-dir)")
    p.add_argument("--spec-dir", default="specs")
    p.add_argument("--out", default="generated", help="where the modules are built (default: generated)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser(
        "report",
        help="compile every kernel ahead of time for GPU archs; report registers, spills, shared memory, "
        "tensor cores per autotune config",
    )
    p.add_argument("specs", nargs="*", help="spec files or generated modules (default: every spec in --spec-dir)")
    p.add_argument("--spec-dir", default="specs")
    p.add_argument("--out", default="generated", help="where the modules are built (default: generated)")
    p.add_argument("--arch", default="sm_80,sm_90", help="comma-separated GPU architectures (default: sm_80,sm_90)")
    p.add_argument(
        "--configs", choices=("first", "all"), default="all",
        help="autotune configs to compile: the first (smallest tiles) or all (default)",
    )
    p.add_argument(
        "--dtypes", default="all", help="dtypes to compile: all (default), first (each module's first), "
        "or a comma-separated list such as fp16,bf16",
    )
    p.add_argument("--json", metavar="FILE", help="also write every row to FILE as JSON")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per CPU)")
    p.add_argument(
        "--timeout", type=float, default=300.0, help="seconds one compilation may take (default: 300); "
        "a config past it is reported as an error",
    )
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("tune", help="autotune every kernel on this GPU and persist the winners")
    p.add_argument("specs", nargs="*", help="spec files (default: every spec in --spec-dir)")
    p.add_argument("--spec-dir", default="specs")
    p.add_argument("--out", default="generated")
    p.add_argument("--lengths", default="1024,4096,8192,16384", help="sequence lengths to tune for")
    p.add_argument("--batch", type=int, default=1)
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("show", help="print a spec's mask at a small size with the tile classes of its kernels")
    p.add_argument("spec", help="a spec file, or the name of a spec in --spec-dir")
    p.add_argument("--spec-dir", default="specs")
    p.add_argument("--out", metavar="FILE.png", help="also draw a PNG (needs matplotlib: the `bench` extra)")
    p.add_argument("--n", type=int, default=64, help="query length, and key length unless --n-k (default: 64)")
    p.add_argument("--n-k", type=int, default=None, help="key length (default: --n)")
    p.add_argument("--block-m", type=int, default=None, help="query tile (default: the spec's smallest block_m)")
    p.add_argument("--block-n", type=int, default=None, help="KV tile (default: the spec's smallest block_n)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a mask parameter (repeat)")
    p.set_defaults(func=_cmd_show)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
