#!/usr/bin/env bash
# GPU check for attngen, for a lent GPU machine with no network and no pip: records versions, runs
# the test suite on the GPU, then the benchmark table, all within about 8 minutes.
#
#   scripts/gpu_check.sh OUTDIR
#
# Writes into OUTDIR: versions.txt, pytest.log, bench_*/ (bench.csv, meta.json, plots when
# matplotlib is importable) with a log each, nsa_model/ (the NSA cost model and its GPU timing,
# log.txt and nsa.csv) and summary.txt (each step's exit status and time). The benchmarks run in
# order of importance, each only when its minimum time is left: llama3_gqa against SDPA, flex and
# flash-attn; sliding_window (w = 1024) at N = 16k against dense causal attention of the same heads
# and dims (SDPA flash and attngen's own causal kernel) and FlexAttention; the other dense specs;
# nsa_paper against SDPA flash causal at 8k..64k; llama3_gqa KV-cache decoding against SDPA on the
# padded cache (decode/: latency, achieved GB/s and the fraction of the card's peak); compile times;
# then goals.txt / goals.csv: benchmarks/goals.py's table of the ratios the performance goals name.
# One failing step does not stop the others. Exit status: 1 when the tests failed or did not finish,
# 2 when only a benchmark step failed, 0 otherwise.
# Environment: PYTHON (interpreter, default python, else python3), TOTAL_S (budget, default 470),
# SKIP_TESTS=1 (benchmarks only, e.g. for a rerun; the exit status then ignores the tests).

set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 64
fi
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# autotune winners (attngen.runtime.TuneCache) stay with the run's other outputs
export ATTNGEN_CACHE_DIR="${ATTNGEN_CACHE_DIR:-$OUT/autotune-cache}"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1

# attngen from this checkout, not installed (the `attngen` console script may not exist either)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-$(command -v python || command -v python3)}
TOTAL_S=${TOTAL_S:-470}
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

left() { echo $((TOTAL_S - ($(date +%s) - START))); }

# step NAME LOG TIMEOUT_S CMD...: run with a timeout, log output, record status and duration
step() {
    local name=$1 log=$2 limit=$3
    shift 3
    local t0 rc
    t0=$(date +%s)
    echo "== $name (limit ${limit}s): $*" | tee -a "$SUMMARY"
    timeout --signal=INT --kill-after=15 "$limit" "$@" >"$log" 2>&1
    rc=$?
    echo "   $name: exit $rc after $(($(date +%s) - t0))s, log $(basename "$log")" | tee -a "$SUMMARY"
    tail -n 5 "$log" | sed 's/^/   | /'
    return $rc
}

# -- versions
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -a)"
    echo "checkout: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    git status --short 2>/dev/null | sed 's/^/  changed: /'
    echo "python: $PY"
    echo "--- nvidia-smi"
    nvidia-smi 2>&1 || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
    echo "--- python packages"
    "$PY" - <<'EOF' 2>&1
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "jinja2", "sympy", "yaml", "numpy", "pytest", "hypothesis", "matplotlib",
             "flash_attn", "fla"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "(no __version__)"))
    except Exception as e:
        print(name, "not installed:", type(e).__name__, e)
import torch
print("torch.version.cuda", torch.version.cuda)
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
EOF
} >"$OUT/versions.txt" 2>&1
echo "== versions -> $OUT/versions.txt" | tee -a "$SUMMARY"
grep -E "^(torch|triton|device|cuda available) " "$OUT/versions.txt" | sed 's/^/   | /'

# -- generated/ up to date with specs/ (quick; informative only)
step "attngen check" "$OUT/attngen_check.log" 60 "$PY" -m attngen.tools.cli check
check_rc=$?

# -- tests on the GPU
if [ "${SKIP_TESTS:-0}" = 1 ]; then
    echo "== pytest: skipped (SKIP_TESTS=1)" | tee -a "$SUMMARY"
    test_rc=0
else
    # One config per kernel (the smallest tiles) so the suite compiles instead of autotuning every
    # new length bucket; the benchmarks below autotune for real. The cache stays in OUTDIR.
    step "pytest" "$OUT/pytest.log" 240 \
        env ATTNGEN_CONFIGS=first "$PY" -m pytest -x -q
    test_rc=$?
fi

# -- benchmarks: the headline table first, then whatever else fits
bench_rc=0
bench() {  # bench NAME MIN_S MAX_S ARGS...: run when at least MIN_S seconds are left
    local name=$1 min_s=$2 max_s=$3
    shift 3
    local avail limit
    avail=$(($(left) - 10))
    if [ "$avail" -lt "$min_s" ]; then
        echo "== $name: skipped, ${avail}s left" | tee -a "$SUMMARY"
        return 0
    fi
    limit=$((avail < max_s ? avail : max_s))
    mkdir -p "$OUT/$name"
    step "$name" "$OUT/$name/log.txt" "$limit" "$PY" benchmarks/bench.py --device cuda --dtype bf16 \
        --out "$OUT/$name" --budget $((limit - 25)) "$@" || bench_rc=1
}

# nsa_step MIN_S MAX_S: the NSA model and nsa_paper's GPU timing, when at least MIN_S seconds are left
nsa_step() {
    local min_s=$1 max_s=$2 avail limit
    avail=$(($(left) - 10))
    if [ "$avail" -lt "$min_s" ]; then
        echo "== nsa_model: skipped, ${avail}s left" | tee -a "$SUMMARY"
        return 0
    fi
    limit=$((avail < max_s ? avail : max_s))
    mkdir -p "$OUT/nsa_model"
    # rows are printed as they are measured: a step cut short keeps them in log.txt
    step "nsa_model" "$OUT/nsa_model/log.txt" "$limit" "$PY" benchmarks/nsa_model.py --gpu \
        --module generated/nsa_paper.py --lengths 8k,16k,32k,64k --warmup 1 --repeats 5 \
        --seconds-per-measure 0.5 --csv "$OUT/nsa_model/nsa.csv" || bench_rc=1
}

# decode_step MIN_S MAX_S: KV-cache decoding of llama3_gqa against SDPA on the padded cache, when at
# least MIN_S seconds are left
decode_step() {
    local min_s=$1 max_s=$2 avail limit
    avail=$(($(left) - 10))
    if [ "$avail" -lt "$min_s" ]; then
        echo "== decode: skipped, ${avail}s left" | tee -a "$SUMMARY"
        return 0
    fi
    limit=$((avail < max_s ? avail : max_s))
    mkdir -p "$OUT/decode"
    step "decode" "$OUT/decode/log.txt" "$limit" "$PY" benchmarks/decode.py --gpu \
        --module generated/llama3_gqa.py --lengths 4k,16k,64k --batch 1,16 --rep-ms 50 \
        --csv "$OUT/decode/decode.csv" || bench_rc=1
}

bench bench_llama3_gqa 90 200 --specs specs/llama3_gqa.yaml --lengths 1k,2k,4k,8k,16k \
    --sections timing --max-configs 6 --warmup 2 --seconds-per-measure 1
# sliding window (w = 1024, the row's params column) against dense causal of the same shape
bench bench_sliding_window 60 100 --specs specs/sliding_window.yaml --lengths 16k --sections timing \
    --impls attngen,attngen_causal,sdpa_flash,flex --max-configs 4 --warmup 2 --seconds-per-measure 0.5
bench bench_other_specs 45 100 --specs specs/mha.yaml specs/mqa.yaml specs/gqa_hd80.yaml --lengths 1k,4k,16k \
    --sections timing --max-configs 4 --warmup 2 --seconds-per-measure 0.5
nsa_step 45 90
decode_step 30 60
bench bench_compile 45 80 --specs specs/llama3_gqa.yaml --sections tiles,compile --max-configs 6 \
    --lengths 1k,4k,16k --probe-timeout 70

# -- the goals table (ratios against SDPA flash and FlexAttention, NSA and the window against dense
# causal, the autotune winners), read from the CSVs above; nothing is timed here
"$PY" benchmarks/goals.py "$OUT" --csv "$OUT/goals.csv" >"$OUT/goals.txt" 2>&1 || bench_rc=1
echo "== goals -> $OUT/goals.txt" | tee -a "$SUMMARY"
sed 's/^/   | /' "$OUT/goals.txt"

echo "== total $(($(date +%s) - START))s" | tee -a "$SUMMARY"
if [ "$test_rc" -ne 0 ]; then
    echo "RESULT: tests FAILED (pytest exit $test_rc)" | tee -a "$SUMMARY"
    exit 1
fi
if [ "$bench_rc" -ne 0 ]; then
    echo "RESULT: tests passed; a benchmark step failed (see its log)" | tee -a "$SUMMARY"
    exit 2
fi
[ "$check_rc" -ne 0 ] && echo "note: attngen check reported stale or missing generated modules" | tee -a "$SUMMARY"
echo "RESULT: tests passed; benchmarks ran" | tee -a "$SUMMARY"
exit 0
