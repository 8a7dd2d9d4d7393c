"""The one tolerance rule, and a comparison that says what went wrong.

A kernel result passes when its error against the float64 reference is at most

    K * (error of the same computation done by PyTorch at the input dtype) + ULP[dtype] * max(1, |ref|max)

as flash-attention's tests do: the kernel may be a small factor worse than PyTorch at the same
precision, never more, and the floor (about one fp16/bf16 ulp, or 32 fp32 ulps, of the largest reference value) covers
cases where PyTorch happens to be exact (N = 1).
Infinities must match exactly (a row that sees no key has lse = -inf in both); any NaN fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

K = 3.0
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-18}


@dataclass
class Comparison:
    name: str
    max_err: float
    baseline_err: float
    tolerance: float
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def ratio(self) -> float:
        """max_err as a fraction of the tolerance the rule allowed: at most 1 when it passes."""
        if self.tolerance > 0:
            return self.max_err / self.tolerance
        return 0.0 if self.max_err == 0 else float("inf")

    def __str__(self) -> str:
        head = (f"{self.name}: max error {self.max_err:.3g} = {self.ratio:.3g} x tolerance {self.tolerance:.3g} "
                f"(PyTorch at dtype: {self.baseline_err:.3g})")
        return "\n  ".join([head, *self.problems])


def compare(name: str, actual: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype) -> Comparison:
    """Compare a kernel result with the float64 reference under the tolerance rule."""
    problems = []
    if actual.shape != ref.shape:
        return Comparison(name, float("inf"), 0.0, 0.0, [f"shape {tuple(actual.shape)} != reference {tuple(ref.shape)}"])
    a = actual.detach().to(torch.float64).cpu()
    r = ref.detach().to(torch.float64).cpu()
    bl = baseline.detach().to(torch.float64).cpu()
    nan = torch.isnan(a)
    if nan.any():
        where = nan.nonzero()[:3].tolist()
        problems.append(f"{int(nan.sum())} NaN element(s), first at {where}")
    inf_a, inf_r = torch.isinf(a), torch.isinf(r)
    inf_bad = (inf_a | inf_r) & ~(inf_a & inf_r & (a == r))
    if inf_bad.any():
        where = inf_bad.nonzero()[:3].tolist()
        problems.append(f"{int(inf_bad.sum())} element(s) infinite in one of kernel/reference only, first at {where}")
    finite = torch.isfinite(a) & torch.isfinite(r)
    diff = torch.where(finite, (a - r).abs(), torch.zeros_like(a))
    bdiff = torch.where(torch.isfinite(bl) & torch.isfinite(r), (bl - r).abs(), torch.zeros_like(bl))
    max_err = float(diff.max()) if diff.numel() else 0.0
    base_err = float(bdiff.max()) if bdiff.numel() else 0.0
    scale = float(torch.where(finite, r.abs(), torch.zeros_like(r)).max()) if r.numel() else 0.0
    tol = K * base_err + ULP[dtype] * max(1.0, scale)
    bad = diff > tol
    if bad.any():
        idx = diff.flatten().argmax().item()
        pos = list(torch.unravel_index(torch.tensor(idx), diff.shape))
        pos = [int(p) for p in pos]
        problems.append(
            f"{int(bad.sum())}/{diff.numel()} element(s) beyond tolerance; worst at {pos}: "
            f"kernel {float(a.flatten()[idx]):.6g}, reference {float(r.flatten()[idx]):.6g}"
        )
    return Comparison(name, max_err, base_err, tol, problems)


def random_inputs(mod, *, batch: int, n_q: int, n_k: int, dtype: torch.dtype, seed: int = 0, bnhd: bool = False):
    """q, k, v for a generated module, as [B, H, N, D] tensors on the device the module runs on
    (CPU under the interpreter, else CUDA); with bnhd=True they are views of
    [B, N, H, D] storage (the layout most models keep), exercising non-contiguous strides."""
    from attngen.runtime import DEVICE

    g = torch.Generator().manual_seed(seed)

    def make(h, n, d):
        if bnhd:
            return torch.randn(batch, n, h, d, generator=g).to(DEVICE, dtype).transpose(1, 2)
        return torch.randn(batch, h, n, d, generator=g).to(DEVICE, dtype)

    return (
        make(mod.Q_HEADS, n_q, mod.HEAD_DIM),
        make(mod.KV_HEADS, n_k, mod.HEAD_DIM),
        make(mod.KV_HEADS, n_k, mod.V_HEAD_DIM),
    )


def _loss(o, lse, do, dlse):
    # lse enters the loss too, so its gradient path is tested; -inf rows are left out
    return (o.to(do.dtype) * do).sum() + (torch.where(torch.isfinite(lse), lse, 0).to(dlse.dtype) * dlse).sum()


def reference_mask(mod, params: dict | None = None, *, q_offset: int = 0, kv_offset: int = 0):
    """The mask of a generated module for attngen.reference.dense: 'none' / 'causal', or a callable built
    from the module's MASK expression text and PARAMS declarations with the given values
    (generated modules do not import sympy, so this is done here). With offsets, the callable
    takes rows and gives the mask positions, as attention(q_offset=, kv_offset=) does: q_idx is
    q_offset + row, q_len is q_offset + Nq (and kv_idx, kv_len alike)."""
    if mod.MASK == "none" or (mod.MASK == "causal" and q_offset == kv_offset == 0):
        return mod.MASK
    from attngen.language.expr import parse_expr, parse_params, to_torch

    text = "q_idx >= kv_idx" if mod.MASK == "causal" else mod.MASK
    decls = parse_params(dict(mod.PARAMS)) if mod.PARAMS else {}
    fn = to_torch(parse_expr(text, kind="mask", params=decls))
    values = dict(params or {})

    def mask(b, h, q_idx, kv_idx):
        return fn(b, h, q_idx + q_offset, kv_idx + kv_offset, q_offset + q_idx.shape[2], kv_offset + kv_idx.shape[3], **values)

    return mask


def reference_score_mod(mod, params: dict | None = None, *, q_offset: int = 0, kv_offset: int = 0):
    """The score_mod of a generated module for attngen.reference.dense (None when it has none): its
    SCORE_MOD text evaluated elementwise by expr.to_torch with the given parameter values (float
    tensors in the dtype given, so a float64 copy gives the float64 reference), at the positions
    the offsets give (as reference_mask)."""
    if not getattr(mod, "SCORE_MOD", ""):
        return None
    from attngen.language.expr import parse_expr, parse_params, to_torch

    fn = to_torch(parse_expr(mod.SCORE_MOD, kind="score_mod", params=parse_params(dict(mod.PARAMS))))
    values = dict(params or {})

    def score_mod(score, b, h, q_idx, kv_idx):
        return fn(b, h, q_idx + q_offset, kv_idx + kv_offset, q_offset + q_idx.shape[2], kv_offset + kv_idx.shape[3],
                  score=score, **values)

    return score_mod


def learnable_params(mod) -> list[str]:
    """The float tensor parameters of a generated module (each receives a gradient)."""
    return [n for n, kind in getattr(mod, "PARAMS", {}).items() if isinstance(kind, dict) and kind["tensor"] in ("fp32", "fp16", "bf16")]


def default_params(mod, *, batch: int, n_q: int, n_k: int, seed: int = 0, device=None) -> dict:
    """Values for a generated module's parameters made from its declarations alone
    (attngen.param_values.generic; shipped specs have chosen values there too, see check_values).
    Tensors are on `device`, by default where the module runs."""
    from attngen.param_values import Shape, generic

    return generic(dict(getattr(mod, "PARAMS", {}) or {}), Shape(mod.Q_HEADS, batch, n_q, n_k), seed=seed, device=device)


def check_module(
    mod, q, k, v, *, scale: float | None = None, backward: bool = True, seed: int = 0, params: dict | None = None,
    q_offset: int = 0, kv_offset: int = 0,
) -> list[Comparison]:
    """Run a generated module on (q, k, v) and compare o, lse and (if backward) dq, dk, dv with the
    float64 reference, using PyTorch at the input dtype as the baseline of the tolerance rule.
    `params` are the mask's and score_mod's parameters (keyword arguments of the module's
    attention); the gradient of each float tensor among them (learnable_params) is compared too.
    `q_offset` / `kv_offset` go to attention() and shift the reference's mask and score_mod."""
    from attngen import runtime
    from attngen.reference.dense import attention_reference

    dtype = q.dtype
    params = dict(params or {})
    offsets = dict(q_offset=q_offset, kv_offset=kv_offset)
    ref_mask = reference_mask(mod, params, **offsets)
    learn = learnable_params(mod) if backward else []
    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    kparams = {n: (t.detach().requires_grad_() if n in learn else t) for n, t in params.items()}
    leaves += [kparams[n] for n in learn]
    with runtime.poison_outputs():
        o, lse = mod.attention(*leaves[:3], scale=scale, return_lse=True, **offsets, **kparams)
    g = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)
    dlse = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(o.device)
    results = {}
    for label, cdt in (("ref", torch.float64), ("base", None)):
        ins = [t.detach().clone().requires_grad_(backward) for t in (q, k, v)]
        rparams = dict(params)
        for n in learn:
            rparams[n] = params[n].detach().to(cdt or params[n].dtype).requires_grad_()
            ins.append(rparams[n])
        ro, rlse = attention_reference(
            *ins[:3], scale=scale, mask=ref_mask, compute_dtype=cdt, score_mod=reference_score_mod(mod, rparams, **offsets)
        )
        grads = [None] * len(ins)
        if backward:
            grads = torch.autograd.grad(_loss(ro, rlse, do.to(ro.dtype), dlse.to(rlse.dtype)), ins, allow_unused=True)
        results[label] = (ro, rlse, *grads)
    out = [compare("o", o, results["ref"][0], results["base"][0], dtype),
           compare("lse", lse, results["ref"][1], results["base"][1], dtype)]
    if backward:
        with runtime.poison_outputs():
            kernel_grads = torch.autograd.grad(_loss(o, lse, do.to(o.dtype), dlse.float()), leaves)
        names = ("dq", "dk", "dv", *(f"d{n}" for n in learn))
        for name, kg, rg, bg in zip(names, kernel_grads, results["ref"][2:], results["base"][2:]):
            out.append(compare(name, kg, rg, bg, dtype))
    return out


# ----------------------------------------------------------------------------- NSA


def random_nsa_inputs(mod, *, batch: int, n: int, dtype: torch.dtype, seed: int = 0, bnhd: bool = False, compressed: bool = False):
    """q, k, v, gates (in (0, 1), as after a sigmoid) for a generated NSA module, and k_cmp, v_cmp
    (random, as a learnable compression would give) when `compressed`, else None, None."""
    from attngen.reference.nsa import num_compressed
    from attngen.runtime import DEVICE

    q, k, v = random_inputs(mod, batch=batch, n_q=n, n_k=n, dtype=dtype, seed=seed, bnhd=bnhd)
    g = torch.Generator().manual_seed(seed + 7)
    gates = torch.rand(batch, mod.Q_HEADS, n, 3, generator=g).to(DEVICE, dtype)
    if not compressed:
        return q, k, v, gates, None, None
    c = num_compressed(n, mod.BLOCK, mod.STRIDE)
    k_cmp = torch.randn(batch, mod.KV_HEADS, c, mod.HEAD_DIM, generator=g).to(DEVICE, dtype)
    v_cmp = torch.randn(batch, mod.KV_HEADS, c, mod.V_HEAD_DIM, generator=g).to(DEVICE, dtype)
    return q, k, v, gates, k_cmp, v_cmp


def nsa_composed(mod, q, k, v, gates, k_cmp, v_cmp, block_indices, *, scale=None, compute_dtype=torch.float64):
    """NSA with a generated module's parameters over given block indices, assembled from the
    oracle's masks (attngen.reference.nsa) and the dense reference: in float64, or with
    compute_dtype=None in PyTorch at the inputs' dtype (the baseline of the tolerance rule).
    k_cmp / v_cmp None: mean pooling of k / v. Returns (o, {"lse_cmp", "lse_slc"[, "lse_win"]})."""
    from attngen.reference import nsa as nr
    from attngen.reference.dense import attention_reference

    n, group = q.shape[2], mod.GROUP
    cd = compute_dtype or q.dtype
    if k_cmp is None:
        k_cmp = nr.compress_mean(k.to(cd), block=mod.BLOCK, stride=mod.STRIDE)
        v_cmp = nr.compress_mean(v.to(cd), block=mod.BLOCK, stride=mod.STRIDE)
    c = k_cmp.shape[2]
    vis = nr.compressed_visibility(n, c, block=mod.BLOCK, stride=mod.STRIDE, device=q.device).view(1, 1, n, c)
    slc = nr.selection_mask(block_indices, select_block=mod.SELECT_BLOCK, n_keys=n).repeat_interleave(group, dim=1)
    o_cmp, lse_cmp = attention_reference(q, k_cmp, v_cmp, scale=scale, mask=vis, compute_dtype=compute_dtype)
    o_slc, lse_slc = attention_reference(q, k, v, scale=scale, mask=slc, compute_dtype=compute_dtype)
    g = gates.to(cd)
    o = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc
    lse = {"lse_cmp": lse_cmp, "lse_slc": lse_slc}
    if mod.WINDOW:
        win = nr.window_mask(n, mod.WINDOW, n, q.device).view(1, 1, n, n)
        o_win, lse["lse_win"] = attention_reference(q, k, v, scale=scale, mask=win, compute_dtype=compute_dtype)
        o = o + g[..., 2:3] * o_win
    return o, lse


def check_nsa_module(
    mod, q, k, v, gates, k_cmp=None, v_cmp=None, *, scale: float | None = None, backward: bool = True, seed: int = 0
) -> list[Comparison]:
    """Run a generated NSA module's nsa_attention and compare o, every branch's lse and (if
    backward) dq, dk, dv, dgates (and dk_cmp, dv_cmp when given) with the float64 reference under
    the tolerance rule. The reference uses the module's block indices, so ties in the selection
    cannot make the two differ; `nsa_indices_agree` checks the selection itself."""
    from attngen import runtime

    dtype = q.dtype
    inputs = [q, k, v, gates] + ([k_cmp, v_cmp] if k_cmp is not None else [])
    names = ["dq", "dk", "dv", "dgates", "dk_cmp", "dv_cmp"][: len(inputs)]
    leaves = [t.detach().requires_grad_(backward) for t in inputs]
    with runtime.poison_outputs():
        o, aux = mod.nsa_attention(*leaves[:4], k_cmp=leaves[4] if k_cmp is not None else None,
                                   v_cmp=leaves[5] if k_cmp is not None else None, scale=scale, return_aux=True)
    idx = aux["block_indices"]
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(o.device)
    results = {}
    for label, cdt in (("ref", torch.float64), ("base", None)):
        ins = [t.detach().clone().requires_grad_(backward) for t in inputs]
        ro, rlse = nsa_composed(mod, *ins[:4], *(ins[4:] or [None, None]), idx, scale=scale, compute_dtype=cdt)
        grads = torch.autograd.grad((ro * do.to(ro.dtype)).sum(), ins, allow_unused=True) if backward else ()
        results[label] = (ro, rlse, [torch.zeros_like(t) if gr is None else gr for t, gr in zip(ins, grads)])
    out = [compare("o", o, results["ref"][0], results["base"][0], dtype)]
    out += [compare(name, aux[name], results["ref"][1][name], results["base"][1][name], dtype) for name in results["ref"][1]]
    if backward:
        with runtime.poison_outputs():
            kernel_grads = torch.autograd.grad((o.to(do.dtype) * do).sum(), leaves, allow_unused=True)
        kernel_grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, kernel_grads)]
        for name, kg, rg, bg in zip(names, kernel_grads, results["ref"][2], results["base"][2]):
            out.append(compare(name, kg, rg, bg, dtype))
    return out
