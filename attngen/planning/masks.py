"""How a mask shapes the kernels' tile loops: the hand-written rules for none and causal, the rule
of a parsed mask expression (tile bounds from attngen.planning.classify), which of the three tile
loops a kernel prints, and the runtime tile skip of an id-equality mask."""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass

from attngen.language.expr import Expr, to_triton
from attngen.language.spec import Spec
from attngen.planning.classify import Bounds, TileLoop, classify, id_equality
from attngen.planning.classify import loops as walked_loops



@dataclass(frozen=True)
class MaskRule:
    """How a mask shapes the tile loops.

    `fwd` and `dkdv` are classify.Bounds: Triton expressions over the tile start and last index
    (`start_m` / `last_m` for a query tile, `start_n` / `last_n` for a KV tile), BLOCK_M, BLOCK_N,
    N_Q, N_K, the offsets Q_OFF and KV_OFF (query row i is at position Q_OFF + i, key row j at
    KV_OFF + j), i_b, i_h and the parameters (`arg_NAME`); tiles and ranges are over rows:
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
    grids (positions), or None. `tight`: every visited tile holds a visible pair. `path` and `notes` say, for
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
    # causal over positions: key row j is visible to query row i iff j <= i + Q_OFF - KV_OFF
    "causal": MaskRule(
        doc="causal, q_idx >= kv_idx (top-left aligned at equal offsets, as SDPA's is_causal).",
        predicate="({q} >= {kv})",
        fwd=Bounds(
            prelude=(), start="0", end="tl.minimum(tl.maximum(Q_OFF - KV_OFF + last_m + 1, 0), N_K)", visit="lo < hi",
            full_start="0", full_end="tl.minimum(tl.maximum(Q_OFF - KV_OFF + start_m + 1, 0), N_K)", note="",
        ),
        dkdv=Bounds(
            prelude=(), start="tl.minimum(tl.maximum(KV_OFF - Q_OFF + start_n, 0), N_Q)", end="N_Q",
            visit="q_lo < q_hi",  # a KV tile past the last query is seen by none
            full_start="tl.maximum(KV_OFF - Q_OFF + last_n, 0)", full_end="N_Q", note="",
        ),
    ),
}

# Source names of the expression symbols in the kernels' predicates and score_mods: positions, not
# rows (the kernels define pos_m = o_m + Q_OFF and pos_n = o_n + KV_OFF beside the rows o_m, o_n);
# q_len / kv_len are the positions past the last rows.
_RANGE_NAMES = {"b": "i_b", "h": "i_h", "q_len": "(N_Q + Q_OFF)", "kv_len": "(N_K + KV_OFF)"}

PARAM_PREFIX = "arg_"

@functools.lru_cache(maxsize=64)
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

# The boundaries classify.range_statements assigns: walked tiles [lo, full_lo) and [full_hi, hi)
# are partial (masked), [full_lo, full_hi) full (a disjunction's masked tiles: classify.loops).
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
    A disjunction runs classify.loops as they are (its masked walk, then its full range), less the
    full range where no conjunction has one.
    """
    lo, full_lo, full_hi, hi = bounds = LOOP_BOUNDS[kernel]
    b = rule.fwd if kernel == "fwd" else rule.dkdv
    if b.pieces:
        return tuple(x for x in walked_loops(rule, kernel) if x.masked or _ZERO.fullmatch(b.full_end) is None)
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


def id_skip(spec: Spec) -> str | None:
    """The id tensor of an expression mask with a `T[b, q_idx] == T[b, kv_idx]` conjunct, else None."""
    return id_equality(spec.mask_expr.sympy) if spec.mask_expr is not None else None
