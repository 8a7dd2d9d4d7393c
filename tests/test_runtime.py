"""Generated-module runtime behaviour: backend selection, input checks, layouts, tile bounds."""

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attngen import runtime
from attngen.build import build
from attngen.plan import MASK_RULES, tile_counts
from attngen.testing import random_inputs
from attngen.verify import import_generated

from helpers import ROOT, generated
from test_build import write_spec


def test_import_on_cpu_needs_no_environment_variable():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    code = (
        "import torch, sys; sys.path.insert(0, 'generated'); import mha;"
        "q = torch.randn(1, 4, 5, 64, dtype=torch.float16);"
        "print(mha.attention(q, q, q).shape, mha._rt.backend())"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "torch.Size([1, 4, 5, 64]) triton-interpreter" in r.stdout


def _inputs(mod, **kw):
    return random_inputs(mod, batch=1, n_q=4, n_k=6, dtype=torch.float16, **kw)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, k, v: (q.float(), k.float(), v.float()), "q has dtype torch.float32; this module was built for fp16, bf16"),
        (lambda q, k, v: (q, k.bfloat16(), v), "q, k, v must share one dtype"),
        (lambda q, k, v: (q[0], k, v), "q must be 4-D"),
        (lambda q, k, v: (q[:, :5], k, v), "q has 5 heads (dim 1 of [B, H, N, D]); expected 8"),
        (lambda q, k, v: (q, k.expand(1, 2, 6, 64), v), "k has 2 heads; expected 1 KV heads"),
        (lambda q, k, v: (q[..., :32], k, v), "q has head_dim 32; expected 64"),
        (lambda q, k, v: (q, k, v[..., :32]), "v has head_dim 32; expected 64"),
        (lambda q, k, v: (q, k, v[:, :, :5]), "v has 5 keys but k has 6"),
        (lambda q, k, v: (q, k.expand(2, 1, 6, 64), v), "k has batch 2; expected 1"),
        (lambda q, k, v: (q, k.to("meta"), v), "k is on meta"),
        (lambda q, k, v: ("q", k, v), "q must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_valueerror_naming_the_tensor(change, message):
    mod = generated("mqa")
    with pytest.raises(ValueError) as info:
        mod.attention(*change(*_inputs(mod)))
    assert message in str(info.value)
    assert str(info.value).startswith("mqa: ")


def test_bnhd_views_work_and_keep_their_layout():
    mod = generated("mqa")
    q, k, v = _inputs(mod, bnhd=True)
    assert not q.is_contiguous()
    o = mod.attention(q, k, v)
    assert o.transpose(1, 2).is_contiguous(), "o comes back in q's [B, N, H, D] layout"
    o_contig = mod.attention(q.contiguous(), k.contiguous(), v.contiguous())
    assert torch.equal(o, o_contig)


def test_backward_false_module(tmp_path):
    spec = write_spec(tmp_path, name="fwd_only", extra="backward: false\n")
    [(path, _)] = build([spec], tmp_path / "out")
    mod = import_generated(path)
    assert not hasattr(mod, "_backward")
    q, k, v = random_inputs(mod, batch=1, n_q=3, n_k=3, dtype=torch.float16)
    assert mod.attention(q, k, v).shape == (1, 4, 3, 32)
    with pytest.raises(RuntimeError, match="backward: false"):
        mod.attention(q.requires_grad_(), k, v)
    with torch.no_grad():
        mod.attention(q, k, v)


def test_empty_batch_and_queries():
    mod = generated("mha")
    q, k, v = random_inputs(mod, batch=1, n_q=0, n_k=5, dtype=torch.float16)
    assert mod.attention(q, k, v).shape == (1, 4, 0, 64)
    q, k, v = random_inputs(mod, batch=0, n_q=3, n_k=5, dtype=torch.float16)
    assert mod.attention(q, k, v).shape == (0, 4, 3, 64)


def _bounds(rule, **names):
    """Evaluate the plan's Triton bound expressions with Python integers."""
    tl = type("tl", (), {"minimum": staticmethod(min), "cdiv": staticmethod(lambda a, b: -(-a // b))})
    env = {"tl": tl, **names}
    # these strings are the plan's own fixed bound expressions, never user input
    return {k: eval(getattr(rule, k), {"__builtins__": {}}, env) for k in ("fwd_full_end", "fwd_end", "dkdv_start", "dkdv_full_start")}


@settings(max_examples=200)
@given(
    mask=st.sampled_from(sorted(MASK_RULES)),
    n_q=st.integers(1, 300),
    n_k=st.integers(1, 300),
    block_m=st.sampled_from([16, 32, 64, 128]),
    block_n=st.sampled_from([16, 32, 64, 128]),
)
def test_tile_bounds_against_brute_force(mask, n_q, n_k, block_m, block_n):
    """The kernels never skip a visible pair, never skip the mask on a tile that needs it, and
    (for these provable masks) never visit a tile with no visible pair."""
    rule = MASK_RULES[mask]
    qi = torch.arange(n_q).view(-1, 1)
    ki = torch.arange(n_k).view(1, -1)
    vis = torch.ones(n_q, n_k, dtype=torch.bool) if mask == "none" else qi >= ki
    for start_m in range(0, n_q, block_m):
        b = _bounds(rule, start_m=start_m, start_n=0, BLOCK_M=block_m, BLOCK_N=block_n, N_Q=n_q, N_K=n_k)
        rows = vis[start_m:start_m + block_m]
        full_end = b["fwd_full_end"] // block_n * block_n
        assert rows[:, :full_end].all(), "a tile run without the mask has a masked pair"
        assert not rows[:, b["fwd_end"]:].any(), "a visible pair lies past the visited tiles"
        for start_n in range(0, b["fwd_end"], block_n):
            assert rows[:, start_n:start_n + block_n].any(), "visited a tile with no visible pair"
    for start_n in range(0, n_k, block_n):
        b = _bounds(rule, start_m=0, start_n=start_n, BLOCK_M=block_m, BLOCK_N=block_n, N_Q=n_q, N_K=n_k)
        cols = vis[:, start_n:start_n + block_n]
        assert b["dkdv_start"] % block_m == 0 and b["dkdv_full_start"] % block_m == 0
        assert not cols[: b["dkdv_start"]].any(), "dK/dV skipped a query that sees this tile"
        assert cols[b["dkdv_full_start"]:].all(), "dK/dV ran unmasked over a masked pair"
    counts = tile_counts(mask, n_q, n_k, block_m, block_n)
    needed = sum(
        bool(vis[m:m + block_m, n:n + block_n].any()) for m in range(0, n_q, block_m) for n in range(0, n_k, block_n)
    )
    assert counts["visited"] == needed
    assert counts["total"] == math.ceil(n_q / block_m) * math.ceil(n_k / block_n)


def _general_bounds(rule, n_q, n_k, block_m, block_n, **params):
    """The KV tiles (partial, full) per query tile and the query tiles (partial, full) per KV tile,
    exactly as the generated kernels' three loops compute them (templates/dense.py.jinja)."""
    tl = type("tl", (), {
        "minimum": staticmethod(min), "maximum": staticmethod(max), "cdiv": staticmethod(lambda a, b: -(-a // b)),
    })
    env = {"tl": tl, "BLOCK_M": block_m, "BLOCK_N": block_n, "N_Q": n_q, "N_K": n_k, "i_b": 0, "i_h": 0,
           **{f"arg_{k}": v for k, v in params.items()}}

    def ev(text, **names):
        # the plan's own bound expressions over integers, never user text (params are numbers here)
        return eval(text, {"__builtins__": {}}, {**env, **names})

    fwd = {}
    for start_m in range(0, n_q, block_m):
        names = {"start_m": start_m, "last_m": min(start_m + block_m, n_q) - 1}
        hi = ev(rule.fwd_end, **names)
        lo = ev(rule.fwd_start, **names)
        lo = lo // block_n * block_n if ev(rule.fwd_visit, lo=lo, hi=hi, **names) else hi
        full_lo = min(max(-(-ev(rule.fwd_full_start, **names) // block_n) * block_n, lo), hi)
        full_hi = max(ev(rule.fwd_full_end, **names) // block_n * block_n, full_lo)
        partial = [*range(lo, full_lo, block_n), *range(full_hi, hi, block_n)]
        fwd[start_m] = (partial, list(range(full_lo, full_hi, block_n)))
    bwd = {}
    for start_n in range(0, n_k, block_n):
        names = {"start_n": start_n, "last_n": min(start_n + block_n, n_k) - 1}
        q_hi = ev(rule.dkdv_end, **names)
        q_lo = ev(rule.dkdv_start, **names)
        q_lo = q_lo // block_m * block_m if ev(rule.dkdv_visit, q_lo=q_lo, q_hi=q_hi, **names) else q_hi
        q_full = min(max(-(-ev(rule.dkdv_full_start, **names) // block_m) * block_m, q_lo), q_hi)
        q_full_end = max(ev(rule.dkdv_full_end, **names), q_full)
        partial = [*range(q_lo, q_full, block_m), *range(q_full_end, q_hi, block_m)]
        bwd[start_n] = (partial, list(range(q_full, q_full_end, block_m)))
    return fwd, bwd


# (mask, params): the shipped sliding window and other single affine conjunctions (bands, offsets,
# conditions on one index only, head-dependent bounds)
AFFINE_MASKS = [
    ("sliding_window(w)", ("w",)),
    ("kv_idx <= q_idx + w and q_idx <= kv_idx + w", ("w",)),
    ("causal and kv_idx >= w", ("w",)),
    ("q_idx < q_len - w and kv_idx < kv_len - 1", ("w",)),
    ("kv_idx - h <= q_idx and q_idx - kv_idx < w + h", ("w",)),
]


@settings(max_examples=150)
@given(
    case=st.sampled_from(AFFINE_MASKS),
    w=st.integers(-5, 320),
    n_q=st.integers(1, 300),
    n_k=st.integers(1, 300),
    block_m=st.sampled_from([16, 32, 64, 128]),
    block_n=st.sampled_from([16, 32, 64, 128]),
    h=st.integers(0, 3),
)
def test_expression_tile_bounds_against_brute_force(case, w, n_q, n_k, block_m, block_n, h):
    """Closed-form bounds of single-conjunction masks: no visible pair is skipped, full tiles hold
    only visible pairs (inside the sequence), and for the sliding window no visited tile is wholly
    masked."""
    from attngen.expr import parse_expr, parse_params, to_torch
    from attngen.plan import expr_rule

    text, names = case
    params = tuple((n, "int") for n in names)
    rule = expr_rule(text, params)
    assert rule.path.startswith("closed-form"), rule.path
    fn = to_torch(parse_expr(text, kind="mask", params=parse_params(dict(params))))
    qi = torch.arange(n_q).view(-1, 1)
    ki = torch.arange(n_k).view(1, -1)
    vis = torch.as_tensor(fn(0, h, qi, ki, n_q, n_k, w=w), dtype=torch.bool).expand(n_q, n_k)
    # the rules that read the head (i_h) are evaluated at head h
    fwd, bwd = _general_bounds_at_head(rule, n_q, n_k, block_m, block_n, h, w=w)
    sliding = text == "sliding_window(w)"
    for start_m, (partial, full) in fwd.items():
        rows = vis[start_m:start_m + block_m]
        seen = torch.zeros(n_k, dtype=torch.bool)
        for n in partial + full:
            assert 0 <= n < n_k
            seen[n:n + block_n] = True
            if sliding:
                assert rows[:, n:n + block_n].any(), "visited a KV tile with no visible pair"
        for n in full:
            assert n + block_n <= n_k and rows[:, n:n + block_n].all(), "an unmasked tile has a masked pair"
        assert not (rows & ~seen).any(), "a visible pair lies in a skipped KV tile"
        assert len(set(partial + full)) == len(partial + full), "a KV tile visited twice"
    for start_n, (partial, full) in bwd.items():
        cols = vis[:, start_n:start_n + block_n]
        seen = torch.zeros(n_q, dtype=torch.bool)
        for m in partial + full:
            assert 0 <= m < n_q and m % block_m == 0
            seen[m:m + block_m] = True
            if sliding:
                assert cols[m:m + block_m].any(), "dK/dV visited a query tile with no visible pair"
        for m in full:
            assert cols[m:m + block_m].all(), "dK/dV ran unmasked over a masked pair"
        assert not (cols & ~seen[:, None]).any(), "dK/dV skipped a query that sees this tile"
        assert len(set(partial + full)) == len(partial + full), "a query tile visited twice"


def _general_bounds_at_head(rule, n_q, n_k, block_m, block_n, h, **params):
    import dataclasses

    sub = {k: getattr(rule, k).replace("i_h", f"({h})") for k in (
        "fwd_start", "fwd_full_start", "fwd_full_end", "fwd_end", "dkdv_start", "dkdv_full_start", "dkdv_full_end", "dkdv_end")}
    return _general_bounds(dataclasses.replace(rule, **sub), n_q, n_k, block_m, block_n, **params)


@pytest.mark.parametrize("mask, params, reason", [
    ("prefix_lm(p)", (("p", "int"),), "disjunction"),
    ("chunked(c)", (("c", "int"),), "not an affine"),
    ("global_tokens(g) or sliding_window(w)", (("g", "int"), ("w", "int")), "disjunction"),
    ("causal and 2 * kv_idx <= q_idx", (), "coefficient"),
])
def test_other_masks_take_the_safe_path(mask, params, reason):
    from attngen.plan import expr_rule

    rule = expr_rule(mask, params)
    assert reason in rule.path and "safe path" in rule.path
    assert (rule.fwd_full_end, rule.fwd_end, rule.dkdv_start, rule.dkdv_full_start) == ("0", "N_K", "0", "N_Q")


def test_triton_imported_first_gives_a_clear_error():
    """On a CPU machine, importing triton before attngen leaves triton's own helpers in compiled
    mode; the runtime says so instead of failing inside a kernel."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no CUDA device in the child, so the interpreter is chosen
    code = "import triton, sys; sys.path.insert(0, 'generated'); import mha"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "Import the generated module (or attngen.runtime) before triton" in r.stderr
