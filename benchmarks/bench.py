#!/usr/bin/env python
"""Benchmark attngen's generated modules against torch SDPA (flash), FlexAttention and, when
installed, flash_attn and fla's NSA kernels.

On a CUDA machine it times forward, backward and forward+backward (CUDA events, warmup, median of
repeats) and records TFLOP/s and peak memory. Without CUDA, kernels would run in Triton's CPU
interpreter, whose timings mean nothing, so it reports what is meaningful there instead: the tiles
the forward kernel visits against the minimum the mask needs, and the time from spec to importable
module next to FlexAttention's first-call compile time.

Specs with an expression mask or a score_mod run with parameter values chosen per sequence length
(attngen.param_values, shared with the tests and `attngen verify`; recorded in the `params`
column) and are timed against dense baselines of the same shape as well; NSA specs are left to
benchmarks/nsa_model.py --gpu.

The harness lives in benchmarks/bench_harness/ (one module per concern: counts, specs, impls,
measure, compile_probe, output, plots, cli); this script is its entry point and re-exports the
names other scripts and the tests use.

Run `python benchmarks/bench.py --help` for the options, the CSV columns and the FLOP convention.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (HERE.parent, HERE):  # attngen from this checkout, installed or not; then the harness
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench_harness.cli import DEFAULT_LENGTHS, QUICK_LENGTHS, main, make_parser, parse_lengths  # noqa: E402,F401
from bench_harness.counts import (  # noqa: E402,F401
    FLOP_RULE, PASS_FLOP_FACTOR, brute_min_tiles, expr_fns, flops_fwd, mask_counts, min_tiles, unmasked_pairs,
)
from bench_harness.impls import FlexRunner, sdpa_flash  # noqa: E402,F401
from bench_harness.measure import measure  # noqa: E402,F401
from bench_harness.output import COLUMNS, device_name, short_error  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
