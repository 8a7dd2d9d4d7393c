"""The run's output: the CSV columns and their documentation, the CSV writer that also prints each
row, and the machine's description."""

from __future__ import annotations

import contextlib
import csv
import math
import os
import platform
from pathlib import Path

from .counts import FLOP_RULE

COLUMNS = {
    "section": "tiles (forward tile work), compile (spec->module and first-call compile), timing (CUDA), env",
    "spec": "spec name",
    "impl": "attngen, sdpa_flash, flex, flash_attn, fla_nsa; baselines for an expression mask or a "
            "score_mod: sdpa_flash_causal (dense causal, for masks inside the causal triangle and causal "
            "score_mod specs) or sdpa_flash_dense (no mask), attngen_causal (the same spec built with "
            "mask causal, no params, no score_mod)",
    "pass": "fwd, bwd, fwd_bwd; compile section: torch_import, build, import, spec_to_module, process_wall, "
            "block_mask, first_call_fwd, first_call_fwd_bwd; env: availability",
    "mask": "the spec's mask: none, causal or an expression",
    "score_mod": "the spec's score_mod expression, empty without one",
    "params": "the mask's and score_mod's parameter values the row used (chosen per N to mean something "
              "at long N, e.g. a 1024-key window; tensors described)",
    "q_heads": "query heads Hq",
    "kv_heads": "key/value heads Hkv",
    "head_dim": "D (q and k)",
    "v_head_dim": "Dv",
    "dtype": "input dtype",
    "batch": "B",
    "n": "sequence length (Nq = Nk)",
    "config": "tiles: 'first' or 'largest' config of the module's autotune space; timing: the config "
              "attngen's autotuner chose, when it can be read",
    "block_m": "BLOCK_M of the tile config",
    "block_n": "BLOCK_N of the tile config",
    "tiles_full": "KV tiles the forward kernel visits without evaluating the mask, per (batch, head)",
    "tiles_partial": "KV tiles it visits with the mask applied",
    "tiles_visited": "tiles_full + tiles_partial",
    "tiles_min": "tiles holding at least one visible (q, kv) pair: the least any tiled kernel with "
                 "these tile sizes must visit",
    "tiles_total": "all (query tile, KV tile) pairs",
    "visited_over_min": "tiles_visited / tiles_min (1.0 = no tile visited in vain)",
    "useful_fraction": "unmasked pairs / (tiles_visited * BLOCK_M * BLOCK_N): share of computed scores "
                       "that are kept (diagonal tiles and sequence-end padding lower it)",
    "unmasked_pairs": "visible (q, kv) pairs per (batch, head) of the row's implementation (a baseline's "
                      "own mask); for an expression mask counted at batch 0, head 0 by evaluating it "
                      "on every pair (tiles: up to N = 4096 on the CPU, 65536 with CUDA; timing: on the "
                      "device)",
    "flops": "FLOPs credited to the pass (see flop_rule)",
    "median_ms": "median time of one call over the repeats (CUDA events)",
    "tflops": "flops / median time / 1e12",
    "peak_mem_mib": "peak memory allocated during one call above what was allocated just before it "
                    "(inputs and, for bwd, the saved forward state excluded)",
    "first_call_s": "wall time of the measurement's first call: includes JIT compile / autotune / torch.compile "
                    "unless an earlier row already paid it (the compile section measures it in a fresh process)",
    "seconds": "compile section: wall seconds of the step",
    "status": "ok, error, skipped, not installed",
    "note": "error text, fallbacks used (e.g. repeat_interleave instead of enable_gqa), caveats",
    "device": "GPU name, or the CPU model",
    "torch": "torch version",
    "triton": "triton version",
    "date": "UTC start time of the run",
    "command": "the exact command line",
    "flop_rule": "the FLOP convention (timing rows)",
}


class Report:
    """Writes one CSV row per measurement as it is made (so a killed run keeps what it measured)."""

    def __init__(self, out: Path, meta: dict):
        self.out = out
        self.meta = meta
        self.rows: list[dict] = []
        out.mkdir(parents=True, exist_ok=True)
        self._f = open(out / "bench.csv", "w", newline="", encoding="utf-8")
        self._w = csv.DictWriter(self._f, fieldnames=list(COLUMNS))
        self._w.writeheader()
        self._f.flush()

    def add(self, **row) -> dict:
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise KeyError(f"unknown CSV columns {sorted(unknown)}")
        full = {k: "" for k in COLUMNS}
        full.update({k: _fmt(v) for k, v in row.items() if v is not None})
        for k in ("device", "torch", "triton", "date", "command"):
            full[k] = self.meta[k]
        if row.get("section") == "timing" and row.get("status") == "ok":
            full["flop_rule"] = FLOP_RULE
        self._w.writerow(full)
        self._f.flush()
        self.rows.append(full)
        _print_row(full)
        return full

    def close(self):
        self._f.close()


def _fmt(v):
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.6g}"
    return v


_PRINT_COLS = {
    "tiles": ("spec", "mask", "params", "n", "config", "tiles_visited", "tiles_min", "tiles_total", "visited_over_min",
              "useful_fraction"),
    "compile": ("spec", "impl", "pass", "seconds", "status", "note"),
    "timing": ("spec", "impl", "pass", "params", "n", "batch", "median_ms", "tflops", "peak_mem_mib", "status", "note"),
    "env": ("impl", "status", "note"),
}


def _print_row(row: dict) -> None:
    cols = _PRINT_COLS.get(row["section"], ("spec", "impl", "status"))
    parts = [f"{c}={row[c]}" for c in cols if row[c] != ""]
    line = f"[{row['section']}] " + " ".join(parts)
    print(line if len(line) <= 220 else line[:217] + "...", flush=True)


def short_error(e: BaseException | str, limit: int = 300) -> str:
    text = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    text = " | ".join(lines[:3]) if lines else str(text)
    return text[:limit]


def device_name(cuda: bool) -> str:
    if cuda:
        import torch

        return torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"cpu: {model} ({os.cpu_count()} cores)"
