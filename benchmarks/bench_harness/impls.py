"""The implementations compared: attngen's module, its causal variant, torch SDPA (flash backend),
FlexAttention with the spec's expressions, and the optional flash_attn and fla NSA."""

from __future__ import annotations

import contextlib
import statistics
import time

from .output import Report, short_error
from .specs import SpecInfo

OPTIONAL_MODULES = {"flash_attn": "flash_attn", "fla_nsa": "fla.ops.nsa"}


def on_device(params: dict, device) -> dict:
    """The parameter values with their tensors on `device`."""
    import torch

    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in params.items()}


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
        # torch.compile traces those rather than attngen.language.expr.to_torch's walk over sympy (which
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


def make_impl(impl: str, info: SpecInfo, n: int, batch: int, dev: str, dtype, n_cfg: int, max_configs: int,
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
                        on_device(params, dev))
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
        how = "mask_mod and score_mod from the spec's expressions (attngen.language.expr.to_torch)" if not info.plain else ""
        return fn, "; ".join(x for x in (fn.gqa_note, "torch.compile defaults", how) if x), True
    if not info.plain and impl in ("flash_attn", "fla_nsa"):
        raise NotImplementedError(f"no {impl} form of this mask / score_mod (see the sdpa_flash_* baseline)")
    if impl == "flash_attn":
        return flash_attn_impl(info.mask), "", True
    if impl == "fla_nsa":
        fn, note = fla_nsa_impl(info, n, batch, dev, dtype)
        return fn, note, False
    raise ValueError(f"unknown implementation {impl!r}")


def spec_impls(info: SpecInfo, wanted: list[str], inside_causal: bool) -> list[str]:
    """The implementations timed for a spec. For an expression mask or a score_mod, sdpa_flash is
    the dense baseline (causal when every visible pair has kv <= q, else no mask) and attngen_causal
    (when wanted) follows attngen; for a plain spec attngen_causal is the spec itself, so it is left out."""
    if info.plain:
        return [i for i in wanted if i != "attngen_causal"]
    base = "sdpa_flash_causal" if inside_causal else "sdpa_flash_dense"
    return [base if i == "sdpa_flash" else i for i in wanted if i != "attngen_causal" or inside_causal]
