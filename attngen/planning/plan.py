"""Every decision about a generated module, made in Python so the templates only print.

The plan turns a validated Spec into: padded head dims, the autotune space, and the values the
templates' hooks print (templates/_dense_hooks.jinja): the names of the parameters' kernel
arguments, the tile-range statements and which tile loops run, the mask predicate, the score_mod,
the load masks of padded head dims. Values and whole Triton expressions only: the templates own
the punctuation and the layout of the code. Nothing here imports torch or triton.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import re
from dataclasses import dataclass

import sympy

from attngen.planning.classify import Bounds, classify, id_equality, range_statements
from attngen.language.expr import Expr, ParamDecl, d_param, d_score, print_triton, tensor_args, to_triton
from attngen.language.spec import Spec, SpecError


class StageError(Exception):
    """An unexpected exception while planning what one spec key asks for: a bug in attngen, which
    the build reports at that key's line (the original exception is the __cause__)."""

    def __init__(self, key: str, error: BaseException):
        super().__init__(f"{key}: {type(error).__name__}: {error}")
        self.key, self.error = key, error


@contextlib.contextmanager
def stage(key: str):
    """Attribute any exception but a SpecError raised inside to spec key `key` (StageError)."""
    try:
        yield
    except (SpecError, StageError):
        raise
    except Exception as e:
        raise StageError(key, e) from e


@dataclass(frozen=True)
class MaskRule:
    """How a mask shapes the tile loops.

    `fwd` and `dkdv` are classify.Bounds: Triton expressions over the tile start and last index
    (`start_m` / `last_m` for a query tile, `start_n` / `last_n` for a KV tile), BLOCK_M, BLOCK_N,
    N_Q, N_K, i_b, i_h and the parameters (`arg_NAME`):
      fwd.start, fwd.end          the KV range [start, end) a query tile visits (no visible key
                                  outside it); fwd.full_start, fwd.full_end: keys every row of the
                                  query tile sees (rounded inward to whole KV tiles by the kernel):
                                  those tiles skip the mask;
      dkdv.start, dkdv.end        the query range a KV tile visits; dkdv.full_start: first query
                                  from which every query sees every key of the tile; dkdv.full_end:
                                  end (a multiple of BLOCK_M for expressions) of those queries;
      visit                       whether the tile sees anything, over its clipped range
                                  `lo`/`hi` (`q_lo`/`q_hi`);
      prelude                     temporaries (name, expression) computed first.
    Every kernel runs three tile loops (partial, full, partial) over these;
    classify.range_statements prints them as the statements the templates print and
    `classify_tiles` evaluates. `predicate` is the visibility test over `{q}` and `{kv}` index
    grids, or None. `tight`: every visited tile holds a visible pair. `path` and `notes` say, for
    an expression mask, how its tiles were classified (module docstrings).
    """

    doc: str
    predicate: str | None
    fwd: Bounds
    dkdv: Bounds
    path: str = ""
    notes: tuple[str, ...] = ()
    tight: bool = True


MASK_RULES = {
    "none": MaskRule(
        doc="none (every query sees every key).",
        predicate=None,
        fwd=Bounds(prelude=(), start="0", end="N_K", visit="lo < hi", full_start="0", full_end="N_K", note=""),
        dkdv=Bounds(prelude=(), start="0", end="N_Q", visit="q_lo < q_hi", full_start="0", full_end="N_Q", note=""),
    ),
    "causal": MaskRule(
        doc="causal, q_idx >= kv_idx (top-left aligned, as SDPA's is_causal).",
        predicate="({q} >= {kv})",
        fwd=Bounds(
            prelude=(), start="0", end="tl.minimum(tl.minimum(start_m + BLOCK_M, N_Q), N_K)", visit="lo < hi",
            full_start="0", full_end="tl.minimum(start_m + 1, N_K)", note="",
        ),
        dkdv=Bounds(
            prelude=(), start="start_n // BLOCK_M * BLOCK_M", end="N_Q",
            visit="start_n < q_hi",  # a KV tile past the last query is seen by none
            full_start="tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M", full_end="N_Q", note="",
        ),
    ),
}


# Source names of the expression symbols in the kernels (bounds and predicates).
_RANGE_NAMES = {"b": "i_b", "h": "i_h", "q_len": "N_Q", "kv_len": "N_K"}
PARAM_PREFIX = "arg_"


def expr_rule(expr: Expr) -> MaskRule:
    """The MaskRule of a parsed mask expression, with tile bounds from attngen.planning.classify:
    closed-form where the mask's conditions bound the indices (affine inequalities with integer
    coefficients, floor division by a width, disjunctions of those), the mask applied wherever a
    condition is not understood; the safe path (every tile visited, mask applied) when nothing
    bounds them."""
    names = [d.name for d in expr.decls]
    base = {**_RANGE_NAMES, **{n: PARAM_PREFIX + n for n in names}}
    predicate = to_triton(expr, {**base, "q_idx": "{q}", "kv_idx": "{kv}"}).replace("{", "{{").replace("}", "}}")
    predicate = predicate.replace("{{q}}", "{q}").replace("{{kv}}", "{kv}")
    c = classify(expr.sympy, tuple(names))
    return MaskRule(
        doc=f"expression {expr}",  # sympy's printout: no quotes or backslashes to escape in a docstring
        predicate=predicate,
        fwd=c.fwd,
        dkdv=dataclasses.replace(c.dkdv, full_end=f"({c.dkdv.full_end}) // BLOCK_M * BLOCK_M"),
        path=c.path, tight=c.tight,
        notes=(f"forward and dQ: {c.fwd.note}.", f"dK/dV: {c.dkdv.note}."),
    )


def mask_rule(spec: Spec) -> MaskRule:
    """The shipped hand-written rule for none / causal, else the parsed expression's rule."""
    if spec.mask_expr is None:
        return MASK_RULES[spec.mask]
    return expr_rule(spec.mask_expr)


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


def _param_docs(spec: Spec) -> tuple[str, ...]:
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


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _and(*parts: str) -> str:
    return " & ".join(p for p in parts if p)


@dataclass(frozen=True)
class TileLoop:
    """One tile loop of a kernel: the walked tiles start at range(start, end, BLOCK), both names of
    its range statements; `masked` tiles apply the mask (and the sequence end), the others are
    seen whole by every row of the kernel's own tile."""

    start: str
    end: str
    masked: bool


# The boundaries classify.range_statements assigns: walked tiles [lo, full_lo) and [full_hi, hi)
# are partial (masked), [full_lo, full_hi) full.
LOOP_BOUNDS = {"fwd": ("lo", "full_lo", "full_hi", "hi"), "dkdv": ("q_lo", "q_full", "q_full_end", "q_hi")}
_ZERO = re.compile(r"0|\(0\) // BLOCK_[MN] \* BLOCK_[MN]")


def tile_loops(rule: MaskRule, kernel: str) -> tuple[TileLoop, ...]:
    """The loops `kernel` ('fwd' for the forward and dQ, 'dkdv') runs over its tile ranges: the
    three of range_statements (partial, full, partial) less those the rule makes empty for every
    tile, and two neighbours with the same `masked` merged across an empty one, so a mask without
    full tiles runs one masked loop. The walk visits the same tiles in the same order.

    A range is empty when its two boundaries are equal, which the statements give (rule bounds are
    >= 0, and a visited range has lo <= hi):
      [lo, full_lo)       full_start is 0: full_lo = min(max(0, lo), hi) = lo;
      [full_lo, full_hi)  full_end is 0: full_hi = max(0, full_lo) = full_lo;
      [full_hi, hi)       dK/dV's unrounded full_end is its end: full_hi = max(end, full_lo) = hi.
    """
    lo, full_lo, full_hi, hi = bounds = LOOP_BOUNDS[kernel]
    b = rule.fwd if kernel == "fwd" else rule.dkdv
    full_start, full_end, end = b.full_start, b.full_end, b.end
    empty = (
        full_start == "0",
        _ZERO.fullmatch(full_end) is not None,
        kernel == "dkdv" and full_end == end,
    )
    # boundaries joined by an empty range are equal: a loop starts at the first of its start's
    # equals and ends at the last of its end's
    same = list(range(4))
    for i, e in enumerate(empty):
        if e:
            same[i + 1] = same[i]
    first = {i: bounds[same[i]] for i in range(4)}
    last = {i: bounds[max(j for j in range(4) if same[j] == same[i])] for i in range(4)}
    loops: list[TileLoop] = []
    prev_end = 0  # the boundary index where the last emitted loop ends
    for i, masked in enumerate((True, False, True)):
        if empty[i]:
            continue
        if loops and loops[-1].masked == masked and all(empty[j] for j in range(prev_end, i)):
            loops[-1] = TileLoop(loops[-1].start, last[i + 1], masked)
        else:
            loops.append(TileLoop(first[i], last[i + 1], masked))
        prev_end = i + 1
    return tuple(loops)


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
    kernel_params: tuple[str, ...]  # the kernel arguments that carry the parameters (kernel_param_names)
    param_nospec: tuple[str, ...]  # the scalar kernel arguments of the parameters (never specialised)
    param_docs: tuple[str, ...]  # one docstring line per parameter of attention()
    score_mod: ScoreModPlan | None
    backward: bool
    spaces: dict[str, tuple[tuple[dict, ...], int]]
    paths: tuple[str, ...]
    # -- tile ranges: the statements (name, expression, comment) of classify.range_statements, and
    # the loops over them (tile_loops) of the forward and dQ kernels (`fwd`) and of dK/dV
    fwd_ranges: tuple[tuple[str, str, str], ...]
    dkdv_ranges: tuple[tuple[str, str, str], ...]
    fwd_loops: tuple[TileLoop, ...]
    dkdv_loops: tuple[TileLoop, ...]
    # -- mask: the predicate over a [BM, BN] tile (o_m[:, None], o_n[None, :]) and over a
    # transposed [BN, BM] one; "" for no mask
    mask_fwd: str
    mask_t: str
    # -- load and store masks (Triton boolean expressions; "" where a full tile needs none): rows
    # of a query / KV tile (m_m, m_n) and padded head dims; `_n`: a KV tile's sequence end too
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
    # -- runtime skip: the position in the parameter tuple of the id tensor T of a
    # `T[b, q_idx] == T[b, kv_idx]` conjunct (classify.id_equality): the kernels skip tile pairs
    # whose id ranges are disjoint
    id_skip: int | None = None
    id_skip_name: str = ""
    id_args: tuple[str, ...] = ()  # the kernels' id-range arguments, () without the skip


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
    with stage("mask"):
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

    pred = rule.predicate
    mask_fwd = pred.format(q="o_m[:, None]", kv="o_n[None, :]") if pred else ""
    mask_t = pred.format(q="o_m[None, :]", kv="o_n[:, None]") if pred else ""
    summary = (
        f"{spec.grouping} attention, {spec.q_heads} query heads over {spec.kv_heads} KV heads, "
        f"head_dim {spec.head_dim}" + (f" (v {spec.v_head_dim})" if spec.v_head_dim != spec.head_dim else "")
        + f", mask {spec.mask if spec.mask in MASK_RULES else rule.doc.removeprefix('expression ')}."
    )
    decls = spec.param_decls
    with stage("score_mod"):
        sm = score_mod_plan(spec.score_mod_expr, decls, spec.backward)
    pointers = {f"{PARAM_PREFIX}{n}_ptr" for n, d in decls.items() if d.kind == "tensor"}
    if sm:
        summary = f"{summary[:-1]}, score_mod {sm.doc}."
    if rule.path:  # an expression mask
        paths = (f"mask: {rule.path}.", *rule.notes)
    elif pred:
        paths = (
            f"forward and dQ: KV tiles below ({rule.fwd.full_end}) run unmasked; tiles up to ({rule.fwd.end}) apply the mask; later tiles are skipped.",
            f"dK/dV: query tiles from ({rule.dkdv.start}) to ({rule.dkdv.full_start}) apply the mask; later ones run unmasked; earlier ones are skipped.",
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
    with stage("mask"):
        id_name = _id_skip(spec)
        ranges = range_statements(rule, "fwd"), range_statements(rule, "dkdv")
        loops = tile_loops(rule, "fwd"), tile_loops(rule, "dkdv")
    with stage("params"):
        param_docs = _param_docs(spec)
    with stage("tiles"):
        spaces = autotune_spaces(spec)
    if id_name:
        paths += (
            f"runtime tile skip: the mask implies {id_name}[b, q_idx] == {id_name}[b, kv_idx]; the wrapper takes the "
            f"[min, max] of {id_name} over every 16 positions (O(N) in torch) and the forward, dQ and dK/dV loops skip a "
            "visited tile pair whose query and key ranges are disjoint.",
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
        kernel_params=kernel_param_names(decls),
        param_nospec=tuple(a for a in kernel_param_names(decls) if a not in pointers),
        score_mod=sm,
        param_docs=param_docs,
        backward=spec.backward,
        spaces=spaces,
        paths=paths,
        fwd_ranges=ranges[0],
        dkdv_ranges=ranges[1],
        fwd_loops=loops[0],
        dkdv_loops=loops[1],
        mask_fwd=mask_fwd,
        mask_t=mask_t,
        q_rows_mask=_and("m_m[:, None]", d_row),
        o_rows_mask=_and("m_m[:, None]", dv_row),
        do_rows_mask=_and("m_m[:, None]", dv_row),
        qt_cols_mask=_and("m_m[None, :]", d_col),
        k_rows_mask=_and("m_n[:, None]", d_row),
        v_rows_mask_m=_and("m_n[:, None]", dv_row),
        k_cols_mask=d_col,
        k_cols_mask_n=_and("(o_n[None, :] < N_K)", d_col),
        v_rows_mask=dv_row,
        v_rows_mask_n=_and("(o_n[:, None] < N_K)", dv_row),
        vt_cols_mask=dv_col,
        vt_cols_mask_n=_and("(o_n[None, :] < N_K)", dv_col),
        id_skip=list(decls).index(id_name) if id_name else None,
        id_skip_name=id_name or "",
        id_args=("ID_QMIN", "ID_QMAX", "ID_KMIN", "ID_KMAX", "N_QC", "N_KC") if id_name else (),
    )


def _id_skip(spec: Spec) -> str | None:
    """The id tensor of an expression mask with a `T[b, q_idx] == T[b, kv_idx]` conjunct, else None."""
    return id_equality(spec.mask_expr.sympy) if spec.mask_expr is not None else None
