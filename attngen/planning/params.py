"""What the kernels receive for the spec's runtime parameters (kernel argument names, docstring
lines) and how they print the score_mod and its derivatives (for the backward and for learnable
tensors)."""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from attngen.language.expr import Expr, ParamDecl, d_param, d_score, print_triton, tensor_args, to_triton
from attngen.language.spec import Spec
from attngen.planning.masks import _RANGE_NAMES, PARAM_PREFIX



def kernel_param_names(decls: dict[str, ParamDecl]) -> tuple[str, ...]:
    """The kernel arguments that carry the parameters, in order: `arg_w` for a scalar, pointer,
    strides and sizes (expr.tensor_args) for a tensor."""
    out: list[str] = []
    for name, d in decls.items():
        out += tensor_args(PARAM_PREFIX + name, d.dims) if d.kind == "tensor" else [PARAM_PREFIX + name]
    return tuple(out)

@dataclass(frozen=True)
class GradParam:
    """A float tensor the score_mod reads: the kernel that feeds its gradient writes, per pair,
    `value` (dL/dscore_mod times d(score_mod)/d(element)) and the element's flat index `flat`
    (row-major over the tensor's shape), both 0 where the read falls outside the tensor."""

    name: str
    index: int  # position in the parameter tuple (declaration order)
    dtype: str
    dims: int
    value: str
    flat: str

@dataclass(frozen=True)
class ScoreModPlan:
    """The score_mod's Triton fragments: `fwd` / `bwd_t` over the natural-units score `b_z` in the
    [BM, BN] / transposed [BN, BM] orientation, `d_fwd` / `d_bwd_t` its derivative in score ("" when
    it is 1), and the float tensors that get gradients."""

    text: str
    doc: str
    fwd: str
    bwd_t: str
    d_fwd: str
    d_bwd_t: str
    grads: tuple[GradParam, ...]

def score_mod_plan(mod: Expr | None, decls: dict[str, ParamDecl], backward: bool = True) -> ScoreModPlan | None:
    """Print a parsed score_mod (None for none) for the kernels. The mod is applied to the scaled
    score q.k * scale in natural units; the kernels convert from and back to their base-2 scores.
    Without `backward` the derivatives are left empty."""
    if mod is None:
        return None
    text = mod.text.strip()
    base = {**_RANGE_NAMES, **{n: PARAM_PREFIX + n for n in decls}}
    # positions, not rows: the kernels define pos_m = o_m + Q_OFF and pos_n = o_n + KV_OFF
    fwd_names = {**base, "q_idx": "pos_m[:, None]", "kv_idx": "pos_n[None, :]", "score": "b_z"}
    t_names = {**base, "q_idx": "pos_m[None, :]", "kv_idx": "pos_n[:, None]", "score": "b_zt"}

    def show(e, names, full):
        out = to_triton(e, names)
        # a mod that does not read score (or the indices) still gives a whole tile
        return out if "score" in e.symbols else f"({out} + 0.0 * {full})"

    if not backward:
        return ScoreModPlan(text, str(mod), show(mod, fwd_names, "b_z"), show(mod, t_names, "b_zt"), "", "", ())
    ds = d_score(mod)
    grads = []
    for d in mod.decls:
        if d.kind != "tensor" or d.elem != "float":
            continue
        (load,) = {n for n in sympy.preorder_traversal(mod.sympy) if isinstance(n, sympy.Indexed) and n.base.label.name == d.name}
        sizes = [f"{PARAM_PREFIX}{d.name}_size_{i}" for i in range(d.dims)]
        idx = [f"tl.cast({print_triton(i, fwd_names, mod)}, tl.int64)" for i in load.indices]
        ok = " & ".join(f"({i} >= 0) & ({i} < {n})" for i, n in zip(idx, sizes))
        flat = idx[0]
        for i, n in zip(idx[1:], sizes[1:]):
            flat = f"({flat}) * {n} + {i}"
        value = to_triton(d_param(mod, d.name), fwd_names)
        grads.append(GradParam(d.name, list(decls).index(d.name), d.dtype, d.dims, f"tl.where({ok}, b_ds * {value}, 0.0)", f"tl.where({ok}, {flat}, 0)"))
    return ScoreModPlan(
        text=text, doc=str(mod), fwd=show(mod, fwd_names, "b_z"), bwd_t=show(mod, t_names, "b_zt"),
        # a derivative of 1 (an additive bias) leaves the gradient step as it is
        d_fwd="" if ds.sympy == 1 else to_triton(ds, fwd_names), d_bwd_t="" if ds.sympy == 1 else to_triton(ds, t_names),
        grads=tuple(grads),
    )

def param_docs(spec: Spec) -> tuple[str, ...]:
    decls = spec.param_decls
    readers = {n: [] for n in decls}
    for e in (spec.mask_expr, spec.score_mod_expr):
        if e is not None:
            for n in e.params | e.tensors:
                readers[n].append(e.kind)
    lines = []
    for n, d in decls.items():
        role = {("mask",): "the mask's", ("score_mod",): "the score_mod's"}.get(tuple(readers[n]), "the mask's and score_mod's")
        if d.kind != "tensor":
            extra = " (a constant: no gradient)" if d.kind == "float" and "score_mod" in readers[n] else ""
            lines.append(f"{n}: {d.kind}, required: {role} parameter {n}{extra}.")
        else:
            learn = "; learnable: receives a gradient" if d.elem == "float" else ""
            lines.append(f"{n}: {d.dtype} tensor with {d.dims} dim{'s' * (d.dims > 1)} on q's device, required: {role} parameter {n}{learn}.")
    return tuple(lines)
