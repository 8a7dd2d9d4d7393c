"""Parameter values for the masks and score_mods of the shipped specs, in one place: the tests,
`attngen verify` and benchmarks/ all take them from here.

Each parametrised spec in specs/ has an `Entry` (by name) holding its declarations and three sets
of values:

* ``check``: for the short sequences (up to a few hundred positions) of the tests and of
  `attngen verify`; every query keeps some visible key;
* ``no_key``: values that leave some rows with no visible key at all, at least when Nq > Nk (None
  where no value can: prefix_lm(p) is causal after the prefix, so query i always sees key 0);
* ``long(n)``: values meaningful at long sequence length n for the benchmarks (a 1024-key window,
  documents of 2048 tokens), with a note on how its tensors were made.

A value is a number, or a function of the call's `Shape` giving a tensor (see `materialize`).
A spec that is not listed, or whose declarations differ from the entry's (a user's spec reusing
a shipped name), gets `generic` values made from its declarations alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class Shape:
    """What a tensor parameter's value may depend on: the module's query heads and the call's sizes."""

    q_heads: int
    batch: int
    n_q: int
    n_k: int


# --------------------------------------------------------------------------- tensor makers
# Each takes its own arguments first and the Shape last, so functools.partial(maker, *args) is a
# value (the property tests draw the arguments).


def doc_ids(n_docs: int, extra: int, seed: int, shape: Shape) -> torch.Tensor:
    """Random (unsorted) document ids in [0, n_docs), int32 [B, L] with L = max(Nq, Nk) + extra
    (at least 1): a negative `extra` leaves positions past the tensor, whose reads give 0."""
    g = torch.Generator().manual_seed(seed)
    length = max(1, max(shape.n_q, shape.n_k) + extra)
    return torch.randint(0, n_docs, (shape.batch, length), generator=g, dtype=torch.int32)


def own_doc(shape: Shape) -> torch.Tensor:
    """Every position its own document (int32 [B, max(Nq, Nk)]): a query sees only itself, so with
    Nq > Nk the rows past the last key see nothing."""
    return torch.arange(max(shape.n_q, shape.n_k, 1), dtype=torch.int32).expand(shape.batch, -1).contiguous()


def packed_docs(doc_len: int, shape: Shape) -> torch.Tensor:
    """Documents of doc_len consecutive tokens (the last one shorter), int32 [B, max(Nq, Nk)]."""
    n = max(shape.n_q, shape.n_k, 1)
    return (torch.arange(n) // doc_len).to(torch.int32).expand(shape.batch, n).contiguous()


def slopes(s: float, shape: Shape) -> torch.Tensor:
    """ALiBi slopes s * 2^(-8 (h + 1) / Hq), fp32 [Hq]."""
    return s * 2.0 ** (-8.0 * torch.arange(1, shape.q_heads + 1, dtype=torch.float32) / shape.q_heads)


def bias(width: int, sigma: float, seed: int, shape: Shape) -> torch.Tensor:
    """sigma * randn, fp32 [Hq, width]: a per-head table of relative-position biases."""
    g = torch.Generator().manual_seed(seed)
    return sigma * torch.randn(shape.q_heads, width, generator=g)


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Entry:
    """A shipped spec's parameter declarations (in a generated module's PARAMS form) and values."""

    decls: dict
    check: dict
    no_key: dict | None
    long: Callable[[int], dict]
    long_note: str = ""
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "names", tuple(self.decls))


def _natten_long(n: int) -> dict:
    # a square grid of side a power of two, a 7 x 7 neighbourhood (radius 3)
    return {"width": 1 << max(0, math.ceil(math.log2(max(1.0, math.sqrt(n))))), "r": 3}


DOC_LEN = 2048  # the benchmarks' packed documents: this many tokens each

_INT32_IDS = {"tensor": "int32", "dims": 2}
_FP32_1D = {"tensor": "fp32", "dims": 1}
_FP32_2D = {"tensor": "fp32", "dims": 2}

REGISTRY: dict[str, Entry] = {
    "sliding_window": Entry({"w": "int"}, {"w": 4}, {"w": 0}, lambda n: {"w": 1024}),
    "prefix_lm": Entry({"p": "int"}, {"p": 3}, None, lambda n: {"p": max(1, n // 4)}),
    # chunked(c) is causal: no c >= 1 hides a query's own position; with c = 1 that is its only
    # key, and the rows past the last key (Nq > Nk) see none
    "chunked_local": Entry({"c": "int"}, {"c": 5}, {"c": 1}, lambda n: {"c": 1024}),
    "global_window": Entry({"g": "int", "w": "int"}, {"g": 1, "w": 3}, {"g": 0, "w": 0}, lambda n: {"g": 64, "w": 1024}),
    "dilated_window": Entry({"w": "int", "d": "int"}, {"w": 8, "d": 2}, {"w": 0, "d": 2}, lambda n: {"w": 2048, "d": 2}),
    "natten_2d": Entry({"width": "int", "r": "int"}, {"width": 8, "r": 1}, {"width": 8, "r": -1}, _natten_long),
    "document": Entry(
        {"doc": _INT32_IDS}, {"doc": lambda s: doc_ids(3, 0, 0, s)}, {"doc": own_doc},
        lambda n: {"doc": lambda s: packed_docs(DOC_LEN, s)}, f"ids of {DOC_LEN}-token documents",
    ),
    "alibi": Entry(
        {"slopes": _FP32_1D}, {"slopes": lambda s: slopes(1.0, s)}, None,
        lambda n: {"slopes": lambda s: slopes(1.0, s)}, "ALiBi slopes 2^(-8(h+1)/Hq)",
    ),
    "relpos_bias": Entry(
        {"rb": _FP32_2D}, {"rb": lambda s: bias(32, 1.0, 0, s)}, None,
        lambda n: {"rb": lambda s: bias(32, 0.5, 0, s)}, "0.5*randn",
    ),
    "softcap": Entry({"c": "float"}, {"c": 5.0}, None, lambda n: {"c": 50.0}),
}


def entry(name: str, decls: dict) -> Entry | None:
    """The registry's entry for a spec of this name and these declarations (PARAMS form), or None."""
    e = REGISTRY.get(name)
    return e if e is not None and e.decls == dict(decls) else None


def materialize(values: dict, shape: Shape, device=None) -> dict:
    """Call the functions among `values` with the shape; tensors go to `device` (by default where
    generated modules run)."""
    from attngen.runtime import DEVICE

    out = {}
    for name, v in values.items():
        v = v(shape) if callable(v) else v
        out[name] = v.to(device or DEVICE) if isinstance(v, torch.Tensor) else v
    return out


def generic(decls: dict, shape: Shape, *, seed: int = 0, device=None) -> dict:
    """Values from declarations alone, for a spec the registry does not know: an int is a positive
    length tied to the sequence (a window or prefix that cuts it), a float 1.0; an int tensor of 1
    or 2 dims holds document ids of about a third of the sequence each ([N] or [B, N]); a float
    tensor is small random values, one per query head along dim 0 ([Hq], [Hq, N], [Hq, N, N] or
    [B, Hq, N, N]; for dims 1 positive, ALiBi-like slopes). Reads outside a tensor give 0, so the
    shapes need not fit every expression exactly."""
    from attngen.runtime import DEVICE, PARAM_DTYPES

    g = torch.Generator().manual_seed(seed)
    n = max(shape.n_q, shape.n_k, 1)
    out = {}
    for name, kind in decls.items():
        if kind == "int":
            out[name] = max(1, shape.n_k // 3)
        elif kind == "float":
            out[name] = 1.0
        else:
            dtype, dims = PARAM_DTYPES[kind["tensor"]], kind["dims"]
            if not dtype.is_floating_point:
                ids = torch.arange(n) // max(1, n // 3)
                t = ids.expand(shape.batch, n) if dims == 2 else ids.view((1,) * (dims - 1) + (n,))
            elif dims == 1:
                t = slopes(1.0, shape)
            else:
                hq = shape.q_heads
                t = 0.5 * torch.randn(((hq, n), (hq, n, n), (shape.batch, hq, n, n))[dims - 2], generator=g)
            out[name] = t.contiguous().to(device or DEVICE, dtype)
    return out


def _decls(mod) -> dict:
    return dict(getattr(mod, "PARAMS", {}) or {})


def check_values(mod, *, batch: int, n_q: int, n_k: int, seed: int = 0, device=None) -> dict:
    """Parameter values for checking a generated module on short sequences (tests, `attngen verify`):
    the registry's `check` values for a shipped spec, else `generic` ones."""
    shape = Shape(mod.Q_HEADS, batch, n_q, n_k)
    e = entry(mod.NAME, _decls(mod))
    if e is None:
        return generic(_decls(mod), shape, seed=seed, device=device)
    return materialize(e.check, shape, device)


def no_key_values(name: str) -> dict | None:
    """Values (unmaterialised) that leave rows of the shipped spec `name` with no visible key, or None."""
    e = REGISTRY.get(name)
    return None if e is None else e.no_key


def long_values(name: str, decls: dict, q_heads: int, n: int, batch: int, device=None) -> tuple[dict, str]:
    """(values, how they read in a CSV) for a benchmark at length n: the registry's `long` values
    for a shipped spec, else `generic` ones."""
    if not decls:
        return {}, ""
    shape = Shape(q_heads, batch, n, n)
    e = entry(name, decls)
    values = generic(decls, shape, device=device) if e is None else materialize(e.long(n), shape, device)
    shown = " ".join(f"{k}=tensor{list(v.shape)}" if isinstance(v, torch.Tensor) else f"{k}={v}" for k, v in values.items())
    note = "values from the declarations" if e is None else e.long_note
    return values, shown + (f" ({note})" if note else "")
