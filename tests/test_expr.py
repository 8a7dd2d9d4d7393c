"""The mask / score_mod language: parsing, rejection of hostile text, helpers against brute force,
and the Triton printout run in a tiny kernel against to_torch (Triton's interpreter on the CPU)."""

import atexit
import hashlib
import importlib.util
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import pytest
import sympy
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from attngen.runtime import DEVICE  # selects the interpreter on a machine without CUDA; before triton

import triton  # noqa: E402

from attngen.language.expr import (  # noqa: E402
    HELPERS,
    d_param,
    d_score,
    parse_expr,
    parse_params,
    tensor_args,
    to_torch,
    to_triton,
)
from affine_forms import Ineq, affine_dnf  # noqa: E402  (test-only)
from attngen.reference.dense import attention_reference  # noqa: E402
from attngen.language.spec import SpecError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
B, H, N = 2, 3, 16  # the grid every kernel here evaluates: [B, H, N queries, N keys]
Q_LEN, KV_LEN = 13, 11

# Parameters for the helper tests. ids and slopes are shorter than the grid on purpose: reads past
# their end give 0, in kernels and in to_torch alike; rb is read at negative indices too.
PARAMS = parse_params(
    {
        "w": "int", "n": "int", "d": "int", "p": "int", "g": "int", "cap": "float",
        "ids": {"tensor": "int32", "dims": 2},
        "slopes": {"tensor": "fp32", "dims": 1},
        "rb": {"tensor": "bf16", "dims": 2},
    },
    "params.yaml",
)
_gen = torch.Generator().manual_seed(0)
VALUES = {
    "w": 5, "n": 4, "d": 2, "p": 6, "g": 3, "cap": 20.0,
    "ids": torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3], [5, 5, 6, 6, 6, 6, 6, 7, 7, 7, 8, 8]], dtype=torch.int32),
    "slopes": torch.tensor([0.5, 0.25]),
    "rb": torch.randn(3, 20, generator=_gen).to(torch.bfloat16),
}
SCORE = (torch.randn(B, H, N, N, generator=_gen) * 30).float()


def at(t, *idx):
    """A tensor element, or 0 outside the tensor (the language's rule)."""
    if all(0 <= i < s for i, s in zip(idx, t.shape)):
        return t[idx].item()
    return 0


def grids(q0=0, kv0=0):
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(H).view(1, H, 1, 1)
    q = (q0 + torch.arange(N)).view(1, 1, N, 1)
    kv = (kv0 + torch.arange(N)).view(1, 1, 1, N)
    return b, h, q, kv


def torch_eval(e, values, score=SCORE, q0=0, kv0=0):
    out = to_torch(e)(*grids(q0, kv0), Q_LEN, KV_LEN, score=score, **{k: values[k] for k in _used(e)})
    return torch.as_tensor(out).expand(B, H, N, N)


def _used(e):
    return sorted(e.params | e.tensors)


def brute(fn, values, q0=0, kv0=0):
    out = torch.empty(B, H, N, N, dtype=torch.float64)
    for b, h, i, j in itertools.product(range(B), range(H), range(N), range(N)):
        out[b, h, i, j] = float(fn(b, h, q0 + i, kv0 + j, SCORE[b, h, i, j].item(), values))
    return out


# --------------------------------------------------------------------------- the kernel harness

_KERNEL_DIR = Path(tempfile.mkdtemp(prefix="attngen_expr_"))  # kernels need a source file
atexit.register(shutil.rmtree, _KERNEL_DIR, ignore_errors=True)
KERNEL = """\
import triton
import triton.language as tl


def kernel(out_ptr, score_ptr, q_len, kv_len, q0, kv0, n_h, n_cells{args}):
    b = tl.program_id(0)
    h = tl.program_id(1)
    o_m = q0 + tl.arange(0, 16)
    o_n = kv0 + tl.arange(0, 16)
    off = ((b * n_h + h) * 16 + tl.arange(0, 16)[:, None]) * 16 + tl.arange(0, 16)[None, :]
    b_s = tl.load(score_ptr + off)
    m_all = tl.full([16, 16], 1, tl.int1)
{stores}
"""
NAMES = {"b": "b", "h": "h", "q_idx": "o_m[:, None]", "kv_idx": "o_n[None, :]", "q_len": "q_len",
         "kv_len": "kv_len", "score": "b_s"}


def kernel_source(exprs, params) -> str:
    args = []
    for name, decl in params.items():
        args += tensor_args(name, decl.dims) if decl.kind == "tensor" else [name]
    names = {**NAMES, **{n: n for n, d in params.items() if d.kind != "tensor"}}
    stores = []
    for i, e in enumerate(exprs):
        text = to_triton(e, names)
        val = f"tl.where({text} & m_all, 1.0, 0.0)" if e.type == "bool" else f"{text} + tl.zeros([16, 16], tl.float32)"
        stores.append(f"    tl.store(out_ptr + {i} * n_cells + off, {val})")
    return KERNEL.format(args="".join(f", {a}" for a in args), stores="\n".join(stores))


@lru_cache(maxsize=None)
def load_kernel(source: str):
    path = _KERNEL_DIR / f"k_{hashlib.sha256(source.encode()).hexdigest()[:16]}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.kernel


def kernel_args(params, values):
    out = []
    for name, decl in params.items():
        v = values[name]
        out += [v.to(DEVICE), *v.stride(), *v.shape] if decl.kind == "tensor" else [v]
    return out


def triton_eval(exprs, params, values, q0=0, kv0=0):
    """Run the printed expressions in one kernel on the [B, H, 16, 16] grid: [len(exprs), B, H, N, N]."""
    fn = triton.jit(load_kernel(kernel_source(exprs, params)))
    out = torch.full((len(exprs), B, H, N, N), float("nan"), device=DEVICE)
    fn[(B, H)](out, SCORE.to(DEVICE), Q_LEN, KV_LEN, q0, kv0, H, B * H * N * N, *kernel_args(params, values))
    return out.cpu()


def parse(text, kind="mask", params=PARAMS):
    return parse_expr(text, kind=kind, params=params, file="spec.yaml", line=7)


# --------------------------------------------------------------------------- helpers vs brute force

MASKS = [
    ("causal", lambda b, h, q, k, s, v: q >= k),
    ("causal()", lambda b, h, q, k, s, v: q >= k),
    ("sliding_window(w)", lambda b, h, q, k, s, v: q >= k and q - k < v["w"]),
    ("sliding_window(2 * w - 7)", lambda b, h, q, k, s, v: q >= k and q - k < 2 * v["w"] - 7),
    ("prefix_lm(p)", lambda b, h, q, k, s, v: k < v["p"] or q >= k),
    ("chunked(n)", lambda b, h, q, k, s, v: q >= k and q // v["n"] == k // v["n"]),
    ("dilated(w, d)", lambda b, h, q, k, s, v: q >= k and q - k < v["w"] and (q - k) % v["d"] == 0),
    ("document(ids)", lambda b, h, q, k, s, v: at(v["ids"], b, q) == at(v["ids"], b, k)),
    ("global_tokens(g)", lambda b, h, q, k, s, v: k < v["g"] or q < v["g"]),
    ("sliding_window(w) or global_tokens(4)", lambda b, h, q, k, s, v: (q >= k and q - k < v["w"]) or k < 4 or q < 4),
    ("document(ids) and causal", lambda b, h, q, k, s, v: at(v["ids"], b, q) == at(v["ids"], b, k) and q >= k),
    ("not chunked(n) and q_idx < q_len and kv_idx < kv_len",
     lambda b, h, q, k, s, v: not (q >= k and q // v["n"] == k // v["n"]) and q < Q_LEN and k < KV_LEN),
    ("0 <= q_idx - kv_idx < w or h == 1", lambda b, h, q, k, s, v: 0 <= q - k < v["w"] or h == 1),
]
SCORE_MODS = [
    ("alibi(slopes)", lambda b, h, q, k, s, v: s - at(v["slopes"], h) * abs(q - k)),
    ("softcap(cap)", lambda b, h, q, k, s, v: v["cap"] * math.tanh(s / v["cap"])),
    ("softcap(cap) - slopes[h] * abs(q_idx - kv_idx)",
     lambda b, h, q, k, s, v: v["cap"] * math.tanh(s / v["cap"]) - at(v["slopes"], h) * abs(q - k)),
    ("score + rb[h, q_idx - kv_idx + 8]", lambda b, h, q, k, s, v: s + float(at(v["rb"].float(), h, q - k + 8))),
    ("where(sliding_window(w), score, score - 100)", lambda b, h, q, k, s, v: s if q >= k and q - k < v["w"] else s - 100),
]


@pytest.mark.kernel
@pytest.mark.parametrize("text, fn", MASKS, ids=[m[0] for m in MASKS])
def test_mask_helpers_match_brute_force(text, fn):
    e = parse(text)
    want = brute(fn, VALUES)
    assert torch.equal(torch_eval(e, VALUES).double(), want)
    assert torch.equal(triton_eval([e], PARAMS, VALUES)[0].double(), want)


@pytest.mark.kernel
@pytest.mark.parametrize("text, fn", SCORE_MODS, ids=[m[0] for m in SCORE_MODS])
def test_score_mod_helpers_match_brute_force(text, fn):
    e = parse(text, "score_mod")
    want = brute(fn, VALUES)
    torch.testing.assert_close(torch_eval(e, VALUES).double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(triton_eval([e], PARAMS, VALUES)[0].double(), want, rtol=1e-5, atol=1e-4)


def test_every_helper_is_tested_and_documented():
    tested = " ".join(t for t, _ in MASKS + SCORE_MODS)
    for name, helper in HELPERS.items():
        assert name in tested, f"helper {name} has no brute-force test"
        assert helper.doc and helper.kind in ("mask", "score_mod")


def test_mask_plugs_into_the_dense_reference():
    fn = to_torch(parse("sliding_window(w)"))
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64, generator=_gen) for _ in range(3))
    o, lse = attention_reference(q, k, v, mask=lambda b, h, qi, ki: fn(b, h, qi, ki, 9, 9, w=3))
    want = (torch.arange(9)[:, None] >= torch.arange(9)) & (torch.arange(9)[:, None] - torch.arange(9) < 3)
    o2, lse2 = attention_reference(q, k, v, mask=want)
    torch.testing.assert_close(o, o2)
    torch.testing.assert_close(lse, lse2)


# --------------------------------------------------------------------------- floor semantics


FLOOR_CASES = [
    # (score_mod text, Python definition); operands of both signs, divisors of both signs
    ("(kv_idx - q_idx) // 3", lambda q, k, w, s: (k - q) // 3),
    ("(kv_idx - q_idx) % 3", lambda q, k, w, s: (k - q) % 3),
    ("(q_idx - kv_idx) // -4", lambda q, k, w, s: (q - k) // -4),
    ("(q_idx - kv_idx) % -4", lambda q, k, w, s: (q - k) % -4),
    ("(q_idx - kv_idx) // w", lambda q, k, w, s: (q - k) // w),
    ("(q_idx - kv_idx) % w", lambda q, k, w, s: (q - k) % w),
    ("q_idx // w + kv_idx % w", lambda q, k, w, s: q // w + k % w),
    ("q_idx // 4 + kv_idx % 4", lambda q, k, w, s: q // 4 + k % 4),
    ("(kv_idx - q_idx) / 4 // 1", lambda q, k, w, s: math.floor((k - q) / 4)),
    ("score // 0.75", lambda q, k, w, s: math.floor(s / 0.75)),
    ("score % 0.75", lambda q, k, w, s: s - 0.75 * math.floor(s / 0.75)),
    ("score % -2.5 + score // -2.5", lambda q, k, w, s: s + 2.5 * math.floor(s / -2.5) + math.floor(s / -2.5)),
]


@pytest.mark.kernel
@pytest.mark.parametrize("w", [3, -3])
@pytest.mark.parametrize("text, fn", FLOOR_CASES, ids=[c[0] for c in FLOOR_CASES])
def test_floor_division_and_remainder_follow_python(text, fn, w):
    params = parse_params({"w": "int"})
    e = parse(text, "score_mod", params)
    want = brute(lambda b, h, q, k, s, v: fn(q, k, w, s), {})
    torch.testing.assert_close(torch_eval(e, {"w": w}).double(), want, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(triton_eval([e], params, {"w": w})[0].double(), want, rtol=1e-6, atol=1e-4)


def test_integer_floor_forms_are_plain_only_when_both_signs_are_known():
    names = {**NAMES, "w": "w"}
    params = parse_params({"w": "int"})
    assert to_triton(parse("q_idx // 4 + q_idx % 4", "score_mod", params), names) == "(o_m[:, None] // 4 + o_m[:, None] % 4)"
    assert "% 4) + 4) % 4" in to_triton(parse("(q_idx - kv_idx) % 4", "score_mod", params), names)
    assert "% w) + w) % w" in to_triton(parse("q_idx % w", "score_mod", params), names)


# --------------------------------------------------------------------------- parsing and errors


def test_parse_reports_what_it_reads():
    e = parse("document(ids) and sliding_window(w) or q_idx < q_len")
    assert e.type == "bool" and e.kind == "mask"
    assert e.symbols == {"b", "q_idx", "kv_idx", "q_len"}
    assert e.params == {"w"} and e.tensors == {"ids"} and e.data_dependent
    assert [d.name for d in e.decls] == ["ids", "w"]
    s = parse("softcap(cap)", "score_mod")
    assert s.type == "float" and s.symbols == {"score"} and s.params == {"cap"} and not s.data_dependent


def test_chained_comparison_and_not():
    e = parse("1 <= q_idx - kv_idx < w and not kv_idx == 3")
    want = brute(lambda b, h, q, k, s, v: 1 <= q - k < v["w"] and not k == 3, VALUES)
    assert torch.equal(torch_eval(e, VALUES).double(), want)


@pytest.mark.parametrize(
    "text, kind, expected",
    [
        ("os", "mask", "unknown name 'os'"),
        ("__import__('os')", "mask", "name '__import__' is not allowed (dunder names)"),
        ("q_idx.real > 0", "mask", "attribute access is not allowed: q_idx.real"),
        ("(lambda: 1)() > 0", "mask", "only named functions can be called"),
        ("lambda: causal", "mask", "lambda is not allowed"),
        ("[q_idx for q_idx in b]", "mask", "a comprehension is not allowed"),
        ("f'{q_idx}' == 1", "mask", "an f-string is not allowed"),
        ("(x := 1) > 0", "mask", "an assignment expression ':=' is not allowed"),
        ("'a' == 'a'", "mask", "a string is not allowed: 'a'"),
        ("None", "mask", "None is not allowed"),
        ("min(*b) > 0", "mask", "starred arguments are not allowed"),
        ("max(q_idx, kv_idx, key=1) > 0", "mask", "keyword arguments are not allowed"),
        ("foo(q_idx) > 1", "mask", "unknown function 'foo'"),
        ("w(1) > 1", "mask", "'w' is not a function"),
        ("min > 0", "mask", "'min' is a function; call it as min(...)"),
        ("q_idx[0] > 0", "mask", "only declared tensor parameters can be indexed: q_idx[0]"),
        ("ids[b] > 0", "mask", "tensor 'ids' has 2 dims, indexed with 1: ids[b]"),
        ("ids[b, q_idx, 0] > 0", "mask", "indexed with 3"),
        ("ids[b, 1:3] > 0", "mask", "a slice is not allowed"),
        ("slopes[h / 2] > 0", "mask", "index 0 of 'slopes' must be an integer expression, got a float"),
        ("ids == 1", "mask", "comparisons need numbers, got a tensor"),
        ("q_idx", "mask", "a mask must be a boolean expression"),
        ("q_idx > 1 > causal", "mask", "comparisons need numbers, got a boolean"),
        ("causal + 1 > 0", "mask", "'+' needs a number, got a boolean"),
        ("q_idx and causal", "mask", "'and' needs a boolean, got an integer"),
        ("not q_idx", "mask", "'not' needs a boolean"),
        ("where(q_idx, 1, 0) > 0", "mask", "where()'s condition needs a boolean"),
        ("where(causal, 1, causal)", "mask", "where()'s branches must both be numbers or both booleans"),
        ("causal", "score_mod", "a score_mod must be a number, got a boolean"),
        ("score > 0", "mask", "unknown name 'score' (score is only available in score_mod)"),
        ("softcap(30) > 0", "mask", "softcap is a score_mod helper"),
        ("sliding_window > 0", "mask", "sliding_window(w) takes 1 argument, got 0"),
        ("sliding_window(1, 2)", "mask", "takes 1 argument, got 2"),
        ("document(w)", "mask", "argument 'ids' must name a declared 2-dim int tensor parameter: w"),
        ("document(slopes)", "mask", "argument 'ids' must name a declared 2-dim int tensor parameter"),
        ("alibi(ids)", "score_mod", "argument 'slopes' must name a declared 1-dim float tensor parameter"),
        ("sliding_window(causal)", "mask", "sliding_window()'s argument 'w' needs a number"),
        ("q_idx > 2147483648", "mask", "integer literal 2147483648 is out of range"),
        ("q_idx > 99999999999999999999", "mask", "is out of range"),
        ("score * 1e39", "score_mod", "float literal 1e39 is not a finite float32"),
        ("score * 65536 * 65536", "score_mod", "constant 4294967296 does not fit in 32 bits"),
        ("q_idx // 0 > 1", "mask", "division by zero: q_idx // 0"),
        ("q_idx % (w - w) > 1", "mask", "division by zero"),
        ("log(0) + score", "score_mod", "log(0) has no finite real value"),
        ("sqrt(-1) + score", "score_mod", "sqrt(-1) has no finite real value"),
        ("q_idx ** 2 > 1", "mask", "operator '**' is not supported"),
        ("causal & causal", "mask", "operator '&' (use 'and') is not supported"),
        ("~causal", "mask", "operator '~' is not supported (use 'not')"),
        ("q_idx is kv_idx", "mask", "comparison 'Is' is not allowed"),
        ("q_idx in b", "mask", "comparison 'In' is not allowed"),
        ("q_idx if causal else 0", "score_mod", "'x if c else y' (use where(c, x, y)) is not allowed"),
        ("(q_idx, kv_idx)", "mask", "a tuple is not allowed"),
        ("{1: 2}", "mask", "a dict is not allowed"),
        ("q_idx >", "mask", "invalid syntax"),
        ("", "mask", "empty expression"),
        ("q\u0131dx > 0", "mask", "non-ASCII character"),
        ("q_idx > 0\x00", "mask", "NUL character"),
        ("(" * 51 + "q_idx" + ")" * 51 + " > 0", "mask", "nested more than 50 levels"),
        ("-" * 60 + "q_idx > 0", "mask", "nested more than 50 levels"),
        ("not " * 60 + "causal", "mask", "nested more than 50 levels"),
        ("q_idx + " * 300 + "1 > 0", "mask", "longer than 2000 characters"),
        ("(q_idx + 1) * " * 40 + "1 > 2", "mask", "multiplied by itself more than 32 times"),
    ],
)
def test_bad_expression_is_rejected_with_location(text, kind, expected):
    with pytest.raises(SpecError) as info:
        parse(text, kind)
    assert str(info.value).startswith(f"spec.yaml:7: {kind}: "), str(info.value)
    assert expected in str(info.value)


def test_non_string_is_rejected():
    with pytest.raises(SpecError, match="spec.yaml:7: mask: expected an expression"):
        parse(True)


def test_parse_params():
    p = parse_params({"w": "int", "c": "float", "doc": {"tensor": "int32", "dims": 2}}, "s.yaml", {"w": 3, "c": 4, "doc": 5})
    assert [(d.name, d.kind, d.dtype, d.dims, d.elem) for d in p.values()] == [
        ("w", "int", "", 0, "int"), ("c", "float", "", 0, "float"), ("doc", "tensor", "int32", 2, "int")]
    assert tensor_args("doc", 2) == ("doc_ptr", "doc_stride_0", "doc_stride_1", "doc_size_0", "doc_size_1")


@pytest.mark.parametrize(
    "mapping, expected",
    [
        ({"w": "double"}, "s.yaml:3: params.w: expected 'int', 'float' or {tensor: DTYPE, dims: N}"),
        ({"q_idx": "int"}, "params.q_idx: 'q_idx' is reserved"),
        ({"causal": "int"}, "params.causal: 'causal' is reserved"),
        ({"lambda": "int"}, "params.lambda: 'lambda' is reserved"),
        ({"__x": "int"}, "params.__x: a parameter name is"),
        ({"a b": "int"}, "params.a b: a parameter name is"),
        ({"t": {"tensor": "int8", "dims": 1}}, "params.t: tensor dtype 'int8' is not one of int32, int64, fp32, fp16, bf16"),
        ({"t": {"tensor": "fp32", "dims": 5}}, "params.t: dims must be an integer in [1, 4], got 5"),
        ({"t": {"tensor": "fp32", "dims": True}}, "dims must be an integer"),
        ({"t": {"tensor": "fp32"}}, "a tensor is declared as {tensor: DTYPE, dims: N}"),
        ({"t": {"tensor": "fp32", "dims": 1, "shape": 3}}, "a tensor is declared as"),
        ({"t": {"tensor": "fp32", "dims": 1}, "t_ptr": "int"}, "params.t_ptr: collides with kernel argument 't_ptr' of tensor 't'"),
        ({f"p{i}": "int" for i in range(17)}, "at most 16 parameters"),
    ],
)
def test_bad_params_are_rejected(mapping, expected):
    with pytest.raises(SpecError) as info:
        parse_params(mapping, "s.yaml", 3)
    assert expected in str(info.value)


def test_large_legal_expression_parses_quickly():
    text = " or ".join(f"(sliding_window({i} + w) and q_idx % {i + 2} == kv_idx // {i + 1})" for i in range(20))
    assert len(text) < 2000
    t0 = time.perf_counter()
    e = parse(text)
    to_triton(e, {**NAMES, "w": "w"})
    assert time.perf_counter() - t0 < 5


# --------------------------------------------------------------------------- derivatives


def _finite_difference(e, values, name=None, eps=1e-6):
    s = SCORE.double()
    fn = to_torch(e)
    g = grids()
    if name is None:
        return (fn(*g, Q_LEN, KV_LEN, score=s + eps, **values) - fn(*g, Q_LEN, KV_LEN, score=s - eps, **values)) / (2 * eps)
    return (fn(*g, Q_LEN, KV_LEN, score=s, **{**values, name: values[name] + eps})
            - fn(*g, Q_LEN, KV_LEN, score=s, **{**values, name: values[name] - eps})) / (2 * eps)


@pytest.mark.kernel
@pytest.mark.parametrize(
    "text",
    ["softcap(cap)", "alibi(slopes)", "where(causal, score * score, exp(score / 30))", "max(score, cap) + min(score, -cap)",
     "sqrt(abs(score) + 1) * log(abs(score) + 2)", "score % 7.5 + score // 4", "tanh(score / cap) * q_idx"],
)
def test_d_score_matches_finite_differences(text):
    e = parse(text, "score_mod")
    values = {k: VALUES[k].double() if isinstance(VALUES[k], torch.Tensor) and VALUES[k].is_floating_point() else VALUES[k] for k in _used(e)}
    got = torch.as_tensor(to_torch(d_score(e))(*grids(), Q_LEN, KV_LEN, score=SCORE.double(), **values)).expand(B, H, N, N)
    torch.testing.assert_close(got.double(), _finite_difference(e, values).expand(B, H, N, N), rtol=1e-4, atol=1e-4)
    assert torch.equal(triton_eval([d_score(e)], PARAMS, VALUES)[0].isnan(), torch.zeros(B, H, N, N, dtype=torch.bool))


def test_d_param_scalar_and_tensor():
    params = parse_params({"c": "float", "rb": {"tensor": "fp32", "dims": 2}})
    e = parse("c * tanh(score / c) + rb[h, q_idx - kv_idx + 8] * rb[h, q_idx - kv_idx + 8]", "score_mod", params)
    values = {"c": 20.0, "rb": torch.randn(3, 20, dtype=torch.float64, generator=_gen)}
    dc = to_torch(d_param(e, "c"))(*grids(), Q_LEN, KV_LEN, score=SCORE.double(), **values)
    torch.testing.assert_close(dc.double(), _finite_difference(e, values, "c"), rtol=1e-4, atol=1e-4)
    drb = d_param(e, "rb")
    assert drb.sympy == 2 * sympy.IndexedBase("rb", real=True)[_sym("h"), _sym("q_idx") - _sym("kv_idx") + 8]
    two_places = parse("score + rb[h, 0] + rb[h, 1]", "score_mod", params)
    with pytest.raises(SpecError, match="read at 2 different indices"):
        d_param(two_places, "rb")
    with pytest.raises(ValueError, match="not a float parameter"):
        d_param(e, "w")


def _sym(name):
    return sympy.Symbol(name, integer=True, nonnegative=True)


# --------------------------------------------------------------------------- affine decomposition


@pytest.mark.parametrize(
    "text",
    ["causal", "sliding_window(w)", "prefix_lm(p)", "global_tokens(g)", "sliding_window(w) or global_tokens(4)",
     "not (q_idx < 3 and kv_idx > 2)", "q_idx != kv_idx", "where(h < 2, causal, kv_idx == q_idx)",
     "2 * q_idx - kv_idx >= w", "q_idx / 3 < kv_idx", "q_idx - kv_idx < cap", "q_len - q_idx <= kv_len - kv_idx", "True"],
)
def test_affine_dnf_evaluates_like_the_mask(text):
    e = parse(text)
    dnf = affine_dnf(e)
    assert dnf is not None
    want = torch_eval(e, VALUES)
    env = {"w": VALUES["w"], "p": VALUES["p"], "g": VALUES["g"], "cap": VALUES["cap"], "q_len": Q_LEN, "kv_len": KV_LEN}
    for b, h, i, j in itertools.product(range(B), range(H), range(N), range(N)):
        got = any(all(c.holds(i, j, b=b, h=h, **env) for c in conj) for conj in dnf)
        assert got == bool(want[b, h, i, j]), (text, b, h, i, j, dnf)


def test_affine_dnf_shapes():
    assert affine_dnf(parse("causal")) == ((Ineq(1, -1, sympy.S.Zero),),)
    (conj,) = affine_dnf(parse("sliding_window(w)"))
    assert set(conj) == {Ineq(1, -1, sympy.S.Zero), Ineq(-1, 1, sympy.Symbol("w", integer=True) - 1)}
    (only,) = affine_dnf(parse("q_idx - kv_idx < cap"))[0]
    assert only.strict and (only.q, only.kv) == (-1, 1)  # a float bound stays strict
    assert affine_dnf(parse("q_idx / 3 < kv_idx")) == ((Ineq(-1, 3, sympy.S.NegativeOne),),)
    assert affine_dnf(parse("False")) == ()


@pytest.mark.parametrize(
    "text",
    ["chunked(n)", "dilated(w, d)", "document(ids)", "q_idx * kv_idx > 3", "w * q_idx > kv_idx",
     "min(q_idx, 4) > kv_idx", "abs(q_idx - kv_idx) < w", "slopes[0] * q_idx > kv_idx"],
)
def test_affine_dnf_gives_up_when_not_affine(text):
    assert affine_dnf(parse(text)) is None


def test_affine_dnf_gives_up_when_too_large():
    text = " and ".join(f"(q_idx < {i} or kv_idx > {i})" for i in range(8))  # 256 conjunctions
    assert affine_dnf(parse(text)) is None


# --------------------------------------------------------------------------- fuzzing

FUZZ_PARAMS = parse_params({
    "w": "int", "c": "float",
    "doc": {"tensor": "int32", "dims": 2}, "slopes": {"tensor": "fp32", "dims": 1}, "rb": {"tensor": "fp16", "dims": 2},
})
FUZZ_VALUES = {
    "w": -3, "c": 1.75,
    "doc": torch.randint(0, 3, (B, 12), generator=_gen, dtype=torch.int32),
    "slopes": torch.tensor([0.5, -0.25]),
    "rb": torch.randn(H, 9, generator=_gen).half(),
}
INT_LEAVES = ["q_idx", "kv_idx", "b", "h", "q_len", "kv_len", "w", "doc[b, q_idx]", "doc[h, kv_idx - 2]", "7", "-4", "0"]
EXACT_FLOAT_LEAVES = ["score", "c", "0.5", "-1.25", "slopes[h]", "rb[h, q_idx - kv_idx + 4]", "slopes[q_idx - 3]"]
DIVISORS = ["3", "-2", "5", "w", "-7"]


def _bin(a, op, b):
    return st.tuples(a, b).map(lambda t: f"({t[0]} {op} {t[1]})")


def _call(fn, *args):
    return st.tuples(*args).map(lambda t: f"{fn}({', '.join(t)})")


@lru_cache(maxsize=None)
def ints(depth):
    leaves = st.sampled_from(INT_LEAVES)
    if depth == 0:
        return leaves
    sub = ints(depth - 1)
    small = st.sampled_from(["2", "-3", "1"])
    return st.one_of(
        leaves,
        *(_bin(sub, op, sub) for op in ("+", "-")),
        _bin(sub, "*", small),  # products stay small: kernels compute in 32 bits
        *(_bin(sub, op, st.sampled_from(DIVISORS)) for op in ("//", "%")),
        sub.map(lambda a: f"-{a}"),
        _call("abs", sub), _call("min", sub, sub), _call("max", sub, sub),
        _call("where", bools(depth - 1), sub, sub),
    )


@lru_cache(maxsize=None)
def exact_floats(depth):
    """Float expressions every backend rounds identically (no exp/log/tanh/sqrt)."""
    leaves = st.sampled_from(EXACT_FLOAT_LEAVES)
    if depth == 0:
        return leaves
    sub = exact_floats(depth - 1)
    mixed = st.one_of(sub, ints(depth - 1))
    return st.one_of(
        leaves,
        *(_bin(sub, op, mixed) for op in ("+", "-", "*")),
        _bin(mixed, "/", st.sampled_from(["4", "-0.5", "3"])),
        *(_bin(sub, op, st.sampled_from(["0.75", "-2.5", "c"])) for op in ("//", "%")),
        _call("min", sub, mixed), _call("max", mixed, sub), _call("abs", sub),
        _call("where", bools(depth - 1), sub, mixed),
    )


@lru_cache(maxsize=None)
def floats(depth):
    if depth == 0:
        return exact_floats(0)
    sub = floats(depth - 1)
    return st.one_of(
        exact_floats(depth),
        *(_bin(sub, op, sub) for op in ("+", "-", "*")),
        _bin(sub, "/", st.sampled_from(["(1.5 + abs(score))", "3", "c"])),
        *(_call(f, sub) for f in ("exp", "tanh")),
        _call("log", sub.map(lambda a: f"abs({a})")), _call("sqrt", sub),
        _call("where", bools(depth - 1), sub, sub), _call("min", sub, sub),
        st.sampled_from(["softcap(c)", "alibi(slopes)"]),
    )


@lru_cache(maxsize=None)
def bools(depth):
    cmp = st.sampled_from(["<", "<=", ">", ">=", "==", "!="])
    helpers = st.sampled_from(["causal", "sliding_window(w)", "sliding_window(4)", "prefix_lm(3)", "chunked(3)",
                               "dilated(6, 2)", "document(doc)", "global_tokens(2)"])
    leaves = st.one_of(helpers, st.tuples(ints(0), cmp, ints(0)).map(" ".join))
    if depth == 0:
        return leaves
    sub = bools(depth - 1)
    return st.one_of(
        leaves,
        st.tuples(ints(depth), cmp, ints(depth)).map(" ".join),
        st.tuples(exact_floats(depth - 1), cmp, st.one_of(exact_floats(depth - 1), ints(depth - 1))).map(" ".join),
        st.tuples(ints(depth - 1), cmp, ints(depth - 1), cmp, ints(depth - 1)).map(" ".join),  # chained
        _bin(sub, "and", sub), _bin(sub, "or", sub), sub.map(lambda a: f"not {a}"),
        _call("where", sub, sub, sub),
    )


def _check_agreement(text, kind, q0):
    e = parse(text, kind, FUZZ_PARAMS)  # well-formed by construction: any SpecError is a bug
    got = triton_eval([e], FUZZ_PARAMS, FUZZ_VALUES, q0=q0)[0]
    want = torch_eval(e, FUZZ_VALUES, q0=q0).float()
    if kind == "mask":
        assert torch.equal(got, want), f"{text}\n{to_triton(e, {**NAMES, 'w': 'w', 'c': 'c'})}"
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, equal_nan=True, msg=lambda m: f"{text}\n{m}")


@pytest.mark.kernel
@settings(max_examples=30)
@given(text=bools(3), q0=st.sampled_from([0, 5]))
@example(text="(kv_idx - q_idx) // -2 == (q_idx - kv_idx) % w", q0=0)
def test_fuzz_masks_agree_between_triton_and_torch(text, q0):
    _check_agreement(text, "mask", q0)


@pytest.mark.kernel
@settings(max_examples=30)
@given(text=st.one_of(floats(3), ints(2)), q0=st.sampled_from([0, 5]))
@example(text="(score // -2.5) * 0.5 + exp(score / 50) - min(score, c) % 0.75", q0=0)
def test_fuzz_score_mods_agree_between_triton_and_torch(text, q0):
    _check_agreement(text, "score_mod", q0)


CANARY = _KERNEL_DIR / "CANARY"
HOSTILE = [
    f"__import__('os').system('touch {CANARY}')",
    f"open('{CANARY}', 'w')",
    f"exec(\"open('{CANARY}', 'w')\")",
    f"eval(\"open('{CANARY}', 'w')\")",
    "().__class__.__bases__[0].__subclasses__()",
    "q_idx.__class__.__mro__",
    "getattr(q_idx, 'real')",
    f"(lambda: open('{CANARY}', 'w'))()",
    f"[open('{CANARY}', 'w') for _ in b]",
    f"(f := open('{CANARY}', 'w'))",
    f"f\"{{open('{CANARY}', 'w')}}\"",
    "globals()", "breakpoint()", "__builtins__", "compile('1', 'x', 'eval')",
    "10 ** 100", "9" * 40, "1e999", "causal(*b)", "doc[b, 0:3]", "q_idx @ kv_idx", "yield q_idx", "await q_idx",
    "(" * 200 + "q_idx" + ")" * 200, "-" * 1999 + "1", "not " * 499 + "causal",
    "sliding_window(" * 30 + "1" + ")" * 30,
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_text_is_rejected_and_never_run(text):
    with pytest.raises(SpecError):
        parse(text)
    with pytest.raises(SpecError):
        parse(text, "score_mod")
    assert not CANARY.exists()


TOKENS = HOSTILE[:12] + [
    "q_idx", "kv_idx", "score", "w", "c", "doc", "doc[b, q_idx]", "causal", "sliding_window", "(", ")", "[", "]", ",",
    "+", "-", "*", "/", "//", "%", "**", "<", "==", "and", "or", "not", "where", "min", "abs", "exp", ".", "__class__",
    "lambda", ":", "=", ":=", "'s'", "1", "0", "-1", "2.5", "1e40", "2147483648", "#", "\\", "\n", "@", "if", "else",
]


@settings(max_examples=300)
@given(st.one_of(st.lists(st.sampled_from(TOKENS), max_size=12).map(" ".join), st.text(max_size=60)),
       st.sampled_from(["mask", "score_mod"]))
def test_fuzz_any_text_parses_or_raises_spec_error(text, kind):
    try:
        e = parse_expr(text, kind=kind, params=FUZZ_PARAMS, file="f.yaml", line=2)
    except SpecError as err:
        assert str(err).startswith(f"f.yaml:2: {kind}: ")
    else:
        assert e.type == ("bool" if kind == "mask" else e.type) and e.type in ("bool", "int", "float")
        to_triton(e, {**NAMES, "w": "w", "c": "c"})
    assert not CANARY.exists()


# --------------------------------------------------------------------------- printing


def test_printing_is_deterministic_across_processes():
    code = (
        "from attngen.language.expr import parse_expr, parse_params, to_triton\n"
        "p = parse_params({'w': 'int', 'ids': {'tensor': 'int32', 'dims': 2}})\n"
        "names = {'b': 'b', 'h': 'h', 'q_idx': 'q', 'kv_idx': 'k', 'q_len': 'N', 'kv_len': 'M', 'w': 'w'}\n"
        "for t in ['sliding_window(w) or global_tokens(4) or document(ids)', 'dilated(w, 3) and chunked(w + 1)',\n"
        "          'where(q_idx + kv_idx > w, min(q_idx, kv_idx, w, b, h), max(h, b, 3)) < 3 and not causal']:\n"
        "    print(to_triton(parse_expr(t, kind='mask', params=p), names))\n"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1


def test_missing_names_are_reported():
    with pytest.raises(ValueError, match="no source text for kv_len, w"):
        to_triton(parse("kv_idx < kv_len - w"), {"kv_idx": "k"})


AOT = """\
import importlib.util, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

path, sig, consts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
spec = importlib.util.spec_from_file_location("k", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
try:
    from triton.compiler.errors import CompilationError
    triton.compile(ASTSource(fn=JITFunction(module.kernel), signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
except CompilationError as e:
    print(e)
    sys.exit(1)
except Exception as e:  # no CUDA toolchain in this Triton build
    print(f"{type(e).__name__}: {str(e)[:300]}")
    sys.exit(3)
"""


@pytest.mark.aot
def test_helpers_compile_for_sm90():
    """The interpreter accepts more than the compiler (e.g. `.to` on a constexpr): compile the
    printout ahead of time for sm_90, with a stride, a size and a scalar specialised to 1 as Triton
    does. In a subprocess: the compiler does not run where the interpreter is active."""
    exprs = [parse(t) for t, _ in MASKS] + [parse(t, "score_mod") for t, _ in SCORE_MODS]
    exprs += [d_score(e) for e in exprs[len(MASKS):]]
    exprs += [parse(t, "score_mod", parse_params({"w": "int"})) for t, _ in FLOOR_CASES[:6]]
    # w is specialised to the constant 1: casts and functions of it must not assume a tensor
    exprs.append(parse("score + exp(-w) * sqrt(q_len) + tanh(h - w) + w / 2 + abs(w) + min(w, 2) + log(w + 1)"
                       " + where(w > 1 and not (w < 3 or h > 2), 1, 0) + slopes[w - 1] + slopes[0]", "score_mod"))
    source = kernel_source(exprs, PARAMS)
    load_kernel(source)
    path = _KERNEL_DIR / f"k_{hashlib.sha256(source.encode()).hexdigest()[:16]}.py"
    ptr = {"int32": "*i32", "fp32": "*fp32", "bf16": "*bf16"}
    sig = dict.fromkeys(["q_len", "kv_len", "q0", "kv0", "n_h", "n_cells"], "i32")
    sig = {"out_ptr": "*fp32", "score_ptr": "*fp32", **sig}
    for name, d in PARAMS.items():
        if d.kind == "tensor":
            sig.update(dict.fromkeys(tensor_args(name, d.dims), "i32"))
            sig[f"{name}_ptr"] = ptr[d.dtype]
        else:
            sig[name] = "i32" if d.kind == "int" else "fp32"
    consts = {"w": 1, "rb_stride_1": 1, "slopes_size_0": 1}
    sig.update(dict.fromkeys(consts, "constexpr"))
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-c", AOT, str(path), json.dumps(sig), json.dumps(consts)],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    if run.returncode == 3:
        pytest.skip(f"ahead-of-time compilation unavailable: {run.stdout.strip()}")
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
