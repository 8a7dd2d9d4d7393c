"""Every decision about a generated module, made in Python so the templates only print.

The plan turns a validated Spec into: padded head dims, the autotune space, and the Triton source
fragments the templates splice in (loop bounds of the full and partial tile ranges, the mask
predicate, load masks). Nothing here imports torch or triton.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

from .spec import Spec


@dataclass(frozen=True)
class MaskRule:
    """How a mask shapes the tile loops.

    Bounds are Triton expressions over the tile start (`start_m` for a query tile, `start_n` for a
    KV tile), BLOCK_M, BLOCK_N, N_Q and N_K:
      fwd_full_end   keys [0, this) are visible to every row of the query tile (rounded down to
                     whole KV tiles by the kernel): those tiles skip the mask;
      fwd_end        keys at or past this are invisible to every row: those tiles are not visited;
      dkdv_start     first query (a multiple of BLOCK_M) that can see any key of the KV tile;
      dkdv_full_start  first query (a multiple of BLOCK_M) from which every query sees every key of
                     the KV tile.
    Every kernel runs three tile loops (partial, full, partial); the hand-written rules leave the
    lower bounds at their defaults. Expression masks (`expr_rule`) also give the lower bounds fwd_start (first key any
    row of the query tile sees) and fwd_full_start (first key every row sees), and dkdv_full_end /
    dkdv_end (the end of the queries that see all / any of the KV tile), each over `start_m` /
    `last_m` or `start_n` / `last_n`; fwd_visit / dkdv_visit say whether the tile sees anything.
    `predicate` is the visibility test over `{q}` and `{kv}` index grids, or None.
    `visible(q_idx, kv_idx)` and `fwd_bounds(start_m, block_m, n_q, n_k)` are the same rule in Python,
    for counting tiles (benchmarks, `tile_counts`) and for checking the bounds against brute force.
    """

    doc: str
    predicate: str | None
    fwd_full_end: str
    fwd_end: str
    dkdv_start: str
    dkdv_full_start: str
    visible: Callable[[int, int], bool] | None
    fwd_bounds: Callable[[int, int, int, int], tuple[int, int]] | None
    # Expression masks (see `expr_rule`): lower bounds too, and the dK/dV range may end before N_Q.
    fwd_start: str = "0"
    fwd_full_start: str = "0"
    dkdv_full_end: str = "N_Q"
    dkdv_end: str = "N_Q"
    path: str = ""
    # whether a tile has any visible pair, over its clipped range `lo`/`hi` (`q_lo`/`q_hi`)
    fwd_visit: str = "lo < hi"
    dkdv_visit: str = "q_lo < q_hi"


MASK_RULES = {
    "none": MaskRule(
        doc="none (every query sees every key).",
        predicate=None,
        fwd_full_end="N_K",
        fwd_end="N_K",
        dkdv_start="0",
        dkdv_full_start="0",
        visible=lambda q, kv: True,
        fwd_bounds=lambda start_m, block_m, n_q, n_k: (n_k, n_k),
    ),
    "causal": MaskRule(
        doc="causal, q_idx >= kv_idx (top-left aligned, as SDPA's is_causal).",
        predicate="({q} >= {kv})",
        fwd_full_end="tl.minimum(start_m + 1, N_K)",
        fwd_end="tl.minimum(tl.minimum(start_m + BLOCK_M, N_Q), N_K)",
        dkdv_start="start_n // BLOCK_M * BLOCK_M",
        dkdv_full_start="tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M",
        visible=lambda q, kv: q >= kv,
        fwd_bounds=lambda start_m, block_m, n_q, n_k: (min(start_m + 1, n_k), min(start_m + block_m, n_q, n_k)),
    ),
}


# Source names of the expression symbols in the kernels (bounds and predicates).
_RANGE_NAMES = {"b": "i_b", "h": "i_h", "q_len": "N_Q", "kv_len": "N_K"}
PARAM_PREFIX = "arg_"


def _clip(text: str, n: str) -> str:
    return f"tl.minimum(tl.maximum({text}, 0), {n})"


def _combine(fn: str, texts: list[str]) -> str:
    out = texts[-1]
    for t in reversed(texts[:-1]):
        out = f"{fn}({t}, {out})"
    return out


def _affine_bounds(conj, var: str, other: str, names_lo: dict, names_hi: dict, n: str, printer, lo_hi=("lo", "hi")):
    """Bounds on `var` (q_idx or kv_idx) as a function of `other` over a tile [first, last] of it.

    Each inequality a*var + c*other + rest >= 0 with a = +1 is a lower bound var >= -(c*other + rest),
    with a = -1 an upper bound var < c*other + rest + 1. Over the tile, an affine function of
    `other` takes its extremes at the ends, so (visited_lo, full_lo, full_hi, visited_hi) are:
      visited_lo = max over lower bounds of their minimum over the tile (no visible pair below),
      full_lo    = max over lower bounds of their maximum (every row sees from here),
      full_hi    = min over upper bounds of their minimum, visited_hi = min of their maximum,
    each clipped to [0, n]. Returns None when a coefficient on `var` is not -1, 0 or +1;
    inequalities without `var` leave no full range (`full_hi` = "0").
    """
    import sympy

    from .expr import _SYMBOLS

    x = _SYMBOLS[other]
    lows, highs, free = [], [], False
    for ineq in conj:
        a, c = (ineq.q, ineq.kv) if var == "q_idx" else (ineq.kv, ineq.q)
        if a == 0:
            free = True
            continue
        if abs(a) != 1:
            return None
        f = -(c * x + ineq.rest) if a == 1 else c * x + ineq.rest + 1
        slope = -c if a == 1 else c
        at_min, at_max = (names_lo, names_hi) if slope >= 0 else (names_hi, names_lo)
        f = sympy.expand(f)
        pair = (printer(f, at_min), printer(f, at_max), printer(f, names_lo), printer(f, names_hi))
        (lows if a == 1 else highs).append(pair)
    v_lo = _clip(_combine("tl.maximum", [p[0] for p in lows]), n) if lows else "0"
    f_lo = _clip(_combine("tl.maximum", [p[1] for p in lows]), n) if lows else "0"
    f_hi = _clip(_combine("tl.minimum", [p[0] for p in highs]), n) if highs else n
    v_hi = _clip(_combine("tl.minimum", [p[1] for p in highs]), n) if highs else n
    # With one lower and one upper bound the width hi - lo is affine over the tile: if it is empty at
    # both ends, no row has a visible pair although [visited_lo, visited_hi) may not be empty.
    lo, hi = lo_hi
    visit = f"{lo} < {hi}"
    if len(lows) == 1 and len(highs) == 1:
        (_, _, lo_first, lo_last), (_, _, hi_first, hi_last) = lows[0], highs[0]
        visit = f"({lo} < {hi}) & (({lo_first} < {hi_first}) | ({lo_last} < {hi_last}))"
    return v_lo, f_lo, ("0" if free else f_hi), v_hi, visit


def expr_rule(text: str, params: tuple[tuple[str, str], ...] = ()) -> MaskRule:
    """The MaskRule of a mask expression. One conjunction of affine inequalities whose coefficients
    on q_idx and kv_idx are -1, 0 or 1 (and integer constant parts) gets closed-form tile bounds;
    anything else takes the safe path: every tile visited with the mask applied."""
    from .expr import _TritonPrinter, affine_dnf, parse_expr, parse_params, to_triton

    decls = parse_params(dict(params)) if params else {}
    expr = parse_expr(text, kind="mask", params=decls)
    base = {**_RANGE_NAMES, **{n: PARAM_PREFIX + n for n in decls}}
    predicate = to_triton(expr, {**base, "q_idx": "{q}", "kv_idx": "{kv}"}).replace("{", "{{").replace("}", "}}")
    predicate = predicate.replace("{{q}}", "{q}").replace("{{kv}}", "{kv}")

    def printer(e, names):
        out, _ = _TritonPrinter(expr, {**base, **names}).p(e)
        return f"({out})" if not out.replace("_", "").isalnum() else out

    doc = f"expression {expr}"  # sympy's printout: no quotes or backslashes to escape in a docstring
    dnf = affine_dnf(expr)
    reason = ""
    if dnf is None:
        reason = "not an affine condition on q_idx and kv_idx"
    elif len(dnf) != 1:
        reason = f"a disjunction of {len(dnf)} conditions" if dnf else "never true"
    elif any(i.strict or not i.rest.is_integer for i in dnf[0]):
        reason = "an inequality with a non-integer constant part"
    bounds = None
    if not reason:
        last_m = {"q_idx": "last_m"}
        last_n = {"kv_idx": "last_n"}
        fwd = _affine_bounds(dnf[0], "kv_idx", "q_idx", {"q_idx": "start_m"}, last_m, "N_K", printer)
        bwd = _affine_bounds(dnf[0], "q_idx", "kv_idx", {"kv_idx": "start_n"}, last_n, "N_Q", printer, ("q_lo", "q_hi"))
        if fwd is None or bwd is None:
            reason = "a coefficient on q_idx or kv_idx other than -1, 0, 1"
        else:
            bounds = fwd, bwd
    if bounds is None:
        return MaskRule(
            doc=doc, predicate=predicate, fwd_full_end="0", fwd_end="N_K", dkdv_start="0", dkdv_full_start="N_Q",
            visible=None, fwd_bounds=None,
            path=f"safe path ({reason}): every tile is visited with the mask applied",
        )
    (f_vlo, f_flo, f_fhi, f_vhi, f_visit), (b_vlo, b_flo, b_fhi, b_vhi, b_visit) = bounds
    return MaskRule(
        doc=doc, predicate=predicate,
        fwd_start=f_vlo, fwd_full_start=f_flo, fwd_full_end=f_fhi, fwd_end=f_vhi,
        dkdv_start=b_vlo, dkdv_full_start=b_flo, dkdv_full_end=f"({b_fhi}) // BLOCK_M * BLOCK_M", dkdv_end=b_vhi,
        fwd_visit=f_visit, dkdv_visit=b_visit,
        visible=None, fwd_bounds=None,
        path="closed-form tile bounds (one conjunction of affine inequalities)",
    )


def mask_rule(spec: Spec) -> MaskRule:
    """The shipped hand-written rule for none / causal, else the expression's rule."""
    if spec.mask in MASK_RULES:
        return MASK_RULES[spec.mask]
    return expr_rule(spec.mask, spec.params)


def param_decls(params) -> dict:
    """expr.ParamDecl per declared parameter of a spec's `params` pairs."""
    from .expr import parse_params

    return parse_params(dict(params)) if params else {}


def kernel_param_names(params) -> tuple[str, ...]:
    """The kernel arguments that carry the parameters, in order: `arg_w` for a scalar, pointer,
    strides and sizes (expr.tensor_args) for a tensor."""
    from .expr import tensor_args

    out: list[str] = []
    for name, d in param_decls(params).items():
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


def score_mod_plan(text: str, params, backward: bool = True) -> ScoreModPlan | None:
    """Print a score_mod (None for none) for the kernels. The mod is applied to the scaled score
    q.k * scale in natural units; the kernels convert from and back to their base-2 scores.
    Without `backward` the derivatives are left empty."""
    if not text:
        return None
    import sympy

    from .expr import _TritonPrinter, d_param, d_score, parse_expr, to_triton

    decls = param_decls(params)
    mod = parse_expr(text, kind="score_mod", params=decls)
    base = {**_RANGE_NAMES, **{n: PARAM_PREFIX + n for n in decls}}
    fwd_names = {**base, "q_idx": "o_m[:, None]", "kv_idx": "o_n[None, :]", "score": "b_z"}
    t_names = {**base, "q_idx": "o_m[None, :]", "kv_idx": "o_n[:, None]", "score": "b_zt"}

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
        printer = _TritonPrinter(mod, fwd_names)
        sizes = [f"{PARAM_PREFIX}{d.name}_size_{i}" for i in range(d.dims)]
        idx = [f"tl.cast({printer.p(i)[0]}, tl.int64)" for i in load.indices]
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


def _param_docs(spec: Spec) -> tuple[str, ...]:
    from .expr import parse_expr

    decls = param_decls(spec.params)
    readers = {n: [] for n in decls}
    for kind, text in (("mask", "" if spec.mask in MASK_RULES else spec.mask), ("score_mod", spec.score_mod)):
        if text:
            e = parse_expr(text, kind=kind, params=decls)
            for n in e.params | e.tensors:
                readers[n].append(kind)
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


def tile_counts(mask: str, n_q: int, n_k: int, block_m: int, block_n: int) -> dict[str, int]:
    """How many (query tile, KV tile) pairs the forward kernel visits, split into full (mask
    skipped) and partial (mask applied), for one (batch, head). Mirrors the kernel's loops."""
    rule = MASK_RULES[mask]
    full = partial = 0
    for start_m in range(0, n_q, block_m):
        full_end, end = rule.fwd_bounds(start_m, block_m, n_q, n_k)
        n_full = full_end // block_n
        n_all = -(-end // block_n) if end > n_full * block_n else n_full
        full += n_full
        partial += n_all - n_full
    total = -(-n_q // block_m) * -(-n_k // block_n)
    return {"full": full, "partial": partial, "visited": full + partial, "total": total}


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _and(*parts: str) -> str:
    return " & ".join(p for p in parts if p)


@dataclass(frozen=True)
class Plan:
    name: str
    summary: str
    q_heads: int
    kv_heads: int
    group: int
    head_dim: int
    v_head_dim: int
    block_d: int
    block_dv: int
    dtypes: tuple[str, ...]
    mask: str
    mask_doc: str
    mask_path: str
    params: dict[str, object]  # name -> 'int' | 'float' | {'tensor': DTYPE, 'dims': N}
    param_args: str  # ", arg_w, arg_c": kernel arguments (signatures and calls), "" without params
    param_nospec: tuple[str, ...]  # the scalar kernel arguments of the parameters (never specialised)
    param_docs: tuple[str, ...]  # one docstring line per parameter of attention()
    score_mod: ScoreModPlan | None
    backward: bool
    spaces: dict[str, tuple[tuple[dict, ...], int]]
    paths: tuple[str, ...]
    # Triton source fragments
    fwd_visit: str
    dkdv_visit: str
    fwd_start: str
    fwd_full_start: str
    fwd_full_end: str
    fwd_end: str
    dkdv_start: str
    dkdv_full_start: str
    dkdv_full_end: str
    dkdv_end: str
    mask_and_fwd: str
    mask_bwd_t: str
    q_rows_mask: str
    o_rows_mask: str
    do_rows_mask: str
    qt_cols_mask: str
    k_rows_mask: str
    v_rows_mask_m: str
    k_cols_mask: str
    k_cols_mask_n: str
    v_rows_mask: str
    v_rows_mask_n: str
    vt_cols_mask: str
    vt_cols_mask_n: str


# Shared memory a config may plan for: the smaller opt-in maximum of the targets (A100, sm_80),
# so one generated module suits sm_80 and sm_90. `attngen report` shows the real figures.
SMEM_BUDGET = 163 * 1024
# Register words per thread each kernel may plan for (over num_warps * 32 threads), against the
# estimate in `footprint`. Calibrated with `attngen report` at sm_90, D = 128, fp16 (llama3_gqa):
# forward 128x128 w8 (64 words) compiles to 244 registers and 128x64 w4 (128 words) spills;
# dK/dV 32x32 w4 (112 words) compiles to 214 registers and 64x32 w4 (160 words) spills.
REGISTER_BUDGET = {"_fwd_kernel": 64, "_bwd_dq_kernel": 64, "_bwd_dkdv_kernel": 112}
BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
KERNELS = ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")


def footprint(kernel: str, c: dict, block_d: int, block_dv: int) -> tuple[int, int]:
    """(elements of shared memory, 32-bit register words) one program of `kernel` needs.

    Shared memory: the forward and dQ keep a query tile and stream num_stages K/V tiles; dK/dV
    keeps a K/V tile and streams num_stages Q/dO tiles. Registers: the fp32 accumulators (O
    [BM, DV]; dQ [BM, D]; dK and dV [BN, D + DV]); dK/dV also holds its [BN, BM] score and
    probability tiles and the streamed 16-bit Q/dO operands, which is where it runs out first.
    """
    bm, bn, st = c["block_m"], c["block_n"], c["num_stages"]
    if kernel == "_fwd_kernel":
        return bm * block_d + st * bn * (block_d + block_dv), bm * block_dv
    if kernel == "_bwd_dq_kernel":
        return bm * (block_d + block_dv) + st * bn * (block_d + block_dv), bm * block_d
    regs = bn * (block_d + block_dv) + 2 * bm * bn + bm * (block_d + block_dv) // 2
    return bn * (block_d + block_dv) + st * bm * (block_d + block_dv), regs


def keep(kernel: str, c: dict, block_d: int, block_dv: int, elem_bytes: int) -> bool:
    """The autotune pruning rule: the tiles fit shared memory and the estimate fits registers."""
    smem, regs = footprint(kernel, c, block_d, block_dv)
    return smem * elem_bytes <= SMEM_BUDGET and regs <= REGISTER_BUDGET[kernel] * 32 * c["num_warps"]


def autotune_spaces(spec: Spec) -> dict[str, tuple[tuple[dict, ...], int]]:
    """Per kernel: the spec's tile combinations that pass `keep`, smallest tiles first (the
    interpreter runs the first), and how many were pruned. Shared memory is sized for the spec's
    widest dtype; registers for 16-bit inputs (fp32 kernels may still spill: `attngen report`
    says). If the rule prunes everything the smallest combination is kept."""
    t = spec.tiles
    block_d, block_dv = next_pow2(spec.head_dim), next_pow2(spec.v_head_dim)
    elem = max(BYTES[d] for d in spec.dtypes)
    combos = [
        {"block_m": bm, "block_n": bn, "num_warps": w, "num_stages": s}
        for bm, bn, w, s in itertools.product(
            sorted(t.block_m), sorted(t.block_n), sorted(t.num_warps), sorted(t.num_stages)
        )
    ]
    spaces = {}
    for kernel in KERNELS if spec.backward else KERNELS[:1]:
        kept = [c for c in combos if keep(kernel, c, block_d, block_dv, elem)] or combos[:1]
        spaces[kernel] = (tuple(kept), len(combos) - len(kept))
    return spaces


def make_plan(spec: Spec) -> Plan:
    rule = mask_rule(spec)
    block_d, block_dv = next_pow2(spec.head_dim), next_pow2(spec.v_head_dim)
    pad_d = block_d != spec.head_dim
    pad_dv = block_dv != spec.v_head_dim
    # Padded head dims: literal bounds, so the tile helpers need no extra constexpr arguments.
    d, dv = spec.head_dim, spec.v_head_dim
    d_row = f"(o_d[None, :] < {d})" if pad_d else ""  # D along columns
    d_col = f"(o_d[:, None] < {d})" if pad_d else ""  # D along rows (transposed tiles)
    dv_row = f"(o_dv[None, :] < {dv})" if pad_dv else ""
    dv_col = f"(o_dv[:, None] < {dv})" if pad_dv else ""

    def opt_mask(m: str) -> str:
        return f", mask={m}, other=0.0" if m else ""

    pred = rule.predicate
    mask_fwd = pred.format(q="o_m[:, None]", kv="o_n[None, :]") if pred else ""
    mask_t = pred.format(q="o_m[None, :]", kv="o_n[:, None]") if pred else "True"
    summary = (
        f"{spec.grouping} attention, {spec.q_heads} query heads over {spec.kv_heads} KV heads, "
        f"head_dim {spec.head_dim}" + (f" (v {spec.v_head_dim})" if spec.v_head_dim != spec.head_dim else "")
        + f", mask {spec.mask if spec.mask in MASK_RULES else rule.doc.removeprefix('expression ')}."
    )
    sm = score_mod_plan(spec.score_mod, spec.params, spec.backward)
    pointers = {f"{PARAM_PREFIX}{n}_ptr" for n, d in param_decls(spec.params).items() if d.kind == "tensor"}
    if sm:
        summary = f"{summary[:-1]}, score_mod {sm.doc}."
    if rule.path:  # an expression mask
        paths = (
            f"mask: {rule.path}.",
            f"forward and dQ: KV tiles from ({rule.fwd_start}) to ({rule.fwd_end}) are visited; those from ({rule.fwd_full_start}) to ({rule.fwd_full_end}) run unmasked.",
            f"dK/dV: query tiles from ({rule.dkdv_start}) to ({rule.dkdv_end}) are visited; those from ({rule.dkdv_full_start}) to ({rule.dkdv_full_end}) run unmasked.",
        )
    elif pred:
        paths = (
            f"forward and dQ: KV tiles below ({rule.fwd_full_end}) run unmasked; tiles up to ({rule.fwd_end}) apply the mask; later tiles are skipped.",
            f"dK/dV: query tiles from ({rule.dkdv_start}) to ({rule.dkdv_full_start}) apply the mask; later ones run unmasked; earlier ones are skipped.",
        )
    else:
        paths = (
            "forward and dQ: every KV tile runs unmasked except the last partial one (sequence end).",
            "dK/dV: every query tile runs unmasked (rows past the end contribute p = 0).",
        )
    if sm:
        paths += (
            "score_mod: applied to q.k * scale (natural units) on every visited tile, before the mask; "
            "dQ and dK/dV multiply dL/d(score_mod) by its derivative in score.",
        )
        if sm.grads:
            paths += (
                f"gradients of {', '.join(g.name for g in sm.grads)} (only when one requires grad): a separate pass "
                "over query-row chunks recomputes p and dp for every (query, key) pair and writes each pair's "
                "contribution and element index (12 bytes a pair, at most runtime.PARAM_GRAD_ELEMS pairs a chunk), "
                "summed per element in index order (runtime.index_sum_): deterministic, no atomics, but about one "
                "more dQ pass plus a sort of B * H * Nq * Nk entries, with no tile skipped.",
            )
    if spec.description:
        summary = f"{spec.description.rstrip('.')}. {summary}"
    return Plan(
        name=spec.name,
        summary=summary,
        q_heads=spec.q_heads,
        kv_heads=spec.kv_heads,
        group=spec.group,
        head_dim=spec.head_dim,
        v_head_dim=spec.v_head_dim,
        block_d=block_d,
        block_dv=block_dv,
        dtypes=spec.dtypes,
        mask=spec.mask,
        mask_doc=rule.doc,
        mask_path=rule.path or ("hand-written tile bounds" if pred else "no mask"),
        params={n: (k if isinstance(k, str) else dict(k)) for n, k in spec.params},
        param_args="".join(f", {a}" for a in kernel_param_names(spec.params)),
        param_nospec=tuple(a for a in kernel_param_names(spec.params) if a not in pointers),
        score_mod=sm,
        param_docs=_param_docs(spec),
        backward=spec.backward,
        spaces=autotune_spaces(spec),
        paths=paths,
        fwd_visit=rule.fwd_visit,
        dkdv_visit=rule.dkdv_visit,
        fwd_start=rule.fwd_start,
        fwd_full_start=rule.fwd_full_start,
        fwd_full_end=rule.fwd_full_end,
        fwd_end=rule.fwd_end,
        dkdv_start=rule.dkdv_start,
        dkdv_full_start=rule.dkdv_full_start,
        dkdv_full_end=rule.dkdv_full_end,
        dkdv_end=rule.dkdv_end,
        mask_and_fwd=f" & {mask_fwd}" if mask_fwd else "",
        mask_bwd_t=mask_t,
        q_rows_mask=_and("m_m[:, None]", d_row),
        o_rows_mask=_and("m_m[:, None]", dv_row),
        do_rows_mask=_and("m_m[:, None]", dv_row),
        qt_cols_mask=_and("m_m[None, :]", d_col),
        k_rows_mask=_and("m_n[:, None]", d_row),
        v_rows_mask_m=_and("m_n[:, None]", dv_row),
        k_cols_mask=opt_mask(d_col),
        k_cols_mask_n=_and("(o_n[None, :] < N_K)", d_col),
        v_rows_mask=opt_mask(dv_row),
        v_rows_mask_n=_and("(o_n[:, None] < N_K)", dv_row),
        vt_cols_mask=opt_mask(dv_col),
        vt_cols_mask_n=_and("(o_n[None, :] < N_K)", dv_col),
    )
