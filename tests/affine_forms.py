"""Test-only: a mask as a disjunction of conjunctions of affine inequalities in q_idx and kv_idx.

An independent reading of the expression language's sympy values, used by the tests to check
parsed masks (the generator's own tile bounds come from attngen.planning.classify)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import sympy

from attngen.language.expr import MAX_DNF, Expr, dnf

_SYMBOLS = {n: sympy.Symbol(n, integer=True, nonnegative=True) for n in ("q_idx", "kv_idx")}


@dataclass(frozen=True)
class Ineq:
    """``q * q_idx + kv * kv_idx + rest >= 0`` (``> 0`` when strict), with integer q and kv and a
    rest free of q_idx and kv_idx (params, lengths, b, h). Strict only when rest is not known to
    be an integer; otherwise ``x > 0`` is stored as ``x - 1 >= 0``."""

    q: int
    kv: int
    rest: sympy.Expr
    strict: bool = False

    def holds(self, q_idx: int, kv_idx: int, **values) -> bool:
        rest = self.rest.subs({s: values[s.name] for s in self.rest.free_symbols})
        lhs = self.q * q_idx + self.kv * kv_idx + rest
        return bool(lhs > 0) if self.strict else bool(lhs >= 0)

    def __str__(self) -> str:
        lhs = sympy.Integer(self.q) * _SYMBOLS["q_idx"] + sympy.Integer(self.kv) * _SYMBOLS["kv_idx"] + self.rest
        return f"{lhs} {'>' if self.strict else '>='} 0"


def affine_dnf(expr: Expr) -> tuple[tuple[Ineq, ...], ...] | None:
    """A mask as a disjunction (outer tuple) of conjunctions (inner tuples) of affine inequalities
    in q_idx and kv_idx, or None when it is not one: it reads tensor data, applies //, %, min,
    max, abs or where to an expression of q_idx or kv_idx, is non-linear in them, or needs more
    than MAX_DNF conjunctions. () is never true; ((),) is always true."""
    if expr.type != "bool":
        raise ValueError("affine_dnf: expected a mask")
    if expr.sympy.has(sympy.Indexed):
        return None
    try:
        return dnf(expr.sympy, _affine_leaf, MAX_DNF)
    except (_NotAffine, OverflowError):
        return None


class _NotAffine(Exception):
    pass


def _affine_leaf(d: sympy.Expr, op: str | None) -> tuple[tuple[Ineq, ...], ...]:
    if op is None:
        raise _NotAffine
    if op == "==":
        return ((_ineq(d, False), _ineq(-d, False)),)
    if op == "!=":
        return ((_ineq(d, True),), (_ineq(-d, True),))
    return ((_ineq(d if op in (">", ">=") else -d, op in ("<", ">")),),)


def _ineq(d: sympy.Expr, strict: bool) -> Ineq:
    a, b, rest = _linear(d)
    scale = math.lcm(int(sympy.Rational(a).q), int(sympy.Rational(b).q))
    a, b, rest = int(a * scale), int(b * scale), sympy.expand(rest * scale) if scale != 1 else rest
    if strict and rest.is_integer:
        return Ineq(a, b, rest - 1, False)
    return Ineq(a, b, rest, strict)


def _linear(e: sympy.Expr) -> tuple[sympy.Rational, sympy.Rational, sympy.Expr]:
    """(a, b, rest) with e = a*q_idx + b*kv_idx + rest; raises _NotAffine otherwise."""
    q, kv = _SYMBOLS["q_idx"], _SYMBOLS["kv_idx"]
    if not e.has(q, kv):
        return sympy.S.Zero, sympy.S.Zero, e
    if e == q:
        return sympy.S.One, sympy.S.Zero, sympy.S.Zero
    if e == kv:
        return sympy.S.Zero, sympy.S.One, sympy.S.Zero
    if isinstance(e, sympy.Add):
        parts = [_linear(t) for t in e.args]
        return tuple(sympy.Add(*xs) for xs in zip(*parts))
    if isinstance(e, sympy.Mul):
        inner = [f for f in e.args if f.has(q, kv)]
        coeff = sympy.Mul(*(f for f in e.args if not f.has(q, kv)))
        if len(inner) != 1 or not coeff.is_Rational:
            raise _NotAffine
        a, b, rest = _linear(inner[0])
        return coeff * a, coeff * b, coeff * rest
    raise _NotAffine
