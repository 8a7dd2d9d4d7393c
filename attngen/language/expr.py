"""The mask and score-modification language: untrusted text -> whitelisted AST -> sympy.

A spec's ``mask:`` is a boolean expression and its ``score_mod:`` a numeric one, over

  index symbols   b, h, q_idx, kv_idx (integers >= 0), q_len, kv_len (the sequence lengths)
  score           the scaled q.k of the pair (score_mod only)
  parameters      declared scalars (int, float) and tensors, indexed with one integer index per dim:
                  doc[b, q_idx], slopes[h], rb[h, q_idx - kv_idx + 128]
  literals        integers (|n| < 2**31), finite floats, True, False
  operators       + - * / // % (Python semantics: / is true division, // and % round toward minus
                  infinity), unary -, < <= > >= == != (chains allowed), and or not
  functions       where(c, a, b), min, max, abs, exp, log, tanh, sqrt
  helpers         causal, sliding_window(w), ... (see HELPERS), which expand to expressions

Text is parsed with Python's ``ast`` module and converted node by node into sympy; nothing is ever
evaluated as Python, and any node outside the whitelist is an error. Errors are SpecError at the
caller's FILE:LINE, naming the construct: ``mask: unknown name 'os'``.

The result, an :class:`Expr`, prints as Triton source (:func:`to_triton`) and evaluates on torch
tensors (:func:`to_torch`); the two follow the same operation order, so in float32 they agree to
the rounding of exp/log/tanh. Only this module and the plan know sympy: printed Triton source needs
triton alone, and to_torch imports torch only when called.

Numbers in kernels: integer arithmetic is 32-bit there and 64-bit in to_torch; float arithmetic
is float32 in kernels. A float ``a // b`` is floor(a / b) and ``a % b`` is a - b * floor(a / b),
computed in float arithmetic (Python differs only at rounding boundaries). Division by a
value that is zero at run time is undefined; division by a constant zero is an error.

Tensor parameters in kernels (see :func:`tensor_args`): a tensor ``doc`` with 2 dims is passed as
``doc_ptr``, ``doc_stride_0``, ``doc_stride_1``, ``doc_size_0``, ``doc_size_1``. Reading outside
the tensor gives 0: the load reads at the indices clamped into [0, size - 1], so it never leaves
the tensor, and ``tl.where(in_range, value, 0)`` replaces what it read outside. Tensor parameters
must therefore have at least one element (the caller checks; to_torch raises). fp16 / bf16
elements are widened to float32 when loaded.
"""

from __future__ import annotations

import ast
import functools
import keyword
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple

import sympy
from sympy.core.function import Function
from sympy.logic.boolalg import Boolean, BooleanAtom

from attngen.errors import SpecError

__all__ = [
    "Expr", "HELPERS", "Helper", "ParamDecl", "d_param", "d_score", "dnf", "dnf_all", "dnf_any",
    "parse_expr",
    "parse_params", "print_triton", "tensor_args", "to_torch", "to_triton",
]

KINDS = ("mask", "score_mod")
INDEX_SYMBOLS = ("b", "h", "q_idx", "kv_idx", "q_len", "kv_len")
SCORE = "score"
MAX_TEXT = 2000
MAX_DEPTH = 50
MAX_INT = 2**31 - 1
MAX_FLOAT = 3.4028234663852886e38  # largest finite float32
MAX_POWER = 32  # x * x * ... folds into x**n; the printer writes n factors
MAX_PARAMS = 16
MAX_DNF = 64
TENSOR_DTYPES = {"int32": "int", "int64": "int", "fp32": "float", "fp16": "float", "bf16": "float"}
# torch's spellings of the floating dtypes, accepted wherever a spec names a dtype and read as the
# short names above (so a module built from either spelling is the same module)
DTYPE_ALIASES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
TENSOR_DIMS = (1, 4)

_SYMBOLS = {n: sympy.Symbol(n, integer=True, nonnegative=True) for n in INDEX_SYMBOLS}
_SYMBOLS[SCORE] = sympy.Symbol(SCORE, real=True)
_PARAM_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")


# --------------------------------------------------------------------------- sympy vocabulary


class FloorDiv(Function):
    """Python's ``a // b``: the quotient rounded toward minus infinity (floor(a / b) for floats)."""

    nargs = 2

    @classmethod
    def eval(cls, a, b):
        if a.is_Number and b.is_Number and not b.is_zero:
            if a.is_Integer and b.is_Integer:
                return sympy.Integer(int(a) // int(b))
            return sympy.Float(math.floor(float(a) / float(b)))
        if b == 1 and a.is_integer:
            return a
        return None

    def _eval_is_integer(self):
        a, b = self.args
        return True if (a.is_integer and b.is_integer) else None

    def fdiff(self, argindex=1):
        return sympy.S.Zero  # piecewise constant


# --------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class ParamDecl:
    """A declared runtime parameter: a scalar (``kind`` 'int' or 'float') or a tensor (``kind``
    'tensor', ``dtype`` one of TENSOR_DTYPES, ``dims`` 1..4)."""

    name: str
    kind: str
    dtype: str = ""
    dims: int = 0

    @property
    def elem(self) -> str:
        """'int' or 'float': the scalar's type, or the tensor's element type."""
        return TENSOR_DTYPES[self.dtype] if self.kind == "tensor" else self.kind

    def symbol(self) -> sympy.Symbol:
        return sympy.Symbol(self.name, **({"integer": True} if self.kind == "int" else {"real": True}))

    def base(self) -> sympy.IndexedBase:
        kw = {"integer": True} if self.elem == "int" else {"real": True}
        return sympy.IndexedBase(self.name, **kw)


def tensor_args(name: str, dims: int) -> tuple[str, ...]:
    """The kernel arguments that carry tensor parameter `name`: pointer, strides, sizes (elements)."""
    return (f"{name}_ptr", *(f"{name}_stride_{i}" for i in range(dims)), *(f"{name}_size_{i}" for i in range(dims)))


def parse_params(mapping: Mapping[str, Any], file: str = "<string>", lines: int | Mapping[str, int] = 1) -> dict[str, ParamDecl]:
    """Validate a ``params:`` mapping: ``w: int``, ``c: float``, ``doc: {tensor: int32, dims: 2}``.

    `lines` is the YAML line of each key (or one line for all). Returns the declarations in the
    given order; raises SpecError listing every problem.
    """
    problems: list[tuple[str, int, str]] = []

    def line_of(key: str) -> int:
        return lines if isinstance(lines, int) else lines.get(key, 1)

    def err(key: str, msg: str) -> None:
        problems.append((file, line_of(key), f"params.{key}: {msg}"))

    if not isinstance(mapping, Mapping):
        raise SpecError([(file, lines if isinstance(lines, int) else 1, "params: expected a mapping of name -> type")])
    if len(mapping) > MAX_PARAMS:
        raise SpecError([(file, lines if isinstance(lines, int) else 1, f"params: at most {MAX_PARAMS} parameters")])
    out: dict[str, ParamDecl] = {}
    for name, value in mapping.items():
        if not isinstance(name, str) or not _PARAM_NAME.fullmatch(name) or "__" in name:
            err(str(name), "a parameter name is a letter then letters, digits or '_' (at most 32, no '__')")
            continue
        if name in _RESERVED:
            err(name, f"{name!r} is reserved (an index symbol, function, helper or Python name)")
            continue
        if value in ("int", "float"):
            out[name] = ParamDecl(name, value)
        elif isinstance(value, Mapping):
            decl = _tensor_decl(name, value, err)
            if decl:
                out[name] = decl
        else:
            err(name, f"expected 'int', 'float' or {{tensor: DTYPE, dims: N}}, got {value!r}")
    taken = {a: n for n, d in out.items() if d.kind == "tensor" for a in tensor_args(n, d.dims)}
    for name in out:
        if name in taken:
            err(name, f"collides with kernel argument {name!r} of tensor {taken[name]!r}")
    if problems:
        raise SpecError(problems)
    return out


def _tensor_decl(name: str, value: Mapping, err) -> ParamDecl | None:
    extra = set(value) - {"tensor", "dims"}
    if extra or "tensor" not in value or "dims" not in value:
        err(name, "a tensor is declared as {tensor: DTYPE, dims: N}")
        return None
    dtype, dims = value["tensor"], value["dims"]
    if isinstance(dtype, str):
        dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in TENSOR_DTYPES:
        err(name, f"tensor dtype {dtype!r} is not one of {', '.join(TENSOR_DTYPES)} "
            f"(or torch's {', '.join(DTYPE_ALIASES)})")
        return None
    lo, hi = TENSOR_DIMS
    if not isinstance(dims, int) or isinstance(dims, bool) or not lo <= dims <= hi:
        err(name, f"dims must be an integer in [{lo}, {hi}], got {dims!r}")
        return None
    return ParamDecl(name, "tensor", dtype, dims)


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Helper:
    """A named pattern: `body` is an expression in this language over the index symbols (and
    `score` for score_mod helpers) and the helper's own arguments, which the caller passes as
    expressions. An argument listed in `tensors` must name a declared tensor parameter with that
    (element type, dims). Mask helpers may also appear in a score_mod (``where(causal, ...)``)."""

    kind: str
    args: tuple[str, ...]
    body: str
    doc: str
    tensors: tuple[tuple[str, str, int], ...] = ()


# The whole helper table: a new pattern is one entry here.
HELPERS: dict[str, Helper] = {
    "causal": Helper("mask", (), "q_idx >= kv_idx", "a query sees itself and earlier keys (top-left aligned)"),
    "sliding_window": Helper("mask", ("w",), "causal and q_idx - kv_idx < w", "causal, the last w keys (itself included)"),
    "prefix_lm": Helper("mask", ("p",), "kv_idx < p or causal", "the first p keys are seen by every query; causal after"),
    "chunked": Helper(
        "mask", ("c",), "causal and q_idx // c == kv_idx // c",
        "causal within chunks of c positions (chunked local attention); nothing across chunks",
    ),
    "dilated": Helper(
        "mask", ("w", "d"), "sliding_window(w) and (q_idx - kv_idx) % d == 0",
        "causal, within window w, every d-th key counting back from the query",
    ),
    "document": Helper(
        "mask", ("ids",), "ids[b, q_idx] == ids[b, kv_idx]",
        "a query sees keys of its own document; ids[b, i] is position i's document (not causal)",
        tensors=(("ids", "int", 2),),
    ),
    "global_tokens": Helper("mask", ("g",), "kv_idx < g or q_idx < g", "the first g positions see and are seen by all"),
    "alibi": Helper(
        "score_mod", ("slopes",), "score - slopes[h] * abs(q_idx - kv_idx)",
        "ALiBi: subtract slopes[h] (> 0) times the distance; under a causal mask this equals "
        "score + slopes[h] * (kv_idx - q_idx)",
        tensors=(("slopes", "float", 1),),
    ),
    "softcap": Helper("score_mod", ("c",), "c * tanh(score / c)", "squash scores into (-c, c)"),
}

_FUNCTIONS = {"where": (3, 3), "min": (2, 8), "max": (2, 8), "abs": (1, 1), "exp": (1, 1), "log": (1, 1), "tanh": (1, 1), "sqrt": (1, 1)}
_RESERVED = frozenset(INDEX_SYMBOLS) | {SCORE} | set(_FUNCTIONS) | set(HELPERS) | set(keyword.kwlist) | {"tl", "triton", "torch", "math"}


# --------------------------------------------------------------------------- the parsed expression


@dataclass(frozen=True)
class Expr:
    """A checked expression. `sympy` is its value; `type` is 'bool', 'int' or 'float'.

    `symbols` are the index symbols (and 'score') it reads, `params` the scalar parameters,
    `tensors` the tensor parameters; `decls` holds their declarations. file/line locate the text.
    """

    kind: str
    text: str
    sympy: sympy.Basic
    type: str
    symbols: frozenset[str]
    params: frozenset[str]
    tensors: frozenset[str]
    decls: tuple[ParamDecl, ...]
    file: str = field(default="<string>", compare=False)
    line: int = field(default=1, compare=False)

    @property
    def data_dependent(self) -> bool:
        """True when the value depends on tensor contents (not decidable per tile at build time)."""
        return bool(self.tensors)

    def __str__(self) -> str:
        return str(self.sympy)


def _make_expr(kind, text, value, typ, decls: Mapping[str, ParamDecl], file, line) -> Expr:
    symbols, params, tensors = set(), set(), set()
    for node in sympy.preorder_traversal(value):
        if isinstance(node, sympy.Indexed):
            tensors.add(node.base.label.name)
        elif isinstance(node, sympy.Symbol):
            if node.name in _SYMBOLS:
                symbols.add(node.name)
            elif node.name in decls and decls[node.name].kind != "tensor":
                params.add(node.name)
    used = sorted(params | tensors)
    return Expr(kind, text, value, typ, frozenset(symbols), frozenset(params), frozenset(tensors),
                tuple(decls[n] for n in used), file, line)


class _Val(NamedTuple):
    value: Any  # a sympy expression, or the ParamDecl of a tensor
    type: str  # 'bool' | 'int' | 'float' | 'tensor'


def parse_expr(
    text: str,
    *,
    kind: str,
    params: Mapping[str, ParamDecl] | None = None,
    file: str = "<string>",
    line: int = 1,
) -> Expr:
    """Parse a ``mask`` (boolean) or ``score_mod`` (numeric) expression; raise SpecError at
    file:line, the message prefixed with `kind`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    params = dict(params or {})
    conv = _Converter(kind, params, file, line, env={}, helper_depth=0)
    if not isinstance(text, str):
        conv.fail(f"expected an expression (a string), got {type(text).__name__}")
    val = conv.parse(text)
    if kind == "mask" and val.type != "bool":
        conv.fail(f"a mask must be a boolean expression (a comparison, and/or/not, a helper), got {_TYPE_WORDS[val.type]}")
    if kind == "score_mod" and val.type not in ("int", "float"):
        conv.fail(f"a score_mod must be a number, got {_TYPE_WORDS[val.type]}")
    _check_result(val.value, conv.fail)
    decls = {**params, **conv.tensors_seen}
    return _make_expr(kind, text, val.value, val.type, decls, file, line)


_TYPE_WORDS = {"bool": "a boolean", "int": "an integer", "float": "a float", "tensor": "a tensor"}

_REJECTED = {
    ast.Attribute: "attribute access",
    ast.Lambda: "lambda",
    ast.ListComp: "a comprehension",
    ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a comprehension",
    ast.JoinedStr: "an f-string",
    ast.FormattedValue: "an f-string",
    ast.NamedExpr: "an assignment expression ':='",
    ast.Starred: "a starred argument",
    ast.IfExp: "'x if c else y' (use where(c, x, y))",
    ast.List: "a list",
    ast.Tuple: "a tuple",
    ast.Set: "a set",
    ast.Dict: "a dict",
    ast.Slice: "a slice",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
}
_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%"}
_BAD_BINOPS = {ast.Pow: "'**'", ast.MatMult: "'@'", ast.LShift: "'<<'", ast.RShift: "'>>'",
               ast.BitAnd: "'&' (use 'and')", ast.BitOr: "'|' (use 'or')", ast.BitXor: "'^'"}
_COMPARE = {ast.Lt: sympy.Lt, ast.LtE: sympy.Le, ast.Gt: sympy.Gt, ast.GtE: sympy.Ge, ast.Eq: sympy.Eq, ast.NotEq: sympy.Ne}
_NOT_REAL = (sympy.S.ComplexInfinity, sympy.S.Infinity, sympy.S.NegativeInfinity, sympy.S.NaN, sympy.S.ImaginaryUnit)
_ESCAPES = (TypeError, ValueError, ArithmeticError, RecursionError, AttributeError, sympy.SympifyError)


class _Converter:
    def __init__(self, kind, params, file, line, env, helper_depth):
        self.kind, self.params, self.file, self.line = kind, params, file, line
        self.env: dict[str, _Val] = env  # helper arguments, bound in a helper's body
        self.helper_depth = helper_depth
        self.text = ""
        self.tensors_seen: dict[str, ParamDecl] = {}

    def fail(self, msg: str):
        raise SpecError([(self.file, self.line, f"{self.kind}: {msg}")])

    def snippet(self, node: ast.AST) -> str:
        s = ast.get_source_segment(self.text, node) or type(node).__name__
        return s if len(s) <= 40 else s[:37] + "..."

    def parse(self, text: str) -> _Val:
        self.text = text
        if len(text) > MAX_TEXT:
            self.fail(f"expression is longer than {MAX_TEXT} characters")
        if not text.isascii():
            bad = next(c for c in text if not c.isascii())
            self.fail(f"non-ASCII character {bad!r}")
        if "\x00" in text:
            self.fail("NUL character")
        if not text.strip():
            self.fail("empty expression")
        depth = 0
        for ch in text:  # before ast.parse, whose own nesting limit is far higher
            depth += ch in "([{"
            depth -= ch in ")]}"
            if depth > MAX_DEPTH:
                self.fail(f"expression is nested more than {MAX_DEPTH} levels deep")
        try:
            tree = ast.parse(text.strip(), mode="eval")
        except SyntaxError as e:
            self.fail(f"invalid syntax: {e.msg}")
        except (ValueError, MemoryError, RecursionError) as e:
            self.fail(f"invalid syntax: {e}")
        self.text = text.strip()
        _check_depth(tree.body, self.fail)
        try:
            return self.convert(tree.body)
        except SpecError:
            raise
        except _ESCAPES as e:  # sympy refusing a combination: still the spec's fault
            self.fail(f"cannot build the expression: {type(e).__name__}: {str(e)[:80]}")

    # -- dispatch
    def convert(self, node: ast.AST) -> _Val:
        method = getattr(self, "_" + type(node).__name__, None)
        if method is None:
            what = _REJECTED.get(type(node), f"{type(node).__name__} syntax")
            self.fail(f"{what} is not allowed: {self.snippet(node)}")
        return method(node)

    def real(self, value: sympy.Expr, node: ast.AST) -> sympy.Expr:
        """Stop at the construct that folded into a complex, infinite or undefined constant."""
        if any(value.has(x) for x in _NOT_REAL):
            self.fail(f"{self.snippet(node)} has no finite real value")
        return value

    def numeric(self, node: ast.AST, what: str) -> _Val:
        v = self.convert(node)
        if v.type not in ("int", "float"):
            self.fail(f"{what} needs a number, got {_TYPE_WORDS[v.type]}: {self.snippet(node)}")
        return v

    def boolean(self, node: ast.AST, what: str) -> _Val:
        v = self.convert(node)
        if v.type != "bool":
            self.fail(f"{what} needs a boolean, got {_TYPE_WORDS[v.type]}: {self.snippet(node)}")
        return v

    # -- leaves
    def _Constant(self, node: ast.Constant) -> _Val:
        v = node.value
        if isinstance(v, bool):
            return _Val(sympy.true if v else sympy.false, "bool")
        if isinstance(v, int):
            if abs(v) > MAX_INT:
                self.fail(f"integer literal {self.snippet(node)} is out of range (|n| < 2**31)")
            return _Val(sympy.Integer(v), "int")
        if isinstance(v, float):
            if not math.isfinite(v) or abs(v) > MAX_FLOAT:
                self.fail(f"float literal {self.snippet(node)} is not a finite float32")
            return _Val(sympy.Float(v), "float")
        what = "a string" if isinstance(v, (str, bytes)) else repr(v)
        self.fail(f"{what} is not allowed: {self.snippet(node)}")

    def _Name(self, node: ast.Name) -> _Val:
        name = node.id
        if "__" in name:
            self.fail(f"name {name!r} is not allowed (dunder names)")
        if name in self.env:
            return self.env[name]
        if name in INDEX_SYMBOLS:
            return _Val(_SYMBOLS[name], "int")
        if name == SCORE:
            if self.kind != "score_mod":
                self.fail("unknown name 'score' (score is only available in score_mod)")
            return _Val(_SYMBOLS[SCORE], "float")
        if name in self.params:
            d = self.params[name]
            if d.kind == "tensor":
                return _Val(d, "tensor")
            return _Val(d.symbol(), d.kind)
        if name in HELPERS:
            return self.helper(name, [], node)
        if name in _FUNCTIONS:
            self.fail(f"{name!r} is a function; call it as {name}(...)")
        self.fail(f"unknown name {name!r}")

    # -- operators
    def _UnaryOp(self, node: ast.UnaryOp) -> _Val:
        if isinstance(node.op, ast.Not):
            v = self.boolean(node.operand, "'not'")
            return _Val(sympy.Not(v.value).to_nnf(), "bool")
        if isinstance(node.op, ast.Invert):
            self.fail(f"operator '~' is not supported (use 'not'): {self.snippet(node)}")
        v = self.numeric(node.operand, "unary minus" if isinstance(node.op, ast.USub) else "unary plus")
        return _Val(-v.value if isinstance(node.op, ast.USub) else v.value, v.type)

    def _BinOp(self, node: ast.BinOp) -> _Val:
        op = type(node.op)
        if op not in _BINOPS:
            self.fail(f"operator {_BAD_BINOPS.get(op, op.__name__)} is not supported: {self.snippet(node)}")
        sym = _BINOPS[op]
        a = self.numeric(node.left, f"'{sym}'")
        b = self.numeric(node.right, f"'{sym}'")
        joined = "float" if "float" in (a.type, b.type) else "int"
        if sym in ("/", "//", "%") and b.value.is_zero:
            self.fail(f"division by zero: {self.snippet(node)}")
        if sym == "+":
            return _Val(a.value + b.value, joined)
        if sym == "-":
            return _Val(a.value - b.value, joined)
        if sym == "*":
            return _Val(a.value * b.value, joined)
        if sym == "/":
            return _Val(self.real(a.value / b.value, node), "float")
        if sym == "//":
            return _Val(FloorDiv(a.value, b.value), joined)
        return _Val(sympy.Mod(a.value, b.value), joined)

    def _BoolOp(self, node: ast.BoolOp) -> _Val:
        word = "and" if isinstance(node.op, ast.And) else "or"
        vals = [self.boolean(n, f"'{word}'").value for n in node.values]
        return _Val(sympy.And(*vals) if word == "and" else sympy.Or(*vals), "bool")

    def _Compare(self, node: ast.Compare) -> _Val:
        left = node.left
        parts = []
        for op, right in zip(node.ops, node.comparators):
            if type(op) not in _COMPARE:
                self.fail(f"comparison {type(op).__name__!r} is not allowed: {self.snippet(node)}")
            a, b = self.convert(left), self.convert(right)
            for v, n in ((a, left), (b, right)):
                if v.type not in ("int", "float"):
                    self.fail(f"comparisons need numbers, got {_TYPE_WORDS[v.type]} (combine booleans with and/or/not): {self.snippet(n)}")
            parts.append(_COMPARE[type(op)](a.value, b.value))
            left = right
        return _Val(sympy.And(*parts), "bool")

    # -- calls and indexing
    def _Call(self, node: ast.Call) -> _Val:
        if not isinstance(node.func, ast.Name):
            self.fail(f"only named functions can be called: {self.snippet(node)}")
        name = node.func.id
        if "__" in name:
            self.fail(f"name {name!r} is not allowed (dunder names)")
        if node.keywords:
            self.fail(f"keyword arguments are not allowed: {self.snippet(node)}")
        if any(isinstance(a, ast.Starred) for a in node.args):
            self.fail(f"starred arguments are not allowed: {self.snippet(node)}")
        if name in HELPERS:
            return self.helper(name, node.args, node)
        if name not in _FUNCTIONS:
            known = name in self.params or name in INDEX_SYMBOLS or name in self.env or name == SCORE
            self.fail(f"{name!r} is not a function" if known else f"unknown function {name!r}")
        lo, hi = _FUNCTIONS[name]
        if not lo <= len(node.args) <= hi:
            want = str(lo) if lo == hi else f"{lo} to {hi}"
            self.fail(f"{name}() takes {want} arguments, got {len(node.args)}")
        if name == "where":
            c = self.boolean(node.args[0], "where()'s condition")
            a, b = self.convert(node.args[1]), self.convert(node.args[2])
            if a.type == b.type == "bool":
                return _Val(sympy.ITE(c.value, a.value, b.value), "bool")
            if a.type not in ("int", "float") or b.type not in ("int", "float"):
                self.fail(f"where()'s branches must both be numbers or both booleans: {self.snippet(node)}")
            typ = "float" if "float" in (a.type, b.type) else "int"
            return _Val(sympy.Piecewise((a.value, c.value), (b.value, True)), typ)
        args = [self.numeric(a, f"{name}()") for a in node.args]
        vals = [a.value for a in args]
        joined = "float" if any(a.type == "float" for a in args) else "int"
        if name == "min":
            return _Val(sympy.Min(*vals), joined)
        if name == "max":
            return _Val(sympy.Max(*vals), joined)
        if name == "abs":
            return _Val(sympy.Abs(vals[0]), joined)
        fn = {"exp": sympy.exp, "log": sympy.log, "tanh": sympy.tanh, "sqrt": sympy.sqrt}[name]
        return _Val(self.real(fn(vals[0]), node), "float")

    def _Subscript(self, node: ast.Subscript) -> _Val:
        base = node.value
        target = self.convert(base) if isinstance(base, ast.Name) else None
        if target is None or target.type != "tensor":
            self.fail(f"only declared tensor parameters can be indexed: {self.snippet(node)}")
        decl: ParamDecl = target.value
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if len(items) != decl.dims:
            self.fail(f"tensor {decl.name!r} has {decl.dims} dim{'s' * (decl.dims > 1)}, indexed with {len(items)}: {self.snippet(node)}")
        idx = []
        for i, item in enumerate(items):
            if isinstance(item, ast.Slice):
                self.fail(f"a slice is not allowed: {self.snippet(node)}")
            v = self.convert(item)
            if v.type != "int":
                self.fail(f"index {i} of {decl.name!r} must be an integer expression, got {_TYPE_WORDS[v.type]}: {self.snippet(item)}")
            idx.append(v.value)
        self.tensors_seen[decl.name] = decl
        return _Val(decl.base()[tuple(idx)], decl.elem)

    def helper(self, name: str, args: list[ast.AST], node: ast.AST) -> _Val:
        h = HELPERS[name]
        if h.kind == "score_mod" and self.kind != "score_mod":  # mask helpers serve both
            self.fail(f"{name} is a score_mod helper, not usable in a {self.kind}")
        if len(args) != len(h.args):
            sig = f"{name}({', '.join(h.args)})" if h.args else name
            self.fail(f"{sig} takes {len(h.args)} argument{'s' * (len(h.args) != 1)}, got {len(args)}: {self.snippet(node)}")
        if self.helper_depth > 8:
            raise RuntimeError(f"helper {name!r} expands too deeply: a cycle in HELPERS")
        tensors = {t[0]: t[1:] for t in h.tensors}
        env: dict[str, _Val] = {}
        for arg, a in zip(h.args, args):
            if arg in tensors:
                elem, dims = tensors[arg]
                v = self.convert(a) if isinstance(a, ast.Name) else None
                if v is None or v.type != "tensor" or v.value.dims != dims or v.value.elem != elem:
                    self.fail(f"{name}(): argument {arg!r} must name a declared {dims}-dim {elem} tensor parameter: {self.snippet(a)}")
                self.tensors_seen[v.value.name] = v.value
                env[arg] = v
            else:
                env[arg] = self.numeric(a, f"{name}()'s argument {arg!r}")
        inner = _Converter(self.kind, {}, self.file, self.line, env, self.helper_depth + 1)
        val = inner.parse(h.body)
        self.tensors_seen.update(inner.tensors_seen)
        return val


def _check_depth(root: ast.AST, fail) -> None:
    stack = [(root, 1)]
    while stack:
        node, d = stack.pop()
        if d > MAX_DEPTH:
            fail(f"expression is nested more than {MAX_DEPTH} levels deep")
        stack.extend((c, d + 1) for c in ast.iter_child_nodes(node))


def _check_result(value: sympy.Basic, fail) -> None:
    """Reject what folding produced that no kernel can compute: complex or infinite constants,
    integers past 32 bits, floats past float32, huge powers."""
    if any(value.has(x) for x in _NOT_REAL):
        fail("the expression has no finite real value (log or sqrt of a negative constant, or a division by zero)")
    for node in sympy.preorder_traversal(value):
        if isinstance(node, sympy.Rational) and (abs(node.p) > MAX_INT or node.q > MAX_INT):
            fail(f"constant {node} does not fit in 32 bits")
        if isinstance(node, sympy.Float) and abs(float(node)) > MAX_FLOAT:
            fail(f"constant {node} does not fit in float32")
        if isinstance(node, sympy.Pow) and node.exp.is_Integer and abs(int(node.exp)) > MAX_POWER:
            fail(f"a value is multiplied by itself more than {MAX_POWER} times")


# --------------------------------------------------------------------------- derivatives


def _derived(expr: Expr, value: sympy.Basic, what: str) -> Expr:
    if value.has(sympy.Derivative, sympy.Subs):
        raise SpecError([(expr.file, expr.line, f"{expr.kind}: cannot differentiate {expr.text!r} {what}")])
    decls = {d.name: d for d in expr.decls}
    return _make_expr(expr.kind, f"d/d{what.split()[-1]} ({expr.text})", value, _type(value), decls, expr.file, expr.line)


def _differentiable(value: sympy.Basic) -> sympy.Basic:
    # sympy has no derivative for Mod; a % b = a - b * (a // b), and // is piecewise constant.
    return value.replace(sympy.Mod, lambda a, b: a - b * FloorDiv(a, b))


def d_score(expr: Expr) -> Expr:
    """d(score_mod)/d(score), for the backward pass."""
    if expr.kind != "score_mod":
        raise ValueError("d_score: expected a score_mod expression")
    return _derived(expr, sympy.diff(_differentiable(expr.sympy), _SYMBOLS[SCORE]), "with respect to score")


def d_param(expr: Expr, name: str) -> Expr:
    """d(score_mod)/d(name) for a float parameter.

    For a float tensor, the derivative is with respect to the element the expression loads; the
    tensor's gradient is that value times the upstream gradient, added at the load's indices. The
    tensor must be read at one index tuple only (SpecError otherwise).
    """
    if expr.kind != "score_mod":
        raise ValueError("d_param: expected a score_mod expression")
    decl = next((d for d in expr.decls if d.name == name), None)
    if decl is None or decl.elem != "float":
        raise ValueError(f"d_param: {name!r} is not a float parameter of this expression")
    value = _differentiable(expr.sympy)
    if decl.kind != "tensor":
        return _derived(expr, sympy.diff(value, decl.symbol()), f"with respect to {name}")
    loads = {n for n in sympy.preorder_traversal(value) if isinstance(n, sympy.Indexed) and n.base.label.name == name}
    if len(loads) > 1:
        raise SpecError([(expr.file, expr.line, f"{expr.kind}: tensor {name!r} is read at {len(loads)} different indices; a learnable tensor must be read at one")])
    (load,) = loads
    x = sympy.Dummy("x", real=True)
    return _derived(expr, sympy.diff(value.xreplace({load: x}), x).xreplace({x: load}), f"with respect to {name}")


# --------------------------------------------------------------------------- printing, shared


def _is_bool(e: sympy.Basic) -> bool:
    # A sympy Symbol is a Boolean too (it may stand for a truth value), but also an Expr.
    return isinstance(e, Boolean) and not isinstance(e, sympy.Expr)


@functools.lru_cache(maxsize=4096)
def _type(e: sympy.Basic) -> str:
    """'bool', 'int' or 'float' of a sympy value, as the printers compute it."""
    if _is_bool(e):
        return "bool"
    if e.is_Integer:
        return "int"
    if e.is_Number or e.is_number:
        return "float"
    if isinstance(e, sympy.Symbol):
        return "int" if e.is_integer else "float"
    if isinstance(e, sympy.Indexed):
        return "int" if e.base.is_integer else "float"
    if isinstance(e, sympy.Pow):
        return "int" if _type(e.base) == "int" and e.exp.is_Integer and e.exp > 0 else "float"
    if isinstance(e, sympy.Piecewise):
        return _join(a.expr for a in e.args)
    if isinstance(e, (sympy.Add, sympy.Mul, sympy.Min, sympy.Max, sympy.Abs, sympy.sign, FloorDiv, sympy.Mod)):
        return _join(e.args)
    return "float"


def _join(args) -> str:
    return "float" if any(_type(a) == "float" for a in args) else "int"


def _split_add(e: sympy.Add) -> list[tuple[bool, sympy.Expr]]:
    """Terms in printing order as (subtract, positive term); a positive term leads if any."""
    terms = [(t.could_extract_minus_sign(), t) for t in e.as_ordered_terms()]
    terms = [(neg, -t if neg else t) for neg, t in terms]
    first = next((i for i, (neg, _) in enumerate(terms) if not neg), 0)
    return [terms[first]] + terms[:first] + terms[first + 1:]


def _split_mul(e: sympy.Expr) -> tuple[bool, list[sympy.Expr], list[sympy.Expr]]:
    """(negate, numerator factors, denominator factors); a rational coefficient p/q puts p up
    and q down, so `x / 3` prints as a division, as written."""
    coeff, factors = e.as_coeff_mul()
    neg, num, den = False, [], []
    if coeff.is_Rational:
        p, q = int(coeff.p), int(coeff.q)
        if p == -1:
            neg, p = True, 1
        if p != 1:
            num.append(sympy.Integer(p))
        if q != 1:
            den.append(sympy.Integer(q))
    elif coeff == -1:
        neg = True
    elif coeff != 1:
        num.append(coeff)
    for f in sorted(factors, key=sympy.default_sort_key):
        if isinstance(f, sympy.Pow) and f.exp.is_Number and f.exp < 0:
            den.append(sympy.Pow(f.base, -f.exp))
        else:
            num.append(f)
    return neg, num, den


def _is_div(e: sympy.Basic) -> bool:
    return isinstance(e, sympy.Mul) or (isinstance(e, sympy.Pow) and e.exp.is_Number and e.exp < 0)


# --------------------------------------------------------------------------- Triton


_CMP, _OR, _AND, _ADD, _MUL, _UNARY, _ATOM = range(1, 8)
_REL = {sympy.StrictLessThan: "<", sympy.LessThan: "<=", sympy.StrictGreaterThan: ">", sympy.GreaterThan: ">=",
        sympy.Equality: "==", sympy.Unequality: "!="}
_ATOM_TEXT = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*(\[[^\[\]]*\])?")


def to_triton(expr: Expr, names: Mapping[str, str]) -> str:
    """Triton source computing `expr` elementwise.

    `names` gives the source text of every index symbol, `score` and scalar parameter the
    expression reads, e.g. {"q_idx": "o_m[:, None]", "kv_idx": "o_n[None, :]", "score": "b_s"}.
    A tensor parameter `t` is read through the kernel arguments ``tensor_args(prefix, dims)``, where
    prefix is names.get(t, t). The result is parenthesised unless it is a name, call or literal.
    """
    missing = sorted((expr.symbols | expr.params) - set(names))
    if missing:
        raise ValueError(f"to_triton: no source text for {', '.join(missing)}")
    text, prec = _TritonPrinter(expr, names).p(expr.sympy)
    return text if prec == _ATOM else f"({text})"


def print_triton(value: sympy.Basic, names: Mapping[str, str], expr: Expr | None = None) -> str:
    """Triton source of a sympy value built from this module's vocabulary (the plan's tile
    bounds: FloorDiv, Min, Max, Piecewise, relations, And/Or; a part of a parsed expression, such
    as a tensor read's index). `names` gives the source text of every symbol; tensor reads need
    the parsed `expr` the value comes from, for the tensors' declarations. Integer // and % print
    with floor semantics, as in to_triton. The result is parenthesised unless it is a name, call
    or literal."""
    text, prec = _TritonPrinter(expr, names).p(value)
    return text if prec == _ATOM else f"({text})"


class _TritonPrinter:
    def __init__(self, expr: Expr | None, names: Mapping[str, str]):
        self.names = names
        self.decls = {d.name: d for d in expr.decls} if expr is not None else {}

    def wrap(self, e: sympy.Basic, prec: int) -> str:
        text, p = self.p(e)
        return text if p >= prec else f"({text})"

    def flt(self, e: sympy.Basic) -> str:
        """e as a float32 value (int values cast; constexpr-safe, unlike `.to`)."""
        text, _ = self.p(e)
        return text if _type(e) == "float" else f"tl.cast({text}, tl.float32)"

    def p(self, e: sympy.Basic) -> tuple[str, int]:
        if isinstance(e, BooleanAtom):
            return ("True" if e else "False"), _ATOM
        if not _is_bool(e) and e.is_number:
            return _literal(e)
        if isinstance(e, sympy.Symbol):
            text = self.names[e.name]
            return text, (_ATOM if _ATOM_TEXT.fullmatch(text) else _CMP)
        if isinstance(e, sympy.Indexed):
            return self.load(e), _ATOM
        if isinstance(e, sympy.Add):
            parts = []
            for i, (neg, t) in enumerate(_split_add(e)):
                if i == 0:
                    parts.append("-" + self.wrap(t, _UNARY) if neg else self.wrap(t, _ADD))
                else:  # a right operand of + or - binds tighter
                    parts.append((" - " if neg else " + ") + self.wrap(t, _ADD + 1))
            return "".join(parts), _ADD
        if _is_div(e):
            return self.mul(e)
        if isinstance(e, sympy.Pow):
            return self.power(e)
        if isinstance(e, FloorDiv) or isinstance(e, sympy.Mod):
            return self.floor_op(e)
        if isinstance(e, (sympy.Min, sympy.Max)):
            fn = "tl.minimum" if isinstance(e, sympy.Min) else "tl.maximum"
            nan = ", propagate_nan=tl.PropagateNan.ALL" if _type(e) == "float" else ""
            args = [self.p(a)[0] for a in e.args]
            text = args[-1]
            for a in reversed(args[:-1]):
                text = f"{fn}({a}, {text}{nan})"
            return text, _ATOM
        if isinstance(e, sympy.Abs):
            return f"tl.abs({self.p(e.args[0])[0]})", _ATOM
        if isinstance(e, sympy.exp):
            return f"tl.exp({self.flt(e.args[0])})", _ATOM
        if isinstance(e, sympy.log):
            return f"tl.log({self.flt(e.args[0])})", _ATOM
        if isinstance(e, sympy.tanh):
            # Triton has no tanh in every version: tanh(x) = 2 * sigmoid(2x) - 1.
            x = self.flt(e.args[0])
            return f"2 * tl.sigmoid(2 * {x if _ATOM_TEXT.fullmatch(x) else '(' + x + ')'}) - 1", _ADD
        if isinstance(e, (sympy.floor, sympy.ceiling)):
            fn = "tl.floor" if isinstance(e, sympy.floor) else "tl.ceil"
            return f"{fn}({self.flt(e.args[0])})", _ATOM
        if isinstance(e, sympy.sign):
            x = self.p(e.args[0])[0]
            one, zero = ("1.0", "0.0") if _type(e) == "float" else ("1", "0")
            return f"tl.where({x} > 0, {one}, tl.where({x} < 0, -{one}, {zero}))", _ATOM
        if isinstance(e, sympy.Heaviside):
            x = self.p(e.args[0])[0]
            at0 = _literal(e.args[1])[0] if len(e.args) > 1 else "0.5"
            return f"tl.where({x} > 0, 1.0, tl.where({x} < 0, 0.0, {at0}))", _ATOM
        if isinstance(e, sympy.Piecewise):
            return self.where([(a.cond, a.expr) for a in e.args]), _ATOM
        if isinstance(e, sympy.ITE):
            c, a, b = e.args
            return self.where([(c, a), (sympy.true, b)]), _ATOM
        if type(e) in _REL:
            return f"{self.wrap(e.lhs, _OR)} {_REL[type(e)]} {self.wrap(e.rhs, _OR)}", _CMP
        if isinstance(e, (sympy.And, sympy.Or)):
            op, prec = (" & ", _AND) if isinstance(e, sympy.And) else (" | ", _OR)
            return op.join(self.wrap(a, _ATOM) for a in e.args), prec
        if isinstance(e, sympy.Not):
            # `== 0`, not `~`: on a constexpr Python bool `~True` is -2.
            return f"{self.wrap(e.args[0], _ATOM)} == 0", _CMP
        raise ValueError(f"to_triton: cannot print {type(e).__name__}: {e}")

    def where(self, branches) -> str:
        (c, a), rest = branches[0], branches[1:]
        if c == sympy.true or not rest:
            return self.p(a)[0]
        return f"tl.where({self.p(c)[0]}, {self.p(a)[0]}, {self.where(rest)})"

    def mul(self, e) -> tuple[str, int]:
        neg, num, den = _split_mul(e)
        text = " * ".join(self.wrap(f, _MUL + (i > 0)) for i, f in enumerate(num)) or "1"
        if den:
            d = " * ".join(self.wrap(f, _MUL + (i > 0)) for i, f in enumerate(den))
            text += " / " + (d if len(den) == 1 and self.p(den[0])[1] > _MUL else f"({d})")
        if neg:
            single = len(num) == 1 and not den and self.p(num[0])[1] >= _UNARY
            return "-" + (text if single else f"({text})"), _UNARY
        return text, _MUL

    def power(self, e: sympy.Pow) -> tuple[str, int]:
        base, n = e.base, e.exp
        if n.is_Integer and n > 0:
            return " * ".join([self.wrap(base, _MUL)] + [self.wrap(base, _MUL + 1)] * (int(n) - 1)), _MUL
        if n == sympy.Rational(1, 2):
            return f"tl.sqrt({self.flt(base)})", _ATOM
        # x**y only arises from exp(y * log(x)); print it that way.
        log_base = _literal(sympy.log(base))[0] if base.is_number else f"tl.log({self.flt(base)})"
        return f"tl.exp({self.wrap(n, _MUL)} * {log_base})", _ATOM

    def floor_op(self, e) -> tuple[str, int]:
        a, b = e.args
        is_div = isinstance(e, FloorDiv)
        if _type(e) == "float":
            q = f"tl.floor({self.wrap(a, _MUL)} / {self.wrap(b, _MUL + 1)})"
            return (q, _ATOM) if is_div else (f"{self.wrap(a, _ADD)} - {self.wrap(b, _MUL)} * {q}", _ADD)
        sa, sb = self.wrap(a, _MUL), self.wrap(b, _MUL + 1)
        if a.is_nonnegative and b.is_positive:  # C's truncation is the floor here
            return f"{sa} {'//' if is_div else '%'} {sb}", _MUL
        # Triton's // and % truncate toward zero; ((a % b) + b) % b is the floor remainder for
        # either sign of b, and a minus it divides exactly.
        rem = f"(({sa} % {sb}) + {sb}) % {sb}"
        if not is_div:
            return rem, _MUL
        return f"({self.wrap(a, _ADD)} - {rem}) // {sb}", _MUL

    def load(self, e: sympy.Indexed) -> str:
        name = e.base.label.name
        decl = self.decls[name]
        args = tensor_args(self.names.get(name, name), decl.dims)
        ptr, strides, sizes = args[0], args[1:1 + decl.dims], args[1 + decl.dims:]
        offs, checks = [], []
        for i, idx in enumerate(e.indices):
            s = self.p(idx)[0]
            low = s if idx.is_nonnegative else f"tl.maximum({s}, 0)"
            offs.append(f"tl.cast(tl.minimum({low}, {sizes[i]} - 1), tl.int64) * {strides[i]}")
            if not idx.is_nonnegative:
                checks.append(f"({self.wrap(idx, _OR)} >= 0)")
            checks.append(f"({self.wrap(idx, _OR)} < {sizes[i]})")
        # The clamped address is inside the (non-empty) tensor, so the load needs no mask; a
        # masked load would also trip the interpreter on a scalar index test (b < size).
        value = f"tl.load({ptr} + {' + '.join(offs)})"
        if decl.dtype in ("fp16", "bf16"):
            value += ".to(tl.float32)"
        return f"tl.where({' & '.join(checks)}, {value}, 0)"


def _literal(e: sympy.Basic) -> tuple[str, int]:
    if e.is_Integer:
        v = int(e)
    else:
        v = float(sympy.N(e))
        if not math.isfinite(v):
            raise ValueError(f"to_triton: constant {e} is not finite")
    return repr(v), (_UNARY if v < 0 or repr(v).startswith("-") else _ATOM)


# --------------------------------------------------------------------------- torch


def to_torch(expr: Expr) -> Callable[..., Any]:
    """A function ``fn(b, h, q_idx, kv_idx, q_len, kv_len, score=None, **params)`` computing `expr`
    elementwise on broadcast torch tensors (or numbers), in the order the Triton printout does.

    Scalar parameters are numbers, tensor parameters torch tensors with the declared dims; reads
    outside a tensor give 0 as in kernels. For attngen.reference.dense's mask callable::

        fn = to_torch(mask)
        ref_mask = lambda b, h, q, kv: fn(b, h, q, kv, n_q, n_kv, **params)
    """
    import torch

    decls = {d.name: d for d in expr.decls}

    def fn(b, h, q_idx, kv_idx, q_len, kv_len, score=None, **params):
        env = dict(zip(INDEX_SYMBOLS, (b, h, q_idx, kv_idx, q_len, kv_len)))
        env[SCORE] = score
        if SCORE in expr.symbols and score is None:
            raise ValueError("to_torch: this expression reads score; pass score=")
        missing = sorted(set(decls) - set(params))
        if missing:
            raise ValueError(f"to_torch: missing parameter{'s' * (len(missing) > 1)} {', '.join(missing)}")
        for name, d in decls.items():
            if d.kind == "tensor" and (not isinstance(params[name], torch.Tensor) or params[name].dim() != d.dims):
                raise ValueError(f"to_torch: {name} must be a {d.dims}-dim tensor")
            if d.kind == "tensor" and params[name].numel() == 0:
                raise ValueError(f"to_torch: tensor parameter {name} is empty")
        env.update(params)
        return _TorchEval(torch, env).ev(expr.sympy)

    return fn


class _TorchEval:
    def __init__(self, torch, env):
        self.t, self.env = torch, env

    def tensor(self, v):
        if isinstance(v, self.t.Tensor):
            return v
        # A 0-dim tensor promotes like a Python scalar; float64 keeps a float parameter exact.
        return self.t.as_tensor(v, dtype=self.t.float64) if isinstance(v, float) else self.t.as_tensor(v)

    def flt(self, e):
        v = self.ev(e)
        return v if _type(e) == "float" else v.to(self.t.float32)

    def ev(self, e):
        t = self.t
        if isinstance(e, BooleanAtom):
            return t.tensor(bool(e))
        if not _is_bool(e) and e.is_number:
            return t.tensor(int(e)) if e.is_Integer else t.tensor(float(sympy.N(e)), dtype=t.float64)
        if isinstance(e, sympy.Symbol):
            return self.tensor(self.env[e.name])
        if isinstance(e, sympy.Indexed):
            return self.load(e)
        if isinstance(e, sympy.Add):
            acc = None
            for neg, term in _split_add(e):
                v = self.ev(term)
                acc = (-v if neg else v) if acc is None else (acc - v if neg else acc + v)
            return acc
        if _is_div(e):
            neg, num, den = _split_mul(e)
            acc = self.ev(num[0]) if num else t.tensor(1)
            for f in num[1:]:
                acc = acc * self.ev(f)
            if den:
                d = self.ev(den[0])
                for f in den[1:]:
                    d = d * self.ev(f)
                acc = acc / d
            return -acc if neg else acc
        if isinstance(e, sympy.Pow):
            base, n = e.base, e.exp
            if n.is_Integer and n > 0:
                x = self.ev(base)
                acc = x
                for _ in range(int(n) - 1):
                    acc = acc * x
                return acc
            if n == sympy.Rational(1, 2):
                return t.sqrt(self.flt(base))
            log_base = t.tensor(float(sympy.N(sympy.log(base))), dtype=t.float64) if base.is_number else t.log(self.flt(base))
            return t.exp(self.ev(n) * log_base)
        if isinstance(e, (FloorDiv, sympy.Mod)):
            a, b = (self.ev(x) for x in e.args)
            if _type(e) == "float":
                q = t.floor(a / b)
                return q if isinstance(e, FloorDiv) else a - b * q
            return t.div(a, b, rounding_mode="floor") if isinstance(e, FloorDiv) else t.remainder(a, b)
        if isinstance(e, (sympy.Min, sympy.Max)):
            fn = t.minimum if isinstance(e, sympy.Min) else t.maximum
            vals = [self.ev(a) for a in e.args]
            acc = vals[-1]
            for v in reversed(vals[:-1]):
                acc = fn(v, acc)
            return acc
        if isinstance(e, sympy.Abs):
            return t.abs(self.ev(e.args[0]))
        if isinstance(e, (sympy.exp, sympy.log, sympy.tanh, sympy.floor, sympy.ceiling)):
            fn = {sympy.exp: t.exp, sympy.log: t.log, sympy.tanh: t.tanh, sympy.floor: t.floor, sympy.ceiling: t.ceil}[type(e)]
            return fn(self.flt(e.args[0]))
        if isinstance(e, sympy.sign):
            return t.sign(self.ev(e.args[0]))
        if isinstance(e, sympy.Heaviside):
            x = self.ev(e.args[0])
            at0 = float(e.args[1]) if len(e.args) > 1 else 0.5
            return t.where(x > 0, 1.0, t.where(x < 0, 0.0, at0))
        if isinstance(e, sympy.Piecewise):
            return self.where([(a.cond, a.expr) for a in e.args])
        if isinstance(e, sympy.ITE):
            c, a, b = e.args
            return self.where([(c, a), (sympy.true, b)])
        if type(e) in _REL:
            a, b = self.ev(e.lhs), self.ev(e.rhs)
            return {"<": t.lt, "<=": t.le, ">": t.gt, ">=": t.ge, "==": t.eq, "!=": t.ne}[_REL[type(e)]](a, b)
        if isinstance(e, sympy.And):
            return functools.reduce(lambda x, y: x & y, (self.ev(a) for a in e.args))
        if isinstance(e, sympy.Or):
            return functools.reduce(lambda x, y: x | y, (self.ev(a) for a in e.args))
        if isinstance(e, sympy.Not):
            return ~self.ev(e.args[0])
        raise ValueError(f"to_torch: cannot evaluate {type(e).__name__}: {e}")

    def where(self, branches):
        (c, a), rest = branches[0], branches[1:]
        if c == sympy.true or not rest:
            return self.ev(a)
        return self.t.where(self.ev(c), self.ev(a), self.where(rest))

    def load(self, e: sympy.Indexed):
        t = self.t
        data = self.env[e.base.label.name]
        idx = t.broadcast_tensors(*(self.ev(i).to(t.int64) for i in e.indices))
        ok = t.ones(idx[0].shape, dtype=t.bool, device=data.device)
        clamped = []
        for i, size in zip(idx, data.shape):
            ok = ok & (i >= 0) & (i < size)
            clamped.append(i.clamp(0, size - 1))
        v = t.where(ok, data[tuple(clamped)], t.zeros((), dtype=data.dtype))
        return v.float() if data.dtype in (t.float16, t.bfloat16) else v


# --------------------------------------------------------------------------- normal form


_NEGATED = {"<": ">=", "<=": ">", ">": "<=", ">=": "<", "==": "!=", "!=": "=="}


def dnf(value: sympy.Basic, leaf: Callable, limit: int = MAX_DNF) -> tuple[tuple, ...]:
    """The disjunctive normal form of a boolean sympy value: a tuple (or) of tuples (and) of atoms.
    Constants, not, and, or and boolean where() are expanded here, negations pushed to the leaves;
    each relation becomes ``leaf(d, op)`` for ``d op 0`` (op one of < <= > >= == !=, negation
    applied), any other leaf ``leaf(e, None)`` (e negated with Not when it was). `leaf` returns the
    leaf's own normal form, which it may build with `dnf_all` / `dnf_any`. Raises OverflowError
    past `limit` conjunctions. () is never true; ((),) is always true."""
    if isinstance(value, BooleanAtom):
        return ((),) if bool(value) else ()
    return _dnf(value, False, leaf, limit)


def dnf_all(parts, limit: int = MAX_DNF) -> tuple[tuple, ...]:
    """The conjunction of normal forms (their product)."""
    out = ((),)
    for p in parts:
        out = tuple(x + y for x in out for y in p)
        if len(out) > limit:
            raise OverflowError(f"more than {limit} conjunctions")
    return out


def dnf_any(parts, limit: int = MAX_DNF) -> tuple[tuple, ...]:
    """The disjunction of normal forms."""
    out = tuple(c for p in parts for c in p)
    if len(out) > limit:
        raise OverflowError(f"more than {limit} conjunctions")
    return out


def _dnf(e: sympy.Basic, negate: bool, leaf, limit) -> tuple[tuple, ...]:
    if isinstance(e, BooleanAtom):
        return ((),) if bool(e) != negate else ()
    if isinstance(e, sympy.Not):
        return _dnf(e.args[0], not negate, leaf, limit)
    if isinstance(e, sympy.ITE):
        c, a, b = e.args
        return _dnf(sympy.Or(sympy.And(c, a), sympy.And(sympy.Not(c), b)), negate, leaf, limit)
    if isinstance(e, (sympy.And, sympy.Or)):
        parts = [_dnf(a, negate, leaf, limit) for a in e.args]
        return dnf_all(parts, limit) if isinstance(e, sympy.And) != negate else dnf_any(parts, limit)  # De Morgan
    if type(e) in _REL:
        op = _REL[type(e)]
        return leaf(e.lhs - e.rhs, _NEGATED[op] if negate else op)
    return leaf(sympy.Not(e) if negate else e, None)
