"""`attngen verify`: build specs, then check every generated module against the float64 reference.

This is the main job a user runs first: it proves on this machine (the CPU interpreter when there is
no GPU) that each shipped kernel is correct, forward and backward, for every dtype in its spec.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

# (batch, n_q, n_k): a square causal-style case whose length is not a multiple of any tile, and a
# rectangular one with Nq != Nk.
CASES = ((1, 77, 77), (2, 33, 50))


def import_generated(path: str | Path):
    """Import a generated module from its file (no package or sys.path changes needed)."""
    from attngen.runtime import import_path

    return import_path(path)


def _nsa_case(mod) -> tuple[int, int]:
    """(batch, N) for an NSA module: complete compression blocks, a second (partial) selection
    block, and a length off every grid; small, so the paper-sized spec stays quick too."""
    return 1, mod.SELECT_BLOCK + mod.BLOCK + 3


def main(specs: list[str], *, spec_dir: str = "specs", out: str = "generated", seed: int = 0) -> int:
    from attngen import runtime
    from attngen.codegen.build import build, load_all, spec_files
    from attngen.language.spec import SpecError
    from attngen.param_values import check_values
    from attngen.testing import K, check_module, check_nsa_module, random_inputs, random_nsa_inputs

    paths = specs or spec_files(spec_dir)
    try:
        build(paths, out)
        loaded = load_all(paths)
    except SpecError as e:
        print(e, file=sys.stderr)
        return 1
    rows = []
    failures = []

    def worst(results, forward: bool):
        """(error / tolerance, tolerance) of the output closest to its bound, None if none."""
        picked = [r for r in results if (r.name == "o" or r.name.startswith("lse")) == forward]
        return max(((r.ratio, r.tolerance) for r in picked), default=None)

    def record(mod, dname, shape, results, elapsed):
        ok = all(r.ok for r in results)
        failures.extend(f"{mod.NAME} {dname} {shape}: {r}" for r in results if not r.ok)
        cells = []
        for w in (worst(results, True), worst(results, False)):
            cells += ["-", "-"] if w is None else [f"{w[0]:.2f}", f"{w[1]:.1e}"]
        rows.append((mod.NAME, dname, runtime.backend(), shape, *cells, f"{elapsed:.1f}s", "ok" if ok else "FAIL"))

    for spec in loaded:
        # an NSA spec's branch modules are checked through its nsa_attention
        mod = import_generated(Path(out) / f"{spec.name}.py")
        for dname in mod.DTYPES:
            dtype = runtime.TORCH_DTYPES[dname]
            if spec.sparse is not None:
                b, n = _nsa_case(mod)
                # learnable compression (weighted, mlp) hands the module its own k_cmp, v_cmp
                ins = random_nsa_inputs(mod, batch=b, n=n, dtype=dtype, seed=seed, compressed=mod.METHOD != "mean")
                t0 = time.perf_counter()
                results = check_nsa_module(mod, *ins, backward=spec.backward, seed=seed)
                record(mod, dname, f"{b}x{n}x{n}", results, time.perf_counter() - t0)
                continue
            for i, (b, n_q, n_k) in enumerate(CASES):
                q, k, v = random_inputs(mod, batch=b, n_q=n_q, n_k=n_k, dtype=dtype, seed=seed + i, bnhd=i == 1)
                has_bwd = hasattr(mod, "_backward")
                t0 = time.perf_counter()
                # parameters: the shipped specs' chosen values, else values from the declarations
                # (attngen.param_values.check_values); the tests draw many more
                params = check_values(mod, batch=b, n_q=n_q, n_k=n_k, seed=seed + i)
                results = check_module(mod, q, k, v, backward=has_bwd, seed=seed + i, params=params)
                record(mod, dname, f"{b}x{n_q}x{n_k}", results, time.perf_counter() - t0)
    header = ("spec", "dtype", "path", "BxNqxNk", "fwd err/tol", "fwd tol", "bwd err/tol", "bwd tol", "time", "result")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    print(
        "err/tol: max |kernel - float64 reference| as a fraction of what the tolerance rule allowed (ok: at most 1),\n"
        "  for the output nearest its bound among o and lse (fwd; NSA: each branch's lse) and dq, dk, dv and\n"
        "  learnable tensors (bwd; NSA: dgates, dk_cmp, dv_cmp).\n"
        f"tol: that output's bound, {K:g} x (PyTorch's error at the dtype) + ulp(dtype) x max(1, max |reference|)."
    )
    for f in failures:
        print(f, file=sys.stderr)
    return 1 if failures else 0
