#!/usr/bin/env python
"""Decoding with a KV cache: a bytes-moved model on any machine and, with --gpu on a CUDA machine,
the latency and achieved memory bandwidth of a generated module's attention_with_kvcache against
torch SDPA on the padded equivalent (and flash-attn's flash_attn_with_kvcache when installed).

Decoding is memory-bound: each new token reads the whole cache once. Per decode call (B sequences
of L cached tokens, Nq new queries each, e bytes per element) the kernel requests
  packed     B * Hkv * L * (D + Dv) * e          K and V once per KV head: the G query heads of a
                                                 group (times Nq) are the rows of one tile
             + B * Hq * Nq * (D + Dv) * e        q read, o written
             + B * Hq * Nq * 4                   lse (float32)
  per head   the same with K and V read once per query head (G times per KV head): what a kernel
             with one program per query head, such as the FlashAttention-2 forward, would request.
With split-KV the partial outputs add B * Hq * Nq * splits * (Dv + 1) * 4 bytes written and read
by the merge; the model leaves them out (they are small next to the cache once L >> splits).
"achieved" bandwidth is the packed model's bytes over the measured time; the fraction is of the
card's peak (--peak-gbs, else from the device's memory clock and bus width where torch reports
them, else a table of known cards).

Run `python benchmarks/decode.py --help`.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench_harness.cli import parse_lengths  # noqa: E402
DEFAULT_SPEC = ROOT / "generated" / "llama3_gqa.py"
DEFAULT_LENGTHS = "1k,4k,16k,64k"
DEFAULT_BATCH = "1,16"
# Peak memory bandwidth in GB/s of cards torch may not describe, by a substring of the device name.
KNOWN_PEAK_GBS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0,
                  "A100": 1555.0, "L40S": 864.0, "L4": 300.0, "RTX 4090": 1008.0}


@dataclass(frozen=True)
class Shape:
    batch: int
    cache_len: int
    n_q: int
    q_heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    elem_bytes: int = 2


def bytes_packed(s: Shape) -> int:
    """Bytes one decode call requests with the G query heads of a KV group packed in one tile."""
    kv = s.batch * s.kv_heads * s.cache_len * (s.head_dim + s.v_head_dim) * s.elem_bytes
    return kv + _q_o_lse(s)


def bytes_per_head(s: Shape) -> int:
    """Bytes with K and V read once per query head (no sharing across a GQA group)."""
    kv = s.batch * s.q_heads * s.cache_len * (s.head_dim + s.v_head_dim) * s.elem_bytes
    return kv + _q_o_lse(s)


def _q_o_lse(s: Shape) -> int:
    return s.batch * s.q_heads * s.n_q * ((s.head_dim + s.v_head_dim) * s.elem_bytes + 4)


def parse_list(text: str) -> list[int]:
    """'1,16' or '1k,64k' -> whole numbers >= 1 (k = 1024): the benchmark harness's length parser."""
    return parse_lengths(text)


def load_module(path: str | Path):
    from attngen.tools.verify import import_generated

    mod = import_generated(Path(path))
    if not hasattr(mod, "attention_with_kvcache"):
        raise ValueError(f"{path}: not a dense generated module (no attention_with_kvcache)")
    return mod


def model_rows(mod, batches: list[int], lengths: list[int], n_q: int, elem_bytes: int) -> list[dict]:
    rows = []
    for b in batches:
        for n in lengths:
            s = Shape(b, n, n_q, mod.Q_HEADS, mod.KV_HEADS, mod.HEAD_DIM, mod.V_HEAD_DIM, elem_bytes)
            packed, per_head = bytes_packed(s), bytes_per_head(s)
            rows.append({"spec": mod.NAME, **asdict(s), "bytes_packed": packed, "bytes_per_head": per_head,
                         "per_head_over_packed": per_head / packed})
    return rows


def peak_gbs(device_props, override: float | None) -> tuple[float | None, str]:
    """The card's peak memory bandwidth in GB/s and where it came from."""
    if override:
        return override, "--peak-gbs"
    clock = getattr(device_props, "memory_clock_rate", None)  # kHz, where torch reports it
    width = getattr(device_props, "memory_bus_width", None)  # bits
    if clock and width:
        return 2 * clock * 1e3 * width / 8 / 1e9, "memory clock x bus width (double data rate)"
    for key, gbs in KNOWN_PEAK_GBS.items():
        if key in device_props.name:
            return gbs, f"table entry {key!r}"
    return None, "unknown"


def implementations(mod, q, k_cache, v_cache, seqlens, params: dict, splits: int | None, flash=None) -> dict:
    """name -> a call computing the decode step: attngen's attention_with_kvcache; on a
    parameter-free spec also SDPA over the padded equivalent (every sequence as long as the cache)
    and flash-attn's flash_attn_with_kvcache (`flash`, when given)."""
    import torch
    import torch.nn.functional as F

    impls = {"attngen": lambda: mod.attention_with_kvcache(q, k_cache, v_cache, seqlens, num_splits=splits, **params)}
    if not params and mod.MASK in ("none", "causal"):  # the baselines know no mask expressions
        n_q, n = q.shape[2], k_cache.shape[2]
        # bottom-right causal: query i sees keys up to n - n_q + i (SDPA's is_causal is top-left)
        mask = None
        if mod.MASK == "causal" and n_q > 1:
            mask = torch.arange(n, device=q.device)[None, :] <= torch.arange(n - n_q, n, device=q.device)[:, None]
        impls["sdpa_padded"] = lambda: F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=True)
        if flash is not None and q.dtype != torch.float32:
            qf, kf, vf = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
            impls["flash_attn_kvcache"] = lambda: flash(qf, kf, vf, cache_seqlens=seqlens, causal=mod.MASK == "causal").transpose(1, 2)
    return impls


def time_rows(mod, batches, lengths, n_q, dtype_name, *, warmup: int, rep_ms: int, splits: int | None) -> list[dict]:
    """GPU timings (CUDA only): attngen's attention_with_kvcache, SDPA on the padded equivalent,
    flash-attn's flash_attn_with_kvcache when installed."""
    import torch
    import triton.testing

    from attngen.param_values import long_values
    from attngen.runtime import TORCH_DTYPES

    dtype = TORCH_DTYPES[dtype_name]
    dev = torch.device("cuda")
    flash = None
    if importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_with_kvcache as flash
    rows = []
    for b in batches:
        for n in lengths:
            g = torch.Generator(device=dev).manual_seed(0)
            q = torch.randn(b, mod.Q_HEADS, n_q, mod.HEAD_DIM, device=dev, dtype=dtype, generator=g)
            k_cache = torch.randn(b, mod.KV_HEADS, n, mod.HEAD_DIM, device=dev, dtype=dtype, generator=g)
            v_cache = torch.randn(b, mod.KV_HEADS, n, mod.V_HEAD_DIM, device=dev, dtype=dtype, generator=g)
            seqlens = torch.full((b,), n, device=dev, dtype=torch.int32)
            params, _ = long_values(mod.NAME, dict(mod.PARAMS), mod.Q_HEADS, n, b, device=dev)
            s = Shape(b, n, n_q, mod.Q_HEADS, mod.KV_HEADS, mod.HEAD_DIM, mod.V_HEAD_DIM, dtype.itemsize)
            impls = implementations(mod, q, k_cache, v_cache, seqlens, params, splits, flash)
            for name, fn in impls.items():
                for _ in range(warmup):
                    fn()
                ms = triton.testing.do_bench(fn, rep=rep_ms)
                rows.append({"spec": mod.NAME, "impl": name, **asdict(s), "ms": ms,
                             "achieved_gbs": bytes_packed(s) / (ms * 1e-3) / 1e9})
    return rows


def _fmt(rows: list[dict], keys: list[str]) -> str:
    cells = [[k for k in keys]] + [[(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k])) for k in keys] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(keys))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(keys))).rstrip() for c in cells)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="KV-cache decoding: bytes-moved model, and with --gpu the timing of attention_with_kvcache",
        epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--module", default=str(DEFAULT_SPEC), help=f"generated dense module (default {DEFAULT_SPEC.relative_to(ROOT)})")
    p.add_argument("--lengths", type=parse_list, default=parse_list(DEFAULT_LENGTHS), help=f"cache lengths, k = 1024 (default {DEFAULT_LENGTHS})")
    p.add_argument("--batch", type=parse_list, default=parse_list(DEFAULT_BATCH), help=f"batch sizes (default {DEFAULT_BATCH})")
    p.add_argument("--n-q", type=int, default=1, help="new queries per sequence (default 1)")
    p.add_argument("--dtype", default="bf16", choices=("fp16", "bf16", "fp32"), help="element type (default bf16)")
    p.add_argument("--gpu", action="store_true", help="time the implementations on the CUDA device")
    p.add_argument("--num-splits", type=int, default=None, help="--gpu: attngen's split count (default: its heuristic)")
    p.add_argument("--peak-gbs", type=float, default=None, help="--gpu: the card's peak memory bandwidth in GB/s")
    p.add_argument("--warmup", type=int, default=3, help="--gpu: warmup calls (default 3)")
    p.add_argument("--rep-ms", type=int, default=100, help="--gpu: milliseconds of timed calls (default 100)")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.n_q < 1:
        print("decode: --n-q must be >= 1", file=sys.stderr)
        return 2
    try:
        mod = load_module(args.module)
    except (ValueError, OSError, ImportError) as e:
        print(f"decode: {e}", file=sys.stderr)
        return 2
    elem = {"fp16": 2, "bf16": 2, "fp32": 4}[args.dtype]
    rows = model_rows(mod, args.batch, args.lengths, args.n_q, elem)
    print(f"bytes-moved model, {mod.NAME}: {mod.Q_HEADS} query heads over {mod.KV_HEADS} KV heads, "
          f"head_dim {mod.HEAD_DIM}/{mod.V_HEAD_DIM}, {args.dtype}, Nq = {args.n_q}")
    print(_fmt(rows, ["batch", "cache_len", "bytes_packed", "bytes_per_head", "per_head_over_packed"]))
    out_rows = [{"kind": "model", **r} for r in rows]
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print("decode: --gpu needs a CUDA device; the model above is all this machine can give", file=sys.stderr)
            return 2
        props = torch.cuda.get_device_properties(0)
        peak, source = peak_gbs(props, args.peak_gbs)
        timed = time_rows(mod, args.batch, args.lengths, args.n_q, args.dtype, warmup=args.warmup,
                          rep_ms=args.rep_ms, splits=args.num_splits)
        for r in timed:
            r["device"] = props.name
            r["fraction_of_peak"] = r["achieved_gbs"] / peak if peak else float("nan")
        print(f"\n{props.name}: peak {peak or float('nan'):.0f} GB/s ({source}); torch {torch.__version__}")
        print(_fmt(timed, ["impl", "batch", "cache_len", "ms", "achieved_gbs", "fraction_of_peak"]))
        out_rows += [{"kind": "timing", **r} for r in timed]
    if args.csv:
        keys = sorted({k for r in out_rows for k in r})
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(out_rows)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
