#!/usr/bin/env python
"""Benchmark attngen's generated modules against torch SDPA (flash), FlexAttention and, when
installed, flash_attn and fla's NSA kernels.

On a CUDA machine it times forward, backward and forward+backward (CUDA events, warmup, median of
repeats) and records TFLOP/s and peak memory. Without CUDA, kernels would run in Triton's CPU
interpreter, whose timings mean nothing, so it reports what is meaningful there instead: the tiles
the forward kernel visits against the minimum the mask needs, and the time from spec to importable
module next to FlexAttention's first-call compile time.

Specs with an expression mask or a score_mod run with parameter values chosen per sequence length
(recorded in the `params` column) and are timed against dense baselines of the same shape as well;
NSA specs are left to benchmarks/nsa_model.py --gpu.

Run `python benchmarks/bench.py --help` for the options, the CSV columns and the FLOP convention.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import csv
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # attngen from this checkout, installed or not

DEFAULT_LENGTHS = "512,1k,2k,4k,8k,16k,32k,64k"
QUICK_LENGTHS = "512,2k"

FLOP_RULE = (
    "fwd = 2*B*Hq*pairs*D (QK^T) + 2*B*Hq*pairs*Dv (PV), i.e. 4*B*Hq*pairs*D when Dv = D; "
    "bwd = 2.5 * fwd; fwd_bwd = 3.5 * fwd; pairs = unmasked (q, kv) pairs per (batch, head)"
)

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

EPILOG = (
    "FLOP convention: " + FLOP_RULE + ". Only unmasked pairs count, so causal and full attention "
    "are compared on the work they must do.\n\nCSV columns (bench.csv, one row per measurement; "
    "meta.json holds the same documentation and the run's metadata):\n"
    + "\n".join(f"  {k:17s} {v}" for k, v in COLUMNS.items())
)


# ----------------------------------------------------------------------------- arguments


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


# ----------------------------------------------------------------------------- analytic counts


def unmasked_pairs(mask: str, n_q: int, n_k: int) -> int | None:
    """Visible (q, kv) pairs per (batch, head); None for a mask with no closed form."""
    if mask == "none":
        return n_q * n_k
    if mask == "causal":  # sum over q < n_q of min(q + 1, n_k)
        m = min(n_q, n_k)
        return m * (m + 1) // 2 + (n_q - m) * n_k
    return None


def min_tiles(mask: str, n_q: int, n_k: int, block_m: int, block_n: int) -> int | None:
    """Tiles holding at least one visible pair, per (batch, head), from the tiles' extreme indices
    (vectorised over query tiles); None for a mask with no rule here."""
    import numpy as np

    if n_q == 0 or n_k == 0:
        return 0
    n_mt, n_nt = -(-n_q // block_m), -(-n_k // block_n)
    if mask == "none":
        return n_mt * n_nt
    if mask == "causal":
        # query tile i sees keys [0, last_q + 1): tiles up to the one holding min(last_q, n_k - 1)
        last_q = np.minimum((np.arange(n_mt, dtype=np.int64) + 1) * block_m, n_q) - 1
        return int((-(-np.minimum(last_q + 1, n_k) // block_n)).sum())
    return None


def brute_min_tiles(visible, n_q: int, n_k: int, block_m: int, block_n: int) -> tuple[int, int]:
    """(tiles with a visible pair, visible pairs) by evaluating `visible` on the full index grid:
    for checking the closed forms on small sizes only."""
    import numpy as np

    q = np.arange(n_q)[:, None]
    kv = np.arange(n_k)[None, :]
    vis = np.broadcast_to(np.asarray(visible(q, kv), dtype=bool), (n_q, n_k))
    n_mt, n_nt = -(-n_q // block_m), -(-n_k // block_n)
    padded = np.zeros((n_mt * block_m, n_nt * block_n), dtype=bool)
    padded[:n_q, :n_k] = vis
    per_tile = padded.reshape(n_mt, block_m, n_nt, block_n).any(axis=(1, 3))
    return int(per_tile.sum()), int(vis.sum())


def flops_fwd(batch: int, q_heads: int, pairs: int, d: int, dv: int) -> int:
    return 2 * batch * q_heads * pairs * d + 2 * batch * q_heads * pairs * dv


PASS_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


# ----------------------------------------------------------------------------- expression masks, score_mods


# Largest N at which the tiles section counts the visible pairs and the tiles holding one by
# evaluating the mask over every (q, kv) pair: on the CPU, and on a CUDA device.
COUNT_MAX_N = {"cpu": 4096, "cuda": 65536}
NSA_NOTE = "NSA specs are timed by benchmarks/nsa_model.py --gpu (model of the NSA kernels: benchmarks/nsa_model.py)"


def _window_params(n: int) -> dict:
    return {"w": 1024}


def _natten_params(n: int) -> dict:
    # a square grid of side a power of two, a 7 x 7 neighbourhood (radius 3)
    return {"width": 1 << max(0, math.ceil(math.log2(max(1.0, math.sqrt(n))))), "r": 3}


# Values meaningful at long N for the shipped specs, by spec name and parameter names; any other
# spec gets attngen.testing.default_params. Scalars only: the tensors are made in bench_params.
BENCH_SCALARS = {
    ("sliding_window", ("w",)): _window_params,
    ("prefix_lm", ("p",)): lambda n: {"p": max(1, n // 4)},
    ("chunked_local", ("c",)): lambda n: {"c": 1024},
    ("dilated_window", ("d", "w")): lambda n: {"w": 2048, "d": 2},
    ("natten_2d", ("r", "width")): _natten_params,
    ("global_window", ("g", "w")): lambda n: {"g": 64, "w": 1024},
    ("softcap", ("c",)): lambda n: {"c": 50.0},
}
DOC_LEN = 2048  # packed documents of this many tokens (the last one shorter)


def spec_decls(spec) -> dict:
    """A loaded spec's parameter declarations in the generated module's PARAMS form."""
    return {n: k if isinstance(k, str) else {"tensor": k.tensor, "dims": k.dims} for n, k in spec.params}


def bench_params(name: str, decls: dict, q_heads: int, n: int, batch: int, device) -> tuple[dict, str]:
    """(keyword arguments of the module's attention, how they read in the CSV) at length n."""
    import torch

    from attngen.runtime import PARAM_DTYPES
    from attngen.testing import default_params

    if not decls:
        return {}, ""
    key = (name, tuple(sorted(decls)))
    if key in BENCH_SCALARS:
        values = BENCH_SCALARS[key](n)
        return values, " ".join(f"{k}={v}" for k, v in values.items())
    if name == "document" and list(decls) == ["doc"] and decls["doc"] == {"tensor": "int32", "dims": 2}:
        ids = (torch.arange(n, device=device) // DOC_LEN).to(PARAM_DTYPES["int32"])
        return {"doc": ids.expand(batch, n).contiguous()}, f"doc=ids of {DOC_LEN}-token documents"
    shim = type("Decls", (), {"PARAMS": decls, "Q_HEADS": q_heads})
    values = default_params(shim, batch=batch, n_q=n, n_k=n, device=device)
    shown = []
    for k, v in values.items():
        if isinstance(v, torch.Tensor):
            shown.append(f"{k}=tensor{list(v.shape)}")
        else:
            shown.append(f"{k}={v}")
    how = {"alibi": "ALiBi slopes 2^(-8(h+1)/Hq)", "relpos_bias": "0.5*randn"}.get(name, "default_params")
    return values, " ".join(shown) + f" ({how})"


def expr_fns(mask: str, score_mod: str, decls: dict):
    """(visible, score) callables of a spec's mask and score_mod, on broadcast index tensors:
    visible(b, h, q, kv, q_len, kv_len, **params) -> bool tensor (None for mask none),
    score(s, b, h, q, kv, q_len, kv_len, **params) (None without a score_mod)."""
    import torch

    from attngen.expr import parse_expr, parse_params, to_torch

    parsed = parse_params(dict(decls)) if decls else {}
    visible = None
    if mask == "causal":
        visible = lambda b, h, q, kv, q_len, kv_len, **p: q >= kv  # noqa: E731
    elif mask != "none":
        fn = to_torch(parse_expr(mask, kind="mask", params=parsed))

        def visible(b, h, q, kv, q_len, kv_len, **p):
            out = fn(b, h, q, kv, q_len, kv_len, **p)
            return out if isinstance(out, torch.Tensor) else torch.full((), bool(out), device=q.device)
    score = None
    if score_mod:
        fs = to_torch(parse_expr(score_mod, kind="score_mod", params=parsed))
        score = lambda s, b, h, q, kv, q_len, kv_len, **p: fs(b, h, q, kv, q_len, kv_len, score=s, **p)  # noqa: E731
    return visible, score


def mask_counts(visible, n_q: int, n_k: int, blocks, *, params=None, device="cpu",
                chunk_elems: int = 1 << 24) -> tuple[list[int], int, int]:
    """([tiles holding a visible pair, per (BLOCK_M, BLOCK_N) of `blocks`], visible pairs, visible
    pairs above the diagonal kv > q) at batch 0, head 0, by evaluating the mask on every pair, a few
    query tiles at a time."""
    import torch

    params = params or {}
    kv = torch.arange(n_k, device=device).view(1, -1)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    step = math.lcm(*(bm for bm, _ in blocks)) if blocks else 1
    rows = max(1, chunk_elems // max(1, n_k * step)) * step
    tiles, pairs, above = [0] * len(blocks), 0, 0
    for start in range(0, n_q, rows):
        stop = min(n_q, start + rows)
        q = torch.arange(start, stop, device=device).view(-1, 1)
        vis = visible(zero, zero, q, kv, n_q, n_k, **params).expand(stop - start, n_k)
        pairs += int(vis.sum())
        above += int((vis & (kv > q)).sum())
        for i, (bm, bn) in enumerate(blocks):
            n_nt = -(-n_k // bn)
            pad = torch.zeros(-(-(stop - start) // bm) * bm, n_nt * bn, dtype=torch.bool, device=device)
            pad[: stop - start, :n_k] = vis
            tiles[i] += int(pad.view(-1, bm, n_nt, bn).any(dim=3).any(dim=1).sum())
    return tiles, pairs, above


# ----------------------------------------------------------------------------- output


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


# ----------------------------------------------------------------------------- specs and modules


class SpecInfo:
    """A spec, built into out/modules and imported."""

    def __init__(self, path: Path, module):
        self.path = path
        self.mod = module
        self.name = module.NAME
        self.mask = module.MASK
        self.score_mod = getattr(module, "SCORE_MOD", "")
        self.decls = dict(getattr(module, "PARAMS", {}))
        self.q_heads = module.Q_HEADS
        self.kv_heads = module.KV_HEADS
        self.d = module.HEAD_DIM
        self.dv = module.V_HEAD_DIM

    def shape_cols(self) -> dict:
        return dict(spec=self.name, mask=self.mask, score_mod=self.score_mod, q_heads=self.q_heads,
                    kv_heads=self.kv_heads, head_dim=self.d, v_head_dim=self.dv)

    @property
    def plain(self) -> bool:
        """Mask none or causal, no parameters, no score_mod: closed-form counts, every implementation."""
        return self.mask in ("none", "causal") and not self.decls and not self.score_mod

    def params(self, n: int, batch: int, device) -> tuple[dict, str]:
        return bench_params(self.name, self.decls, self.q_heads, n, batch, device)

    def fns(self):
        return expr_fns(self.mask, self.score_mod, self.decls)


def load_modules(paths: list[Path], out: Path) -> list[SpecInfo]:
    from attngen.build import build
    from attngen.verify import import_generated

    built = build(paths, out / "modules")
    return [SpecInfo(Path(p), import_generated(m)) for p, (m, _) in zip(paths, built)]


def tile_configs(space) -> list[tuple[str, dict]]:
    """The first config of the space (what the interpreter runs) and the one with the largest tiles."""
    first = space[0]
    largest = max(space, key=lambda c: (c["block_m"] * c["block_n"], c["block_m"]))
    return [("first", first), ("largest", largest)]


# ----------------------------------------------------------------------------- section: tiles


def run_tiles(report: Report, infos: list[SpecInfo], lengths: list[int], device: str = "cpu") -> None:
    from attngen.classify import classify_tiles
    from attngen.plan import mask_rule
    from attngen.spec import load_spec

    for info in infos:
        rule = mask_rule(load_spec(info.path))
        visible, _ = info.fns()
        configs = tile_configs(info.mod._SPACES["_fwd_kernel"])
        blocks = [(cfg["block_m"], cfg["block_n"]) for _, cfg in configs]
        for n in lengths:
            params, shown = info.params(n, 1, "cpu")
            pairs = unmasked_pairs(info.mask, n, n)
            counted = None
            if pairs is None and n <= COUNT_MAX_N[device]:
                counted, pairs, _ = mask_counts(visible, n, n, blocks, params=_on(params, device), device=device)
            for i, (role, cfg) in enumerate(configs):
                bm, bn = cfg["block_m"], cfg["block_n"]
                counts = classify_tiles(rule, n, n, bm, bn, params).counts("fwd")
                need = min_tiles(info.mask, n, n, bm, bn)
                note = ""
                if need is None and counted is not None:
                    need = counted[i]
                    note = "tiles_min and unmasked_pairs by evaluating the mask on every pair"
                elif need is None:
                    note = (f"tiles_min and unmasked_pairs not computed above N = {COUNT_MAX_N[device]} on "
                            f"{device} (the mask is evaluated on every pair)")
                report.add(
                    section="tiles", impl="attngen", **{"pass": "fwd"}, **info.shape_cols(), params=shown, n=n,
                    config=f"{role}:{bm}x{bn}", block_m=bm, block_n=bn,
                    tiles_full=counts["full"], tiles_partial=counts["partial"], tiles_visited=counts["visited"],
                    tiles_min=need, tiles_total=counts["total"],
                    visited_over_min=(counts["visited"] / need) if need else None,
                    useful_fraction=(pairs / (counts["visited"] * bm * bn)) if pairs and counts["visited"] else None,
                    unmasked_pairs=pairs, status="ok", note=note,
                )


def _on(params: dict, device) -> dict:
    import torch

    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in params.items()}


# ----------------------------------------------------------------------------- section: compile


def _fresh_cache_env(tmp: str) -> dict:
    env = dict(os.environ)
    env["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton")
    env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run_probe(args, kind: str, spec_path: Path) -> tuple[dict | None, float, str]:
    """Run a compile probe in a fresh interpreter with empty Triton and Inductor caches."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", kind, "--probe-spec", str(spec_path.resolve()),
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
        from attngen.build import build
        from attngen.verify import import_generated

        [(path, _)] = build([args.probe_spec], tmp)
        res["build"] = time.perf_counter() - t
        notes["build"] = "import the generator (jinja2, yaml), load + validate spec, plan, render, write module"
        t = time.perf_counter()
        mod = import_generated(path)
        res["import"] = time.perf_counter() - t
        from attngen.spec import load_spec

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
        from attngen.spec import load_spec

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


# ----------------------------------------------------------------------------- implementations


def limit_configs(mod, max_configs: int) -> int:
    """Restrict every autotuned kernel of a module to at most max_configs configs (spread evenly over
    the space, the largest included). Returns how many configs each kernel now tunes over."""
    from triton.runtime.autotuner import Autotuner

    count = len(mod._SPACES["_fwd_kernel"])
    for obj in vars(mod).values():
        if isinstance(obj, Autotuner):
            cfgs = list(obj.configs)
            if 0 < max_configs < len(cfgs):
                idx = sorted({round(i * (len(cfgs) - 1) / (max_configs - 1)) for i in range(max_configs)}) \
                    if max_configs > 1 else [len(cfgs) - 1]
                obj.configs = [cfgs[i] for i in idx]
            count = len(obj.configs)
    return count


def chosen_config(mod) -> str:
    if mod is None:
        return ""
    cfg = getattr(getattr(mod, "_fwd_kernel", None), "best_config", None)
    if cfg is None:
        return ""
    kw = getattr(cfg, "kwargs", {}) or {}
    return f"fwd bm{kw.get('BLOCK_M')} bn{kw.get('BLOCK_N')} w{cfg.num_warps} s{cfg.num_stages}"


class FlexRunner:
    """torch.compile(flex_attention) with the spec's mask as a block mask."""

    _compiled = None

    def __init__(self, q_heads, kv_heads, flex_attention, create_block_mask, visible=None, score=None,
                 params=None):
        """`visible` and `score` as expr_fns gives them (None: no mask, no score_mod), `params` the
        values of their parameters."""
        import torch

        self.group = q_heads // kv_heads
        self.create_block_mask = create_block_mask
        self.block_mask = None
        self.visible, self.score, self.params = visible, score, dict(params or {})
        self.score_mod = None
        if FlexRunner._compiled is None:
            with contextlib.suppress(Exception):  # many shapes and specs in one process: allow the recompiles
                import torch._dynamo

                for knob in ("cache_size_limit", "recompile_limit"):
                    if hasattr(torch._dynamo.config, knob):
                        setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
            FlexRunner._compiled = torch.compile(flex_attention)
        import inspect

        try:
            self.native_gqa = "enable_gqa" in inspect.signature(flex_attention).parameters
        except (TypeError, ValueError):
            self.native_gqa = False
        if self.group == 1:
            self.gqa_note = "MHA: no head sharing"
        else:
            self.gqa_note = "enable_gqa=True" if self.native_gqa else "repeat_interleave k/v (no enable_gqa in this torch)"

    def make_block_mask(self, n, device):
        """The block mask at length n (None without a mask); also fixes the score_mod's lengths."""
        import torch
        from torch.fx.experimental.proxy_tensor import make_fx

        p = self.params
        # The expressions as FX graphs of torch operations, traced once, for the compiled kernel:
        # torch.compile traces those rather than attngen.expr.to_torch's walk over sympy (which
        # Dynamo cannot). The example indices are 1-element vectors, so that a tensor parameter's
        # read is advanced indexing (a 0-dim index would be read out as a Python int), and the
        # graphs return 1-element results (FlexAttention's lowering takes no reshape); the
        # parameter tensors become constants. create_block_mask, which needs scalar results and
        # runs eagerly under vmap, evaluates the expression itself.
        one = [torch.zeros(1, dtype=torch.int32, device=device) for _ in range(4)]
        if self.score is not None:
            score = self.score
            g_score = make_fx(lambda s, b, h, q, kv: score(s, b, h, q, kv, n, n, **p))(
                torch.zeros((), dtype=torch.float32, device=device), *one)
            self.score_mod = lambda s, b, h, q, kv: g_score(s, b, h, q, kv)
        if self.visible is not None:
            visible = self.visible
            g_mask = make_fx(lambda b, h, q, kv: visible(b, h, q, kv, n, n, **p))(*one)
            self.block_mask = self.create_block_mask(lambda b, h, q, kv: visible(b, h, q, kv, n, n, **p),
                                                     None, None, n, n, device=device)
            self.block_mask.mask_mod = lambda b, h, q, kv: g_mask(b, h, q, kv)
        return self.block_mask

    def __call__(self, q, k, v):
        kw = {"block_mask": self.block_mask, "scale": q.shape[-1] ** -0.5}
        if self.score_mod is not None:
            kw["score_mod"] = self.score_mod
        if self.group > 1:
            if self.native_gqa:
                kw["enable_gqa"] = True
            else:
                k, v = k.repeat_interleave(self.group, 1), v.repeat_interleave(self.group, 1)
        return FlexRunner._compiled(q, k, v, **kw)


def sdpa_flash(mask: str, group: int, dev: str, dtype):
    """SDPA restricted to the flash backend, and a note. GQA via enable_gqa when a small GQA call
    with it succeeds on this device, else by repeat_interleave of k/v inside the timed call."""
    import torch
    import torch.nn.functional as F

    if mask not in ("none", "causal"):
        raise NotImplementedError(f"no SDPA flash form of mask {mask!r}")
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)  # noqa: E731
    except ImportError:  # older torch
        ctx = lambda: torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=False, enable_mem_efficient=False)  # noqa: E731
    native, note = False, ""
    if group > 1:
        try:
            q = torch.zeros(1, 4, 16, 64, device=dev, dtype=dtype)
            kv = torch.zeros(1, 2, 16, 64, device=dev, dtype=dtype)
            with ctx():
                F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
            native, note = True, "enable_gqa=True"
        except (TypeError, RuntimeError) as e:
            note = f"repeat_interleave k/v inside the timed call (enable_gqa unusable: {short_error(e, 120)})"
    causal = mask == "causal"

    def call(q, k, v):
        with ctx():
            if native:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
            if group > 1:
                k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return call, note


def flash_attn_impl(mask):
    from flash_attn import flash_attn_func

    def call(q, k, v):  # flash_attn takes [B, N, H, D]: strided views of ours, no copy
        o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=mask == "causal")
        return o.transpose(1, 2)

    if mask not in ("none", "causal"):
        raise NotImplementedError(f"no flash_attn form of mask {mask!r}")
    return call


def fla_nsa_impl(info: SpecInfo, n: int, batch: int, device, dtype):
    """fla's parallel NSA with a fixed causal block selection: a different (sparse) attention, timed only."""
    import inspect

    import torch
    from fla.ops.nsa import parallel_nsa

    if info.q_heads % (info.kv_heads * 16):
        raise NotImplementedError(f"fla NSA needs Hq/Hkv a multiple of 16 (this spec has {info.q_heads // info.kv_heads})")
    block, count = 64, max(1, min(16, n // 64))
    t = torch.arange(n, device=device)
    sel = (t // block)[:, None] - torch.arange(count, device=device)[None, :]
    idx = sel.clamp(min=0).view(1, n, 1, count).expand(batch, n, info.kv_heads, count).contiguous()
    gate = torch.ones(batch, n, info.q_heads, device=device, dtype=dtype)
    params = inspect.signature(parallel_nsa).parameters
    kw = {"block_indices": idx, "block_counts": count, "block_size": block}
    kw.update({g: gate for g in ("g_cmp", "g_slc", "g_swa") if g in params})
    if "g_cmp" in params:
        kw["g_cmp"] = torch.zeros_like(gate)
    if "head_first" in params:
        kw["head_first"] = False

    def call(q, k, v):
        o = parallel_nsa(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
                         v.transpose(1, 2).contiguous(), **kw)
        o = o[0] if isinstance(o, tuple) else o
        return o.transpose(1, 2)

    return call, f"selected-block sparse attention ({count} blocks of {block} per token): a different pattern, time only"


def optional_available(name: str) -> tuple[bool, str]:
    import importlib

    try:
        importlib.import_module(name)
        return True, ""
    except Exception as e:  # noqa: BLE001  (ImportError, or a broken install)
        return False, short_error(e, 160)


# ----------------------------------------------------------------------------- section: timing


def measure(fn, args, cuda: bool) -> tuple[float, float, float | None]:
    """(first_call_s, median_ms, peak_mem_mib) of fn(). On CUDA: events around each call, one
    synchronisation after all repeats, and the allocator's peak. Without CUDA (the hidden
    --timing-on-cpu smoke mode): perf_counter, and no memory figure."""
    import torch

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    first = est = time.perf_counter() - t
    for _ in range(max(0, args.warmup - 1)):
        t = time.perf_counter()
        fn()
        sync()
        est = time.perf_counter() - t
    reps = int(max(3, min(args.repeats, args.seconds_per_measure / max(est, 1e-6))))
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        sync()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    peak = None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return first, statistics.median(times), peak


def _make_impl(impl: str, info: SpecInfo, n: int, batch: int, dev: str, dtype, n_cfg: int, max_configs: int,
               report: Report, base: dict, params: dict, variant=None):
    """(callable, note, counts_flops) for one implementation at one shape; raises when unavailable.
    `params` are the spec's parameter values, `variant` the attngen_causal module."""
    import torch

    import attngen.runtime as rt

    if impl in ("attngen", "attngen_causal"):
        mod = info.mod if impl == "attngen" else variant
        if rt.DTYPE_NAMES[dtype] not in mod.DTYPES:
            raise NotImplementedError(f"spec built for {', '.join(mod.DTYPES)}")
        total = len(mod._SPACES["_fwd_kernel"])
        pruned = 0 < max_configs < total
        note = f"autotune over {n_cfg} of {total} configs (--max-configs)" if pruned else ""
        if impl == "attngen_causal":
            limit_configs(mod, max_configs)
            return mod.attention, "; ".join(x for x in (f"baseline: {mod.NAME}, mask causal", note) if x), True
        if params:
            return (lambda q, k, v: mod.attention(q, k, v, **params)), note, True
        return mod.attention, note, True
    if impl in ("sdpa_flash", "sdpa_flash_causal", "sdpa_flash_dense"):
        mask = {"sdpa_flash": info.mask, "sdpa_flash_causal": "causal", "sdpa_flash_dense": "none"}[impl]
        fn, note = sdpa_flash(mask, info.q_heads // info.kv_heads, dev, dtype)
        if impl != "sdpa_flash":
            note = "; ".join(x for x in (f"baseline: dense {'causal' if mask == 'causal' else 'unmasked'} attention of the same shape", note) if x)
        return fn, note, True
    if impl == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        visible, score = info.fns()
        fn = FlexRunner(info.q_heads, info.kv_heads, flex_attention, create_block_mask, visible, score,
                        _on(params, dev))
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        times = []
        for _ in range(4):
            t = time.perf_counter()
            fn.make_block_mask(n, dev)
            sync()
            times.append(time.perf_counter() - t)
        if fn.block_mask is not None:
            report.add(**base, impl="flex", **{"pass": "block_mask"}, first_call_s=times[0],
                       median_ms=statistics.median(times[1:]) * 1e3, status="ok",
                       note="create_block_mask (and tracing the spec's expressions); not included in flex's fwd/bwd times")
        how = "mask_mod and score_mod from the spec's expressions (attngen.expr.to_torch)" if not info.plain else ""
        return fn, "; ".join(x for x in (fn.gqa_note, "torch.compile defaults", how) if x), True
    if not info.plain and impl in ("flash_attn", "fla_nsa"):
        raise NotImplementedError(f"no {impl} form of this mask / score_mod (see the sdpa_flash_* baseline)")
    if impl == "flash_attn":
        return flash_attn_impl(info.mask), "", True
    if impl == "fla_nsa":
        fn, note = fla_nsa_impl(info, n, batch, dev, dtype)
        return fn, note, False
    raise ValueError(f"unknown implementation {impl!r}")


def causal_variant(info: SpecInfo, out: Path):
    """The spec built with mask causal and without parameters or score_mod: attngen's own dense
    causal kernel of the same heads, dims and tile space, the baseline of attngen_causal."""
    import yaml

    from attngen.build import build
    from attngen.verify import import_generated

    data = yaml.safe_load(info.path.read_text(encoding="utf-8"))
    for key in ("params", "score_mod"):
        data.pop(key, None)
    data.update(name=f"{info.name}_causal", mask="causal",
                description=f"{info.name} with mask causal, no parameters, no score_mod (benchmark baseline)")
    path = out / "baselines" / f"{info.name}_causal.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    [(module_path, _)] = build([path], out / "modules")
    return import_generated(module_path)


def spec_impls(info: SpecInfo, wanted: list[str], inside_causal: bool) -> list[str]:
    """The implementations timed for a spec. For an expression mask or a score_mod, sdpa_flash is
    the dense baseline (causal when every visible pair has kv <= q, else no mask) and attngen_causal
    (when wanted) follows attngen; for a plain spec attngen_causal is the spec itself, so it is left out."""
    if info.plain:
        return [i for i in wanted if i != "attngen_causal"]
    base = "sdpa_flash_causal" if inside_causal else "sdpa_flash_dense"
    return [base if i == "sdpa_flash" else i for i in wanted if i != "attngen_causal" or inside_causal]


OPTIONAL_MODULES = {"flash_attn": "flash_attn", "fla_nsa": "fla.ops.nsa"}


def run_timing(report: Report, args, infos: list[SpecInfo], lengths: list[int], deadline: float, cuda: bool) -> None:
    import torch

    import attngen.runtime as rt

    dev = "cuda" if cuda else "cpu"
    dtype = rt.TORCH_DTYPES[args.dtype]
    wanted = [s.strip() for s in args.impls.split(",") if s.strip()]
    # optional libraries that are missing were reported once in the env section
    wanted = [i for i in wanted if i not in OPTIONAL_MODULES or optional_available(OPTIONAL_MODULES[i])[0]]
    smoke = "" if cuda else "CPU smoke run (--timing-on-cpu): times mean nothing"
    for info in infos:
        n_cfg = limit_configs(info.mod, args.max_configs)
        visible, _ = info.fns()
        variant = None
        for n in lengths:
            batch = args.batch or max(1, args.tokens // n)
            params, shown = info.params(n, batch, dev)
            pairs, inside_causal, count_note = unmasked_pairs(info.mask, n, n), info.mask in ("none", "causal"), ""
            if pairs is None and time.perf_counter() <= deadline:
                try:
                    t = time.perf_counter()
                    _, pairs, above = mask_counts(visible, n, n, [], params=params, device=dev)
                    inside_causal = above == 0
                    count_note = f"unmasked_pairs counted on {dev} in {time.perf_counter() - t:.2f} s"
                except RuntimeError as e:  # out of memory: time without FLOPs
                    count_note = f"unmasked_pairs not counted ({short_error(e, 100)}): no TFLOP/s"
            impl_pairs = {"sdpa_flash_causal": unmasked_pairs("causal", n, n), "attngen_causal": unmasked_pairs("causal", n, n),
                          "sdpa_flash_dense": n * n}
            base = dict(section="timing", **info.shape_cols(), params=shown, dtype=args.dtype, batch=batch, n=n,
                        unmasked_pairs=pairs)
            impls = spec_impls(info, wanted, inside_causal)
            if time.perf_counter() > deadline:
                report.add(**base, impl=",".join(impls), status="skipped", note="time budget spent")
                continue
            g = torch.Generator(device=dev).manual_seed(n)
            try:
                q = torch.randn(batch, info.q_heads, n, info.d, device=dev, dtype=dtype, generator=g)
                k = torch.randn(batch, info.kv_heads, n, info.d, device=dev, dtype=dtype, generator=g)
                v = torch.randn(batch, info.kv_heads, n, info.dv, device=dev, dtype=dtype, generator=g)
                do = torch.randn(batch, info.q_heads, n, info.dv, device=dev, dtype=dtype, generator=g)
            except RuntimeError as e:  # out of memory for the inputs alone
                report.add(**base, impl=",".join(impls), status="error", note=short_error(e))
                continue
            for impl in impls:
                row = {**base, "unmasked_pairs": impl_pairs.get(impl, pairs)}
                fwd_flops = flops_fwd(batch, info.q_heads, row["unmasked_pairs"], info.d, info.dv) \
                    if row["unmasked_pairs"] is not None else None
                try:
                    if impl == "attngen_causal" and variant is None:
                        variant = causal_variant(info, Path(args.out))
                    fn, note, counts_flops = _make_impl(impl, info, n, batch, dev, dtype, n_cfg, args.max_configs,
                                                        report, row, params, variant)
                except Exception as e:  # noqa: BLE001  (unsupported here: record and go on)
                    report.add(**row, impl=impl, status="skipped", note=short_error(e))
                    continue
                if impl in ("attngen", "flex") and count_note:
                    note = "; ".join(x for x in (note, count_note) if x)
                for pass_ in PASS_FLOP_FACTOR:
                    if time.perf_counter() > deadline:
                        report.add(**row, impl=impl, **{"pass": pass_}, status="skipped", note="time budget spent")
                        continue
                    call = None
                    try:
                        with warnings.catch_warnings(record=True) as caught:
                            warnings.simplefilter("always")
                            try:
                                call = _pass_callable(fn, pass_, q, k, v, do)
                                first, median, peak = measure(call, args, cuda)
                            except Exception as e:  # noqa: BLE001  (the warnings often say why)
                                why = [str(w.message) for w in caught if "not used because" not in str(w.message)]
                                raise RuntimeError(" | ".join([short_error(e, 200), *why[:2]])) from e
                        flops = fwd_flops * PASS_FLOP_FACTOR[pass_] if (fwd_flops and counts_flops) else None
                        extra = chosen_config({"attngen": info.mod, "attngen_causal": variant}.get(impl))
                        report.add(**row, impl=impl, **{"pass": pass_}, flops=flops, median_ms=median,
                                   tflops=(flops / (median * 1e-3) / 1e12) if flops else None,
                                   peak_mem_mib=peak, first_call_s=first, status="ok",
                                   note="; ".join(x for x in (extra, note, smoke) if x))
                    except Exception as e:  # noqa: BLE001  (OOM, unsupported shape: record and go on)
                        report.add(**row, impl=impl, **{"pass": pass_}, status="error", note=short_error(str(e), 400))
                    finally:
                        del call
                        if cuda:
                            torch.cuda.empty_cache()
            del q, k, v, do
            if cuda:
                torch.cuda.empty_cache()


def _pass_callable(fn, pass_, q, k, v, do):
    import torch

    if pass_ == "fwd":
        def call():
            with torch.no_grad():
                return fn(q, k, v)
        return call
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    if pass_ == "bwd":
        o = fn(*leaves)
        return lambda: torch.autograd.grad(o, leaves, do, retain_graph=True)
    return lambda: torch.autograd.grad(fn(*leaves), leaves, do)


# ----------------------------------------------------------------------------- plots


def write_plots(report: Report, out: Path) -> list[str] | None:
    """The PNG files written (none when there is nothing to plot); None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    written = []
    rows = report.rows
    stamp = f"{report.meta['device']} | torch {report.meta['torch']} | triton {report.meta['triton']} | {report.meta['date']}"

    def num(r, c):
        try:
            return float(r[c])
        except (TypeError, ValueError):
            return None

    def grid(names):
        cols = min(2, len(names))
        fig, axes = plt.subplots((len(names) + cols - 1) // cols, cols, figsize=(6.5 * cols, 4.2 * ((len(names) + cols - 1) // cols)),
                                 squeeze=False)
        for ax in axes.flat[len(names):]:
            ax.set_visible(False)
        return fig, list(axes.flat)

    def save(fig, name, title):
        fig.suptitle(f"{title}\n{stamp}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    tiles = [r for r in rows if r["section"] == "tiles" and r["status"] == "ok"]
    specs = list(dict.fromkeys(r["spec"] for r in tiles))
    if specs:
        fig, axes = grid(specs)
        for ax, spec in zip(axes, specs):
            for role, style in (("first", "-"), ("largest", "--")):
                sel = [r for r in tiles if r["spec"] == spec and r["config"].startswith(role + ":")]
                if not sel:
                    continue
                xs = [int(r["n"]) for r in sel]
                cfg = sel[0]["config"].split(":", 1)[1]
                ax.plot(xs, [num(r, "tiles_total") for r in sel], style, color="0.6", label=f"total {cfg}")
                ax.plot(xs, [num(r, "tiles_visited") for r in sel], style, marker="o", label=f"visited {cfg}")
                ax.plot(xs, [num(r, "tiles_min") for r in sel], style, marker="x", label=f"min needed {cfg}")
            ax.set(xscale="log", yscale="log", xlabel="N", ylabel="tiles per (batch, head)",
                   title=f"{spec} ({sel[0]['mask'] if sel else ''})")
            ax.legend(fontsize=7)
        save(fig, "tiles.png", "attngen forward: tiles visited vs needed vs total")

    comp = [r for r in rows if r["section"] == "compile" and r["status"] == "ok"]
    specs = list(dict.fromkeys(r["spec"] for r in comp))
    if specs:
        bars = [("attngen", "spec_to_module", "attngen build+import"), ("attngen", "first_call_fwd", "attngen first fwd (JIT)"),
                ("flex", "block_mask", "flex create_block_mask"), ("flex", "first_call_fwd", "flex first fwd (compile)"),
                ("attngen", "torch_import", "import torch+triton")]
        present = [b for b in bars if any(r["impl"] == b[0] and r["pass"] == b[1] for r in comp)]
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(specs) * len(present) / 2), 4.5))
        width = 0.8 / max(1, len(present))
        for j, (impl, pass_, label) in enumerate(present):
            ys = []
            for spec in specs:
                hit = [num(r, "seconds") for r in comp if r["spec"] == spec and r["impl"] == impl and r["pass"] == pass_]
                ys.append(hit[0] if hit else 0.0)
            ax.bar([i + j * width for i in range(len(specs))], ys, width, label=label)
        ax.set_xticks([i + width * (len(present) - 1) / 2 for i in range(len(specs))], specs)
        ax.set(ylabel="seconds", yscale="log")
        ax.legend(fontsize=7)
        how = ("attngen kernels run in Triton's interpreter here: nothing of theirs is compiled"
               if report.meta["backend"] != "cuda" else "fresh process, empty caches")
        save(fig, "compile.png", f"spec to callable: attngen build+import vs FlexAttention first call ({how})")

    timing = [r for r in rows if r["section"] == "timing" and r["status"] == "ok" and r["pass"] in PASS_FLOP_FACTOR]
    specs = list(dict.fromkeys(r["spec"] for r in timing))
    for metric, label, fname in (("tflops", "TFLOP/s (unmasked pairs)", "tflops_{}.png"),
                                 ("peak_mem_mib", "peak memory (MiB)", "memory_{}.png")):
        for pass_ in PASS_FLOP_FACTOR:
            sel = [r for r in timing if r["pass"] == pass_ and num(r, metric) is not None]
            names = [s for s in specs if any(r["spec"] == s for r in sel)]
            if not names:
                continue
            fig, axes = grid(names)
            for ax, spec in zip(axes, names):
                for impl in dict.fromkeys(r["impl"] for r in sel if r["spec"] == spec):
                    pts = [(int(r["n"]), num(r, metric)) for r in sel if r["spec"] == spec and r["impl"] == impl]
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
                ax.set(xscale="log", xlabel="N", ylabel=label, title=spec)
                ax.legend(fontsize=7)
            save(fig, fname.format(pass_), f"{pass_}: {label}, {report.meta['dtype']}")
    return written


# ----------------------------------------------------------------------------- main


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

    from attngen.build import spec_files

    spec_paths = [Path(p) for p in (args.specs or spec_files(ROOT / "specs"))]
    from attngen.spec import load_spec

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
        "command": shlex.join([sys.executable, *sys.argv] if argv is None else [sys.executable, __file__, *argv]),
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


if __name__ == "__main__":
    sys.exit(main())
