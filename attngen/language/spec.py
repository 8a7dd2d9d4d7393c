"""Load and validate attention specs.

A spec is untrusted input. It is read with PyYAML's safe composer (no Python tags, no aliases),
every key is checked against a schema, and the result is a frozen :class:`Spec`. Every problem is
reported as ``FILE:LINE: key: message``; nothing is built from a spec with any error.
"""

from __future__ import annotations

import hashlib
import keyword
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from attngen.errors import SpecError
from attngen.language.expr import DTYPE_ALIASES, Expr, ParamDecl, d_param, d_score, parse_expr, parse_params

DTYPES = ("fp16", "bf16", "fp32")
MASKS = ("none", "causal")
MAX_SPEC_BYTES = 64 * 1024
MAX_HEADS = 256
HEAD_DIM_RANGE = (16, 256)
BLOCK_RANGE = (16, 256)
NUM_WARPS = (1, 2, 4, 8, 16)
NUM_STAGES_RANGE = (1, 8)
# `sparse:` (Native Sparse Attention): the choices and the bounds of its integers
SPARSE_KINDS = ("nsa",)
COMPRESS_METHODS = ("mean", "weighted", "mlp")
SELECT_SCORES = ("probs", "dot", "cosine")
SELECT_PER = ("token", "block")
SPARSE_INT_MAX = 1 << 20
MAX_NSA_GROUP = 32  # query heads per KV head the NSA kernels are written for

# The autotune space when a spec gives no `tiles`; see plan.py for how it is pruned.
DEFAULT_TILES = {
    "block_m": (64, 128),
    "block_n": (32, 64, 128),
    "num_warps": (4, 8),
    "num_stages": (2, 3),
}


@dataclass(frozen=True)
class Tiles:
    block_m: tuple[int, ...]
    block_n: tuple[int, ...]
    num_warps: tuple[int, ...]
    num_stages: tuple[int, ...]


@dataclass(frozen=True)
class SparseSpec:
    """A `sparse:` section: Native Sparse Attention over the spec's heads and dims.

    Compression blocks of `block` tokens every `stride` tokens; selection of `top_n` blocks of
    `select_block` tokens (`initial` first and `local` most recent forced), scored by `score` per
    `per`; a causal window of `window` keys (0: no window branch)."""

    kind: str
    block: int
    stride: int
    method: str
    select_block: int
    top_n: int
    initial: int
    local: int
    score: str
    per: str
    window: int


@dataclass(frozen=True)
class TensorParam(Mapping):
    """A tensor parameter's declaration, ``{tensor: DTYPE, dims: N}``: a hashable mapping, so a Spec
    stays hashable and reads (and prints into a module's PARAMS) like the YAML mapping it came from."""

    tensor: str
    dims: int

    def __getitem__(self, key: str) -> Any:
        if key not in ("tensor", "dims"):
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(("tensor", "dims"))

    def __len__(self) -> int:
        return 2


@dataclass(frozen=True)
class Spec:
    name: str
    q_heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    dtypes: tuple[str, ...]
    mask: str
    tiles: Tiles
    backward: bool
    description: str = ""
    # runtime parameters of the mask and score_mod, in declaration order: (name, "int" | "float" |
    # TensorParam)
    params: tuple[tuple[str, Any], ...] = ()
    # the score_mod expression over the scaled score (expr.py), "" for none
    score_mod: str = ""
    # Native Sparse Attention (three generated files), or None for a dense module
    sparse: SparseSpec | None = None
    # the NSA spec a derived dense module (a branch of it) was made from, for its header
    derived_from: str = ""
    path: str = field(default="<string>", compare=False)
    sha256: str = field(default="", compare=False)
    # What the reader parsed, for the plan (which never parses text again): the declarations of
    # `params` in order, the mask (None for none / causal) and the score_mod (None for none).
    decls: tuple[ParamDecl, ...] = field(default=(), compare=False)
    mask_expr: Expr | None = field(default=None, compare=False)
    score_mod_expr: Expr | None = field(default=None, compare=False)

    @property
    def group(self) -> int:
        """Query heads per KV head (1 for MHA, q_heads for MQA)."""
        return self.q_heads // self.kv_heads

    @property
    def param_decls(self) -> dict[str, ParamDecl]:
        """name -> declaration of each runtime parameter, in declaration order."""
        return {d.name: d for d in self.decls}

    @property
    def grouping(self) -> str:
        if self.kv_heads == self.q_heads:
            return "MHA"
        if self.kv_heads == 1:
            return "MQA"
        return "GQA"


# --------------------------------------------------------------------------- YAML with lines


class _Node:
    """A YAML value with the 1-based line it starts on."""

    __slots__ = ("value", "line", "key_lines")

    def __init__(self, value: Any, line: int):
        self.value = value
        self.line = line
        self.key_lines: dict[str, int] = {}


_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map")}


class _Reader:
    def __init__(self, filename: str):
        self.filename = filename
        self.problems: list[tuple[str, int, str]] = []
        self.constructor = yaml.constructor.SafeConstructor()

    def error(self, line: int, msg: str) -> None:
        self.problems.append((self.filename, line, msg))

    def convert(self, node: yaml.Node, depth: int = 0) -> _Node:
        line = node.start_mark.line + 1
        if depth > 8:
            raise SpecError([(self.filename, line, "spec is nested too deeply")])
        if node.tag not in _PLAIN_TAGS:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise SpecError([(self.filename, line, f"YAML tag {tag!r} is not allowed")])
        if isinstance(node, yaml.ScalarNode):
            try:
                value = self.constructor.construct_object(node, deep=True)
            except (yaml.YAMLError, ValueError) as e:
                first = str(getattr(e, "problem", None) or e).splitlines()[0]
                raise SpecError([(self.filename, line, f"invalid YAML value: {first}")]) from None
            return _Node(value, line)
        if isinstance(node, yaml.SequenceNode):
            return _Node([self.convert(n, depth + 1) for n in node.value], line)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, _Node] = {}
            key_lines: dict[str, int] = {}
            for knode, vnode in node.value:
                key = self.convert(knode, depth + 1)
                if not isinstance(key.value, str):
                    self.error(key.line, f"keys must be strings, got {key.value!r}")
                    continue
                if key.value in out:
                    self.error(key.line, f"{key.value}: duplicate key (first on line {key_lines[key.value]})")
                    continue
                out[key.value] = self.convert(vnode, depth + 1)
                key_lines[key.value] = key.line
            node_out = _Node(out, line)
            node_out.key_lines = key_lines
            return node_out
        raise SpecError([(self.filename, line, "unsupported YAML node")])


class _NoAliasComposer(yaml.SafeLoader):
    def compose_node(self, parent, index):  # noqa: D401 - PyYAML hook
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise SpecError([(self.name, event.start_mark.line + 1, "YAML aliases are not allowed")])
        event = self.peek_event()
        if getattr(event, "anchor", None):
            raise SpecError([(self.name, event.start_mark.line + 1, "YAML anchors are not allowed")])
        return super().compose_node(parent, index)


# --------------------------------------------------------------------------- validation


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Validator:
    def __init__(self, reader: _Reader):
        self.r = reader

    def mapping(self, node: _Node, where: str, allowed: dict[str, bool]) -> dict[str, _Node] | None:
        """Check that node is a mapping with known keys; `allowed` maps key -> required."""
        if not isinstance(node.value, dict):
            self.r.error(node.line, f"{where}: expected a mapping, got {_kind(node.value)}")
            return None
        lines = node.key_lines
        for key in node.value:
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                self.r.error(lines.get(key, node.line), f"{_join(where, key)}: unknown key (known keys: {known})")
        for key, required in allowed.items():
            if required and key not in node.value:
                self.r.error(node.line, f"{_join(where, key)}: required key is missing")
        return node.value

    def int_in(self, node: _Node, where: str, lo: int, hi: int, *, pow2: bool = False, multiple: int = 1) -> int | None:
        v = node.value
        if not _is_int(v):
            self.r.error(node.line, f"{where}: expected an integer, got {_kind(v)}")
            return None
        if not lo <= v <= hi:
            self.r.error(node.line, f"{where}: {v} is out of range [{lo}, {hi}]")
            return None
        if pow2 and v & (v - 1):
            self.r.error(node.line, f"{where}: {v} is not a power of two")
            return None
        if v % multiple:
            self.r.error(node.line, f"{where}: {v} is not a multiple of {multiple}")
            return None
        return v

    def int_list(self, node: _Node, where: str, check) -> tuple[int, ...] | None:
        """A scalar or a non-empty list of distinct integers, each passing `check`."""
        items = node.value if isinstance(node.value, list) else [node]
        if not items:
            self.r.error(node.line, f"{where}: expected a value or a non-empty list")
            return None
        out = []
        for i, item in enumerate(items):
            v = check(item, where if not isinstance(node.value, list) else f"{where}[{i}]")
            if v is None:
                return None
            if v in out:
                self.r.error(item.line, f"{where}: {v} is listed twice")
                return None
            out.append(v)
        return tuple(out)


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return f"a boolean ({v})"
    if v is None:
        return "nothing (null)"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, str):
        return f"a string ({v!r})"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"a number ({v!r})"
    return f"{type(v).__name__} ({v!r})"


def _join(where: str, key: str) -> str:
    return key if where == "spec" else f"{where}.{key}"


_TOP_KEYS = {
    "name": True,
    "description": False,
    "heads": True,
    "head_dim": True,
    "v_head_dim": False,
    "dtypes": True,
    "mask": False,
    "score_mod": False,
    "params": False,
    "tiles": False,
    "backward": False,
    "sparse": False,
}


_ATTENTION_ARGS = ("q", "k", "v", "scale", "return_lse", "params")


def parse_spec(text: str, filename: str = "<string>") -> Spec:
    """Parse and validate spec text; raise SpecError listing every problem found.

    Each top-level key has its own validator below; each reports its problems at their lines and
    returns None (or a default) for a bad value, so one pass reports every problem. The mask and
    score_mod are parsed here, once: the Spec carries the parsed expressions and the parameter
    declarations, and the plan consumes those."""
    top, reader = _compose(text, filename)
    v = _Validator(reader)
    fields = v.mapping(top, "spec", _TOP_KEYS)
    if fields is None:
        raise SpecError(reader.problems)
    name = _name(v, fields)
    description = _description(v, fields)
    q_heads, kv_heads = _heads(v, fields)
    head_dim, v_head_dim = _head_dims(v, fields)
    dtypes = _dtypes(v, fields)
    decls = _params(v, fields)
    mask, mask_expr, score_mod_expr = _expressions(v, fields, decls)
    tiles = _tiles(v, fields)
    backward = _backward(v, fields)
    sparse = None
    if "sparse" in fields:
        sparse = _sparse(v, fields["sparse"])
        _check_sparse_rest(v, top, fields, mask, q_heads, kv_heads)
        mask = "causal"

    if reader.problems:
        raise SpecError(reader.problems)
    assert None not in (name, q_heads, kv_heads, head_dim, v_head_dim, dtypes, decls)
    return Spec(
        name=name,
        q_heads=q_heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        v_head_dim=v_head_dim,
        dtypes=dtypes,
        mask=mask,
        params=tuple((n, TensorParam(d.dtype, d.dims) if d.kind == "tensor" else d.kind) for n, d in decls.items()),
        score_mod=score_mod_expr.text.strip() if score_mod_expr else "",
        tiles=tiles,
        backward=backward,
        description=description,
        sparse=sparse,
        path=filename,
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        decls=tuple(decls.values()),
        mask_expr=mask_expr,
        score_mod_expr=score_mod_expr,
    )


def _compose(text: str, filename: str) -> tuple[_Node, _Reader]:
    """The YAML document as _Nodes (safe composer, no aliases or tags), and its reader."""
    if len(text.encode()) > MAX_SPEC_BYTES:
        raise SpecError([(filename, 1, f"spec is larger than {MAX_SPEC_BYTES} bytes")])
    reader = _Reader(filename)
    loader = _NoAliasComposer(text)
    loader.name = filename
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise SpecError([(filename, line, f"invalid YAML: {e.problem or e}")]) from None
    except yaml.YAMLError as e:
        raise SpecError([(filename, 1, f"invalid YAML: {e}")]) from None
    finally:
        loader.dispose()
    if root is None:
        raise SpecError([(filename, 1, "spec is empty")])
    return reader.convert(root), reader


def _name(v: _Validator, fields: dict[str, _Node]) -> str | None:
    if "name" not in fields:
        return None  # required: reported by the mapping check
    n = fields["name"]
    if not isinstance(n.value, str):
        v.r.error(n.line, f"name: expected a string, got {_kind(n.value)}")
    elif not n.value.isidentifier() or keyword.iskeyword(n.value) or not n.value.isascii():
        v.r.error(n.line, f"name: {n.value!r} is not a valid Python module name")
    elif n.value.startswith("_"):
        v.r.error(n.line, f"name: {n.value!r} must not start with an underscore")
    else:
        return n.value
    return None


def _description(v: _Validator, fields: dict[str, _Node]) -> str:
    if "description" not in fields:
        return ""
    d = fields["description"]
    if not isinstance(d.value, str):
        v.r.error(d.line, f"description: expected a string, got {_kind(d.value)}")
        return ""
    return d.value.strip()


def _heads(v: _Validator, fields: dict[str, _Node]) -> tuple[int | None, int | None]:
    q_heads = kv_heads = None
    if "heads" in fields:
        h = v.mapping(fields["heads"], "heads", {"q": True, "kv": True})
        if h is not None:
            if "q" in h:
                q_heads = v.int_in(h["q"], "heads.q", 1, MAX_HEADS)
            if "kv" in h:
                kv_heads = v.int_in(h["kv"], "heads.kv", 1, MAX_HEADS)
            if q_heads is not None and kv_heads is not None and q_heads % kv_heads:
                v.r.error(h["kv"].line, f"heads.kv: {kv_heads} does not divide heads.q = {q_heads}")
                kv_heads = None
    return q_heads, kv_heads


def _head_dims(v: _Validator, fields: dict[str, _Node]) -> tuple[int | None, int | None]:
    lo, hi = HEAD_DIM_RANGE
    head_dim = v.int_in(fields["head_dim"], "head_dim", lo, hi, multiple=8) if "head_dim" in fields else None
    v_head_dim = head_dim
    if "v_head_dim" in fields:
        v_head_dim = v.int_in(fields["v_head_dim"], "v_head_dim", lo, hi, multiple=8)
    return head_dim, v_head_dim


def _dtypes(v: _Validator, fields: dict[str, _Node]) -> tuple[str, ...] | None:
    if "dtypes" not in fields:
        return None
    dn = fields["dtypes"]
    items = dn.value if isinstance(dn.value, list) else [dn]
    if not items:
        v.r.error(dn.line, "dtypes: expected at least one of " + ", ".join(DTYPES))
        return None
    seen: list[str] = []
    for item in items:
        name = DTYPE_ALIASES.get(item.value, item.value) if isinstance(item.value, str) else None
        if name not in DTYPES:
            v.r.error(item.line, f"dtypes: {_kind(item.value)} is not one of {', '.join(DTYPES)} "
                      f"(or torch's {', '.join(DTYPE_ALIASES)})")
        elif name in seen:
            v.r.error(item.line, f"dtypes: {item.value} is listed twice" if name == item.value
                      else f"dtypes: {item.value} is {name}, listed twice")
        else:
            seen.append(name)
    return tuple(seen) if len(seen) == len(items) else None


def _params(v: _Validator, fields: dict[str, _Node]) -> dict[str, ParamDecl] | None:
    """The parameter declarations (empty without `params:`), or None when any is bad."""
    if "params" not in fields:
        return {}
    pn = fields["params"]
    if not isinstance(pn.value, dict):
        v.r.error(pn.line, f"params: expected a mapping of name -> int | float | {{tensor: DTYPE, dims: N}}, got {_kind(pn.value)}")
        return None
    plain = {}
    for key, node in pn.value.items():
        if key in _ATTENTION_ARGS or not key[:1].islower():
            # the generated attention(q, k, v, *, <params>, scale, return_lse) takes them as
            # keyword arguments; module constants are upper case
            v.r.error(pn.key_lines.get(key, pn.line), f"params.{key}: a parameter name starts with a lower-case letter and is not one of {', '.join(_ATTENTION_ARGS)}")
        elif isinstance(node.value, dict):
            plain[key] = {k: n.value for k, n in node.value.items()}
        else:
            plain[key] = node.value
    if len(plain) != len(pn.value):
        return None
    try:
        return parse_params(plain, v.r.filename, pn.key_lines)
    except SpecError as e:
        v.r.problems.extend(e.problems)
        return None


def _expressions(v: _Validator, fields: dict[str, _Node], decls: dict[str, ParamDecl] | None) -> tuple[str, Expr | None, Expr | None]:
    """(mask text, parsed mask or None for none / causal, parsed score_mod or None). Expressions
    are parsed only when the declarations are good (they name the parameters)."""
    mask, mask_expr, score_mod_expr = "none", None, None
    ok = decls is not None
    if "mask" in fields:
        m = fields["mask"]
        if not isinstance(m.value, str):
            v.r.error(m.line, f"mask: expected an expression (none, causal, sliding_window(w), ...), got {_kind(m.value)}")
            ok = False
        elif m.value.strip() in MASKS:
            mask = m.value.strip()
        elif decls is not None:
            try:
                mask_expr = parse_expr(m.value, kind="mask", params=decls, file=v.r.filename, line=m.line)
            except SpecError as e:
                v.r.problems.extend(e.problems)
                ok = False
            else:
                mask = m.value.strip()
    if "score_mod" in fields:
        sm = fields["score_mod"]
        if not isinstance(sm.value, str):
            v.r.error(sm.line, f"score_mod: expected an expression over score (softcap(c), score + bias[h], ...), got {_kind(sm.value)}")
            ok = False
        elif decls is not None:
            # (a module built without a backward pass need not differentiate it)
            differentiate = "backward" not in fields or fields["backward"].value is not False
            try:
                score_mod_expr = _parse_score_mod(sm.value, decls, v.r.filename, sm.line, differentiate)
            except SpecError as e:
                v.r.problems.extend(e.problems)
                ok = False
    if ok:
        _check_param_use(v.r, decls, [e for e in (mask_expr, score_mod_expr) if e], fields.get("params"))
    return mask, mask_expr, score_mod_expr


def _tiles(v: _Validator, fields: dict[str, _Node]) -> Tiles:
    if "tiles" not in fields:
        return Tiles(**DEFAULT_TILES)
    t = v.mapping(fields["tiles"], "tiles", {k: False for k in DEFAULT_TILES})
    if t is None:
        return Tiles(**DEFAULT_TILES)
    blo, bhi = BLOCK_RANGE
    slo, shi = NUM_STAGES_RANGE
    checks = {
        "block_m": lambda n, w: v.int_in(n, w, blo, bhi, pow2=True),
        "block_n": lambda n, w: v.int_in(n, w, blo, bhi, pow2=True),
        "num_warps": lambda n, w: _one_of(v, n, w, NUM_WARPS),
        "num_stages": lambda n, w: v.int_in(n, w, slo, shi),
    }
    values = dict(DEFAULT_TILES)
    for key, check in checks.items():
        if key in t:
            values[key] = v.int_list(t[key], f"tiles.{key}", check)
    if any(x is None for x in values.values()):
        return Tiles(**DEFAULT_TILES)  # the problem is reported; the spec is rejected
    return Tiles(**values)


def _backward(v: _Validator, fields: dict[str, _Node]) -> bool:
    if "backward" not in fields:
        return True
    b = fields["backward"]
    if not isinstance(b.value, bool):
        v.r.error(b.line, f"backward: expected true or false, got {_kind(b.value)}")
        return True
    return b.value


def _check_sparse_rest(v: _Validator, top: _Node, fields: dict[str, _Node], mask: str, q_heads, kv_heads) -> None:
    """What a spec with `sparse:` may not say: NSA is causal by construction and its branches take
    no user expressions; its kernels allow at most MAX_NSA_GROUP query heads per KV head."""
    if "mask" in fields and mask != "causal":
        v.r.error(fields["mask"].line, "mask: a spec with sparse: is causal; leave mask out or write mask: causal")
    for key in ("params", "score_mod"):
        if key in fields:
            v.r.error(top.key_lines[key], f"{key}: not supported in a spec with sparse: (its branches have fixed masks)")
    if q_heads is not None and kv_heads is not None and q_heads // kv_heads > MAX_NSA_GROUP:
        v.r.error(fields["heads"].line, f"heads: {q_heads // kv_heads} query heads per KV head; a spec with sparse: allows at most {MAX_NSA_GROUP}")


def _choice(v: _Validator, fields: dict[str, _Node], key: str, where: str, choices: tuple[str, ...], default: str | None) -> str | None:
    """fields[key] when it is one of `choices` (else an error and None), `default` when absent."""
    if key not in fields:
        return default
    node = fields[key]
    if not isinstance(node.value, str) or node.value not in choices:
        v.r.error(node.line, f"{where}: {_kind(node.value)} is not one of {', '.join(choices)}")
        return None
    return node.value


def _sparse(v: _Validator, node: _Node) -> SparseSpec | None:
    """The `sparse:` section; every problem reported at its line, None when any."""
    before = len(v.r.problems)
    top = v.mapping(node, "sparse", {"kind": True, "compress": True, "select": True, "window": False})
    if top is None:
        return None
    kind = _choice(v, top, "kind", "sparse.kind", SPARSE_KINDS, None)  # required: missing is reported above
    comp = v.mapping(top["compress"], "sparse.compress", {"block": True, "stride": True, "method": False}) if "compress" in top else None
    sel_keys = {"block": True, "top_n": True, "initial": False, "local": False, "score": False, "per": False}
    sel = v.mapping(top["select"], "sparse.select", sel_keys) if "select" in top else None
    comp, sel = comp or {}, sel or {}

    def count(fields: dict, key: str, where: str, lo: int, default: int | None = None) -> int | None:
        return v.int_in(fields[key], where, lo, SPARSE_INT_MAX) if key in fields else default

    block = count(comp, "block", "sparse.compress.block", 1)
    stride = count(comp, "stride", "sparse.compress.stride", 1)
    method = _choice(v, comp, "method", "sparse.compress.method", COMPRESS_METHODS, "mean")
    select_block = count(sel, "block", "sparse.select.block", 1)
    top_n = count(sel, "top_n", "sparse.select.top_n", 1)
    # 0 forced blocks is meaningful (MoBA forces only the own block: initial 0, local 1)
    initial = count(sel, "initial", "sparse.select.initial", 0, 1)
    local = count(sel, "local", "sparse.select.local", 0, 2)
    score = _choice(v, sel, "score", "sparse.select.score", SELECT_SCORES, "probs")
    per = _choice(v, sel, "per", "sparse.select.per", SELECT_PER, "token")
    window = 0
    if "window" in top:  # absent, null or 0: no window branch
        window = 0 if top["window"].value is None else count(top, "window", "sparse.window", 0)
    if stride is not None:
        if block is not None and block % stride:
            v.r.error(comp["stride"].line, f"sparse.compress.stride: {stride} does not divide compress.block {block}")
        if select_block is not None and select_block % stride:
            v.r.error(sel["block"].line, f"sparse.select.block: {select_block} is not a multiple of compress.stride {stride}")
    if None not in (initial, local, top_n) and initial + local > top_n:
        line = sel["local"].line if "local" in sel else sel["top_n"].line
        v.r.error(line, f"sparse.select: initial + local = {initial} + {local} forced blocks exceed top_n {top_n}")
    if len(v.r.problems) > before:
        return None
    return SparseSpec(
        kind=kind, block=block, stride=stride, method=method, select_block=select_block, top_n=top_n,
        initial=initial, local=local, score=score, per=per, window=window,
    )


def _parse_score_mod(text: str, decls: dict, filename: str, line: int, differentiate: bool):
    """Parse a score_mod and, with `differentiate`, check that the backward pass can differentiate
    it: with respect to score, and to each float tensor it reads (read at one index)."""
    mod = parse_expr(text, kind="score_mod", params=decls, file=filename, line=line)
    if not differentiate:
        return mod
    d_score(mod)
    for d in mod.decls:
        if d.kind == "tensor" and d.elem == "float":
            d_param(mod, d.name)
    return mod


def _check_param_use(reader: _Reader, decls: dict, parsed: list, pn: _Node | None) -> None:
    """Every declared parameter is read by the mask or the score_mod (an unused one would be a
    required argument that does nothing); a mask reads int tensors only (a float tensor is a
    learnable input of the score_mod, and a mask has no gradient)."""
    used = set()
    for e in parsed:
        used |= e.params | e.tensors
        if e.kind == "mask":
            for d in e.decls:
                if d.kind == "tensor" and d.elem == "float":
                    reader.error(e.line, f"mask: tensor parameter {d.name!r} is {d.dtype}; a mask reads int32 / int64 tensors (float tensors are score_mod inputs)")
    for name in decls:
        if name not in used:
            line = pn.key_lines.get(name, pn.line) if pn is not None else 1
            reader.error(line, f"params.{name}: declared but read by neither mask nor score_mod")


def _one_of(v: _Validator, node: _Node, where: str, choices: tuple[int, ...]) -> int | None:
    if not _is_int(node.value) or node.value not in choices:
        v.r.error(node.line, f"{where}: {_kind(node.value)} is not one of {', '.join(map(str, choices))}")
        return None
    return node.value


def load_spec(path: str | Path) -> Spec:
    """Read and validate one spec file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SpecError([(str(path), 1, f"cannot read spec: {e.strerror}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError([(str(path), 1, "spec is not UTF-8 text")]) from None
    return parse_spec(text, str(path))
