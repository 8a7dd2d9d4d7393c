"""The compile section: each implementation's path from spec to a first result, timed in a fresh
interpreter with empty Triton and Inductor caches (the probe is bench.py itself, run with --probe)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import BENCH_SCRIPT, ROOT
from .counts import expr_fns
from .impls import FlexRunner, limit_configs
from .output import Report, short_error
from .specs import SpecInfo, bench_params, spec_decls


def _fresh_cache_env(tmp: str) -> dict:
    env = dict(os.environ)
    env["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton")
    env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run_probe(args, kind: str, spec_path: Path) -> tuple[dict | None, float, str]:
    """Run a compile probe in a fresh interpreter with empty Triton and Inductor caches."""
    cmd = [sys.executable, str(BENCH_SCRIPT), "--probe", kind, "--probe-spec", str(spec_path.resolve()),
           "--dtype", args.dtype, "--probe-n", str(args.probe_n), "--device", args.device,
           "--max-configs", str(args.max_configs)]
    with tempfile.TemporaryDirectory(prefix="attngen-probe-") as tmp:
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=_fresh_cache_env(tmp), capture_output=True, text=True,
                                  timeout=args.probe_timeout, cwd=tmp)
        except subprocess.TimeoutExpired:
            return None, time.perf_counter() - t0, f"probe timed out after {args.probe_timeout:.0f} s"
        wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("PROBE "):
            return json.loads(line[6:]), wall, ""
    tail = (proc.stderr or proc.stdout or f"probe exited {proc.returncode}").strip().splitlines()[-2:]
    return None, wall, short_error(" | ".join(tail))


def run_compile(report: Report, args, infos: list[SpecInfo], cuda: bool, deadline: float) -> None:
    probes = infos[:1] if args.quick else infos
    for info in probes:
        base = dict(section="compile", **info.shape_cols(), dtype=args.dtype)
        for kind in ("attngen", "flex"):
            if kind == "flex" and args.quick and not cuda:
                report.add(**base, impl="flex", **{"pass": "first_call_fwd"}, status="skipped",
                           note="--quick skips the FlexAttention compile on the CPU")
                continue
            if time.perf_counter() > deadline:
                report.add(**base, impl=kind, status="skipped", note="time budget spent")
                continue
            res, wall, err = _run_probe(args, kind, info.path)
            if res is None:
                report.add(**base, impl=kind, **{"pass": "process_wall"}, seconds=wall, status="error", note=err)
                continue
            batch, n = res.pop("_batch", None), res.pop("_n", None)
            notes = res.pop("_notes", {})
            for step, value in res.items():
                if isinstance(value, str):  # an error text for this step
                    report.add(**base, impl=kind, **{"pass": step}, batch=batch, n=n, status="error", note=value)
                else:
                    report.add(**base, impl=kind, **{"pass": step}, batch=batch, n=n, seconds=value,
                               status="ok", note=notes.get(step, ""))
            report.add(**base, impl=kind, **{"pass": "process_wall"}, seconds=wall, status="ok",
                       note="fresh interpreter, empty Triton/Inductor caches, Python start included")


def probe_main(args) -> int:
    """Child process of run_compile: time one implementation's path to a first result; print JSON."""
    t0 = time.perf_counter()
    import torch

    import attngen.runtime as rt  # noqa: F401  (selects the interpreter without CUDA; imports triton)

    res: dict = {"torch_import": time.perf_counter() - t0}
    notes: dict = {"torch_import": "import torch + triton (shared by every implementation)"}
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = rt.TORCH_DTYPES[args.dtype]
    from_spec = {}  # the spec, loaded inside each branch so the attngen build time includes loading it
    n = args.probe_n
    batch = 1
    res["_batch"], res["_n"] = batch, n

    def inputs(req_grad: bool):
        g = torch.Generator(device=dev).manual_seed(0)
        mk = lambda h, d: torch.randn(batch, h, n, d, device=dev, dtype=dtype, generator=g).requires_grad_(req_grad)  # noqa: E731
        s = from_spec["spec"]
        return mk(s.q_heads, s.head_dim), mk(s.kv_heads, s.head_dim), mk(s.kv_heads, s.v_head_dim)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def first_calls(fn, steps, describe):
        """Time each (step, with_backward) first call of fn on fresh inputs; record errors as text."""
        for step, grad in steps:
            try:
                q, k, v = inputs(grad)
                t = time.perf_counter()
                o = fn(q, k, v)
                if grad:
                    o.sum().backward()
                sync()
                res[step] = time.perf_counter() - t
                notes[step] = describe(grad)
            except Exception as e:  # noqa: BLE001  (record, do not crash the run)
                res[step] = short_error(e)

    if args.probe == "attngen":
        tmp = tempfile.mkdtemp(prefix="attngen-probe-module-")  # kept while the module's kernels may compile
        atexit.register(shutil.rmtree, tmp, True)
        t = time.perf_counter()
        from attngen.codegen.build import build
        from attngen.tools.verify import import_generated

        [(path, _)] = build([args.probe_spec], tmp)
        res["build"] = time.perf_counter() - t
        notes["build"] = "import the generator (jinja2, yaml), load + validate spec, plan, render, write module"
        t = time.perf_counter()
        mod = import_generated(path)
        res["import"] = time.perf_counter() - t
        from attngen.language.spec import load_spec

        from_spec["spec"] = load_spec(args.probe_spec)
        res["spec_to_module"] = res["build"] + res["import"]
        notes["spec_to_module"] = "build + import: the module is importable and callable after this"
        if cuda:
            n_cfg = limit_configs(mod, args.max_configs)
            params, _ = bench_params(mod.NAME, dict(getattr(mod, "PARAMS", {})), mod.Q_HEADS, n, batch, dev)
            first_calls(lambda q, k, v: mod.attention(q, k, v, **params), (("first_call_fwd", False), ("first_call_fwd_bwd", True)),
                        lambda grad: f"Triton JIT + autotune over {n_cfg} configs per kernel, B=1 N={n}"
                        + ("; the forward was compiled by the step before" if grad else ""))
        else:
            notes["import"] = "no CUDA: kernels run in Triton's interpreter, nothing is compiled"
    else:
        from attngen.language.spec import load_spec

        spec = from_spec["spec"] = load_spec(args.probe_spec)
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except Exception as e:  # noqa: BLE001
            res["first_call_fwd"] = short_error(e)
            print("PROBE " + json.dumps({**res, "_notes": notes}), flush=True)
            return 0
        try:
            decls = spec_decls(spec)
            params, _ = bench_params(spec.name, decls, spec.q_heads, n, batch, dev)
            visible, score = expr_fns(spec.mask, spec.score_mod, decls)
            flex = FlexRunner(spec.q_heads, spec.kv_heads, flex_attention, create_block_mask, visible, score, params)
            t = time.perf_counter()
            if flex.make_block_mask(n, dev) is not None:
                sync()
                res["block_mask"] = time.perf_counter() - t
                notes["block_mask"] = ("create_block_mask, first call, and tracing the spec's expressions "
                                       "(not included in first_call_fwd)")
            # FlexAttention has no backward on the CPU
            steps = (("first_call_fwd", False), ("first_call_fwd_bwd", True)) if cuda else (("first_call_fwd", False),)
            first_calls(flex, steps, lambda grad: f"torch.compile(flex_attention) first call, B=1 N={n}; {flex.gqa_note}"
                        + ("; a new graph (forward with autograd + backward)" if grad else ""))
        except Exception as e:  # noqa: BLE001
            res["first_call_fwd"] = short_error(e)
    print("PROBE " + json.dumps({**res, "_notes": notes}), flush=True)
    return 0
