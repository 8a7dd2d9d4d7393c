"""Symbolic tile classification of mask expressions, and its Python mirror.

Every kernel walks the tiles of one index in three loops (partial, full, partial; a disjunction's
in a masked walk and a full loop: `loops`): the forward and dQ kernels walk KV tiles for one query
tile [start_m, last_m]; the dK/dV kernel walks query tiles for one KV tile [start_n, last_n]. Per tile the plan needs

  a visited range  [lo, hi) of the walked index; no row of the tile sees anything outside it;
  a full range     inside it, seen entirely by every row of the tile (the mask is skipped there).

This module derives both from the mask's sympy value, as expressions over the tile ends, the
lengths and the runtime parameters, and prints them as Triton statements (`range_statements`)
that the templates print as they are and that `classify_tiles` evaluates in Python with Triton's
integer semantics: what the tests check of the mirror, they check of the kernels' own bounds.

Expressions speak of positions, kernels of rows: query row i is at position Q_OFF + i and key row
j at KV_OFF + j, both offsets runtime integers of the kernels (attention()'s q_offset and
kv_offset). Each atom is bounded after writing q_idx as q_row + Q_OFF (and kv_idx, q_len, kv_len
alike), so the bounds are over rows and exact for every offset; an offset is an integer shift like
any parameter, and inside a floor division ``(row + Q_OFF) // W`` the bound stays exact.

How (a bound may be loose, never too tight):
  * the mask is put in disjunctive normal form whose atoms are ``d >= 0`` (``abs`` of an index
    expression is split into its two sides);
  * an atom that decomposes as a * F(var) + c * G(other) + rest, with var the walked index, other
    the tile's index, a and c integers, F and G the identity or floor division of the index plus
    a shift (an offset) by a W, shift and W free of the indices, is a lower bound on var (a > 0) or
    an upper bound (a < 0), exact through floor division, and monotone in other, so its extremes
    over the tile lie at the tile's ends; with
    a = 0 it is a condition on other alone, which holds on the whole tile iff at both ends. A W
    that is not a positive literal is guarded by ``W > 0`` at run time (else the range is [0, N)
    and nothing is full);
  * any other atom (modulo, products of indices, and any atom that reads a tensor, wherever the
    read sits: ``kv_idx < lens[b]``, ``abs(q_idx - kv_idx) <= win[h]``) is dropped from the bounds,
    which only widens the visited range, and makes its conjunction never full; the conjunction's
    other atoms still bound it;
  * a disjunction visits the union of its conjunctions' visited ranges as disjoint ranges of whole
    tiles (`_walk`; the hull where that is one range, and for the decode kernel) and runs unmasked
    over one interval inside the union of their full ranges (the hull of two that overlap, else
    the larger); its masked tiles are walked by one loop whose tile start is computed
    (`range_statements`, `loops`).

`id_equality` recognises the one data-dependent conjunct used at run time: ``T[b, q_idx] ==
T[b, kv_idx]``, for which the kernels skip tile pairs whose id ranges are disjoint.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from dataclasses import dataclass

import sympy
from sympy.polys.polyerrors import BasePolynomialError

from attngen.language.expr import FloorDiv, dnf, dnf_all, dnf_any, print_triton

__all__ = ["Atom", "Bounds", "Classification", "TileClasses", "classify", "classify_tiles", "TileLoop", "evaluate", "id_equality", "loops", "mask_dnf",
           "range_statements", "walk"]

MAX_CONJ = 16  # conjunctions in the normal form; a larger mask is bounded as one opaque condition

Q = sympy.Symbol("q_idx", integer=True, nonnegative=True)
KV = sympy.Symbol("kv_idx", integer=True, nonnegative=True)
_LEN = {Q: sympy.Symbol("q_len", integer=True, nonnegative=True), KV: sympy.Symbol("kv_len", integer=True, nonnegative=True)}
# Source names of the expression's own symbols in kernels.
_EXPR_NAMES = {"b": "i_b", "h": "i_h", "q_len": "N_Q", "kv_len": "N_K"}


def _var(name: str) -> sympy.Symbol:
    # Kernel variables carry a '__' prefix in sympy: no parameter name has '__', so none collides.
    return sympy.Symbol("__" + name, integer=True, nonnegative=True)


# The kernels' runtime offsets (attention()'s q_offset, kv_offset): query row i is at position
# Q_OFF + i, key row j at KV_OFF + j. An expression speaks of positions (q_idx, kv_idx; q_len and
# kv_len are the positions past the last rows, Q_OFF + N_Q and KV_OFF + N_K), the kernels walk rows:
# the bounds are derived from the expression with each position written as row + offset.
Q_OFF, KV_OFF = _var("Q_OFF"), _var("KV_OFF")
_TO_ROWS = {Q: Q + Q_OFF, KV: KV + KV_OFF, _LEN[Q]: _LEN[Q] + Q_OFF, _LEN[KV]: _LEN[KV] + KV_OFF}


def _rows(d):
    """An atom's value in row space (q_idx, kv_idx, q_len, kv_len now the rows and row counts)."""
    return None if d is None else d.xreplace(_TO_ROWS)


# --------------------------------------------------------------------------- normal form


@dataclass(frozen=True)
class Atom:
    """The condition ``d >= 0`` (``d > 0`` when `strict`, kept only for non-integer d); `d` is None
    for a condition that is not a comparison of numbers (described by `text`)."""

    d: sympy.Expr | None
    strict: bool = False
    text: str = ""

    def __str__(self) -> str:
        return self.text or f"{self.d} {'>' if self.strict else '>='} 0"


def mask_dnf(value: sympy.Basic) -> tuple[tuple[Atom, ...], ...]:
    """A boolean sympy value as a disjunction (outer) of conjunctions (inner) of atoms. () is never
    true, ((),) always. Past MAX_CONJ conjunctions the whole value becomes one opaque atom."""
    try:
        return dnf(value, _leaf, MAX_CONJ)
    except OverflowError:
        return ((Atom(None, text=str(value)),),)


def _leaf(d, op: str | None):
    """The normal form of ``d op 0``; abs() of an index expression is split into its two sides."""
    if op is None:
        return ((Atom(None, text=str(d)),),)
    if d.has(sympy.Indexed):
        # a tensor's contents are unknown at build time: the atom bounds nothing (whatever else
        # it compares, abs or min/max included), and its conjunction runs masked
        return ((Atom(None, text=f"{d} {op} 0"),),)
    if op in ("==", "!=") and _decompose(d) is None and _abs_split(d) is None:
        return ((Atom(None, text=f"{d} {op} 0"),),)  # no bounds either way: keep it whole
    if op == "==":
        return dnf_all([_leaf(d, ">="), _leaf(-d, ">=")], MAX_CONJ)
    if op == "!=":
        return dnf_any([_leaf(d, ">"), _leaf(-d, ">")], MAX_CONJ)
    if op in ("<", "<="):
        d, op = -d, op.replace("<", ">")
    split = _abs_split(d)
    if split:  # d = s * |x| + r
        s, x, r = split
        sides = [_leaf(r + s * x, op), _leaf(r - s * x, op)]
        return dnf_all(sides, MAX_CONJ) if s < 0 else dnf_any(sides, MAX_CONJ)
    if op == ">" and d.is_integer:
        return ((Atom(d - 1),),)
    return ((Atom(d, strict=op == ">"),),)


def _abs_split(d: sympy.Expr):
    """(s, x, r) with d = s * Abs(x) + r, s a non-zero integer, x an index expression; else None."""
    found = [a for a in d.atoms(sympy.Abs) if a.has(Q, KV)]
    if len(found) != 1:
        return None
    y = sympy.Dummy()
    e = sympy.expand(d.xreplace({found[0]: y}))
    s = e.coeff(y)
    r = e - s * y
    if not s.is_Integer or s == 0 or r.has(y) or r.has(found[0]):
        return None
    return int(s), found[0].args[0], r


@dataclass(frozen=True)
class _Linear:
    """d = terms[q] + terms[kv] + rest, terms[i] = (a, W, s): a * i (W None, s 0) or
    a * ((i + s) // W), s an integer free of the indices (a row's offset: its position is i + s)."""

    terms: dict
    rest: sympy.Expr


def _decompose(d) -> _Linear | None:
    if d is None or d.has(sympy.Indexed):  # a tensor's contents bound nothing at build time
        return None
    reps, floors = {}, []
    for node in sympy.preorder_traversal(d):
        if isinstance(node, FloorDiv) and node.args[1].is_integer and not node.args[1].has(Q, KV) and node not in reps:
            x = node.args[0]
            for index in (Q, KV):
                shift = sympy.expand(x - index)
                if shift.is_integer and not shift.has(Q, KV):  # (index + shift) // W
                    reps[node] = sympy.Dummy(integer=True)
                    floors.append((index, node.args[1], shift))
                    break
    gens = [Q, KV, *reps.values()]
    try:
        poly = sympy.Poly(d.xreplace(reps), *gens)
    except BasePolynomialError:
        return None
    if poly.total_degree() > 1:
        return None
    rest = poly.coeff_monomial(1)
    if not rest.is_integer or rest.has(Q, KV):
        return None  # float parameters: floor bounds would not be exact
    terms = {Q: (0, None, 0), KV: (0, None, 0)}
    for g, (index, w, s) in zip(gens, [(Q, None, 0), (KV, None, 0), *floors]):
        a = poly.coeff_monomial(g)
        if a == 0:
            continue
        if not a.is_Integer or terms[index][0] != 0:
            return None  # a parameter coefficient, or both i and i // W
        terms[index] = (int(a), w, s)
    return _Linear(terms, rest)


# --------------------------------------------------------------------------- bounds of one conjunction


@dataclass(frozen=True)
class _Dir:
    """One kernel's view: it walks `var` over tiles of `other` [first, last]."""

    var: sympy.Symbol
    other: sympy.Symbol
    first: sympy.Symbol
    last: sympy.Symbol
    n: sympy.Symbol  # the walked index's length
    lo: sympy.Symbol  # the kernel's visited-range variables
    hi: sympy.Symbol
    tmp: str  # prefix of temporaries
    block: str  # the walked tiles' size


_FWD = _Dir(KV, Q, _var("start_m"), _var("last_m"), _LEN[KV], _var("lo"), _var("hi"), "t_", "BLOCK_N")
_DKDV = _Dir(Q, KV, _var("start_n"), _var("last_n"), _LEN[Q], _var("q_lo"), _var("q_hi"), "tq_", "BLOCK_M")


def _pos(w):
    return w if w.is_positive else sympy.Max(w, 1)


def _scaled(k, w, n, s=0):
    """k * w - s clipped into [0, n] (the first index i with (i + s) // w >= k), without the product
    leaving 32 bits (a large radius times a large width): monotone in k, as the bound it replaces.
    s >= 0 (an offset) and n + s (a position) fit in 32 bits."""
    w = _pos(w)
    return sympy.Piecewise((0, k <= FloorDiv(s, w)), (n, k > FloorDiv(n + s, w)), (k * w - s, True))


def _apply(w, x, s=0):
    return x if w is None else FloorDiv(x + s, _pos(w))


@dataclass
class _Conj:
    v_lo: sympy.Expr
    v_hi: sympy.Expr
    f_lo: sympy.Expr
    f_hi: sympy.Expr
    visit: sympy.Basic  # besides lo < hi: a necessary condition for any visible pair in the tile
    full: sympy.Basic  # the full range is valid (else nothing is full)
    tight: bool  # every walked tile inside [v_lo, v_hi) holds a visible pair when visit holds
    opaque: tuple[str, ...]  # atoms left out of the bounds
    bounded: bool  # some atom bounds the range


def _conj(atoms, dr: _Dir) -> _Conj:
    lows, highs, visit, full, opaque = [], [], [], [], []
    tight = True
    on_tile = 0  # atoms on the tile's own index alone (a == 0, c != 0)
    for atom in atoms:
        lin = None if atom.strict else _decompose(_rows(atom.d))
        if lin is None:
            opaque.append(str(atom))
            full.append(sympy.false)
            tight = False
            continue
        (a, wv, sv), (c, wo, so) = lin.terms[dr.var], lin.terms[dr.other]
        guard = sympy.And(*(w > 0 for w in (wv, wo) if w is not None and not w.is_positive))
        ends = (_apply(wo, dr.first, so), _apply(wo, dr.last, so))
        if a == 0:  # a condition on the tile's index alone, monotone over the tile
            holds = [c * g + lin.rest >= 0 for g in ends]
            visit.append(sympy.Or(sympy.Not(guard), *holds))
            full.append(sympy.And(guard, *holds))
            tight &= guard == sympy.true
            on_tile += c != 0
            continue
        if a > 0:  # F(var) >= ceil(-(c G + rest) / a)
            k = [-FloorDiv(c * g + lin.rest, a) for g in ends]
            b = [x if wv is None else _scaled(x, wv, dr.n, sv) for x in k]
            rising = c <= 0
        else:  # F(var) <= floor((c G + rest) / -a)
            k = [FloorDiv(c * g + lin.rest, -a) for g in ends]
            b = [x + 1 if wv is None else _scaled(x + 1, wv, dr.n, sv) for x in k]
            rising = c >= 0
        at_min, at_max = (b[0], b[1]) if rising else (b[1], b[0])
        if guard != sympy.true:
            safe = 0 if a > 0 else dr.n
            at_min, at_max = (sympy.Piecewise((x, guard), (safe, True)) for x in (at_min, at_max))
            full.append(guard)
        exact = abs(a) == 1 and wv is None and wo is None
        tight &= exact and abs(c) <= 1
        (lows if a > 0 else highs).append((at_min, at_max, b if exact else None))
    n = dr.n

    def clip(x):
        return sympy.Min(sympy.Max(x, 0), n)

    v_lo = clip(sympy.Max(*(x[0] for x in lows))) if lows else sympy.Integer(0)
    f_lo = clip(sympy.Max(*(x[1] for x in lows))) if lows else sympy.Integer(0)
    f_hi = clip(sympy.Min(*(x[0] for x in highs))) if highs else n
    v_hi = clip(sympy.Min(*(x[1] for x in highs))) if highs else n
    if len(lows) == 1 and len(highs) == 1 and lows[0][2] and highs[0][2]:
        # exact affine bounds: the width hi - lo is affine over the tile; empty at both ends means
        # no row sees anything although [v_lo, v_hi) may not be empty
        (l0, l1), (u0, u1) = lows[0][2], highs[0][2]
        visit.append(sympy.Or(l0 < u0, l1 < u1))
    tight &= len(lows) <= 1 and len(highs) <= 1
    # one condition on the tile's index alone holds on some row iff at an end, and that row sees the
    # whole range; with a bound on the walked index as well, or a second such condition, the rows
    # that pass it need not be those that see a given walked tile
    tight &= on_tile == 0 or (on_tile == 1 and not lows and not highs)
    return _Conj(v_lo, v_hi, f_lo, f_hi, sympy.And(*visit), sympy.And(*full), tight, tuple(opaque), bool(lows or highs))


# --------------------------------------------------------------------------- a whole mask


@dataclass(frozen=True)
class Bounds:
    """One kernel's bounds as Triton source (see MaskRule): temporaries, then the visited range
    [start, end), the visit condition, and the full range [full_start, full_end)."""

    prelude: tuple[tuple[str, str], ...]
    start: str
    end: str
    visit: str
    full_start: str
    full_end: str
    note: str
    # a disjunction's exact walk: statements (name, expression) after the prelude, and the
    # disjoint, tile-aligned [start, end) ranges (names or literals) whose union is the union of
    # its conjunctions' visited tiles; () for one conjunction (which walks [start, end))
    walk: tuple[tuple[str, str], ...] = ()
    pieces: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Classification:
    path: str
    fwd: Bounds
    dkdv: Bounds
    tight: bool  # one conjunction whose bounds are exact: no visited tile is wholly masked


def classify(value: sympy.Basic, params: tuple[str, ...] = ()) -> Classification:
    """Tile bounds of a mask's sympy value; `params` are its scalar parameters' names."""
    names = {**_EXPR_NAMES, **{p: "arg_" + p for p in params}}
    form = mask_dnf(value)
    fwd, fwd_conjs = _bounds(form, _FWD, names)
    dkdv, dkdv_conjs = _bounds(form, _DKDV, names)
    opaque = sorted({a for c in fwd_conjs for a in c.opaque})
    why = f" (not bounded: {'; '.join(opaque)})" if opaque else ""
    # one conjunction, or a disjunction walked exactly, whose bounds are exact
    tight = bool(form) and (len(form) == 1 or "walked whole" not in fwd.note + dkdv.note) and all(
        c.tight for c in fwd_conjs + dkdv_conjs)
    if not form:
        path = "never true: no tile is visited"
    elif len(form) == 1 and not fwd_conjs[0].bounded and not dkdv_conjs[0].bounded:
        path = f"safe path{why}: every tile is visited with the mask applied"
    elif len(form) == 1 and opaque:
        path = f"closed-form visited range from the conditions that bound it, every visited tile partial{why}"
    elif len(form) == 1:
        path = "closed-form tile bounds (one conjunction of affine inequalities" + (
            ")" if tight else " with integer coefficients or floor division)")
    else:
        path = f"closed-form tile bounds for a disjunction of {len(form)} conjunctions{why}"
    return Classification(path, fwd, dkdv, tight)


def _printer(names):
    def p(e) -> str:
        return print_triton(e, {**names, **{s.name: s.name.removeprefix("__") for s in e.free_symbols if s.name.startswith("__")}})

    return p


def _bounds(dnf, dr: _Dir, names) -> tuple[Bounds, list[_Conj]]:
    p = _printer(names)
    conjs = [_conj(c, dr) for c in dnf]
    walked = "KV" if dr is _FWD else "query"
    prelude: list[tuple[str, str]] = []

    def emit(name: str, value):
        """A temporary for `value`; constants and plain names are used as they are (so that
        sympy folds them into what follows)."""
        if value.is_Integer or isinstance(value, sympy.Symbol):
            return value
        sym = _var(dr.tmp + name)
        prelude.append((sym.name, p(value)))
        return sym

    if not conjs:  # never true
        return Bounds((), "0", "0", p(sympy.Lt(dr.lo, dr.hi)), "0", "0", "nothing is visited"), conjs
    walk, pieces = (), ()
    if len(conjs) == 1:
        c = conjs[0]
        v_lo, v_hi, visit, f_lo = c.v_lo, c.v_hi, sympy.And(dr.lo < dr.hi, c.visit), c.f_lo
        f_hi = sympy.Piecewise((c.f_hi, c.full), (0, True))
        if c.full == sympy.false:
            note = f"{walked} tiles from ({p(v_lo)}) to ({p(v_hi)}) are visited, all with the mask applied"
        else:
            note = (f"{walked} tiles from ({p(v_lo)}) to ({p(v_hi)}) are visited; those from ({p(f_lo)}) to "
                    f"({p(f_hi)}) run unmasked")
    else:
        v_los, v_his, los, his = [], [], [], []
        for i, c in enumerate(conjs):
            lo_i, hi_i = emit(f"lo{i}", c.v_lo), emit(f"hi{i}", c.v_hi)
            # nothing visible through this conjunction in this tile: leave it out of the hull
            hi_i = emit(f"hi{i}", sympy.Piecewise((hi_i, sympy.And(lo_i < hi_i, c.visit)), (0, True)))
            v_los.append(sympy.Piecewise((lo_i, lo_i < hi_i), (dr.n, True)))
            v_his.append(hi_i)
            los.append(p(lo_i))
            his.append(p(hi_i))
        # the hull [start, end) (the decode kernel walks it) and the exact walk (the other kernels)
        v_lo, v_hi = sympy.Min(*v_los), sympy.Max(*v_his)
        visit = dr.lo < dr.hi
        f_lo, f_hi = _union_full(conjs, emit)
        walk, pieces, how = _walk(conjs, los, his, dr, p(dr.n))
        n_full = sum(c.full != sympy.false for c in conjs)
        seen = (f"in the union of the {len(conjs)} conjunctions' visited ranges are visited ({how})"
                if len(pieces) > 1 or "walked whole" in how else f"in the hull of the {len(conjs)} conjunctions' visited ranges are visited")  # one range: the same
        note = (f"{walked} tiles {seen}; "
                + (f"one interval inside the union of the full ranges of {n_full} of them runs unmasked" if n_full
                   else "all with the mask applied"))
    prelude = [(name.removeprefix("__"), text) for name, text in prelude]
    bounds = Bounds(tuple(prelude), p(v_lo), p(v_hi), p(visit), p(f_lo), p(sympy.Min(f_hi, dr.hi)), note)
    if len(pieces) > 1:  # (one piece is the hull: the three loops walk it)
        bounds = dataclasses.replace(bounds, walk=walk, pieces=pieces)
    return bounds, conjs


MAX_SORTED = 4  # a disjunction's conjunctions sorted at run time; past this many, their hull is walked


def _walk(conjs, los, his, dr: _Dir, n: str):
    """The union of the conjunctions' visited ranges [los[i], his[i]) (Triton source; his[i] is 0
    where nothing is visible through conjunction i) as disjoint ranges of whole walked tiles:
    statements (name, expression) and the ranges (start, end), names or literals, and how.

    The conjunctions whose range starts at 0 for every tile (known at build time) together cover
    [0, max of their ends); those that end at the length n together [min of their starts, n); the
    others, rounded outward to whole tiles, are sorted by start at run time (compare-and-swap,
    MAX_SORTED of them at most, else their hull counts as one) and each walks from the largest end
    before it (what comes before it in the order is covered up to there: the range reaching that
    end starts no later) to its own end, less the range that ends at n."""
    t, w = dr.tmp, dr.block
    stmts: list[tuple[str, str]] = []

    def let(name: str, text: str) -> str:
        if text.isidentifier() or text.isdigit():
            return text
        stmts.append((t + name, text))
        return t + name

    def fold(fn: str, xs):
        out = xs[-1]
        for x in reversed(xs[:-1]):
            out = f"tl.{fn}({x}, {out})"
        return out

    def up(x: str) -> str:
        return f"tl.cdiv({x}, {w}) * {w}"

    def down(x: str) -> str:
        return f"{x} // {w} * {w}"

    def start_if_seen(i: int, unseen: str = n) -> str:
        return f"tl.where({his[i]} > {los[i]}, {los[i]}, {unseen})"

    # a range [0, n) or nothing joins the ranges ending at n when some do and none need [0, ...)
    whole = [i for i, c in enumerate(conjs) if c.v_lo == 0 and c.v_hi == dr.n]
    at_end = [i for i, c in enumerate(conjs) if c.v_lo != 0 and c.v_hi == dr.n]
    at_zero = [i for i, c in enumerate(conjs) if c.v_lo == 0 and i not in whole]
    (at_end if at_end and not at_zero else at_zero).extend(whole)
    at_zero.sort()
    at_end.sort()
    free = [i for i in range(len(conjs)) if i not in at_zero and i not in at_end]
    how = "disjoint ranges of tiles, no tile twice"
    if len(free) > MAX_SORTED:
        free_ranges = [(fold("minimum", [start_if_seen(i) for i in free]), fold("maximum", [his[i] for i in free]))]
        how = f"the hull of {len(free)} of them walked whole"
    else:
        free_ranges = [(los[i], his[i]) for i in free]
    pieces: list[tuple[str, str]] = []
    reach = None  # the largest end of the ranges walked so far (all start no later than the next)
    # (nothing seen: n + w - 1, which rounds down to n rounded up, so that [lz, nb) is empty)
    end_start = let("lz", down(fold("minimum", [start_if_seen(i, f"{n} + {w} - 1") for i in at_end]))) if at_end else None
    if at_zero:
        reach = let("ha", up(fold("maximum", [his[i] for i in at_zero])))
        pieces.append(("0", let("hb", f"tl.minimum({reach}, {end_start})") if end_start else reach))
    bounds = []
    for k, (lo, hi) in enumerate(free_ranges):
        stmts.append((f"{t}fl{k}", down(lo)))
        stmts.append((f"{t}fh{k}", up(hi)))
        bounds.append((f"{t}fl{k}", f"{t}fh{k}"))
    for a in range(len(bounds) - 1):  # sort by start (empty ranges end at 0: they cover nothing)
        for b in range(len(bounds) - 1 - a):
            (la, ha), (lb, hb) = bounds[b], bounds[b + 1]
            stmts += [(f"{t}sw", f"tl.where({la} <= {lb}, {ha}, {hb})"), (hb, f"tl.where({la} <= {lb}, {hb}, {ha})"),
                      (ha, f"{t}sw"), (f"{t}sw", f"tl.minimum({la}, {lb})"), (lb, f"tl.maximum({la}, {lb})"), (la, f"{t}sw")]
    for k, (lo, hi) in enumerate(bounds):
        start = let(f"pa{k}", f"tl.maximum({lo}, {reach})") if reach else lo
        end = let(f"pb{k}", f"tl.minimum({hi}, {end_start})") if end_start else hi
        pieces.append((start, end))
        if k + 1 < len(bounds):
            reach = let(f"r{k}", f"tl.maximum({reach}, {hi})") if reach else hi
    if end_start:
        pieces.append((end_start, let("nb", up(n))))
    return tuple(stmts), tuple(pieces), how


def _union_full(conjs, emit):
    """One interval inside the union of the conjunctions' full ranges, folded left to right: the
    hull of the running interval and the next where both are non-empty and they overlap or touch,
    else the longer of the two. Returns (start, end)."""
    acc = None
    for i, c in enumerate(conjs):
        if c.full == sympy.false:
            continue
        a_i = emit(f"fa{i}", c.f_lo)
        b_i = emit(f"fb{i}", sympy.Piecewise((c.f_hi, c.full), (0, True)))
        if acc is None:
            acc = (a_i, b_i)
            continue
        a, b = acc
        join = sympy.And(a_i <= b, a <= b_i, a_i < b_i, a < b)
        take = (b_i - a_i) > (b - a)
        acc = (emit(f"ua{i}", sympy.Piecewise((sympy.Min(a, a_i), join), (a_i, take), (a, True))),
               emit(f"ub{i}", sympy.Piecewise((sympy.Max(b, b_i), join), (b_i, take), (b, True))))
    if acc is None:
        return sympy.Integer(0), sympy.Integer(0)
    return acc


# --------------------------------------------------------------------------- kernel statements


_KERNELS = {  # the tile's index letter, its length and tile, the walked tile, the range names, and
    # how the full range's end is rounded down to whole walked tiles (dkdv_full_end comes rounded)
    "fwd": ("m", "N_Q", "BLOCK_M", "BLOCK_N", ("lo", "full_lo", "full_hi", "hi"), "no visible key: visit nothing",
            "({}) // BLOCK_N * BLOCK_N"),
    "dkdv": ("n", "N_K", "BLOCK_N", "BLOCK_M", ("q_lo", "q_full", "q_full_end", "q_hi"), "no query sees it: visit nothing",
             "{}"),
}


# A disjunction's masked tiles are walked as one loop over `var` in [0, end) (the masked ranges
# laid end to end, each a multiple of the walked tile), the tile start computed from it.
_PARTS = {"fwd": ("part_n", "part_end", "t_"), "dkdv": ("part_m", "q_part_end", "tq_")}


def range_statements(rule, kernel: str) -> tuple[tuple[str, str, str], ...]:
    """The statements (name, Triton expression, comment) by which `kernel` ('fwd' for the forward
    and dQ kernels, 'dkdv') computes its tile ranges from a MaskRule (the first, the tile's last
    index, is loop-invariant in dK/dV and printed before its loop): the templates print them,
    `classify_tiles` evaluates them. The forward loops walk [lo, full_lo) and [full_hi, hi) with
    the mask and [full_lo, full_hi) without; dK/dV likewise over q_lo, q_full, q_full_end, q_hi.
    A disjunction (Bounds.pieces) walks [full_lo, full_hi) without the mask, and its disjoint
    pieces less that range with it, in one loop (`loops`)."""
    if kernel not in _KERNELS:
        raise ValueError(f"kernel must be 'fwd' or 'dkdv', got {kernel!r}")
    t, n, block, walk, (lo, full_lo, full_hi, hi), note, rounded = _KERNELS[kernel]
    b: Bounds = rule.fwd if kernel == "fwd" else rule.dkdv
    statements = (
        (f"last_{t}", f"tl.minimum(start_{t} + {block}, {n}) - 1", ""),
        *((name, text, "") for name, text in b.prelude),
        (hi, b.end, ""),
        (lo, b.start, ""),
        (lo, f"tl.where({b.visit}, {lo} // {walk} * {walk}, {hi})", note),
        (full_lo, f"tl.minimum(tl.maximum(tl.cdiv({b.full_start}, {walk}) * {walk}, {lo}), {hi})", ""),
        (full_hi, f"tl.maximum({rounded.format(b.full_end)}, {full_lo})", ""),
    )
    if not b.pieces:
        return statements
    return statements + tuple((name, text, "") for name, text in _masked_walk(b, kernel)[0])


def _masked_walk(b: Bounds, kernel: str):
    """A disjunction's masked walk: the statements after its range statements, and the tile start
    as an expression of the loop variable. Each piece less the full range [full_lo, full_hi) is
    two ranges (below it, above it); laid end to end, range k starts at c{k-1} of the walk and
    its tiles at the walk's position plus d{k}; the walk ends at the last c."""
    var, end, t = _PARTS[kernel]
    _, full_lo, full_hi, _ = _KERNELS[kernel][4]
    ranges = []
    for a, z in b.pieces:
        ranges.append((a, f"tl.minimum({z}, {full_lo})"))
        ranges.append((full_hi if a == "0" else f"tl.maximum({a}, {full_hi})", z))
    stmts = list(b.walk)
    at = "0"  # where range k starts in the walk
    starts = []
    for k, (a, z) in enumerate(ranges):
        if at == "0" and (a.isidentifier() or a.isdigit()):
            starts.append(a)
        else:
            stmts.append((f"{t}d{k}", f"{a} - {at}" if at != "0" else a))
            starts.append(f"{t}d{k}")
        length = z if a == "0" else f"tl.maximum({z} - {a}, 0)"  # (ends are >= 0)
        stmts.append((f"{t}c{k}" if k + 1 < len(ranges) else end, length if at == "0" else f"{at} + {length}"))
        at = stmts[-1][0]
    expr = f"{var} + {starts[0]}" if starts[0] != "0" else var
    for k in range(1, len(ranges)):  # the last range whose start in the walk is at or before var
        expr = f"tl.where({var} >= {t}c{k - 1}, {var} + {starts[k]}, {expr})"
    return stmts, expr


@dataclass(frozen=True)
class TileLoop:
    """One tile loop of a kernel: the walked tiles start at range(start, end, BLOCK), `start` and
    `end` names of its range statements (or literals); `masked` tiles apply the mask (and the
    sequence end), the others are seen whole by every row of the kernel's own tile. With `var`,
    the loop runs `var` over that range and the tile starts at `remap` (an expression of var)."""

    start: str
    end: str
    masked: bool
    var: str = ""
    remap: str = ""


def loops(rule, kernel: str) -> tuple[TileLoop, ...]:
    """The loops over range_statements' names that `kernel` walks (before masks.tile_loops leaves
    out those empty for every tile): partial, full, partial; a disjunction's masked walk and full
    range."""
    lo, full_lo, full_hi, hi = _KERNELS[kernel][4]
    b: Bounds = rule.fwd if kernel == "fwd" else rule.dkdv
    if not b.pieces:
        return (TileLoop(lo, full_lo, True), TileLoop(full_lo, full_hi, False), TileLoop(full_hi, hi, True))
    var, end, _ = _PARTS[kernel]
    return (TileLoop("0", end, True, var, _masked_walk(b, kernel)[1]), TileLoop(full_lo, full_hi, False))


def walk(loop: TileLoop, env: dict, step: int):
    """The tile starts a loop visits, in order, with the range statements' values in `env`."""
    for x in range(evaluate(loop.start, env), evaluate(loop.end, env), step):
        yield evaluate(loop.remap, {**env, loop.var: x}) if loop.var else x


# --------------------------------------------------------------------------- the Python mirror


def _tdiv(a: int, b: int) -> int:
    """Triton's (C's) integer division: the quotient truncated toward zero."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def _tmod(a: int, b: int) -> int:
    return a - b * _tdiv(a, b)


class _TL:
    minimum = staticmethod(min)
    maximum = staticmethod(max)
    where = staticmethod(lambda c, a, b: a if c else b)
    cdiv = staticmethod(lambda a, b: _tdiv(a + b - 1, b))


_OPS = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.BitAnd, ast.BitOr, ast.USub,
        ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq)
_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.Call, ast.Name, ast.Attribute, ast.Constant,
          ast.Load, *_OPS)


def _i32(x: int) -> int:
    """Kernel integers are 32-bit: + - * wrap around."""
    return (x + 2**31) % 2**32 - 2**31


class _TritonInts(ast.NodeTransformer):
    """// and % truncate toward zero, + - * wrap at 32 bits, as in Triton."""

    def visit_BinOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, (ast.FloorDiv, ast.Mod)):
            fn = "_tdiv" if isinstance(node.op, ast.FloorDiv) else "_tmod"
            return ast.copy_location(ast.Call(ast.Name(fn, ast.Load()), [node.left, node.right], []), node)
        if isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            return ast.copy_location(ast.Call(ast.Name("_i32", ast.Load()), [node], []), node)
        return node

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        return ast.copy_location(ast.Call(ast.Name("_i32", ast.Load()), [node], []), node)


@functools.lru_cache(maxsize=1024)
def _compile(text: str):
    """Our own printed bound expressions only (never user text): integer arithmetic, comparisons,
    & |, and tl.minimum / maximum / where / cdiv; anything else is refused."""
    tree = ast.parse(text, mode="eval")
    for node in ast.walk(tree):
        if not isinstance(node, _NODES):
            raise ValueError(f"tile bound {text!r}: unexpected {type(node).__name__}")
        if isinstance(node, ast.Attribute) and not (
            isinstance(node.value, ast.Name) and node.value.id == "tl" and node.attr in ("minimum", "maximum", "where", "cdiv")
        ):
            raise ValueError(f"tile bound {text!r}: unexpected attribute {node.attr}")
        if isinstance(node, ast.Call) and not isinstance(node.func, ast.Attribute):
            raise ValueError(f"tile bound {text!r}: unexpected call")
        if isinstance(node, ast.Name) and node.id.startswith("_"):
            raise ValueError(f"tile bound {text!r}: unexpected name {node.id}")
        if isinstance(node, ast.Constant) and type(node.value) not in (int, bool):
            raise ValueError(f"tile bound {text!r}: unexpected constant {node.value!r}")
    tree = ast.fix_missing_locations(_TritonInts().visit(tree))
    return compile(tree, "<tile bound>", "eval")


def evaluate(text: str, env: dict) -> int | bool:
    """A printed bound expression on Python integers with Triton's integer semantics (32 bits,
    truncating // and %)."""
    return eval(_compile(text), {"__builtins__": {}, "tl": _TL, "_tdiv": _tdiv, "_tmod": _tmod, "_i32": _i32}, env)


@dataclass(frozen=True)
class TileClasses:
    """Per (query tile, KV tile): 'empty' (not visited), 'full' (visited without the mask) or
    'partial' (visited with the mask), as the forward and dQ kernels (`fwd`) and the dK/dV kernel
    (`dkdv`) visit them. Indexed [query tile][KV tile]."""

    fwd: tuple[tuple[str, ...], ...]
    dkdv: tuple[tuple[str, ...], ...]

    def counts(self, kernel: str = "fwd") -> dict[str, int]:
        grid = self.fwd if kernel == "fwd" else self.dkdv
        cells = [c for row in grid for c in row]
        full, partial = cells.count("full"), cells.count("partial")
        return {"full": full, "partial": partial, "visited": full + partial, "total": len(cells)}


def classify_tiles(rule, n_q: int, n_k: int, block_m: int, block_n: int, params=None, b: int = 0, h: int = 0,
                   q_offset: int = 0, kv_offset: int = 0) -> TileClasses:
    """The tile classes the generated kernels' loops give, computed from the same statements
    (`range_statements`) with Python integers, for queries at positions q_offset + [0, n_q) and keys
    at kv_offset + [0, n_k) (tiles are over rows). Raises ValueError if the loops would visit a tile
    twice or outside the sequences (a wrong bound)."""
    for name, v in (("n_q", n_q), ("n_k", n_k), ("block_m", block_m), ("block_n", block_n)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    for name, v in (("q_offset", q_offset), ("kv_offset", kv_offset)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    env0 = {"BLOCK_M": block_m, "BLOCK_N": block_n, "N_Q": n_q, "N_K": n_k, "i_b": b, "i_h": h,
            "Q_OFF": q_offset, "KV_OFF": kv_offset, **{"arg_" + k: v for k, v in (params or {}).items()}}
    tiles_m, tiles_n = -(-n_q // block_m), -(-n_k // block_n)
    grids = {}
    for kernel, (t, _, _, _, _, _, _) in _KERNELS.items():
        # per tile of the kernel's own index: the walked tiles, as its loops visit them
        own, walked = (tiles_m, block_m), (tiles_n, block_n)
        if kernel == "dkdv":
            own, walked = walked, own
        grid = [["empty"] * walked[0] for _ in range(own[0])]
        for i in range(own[0]):
            env = {**env0, f"start_{t}": i * own[1]}
            for name, text, _ in range_statements(rule, kernel):
                env[name] = evaluate(text, env)
            step = walked[1]
            visits = [(s, "partial" if x.masked else "full") for x in loops(rule, kernel) for s in walk(x, env, step)]
            for start, cls in visits:
                j = start // step
                if start % step or not 0 <= j < walked[0] or grid[i][j] != "empty":
                    raise ValueError(f"{kernel} tile {i}: walked tile start {start} visited twice or out of range")
                grid[i][j] = cls
        grids[kernel] = grid if kernel == "fwd" else [list(col) for col in zip(*grid)]  # [query tile][KV tile]
    fwd, dkdv = grids["fwd"], grids["dkdv"]
    return TileClasses(tuple(map(tuple, fwd)), tuple(map(tuple, dkdv)))


# --------------------------------------------------------------------------- runtime tile skip


def id_equality(value: sympy.Basic) -> str | None:
    """The name of a 2-dim tensor T when the mask is ``T[b, q_idx] == T[b, kv_idx]`` (either side
    first) or a conjunction with such a conjunct (as ``document(T) and ...``), else None. Such a
    mask implies the equality, so a tile pair whose query ids and key ids have disjoint [min, max]
    ranges holds no visible pair and may be skipped at run time, whatever the other conjuncts."""
    for part in value.args if isinstance(value, sympy.And) else (value,):
        if not isinstance(part, sympy.Eq):
            continue
        sides = (part.lhs, part.rhs)
        if not all(isinstance(s, sympy.Indexed) and len(s.indices) == 2 for s in sides):
            continue
        (tq, iq), (tk, ik) = ((s.base.label.name, s.indices) for s in sides)
        b = sympy.Symbol("b", integer=True, nonnegative=True)
        if tq == tk and iq[0] == ik[0] == b and {iq[1], ik[1]} == {Q, KV}:
            return tq
    return None
