#!/usr/bin/env python
"""The performance goals, read from what `scripts/gpu_check.sh OUTDIR` measured.

Prints, from OUTDIR's CSVs (nothing is timed here):

1. llama3_gqa, causal bf16, per N: forward and backward TFLOP/s of attngen, SDPA's flash backend and
   FlexAttention, and the ratios the goals name: forward >= 1.0x SDPA flash and >= 1.2x
   FlexAttention, backward >= 0.9x SDPA flash;
2. sliding_window against dense causal attention of the same heads and dims (attngen's own causal
   kernel and SDPA flash causal): the speed-up in time, forward and backward;
3. nsa_paper against SDPA flash causal (benchmarks/nsa_model.py --gpu): the speed-up in time,
   forward and forward+backward; the goal is > 1 from 8k up;
4. the autotune winners recorded in OUTDIR/autotune-cache/autotune.json.

A goal is "met" or "MISSED" only where both sides were measured; otherwise the row says what is
missing. Ratios compare rows of the same run (same card, same versions).

    python benchmarks/goals.py OUTDIR [--csv FILE]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

# (impl, pass, other impl, goal): attngen's TFLOP/s over the other's must be at least goal
DENSE_GOALS = (
    ("fwd", "sdpa_flash", 1.0),
    ("fwd", "flex", 1.2),
    ("bwd", "sdpa_flash", 0.9),
)
NSA_FROM_N = 8192  # NSA must beat dense causal from this length up


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _num(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def best(rows: list[dict], key: str, *, higher: bool) -> dict[tuple, float]:
    """{(impl, pass, n): best value of `key`} over the ok timing rows (several configs or repeats of
    one measurement: the best is what a tuned run would use)."""
    out: dict[tuple, float] = {}
    for r in rows:
        if r.get("section", "timing") != "timing" or r.get("status", "ok") != "ok":
            continue
        v = _num(r.get(key))
        if not math.isfinite(v) or v <= 0:
            continue
        k = (r["impl"], r["pass"], int(r["n"]))
        if k not in out or (v > out[k] if higher else v < out[k]):
            out[k] = v
    return out


def verdict(ratio: float, goal: float) -> str:
    if not math.isfinite(ratio):
        return "not measured"
    return "met" if ratio >= goal else "MISSED"


def dense_table(rows: list[dict]) -> list[dict]:
    """Goal rows for llama3_gqa: one per (N, goal)."""
    tf = best([r for r in rows if r.get("dtype", "bf16") == "bf16"], "tflops", higher=True)
    out = []
    for n in sorted({k[2] for k in tf}):
        for pass_, other, goal in DENSE_GOALS:
            ours, theirs = tf.get(("attngen", pass_, n), math.nan), tf.get((other, pass_, n), math.nan)
            ratio = ours / theirs if math.isfinite(ours) and math.isfinite(theirs) else math.nan
            out.append({"table": "llama3_gqa", "n": n, "pass": pass_, "attngen": ours, "other": other,
                        "other_value": theirs, "ratio": ratio, "goal": goal, "verdict": verdict(ratio, goal)})
    return out


def speedup_table(rows: list[dict], table: str, ours: str, others: tuple[str, ...], passes: tuple[str, ...],
                  goal: float | None, from_n: int = 0) -> list[dict]:
    """Speed-up in time of `ours` over each of `others` (their median ms over ours)."""
    ms = best(rows, "median_ms", higher=False)
    out = []
    for n in sorted({k[2] for k in ms}):
        for pass_ in passes:
            for other in others:
                a, b = ms.get((ours, pass_, n), math.nan), ms.get((other, pass_, n), math.nan)
                if not (math.isfinite(a) or math.isfinite(b)):
                    continue
                ratio = b / a if math.isfinite(a) and math.isfinite(b) else math.nan
                g = goal if goal is not None and n >= from_n else None
                out.append({"table": table, "n": n, "pass": pass_, "attngen": a, "other": other, "other_value": b,
                            "ratio": ratio, "goal": g, "verdict": verdict(ratio, g) if g is not None else ""})
    return out


def autotune_winners(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text()).get("entries", {})
    except (OSError, ValueError, AttributeError):
        return [("(unreadable)", str(path))]
    return sorted((k, json.dumps(v, sort_keys=True)) for k, v in entries.items())


def _fmt(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) and math.isfinite(x) else "-"


def render(title: str, unit: str, rows: list[dict]) -> list[str]:
    lines = [f"## {title}"]
    if not rows:
        return lines + ["(no rows: the step did not run or measured nothing)", ""]
    lines.append(f"{'N':>6}  {'pass':<8} {'attngen ' + unit:>15}  {'vs':<18} {unit:>10}  {'ratio':>6}  {'goal':>5}  verdict")
    for r in rows:
        goal = f">={r['goal']:.1f}" if r["goal"] is not None else ""
        lines.append(f"{r['n']:>6}  {r['pass']:<8} {_fmt(r['attngen'], 3):>15}  {r['other']:<18} "
                     f"{_fmt(r['other_value'], 3):>10}  {_fmt(r['ratio']):>6}  {goal:>5}  {r['verdict']}")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/goals.py", description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", help="the directory scripts/gpu_check.sh wrote")
    p.add_argument("--csv", default=None, help="also write the goal rows to this CSV file")
    args = p.parse_args(argv)
    out = Path(args.outdir)
    if not out.is_dir():
        print(f"goals: {out} is not a directory", file=sys.stderr)
        return 2
    dense = dense_table(read_csv(out / "bench_llama3_gqa" / "bench.csv"))
    sw_rows = read_csv(out / "bench_sliding_window" / "bench.csv")
    window = speedup_table(sw_rows, "sliding_window", "attngen", ("attngen_causal", "sdpa_flash_causal"),
                           ("fwd", "bwd"), None)
    nsa = speedup_table(read_csv(out / "nsa_model" / "nsa.csv"), "nsa_paper", "nsa", ("sdpa_flash",),
                        ("fwd", "fwd_bwd"), 1.0, NSA_FROM_N)
    lines = render("llama3_gqa causal bf16: TFLOP/s, attngen over the other", "TFLOP/s", dense)
    lines += render("sliding_window vs dense causal: median ms, speed-up = theirs / ours", "ms", window)
    lines += render("nsa_paper vs SDPA flash causal: median ms, speed-up = theirs / ours", "ms", nsa)
    lines.append("## autotune winners (kernel | device | triton | dtype | buckets -> config)")
    winners = autotune_winners(out / "autotune-cache" / "autotune.json")
    lines += [f"{k} -> {v}" for k, v in winners] or ["(none recorded)"]
    print("\n".join(lines))
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["table", "n", "pass", "attngen", "other", "other_value", "ratio",
                                              "goal", "verdict"])
            w.writeheader()
            w.writerows(dense + window + nsa)
    return 0


if __name__ == "__main__":
    sys.exit(main())
