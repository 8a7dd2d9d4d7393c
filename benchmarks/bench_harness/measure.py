"""Measurement: the tiles section (tile work against the least needed) and the timing section
(CUDA events, warmup, median of repeats, peak memory)."""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path

from .counts import COUNT_MAX_N, PASS_FLOP_FACTOR, flops_fwd, mask_counts, min_tiles, unmasked_pairs
from .impls import OPTIONAL_MODULES, chosen_config, limit_configs, make_impl, on_device, optional_available, spec_impls
from .output import Report, short_error
from .specs import SpecInfo, causal_variant, tile_configs


def run_tiles(report: Report, infos: list[SpecInfo], lengths: list[int], device: str = "cpu") -> None:
    from attngen.planning.classify import classify_tiles
    from attngen.planning.masks import mask_rule
    from attngen.language.spec import load_spec

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
                counted, pairs, _ = mask_counts(visible, n, n, blocks, params=on_device(params, device), device=device)
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
                    fn, note, counts_flops = make_impl(impl, info, n, batch, dev, dtype, n_cfg, args.max_configs,
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
                                call = pass_callable(fn, pass_, q, k, v, do)
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


def pass_callable(fn, pass_, q, k, v, do):
    """A no-argument callable running one pass (fwd, bwd or fwd_bwd) of fn on q, k, v, with do as
    the output gradient; bwd reuses one forward graph."""
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
