"""Random masks composed from the grammar, built into kernels and run against the reference.

The classification tests check the tile bounds in Python; this runs them for real: a random mask
(affine inequalities with any integer coefficients, floor division, modulo, helpers, reads of a
per-head and a per-batch int tensor inside inequalities, abs, min and max, and / or / not) is
written into a spec, built, imported, and its forward and backward are compared with the float64
reference, which evaluates the same expression elementwise.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from attngen.language.expr import parse_expr, parse_params
from attngen.runtime import DEVICE
from attngen.testing import check_module, random_inputs

from helpers import assert_all_ok, build_and_import, dense_spec

pytestmark = pytest.mark.kernel


INDEX = st.sampled_from(["q_idx", "kv_idx"])
COEF = st.sampled_from([-3, -2, -1, 1, 2, 3, 5])
CMP = st.sampled_from(["<", "<=", ">", ">=", "==", "!="])


@st.composite
def affine(draw):
    """a*q_idx + c*kv_idx + rest, with integer coefficients and an optional runtime parameter."""
    a, c = draw(COEF), draw(COEF)
    rest = draw(st.sampled_from(["0", "w", "-w", "7", "-5", "q_len - 20"]))
    return f"{a} * q_idx + {c} * kv_idx + {rest}"


TENSORS = {"win": "{tensor: int32, dims: 1}", "lens": "{tensor: int64, dims: 1}"}  # per head, per batch
READ = st.sampled_from(["win[h]", "lens[b]", "win[h] + lens[b]", "min(win[h], lens[b])", "max(win[h], 3)"])


@st.composite
def atom(draw):
    kind = draw(st.sampled_from(["affine", "floor", "mod", "helper", "tensor"]))
    if kind == "affine":
        return f"{draw(affine())} {draw(CMP)} 0"
    if kind == "tensor":  # an int tensor read inside an inequality (or abs / min / max)
        lhs = draw(st.sampled_from(["kv_idx", "q_idx - kv_idx", "abs(q_idx - kv_idx)", "min(q_idx, kv_idx)",
                                    "kv_idx // 3", f"{draw(affine())}"]))
        return f"{lhs} {draw(CMP)} {draw(READ)}"
    if kind == "floor":
        d = draw(st.sampled_from([2, 3, 7, 16]))
        return f"{draw(INDEX)} // {d} {draw(CMP)} {draw(INDEX)} // {d} + {draw(st.integers(-2, 2))}"
    if kind == "mod":
        return f"(q_idx - kv_idx) % {draw(st.sampled_from([2, 3, 5]))} == 0"
    return draw(st.sampled_from(["causal", "sliding_window(w)", "prefix_lm(w)", "chunked(5)", "dilated(w, 2)",
                                 "global_tokens(3)"]))


@st.composite
def masks(draw, depth=2):
    if depth == 0 or draw(st.booleans()):
        return draw(atom())
    op = draw(st.sampled_from(["and", "or", "not"]))
    if op == "not":
        return f"not ({draw(masks(depth - 1))})"
    return f"({draw(masks(depth - 1))}) {op} ({draw(masks(depth - 1))})"


_NAMES = (f"fuzz_mask_{i}" for i in itertools.count())


@st.composite
def tensor_masks(draw):
    """A mask with at least one tensor read inside an inequality, combined with another mask."""
    t = draw(atom().filter(lambda a: "[" in a))
    op = draw(st.sampled_from(["and", "or", "not"]))
    return f"not ({t})" if op == "not" else f"({t}) {op} ({draw(masks(1))})"


def _build_and_check(tmp_path, mask, n_q, n_k, w, seed, win, lens):
    name = next(_NAMES)
    # a declared parameter must be read, and a name must be declared: skip a mask where sympy folds
    # away a parameter it names (`x < w or q_idx >= q_idx`)
    used = [n for n in ("w", *TENSORS) if re.search(rf"\b{n}\b", mask)]
    read = parse_expr(mask, kind="mask", params=parse_params({"w": "int", **{n: yaml.safe_load(d) for n, d in TENSORS.items()}}))
    assume(set(used) == read.params | read.tensors)
    decls = "".join(f"\n  {n}: {TENSORS.get(n, 'int')}" for n in used)
    extra = f"params:{decls}\n" if used else ""
    mod = build_and_import(tmp_path, dense_spec(name, q=2, kv=1, d=16, dtypes="[fp32]", mask=f'"{mask}"', extra=extra))
    # batch 2 and 2 query heads: the per-batch lens and per-head win differ across programs
    q, k, v = random_inputs(mod, batch=2, n_q=n_q, n_k=n_k, dtype=torch.float32, seed=seed)
    values = {"w": w, "win": torch.tensor(win, dtype=torch.int32, device=DEVICE),
              "lens": torch.tensor(lens, dtype=torch.int64, device=DEVICE)}
    params = {n: values[n] for n in used}
    assert_all_ok(check_module(mod, q, k, v, params=params, seed=seed), f"{mask} {params} {n_q}x{n_k}")


SIZES = dict(n_q=st.integers(1, 70), n_k=st.integers(1, 70), w=st.integers(-3, 40), seed=st.integers(0, 2**16),
             win=st.lists(st.integers(-2, 40), min_size=2, max_size=2), lens=st.lists(st.integers(0, 70), min_size=2, max_size=2))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mask=masks(), **SIZES)
def test_random_masks_build_and_match_the_reference(tmp_path, mask, n_q, n_k, w, seed, win, lens):
    _build_and_check(tmp_path, mask, n_q, n_k, w, seed, win, lens)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mask=tensor_masks(), **SIZES)
def test_random_tensor_reading_masks_build_and_match_the_reference(tmp_path, mask, n_q, n_k, w, seed, win, lens):
    _build_and_check(tmp_path, mask, n_q, n_k, w, seed, win, lens)
