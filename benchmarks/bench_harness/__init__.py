"""The benchmark harness behind benchmarks/bench.py, by concern:

counts         the FLOP convention; visible pairs and the tiles holding one (closed forms, brute force,
               and the spec's expressions evaluated on every pair)
specs          the specs benchmarked: built, imported, their parameter values per length
               (attngen.param_values) and the causal baseline variant
impls          the implementations compared (attngen, SDPA flash, FlexAttention, flash_attn, fla NSA)
measure        the tiles and timing sections (CUDA events, warmup, median, peak memory)
compile_probe  the compile section: spec to first result in a fresh process with empty caches
output         the CSV columns, the row writer, the machine's description
plots          PNG plots of the rows
cli            options and the run (`python benchmarks/bench.py --help`)
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH_SCRIPT = ROOT / "benchmarks" / "bench.py"  # the entry point; the compile probes run it again
