"""Random masks composed from the grammar, built into kernels and run against the reference.

The classification tests check the tile bounds in Python; this runs them for real: a random mask
(affine inequalities with any integer coefficients, floor division, modulo, helpers, and / or /
not) is written into a spec, built, imported, and its forward and backward are compared with the
float64 reference, which evaluates the same expression elementwise.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attngen.build import build
from attngen.testing import check_module, random_inputs
from attngen.verify import import_generated

from helpers import assert_all_ok

pytestmark = pytest.mark.kernel

SPEC = """\
name: {name}
heads: {{q: 2, kv: 1}}
head_dim: 16
dtypes: [fp32]
mask: "{mask}"
{params}
tiles: {{block_m: 16, block_n: 16, num_warps: 4, num_stages: 1}}
"""

INDEX = st.sampled_from(["q_idx", "kv_idx"])
COEF = st.sampled_from([-3, -2, -1, 1, 2, 3, 5])
CMP = st.sampled_from(["<", "<=", ">", ">=", "==", "!="])


@st.composite
def affine(draw):
    """a*q_idx + c*kv_idx + rest, with integer coefficients and an optional runtime parameter."""
    a, c = draw(COEF), draw(COEF)
    rest = draw(st.sampled_from(["0", "w", "-w", "7", "-5", "q_len - 20"]))
    return f"{a} * q_idx + {c} * kv_idx + {rest}"


@st.composite
def atom(draw):
    kind = draw(st.sampled_from(["affine", "floor", "mod", "helper"]))
    if kind == "affine":
        return f"{draw(affine())} {draw(CMP)} 0"
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


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mask=masks(), n_q=st.integers(1, 70), n_k=st.integers(1, 70), w=st.integers(-3, 40), seed=st.integers(0, 2**16))
def test_random_masks_build_and_match_the_reference(tmp_path, mask, n_q, n_k, w, seed):
    name = next(_NAMES)
    spec = tmp_path / f"{name}.yaml"
    uses_w = re.search(r"\bw\b", mask) is not None  # a declared parameter must be read
    spec.write_text(SPEC.format(name=name, mask=mask, params="params: {w: int}" if uses_w else ""))
    [(path, _)] = build([spec], tmp_path / "out")
    mod = import_generated(path)
    q, k, v = random_inputs(mod, batch=1, n_q=n_q, n_k=n_k, dtype=torch.float32, seed=seed)
    assert_all_ok(check_module(mod, q, k, v, params={"w": w} if uses_w else {}, seed=seed), f"{mask} w={w} {n_q}x{n_k}")
