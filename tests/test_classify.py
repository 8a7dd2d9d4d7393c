"""Tile classification (attngen.planning.classify) against brute force, through its Python mirror of the
kernels' range statements, and through generated kernels for masks beyond the shipped specs."""

import functools
import inspect
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from attngen import runtime
from attngen.codegen.build import build
from attngen.planning.classify import classify_tiles, evaluate, mask_dnf
from attngen.language.expr import parse_expr, parse_params, to_torch
from attngen.planning.masks import MASK_RULES, mask_rule
from mirror import rule_for, tile_counts
from attngen.language.spec import load_spec
from attngen.testing import check_module, random_inputs
from attngen.tools.verify import import_generated

from helpers import SPEC_PATHS, assert_all_ok

INTS = st.integers(-5, 320)
DIVISORS = st.integers(-8, 70).filter(bool)  # a divisor of 0 leaves the mask undefined
# (mask, {param: strategy}): every shipped spec's mask, then masks no spec ships
SHIPPED = {s.name: s for s in map(load_spec, SPEC_PATHS)}
_DRAW = {"c": DIVISORS, "d": DIVISORS, "width": DIVISORS, "W": DIVISORS}
# (specs with tensor parameters: their masks are causal, or read the tensor; the document mask has
# its own test below)
SCALAR_SPECS = [s for s in SHIPPED.values() if all(kind in ("int", "float") for _, kind in s.params)]
CASES = [(s.mask, {n: _DRAW.get(n, INTS) for n, _ in s.params}) for s in SCALAR_SPECS] + [
    ("kv_idx * 16 + 31 <= q_idx", {}),  # compressed blocks of 16 keys, stride 16, seen once complete
    ("3 * q_idx - 5 * kv_idx >= -7 and 2 * q_idx < 7 * kv_idx + w", {"w": INTS}),
    ("q_idx // 5 >= kv_idx // 3 - w and kv_idx < 2 * q_idx", {"w": INTS}),
    ("chunked(c)", {"c": DIVISORS}),
    ("dilated(w, d)", {"w": INTS, "d": DIVISORS}),
    ("abs(q_idx // W - kv_idx // W) <= r and abs(q_idx % W - kv_idx % W) <= r", {"W": DIVISORS, "r": st.integers(-2, 8)}),
    ("prefix_lm(p)", {"p": INTS}),
    ("global_tokens(g) or sliding_window(w)", {"g": INTS, "w": INTS}),
    ("global_tokens(g) or chunked(c) or kv_idx * 4 + 3 <= q_idx", {"g": st.integers(-3, 40), "c": DIVISORS}),
    ("kv_idx - h <= q_idx and q_idx - kv_idx < w + h", {"w": INTS}),  # reads the head
    ("q_idx < q_len - w and kv_idx < kv_len - 1 and w != 3", {"w": INTS}),
    ("not (kv_idx > q_idx or q_idx - kv_idx >= w)", {"w": INTS}),
]
TILES = st.sampled_from([16, 32, 64, 128])
# attention()'s q_offset / kv_offset (query row i at position offset + i): 0, or up to well past
# the lengths drawn
OFFSETS = st.one_of(st.just(0), st.integers(0, 700))


@functools.lru_cache(maxsize=None)
def _rule_cached(mask, names):
    return rule_for(mask, tuple((n, "int") for n in names))


def _rule(mask, names):
    return _rule_cached(mask, tuple(names))


def _visible(mask, names, params, n_q, n_k, h, q_offset=0, kv_offset=0):
    """Per (query row, key row): visible, the mask read at positions offset + row (q_len, kv_len:
    offset + length), as attention(q_offset=, kv_offset=) defines them."""
    qi = torch.arange(n_q).view(-1, 1) + q_offset
    ki = torch.arange(n_k).view(1, -1) + kv_offset
    if mask in MASK_RULES:
        return torch.ones(n_q, n_k, dtype=torch.bool) if mask == "none" else (qi >= ki)
    fn = to_torch(parse_expr(mask, kind="mask", params=parse_params({n: "int" for n in names})))
    return torch.as_tensor(fn(0, h, qi, ki, q_offset + n_q, kv_offset + n_k, **params), dtype=torch.bool).expand(n_q, n_k)


def brute_tiles(vis, block_m, block_n):
    """Per tile: any visible pair, and all pairs inside Nq x Nk visible."""
    n_q, n_k = vis.shape
    tm, tn = math.ceil(n_q / block_m), math.ceil(n_k / block_n)
    pad_any = torch.zeros(tm * block_m, tn * block_n, dtype=torch.bool)
    pad_all = torch.ones(tm * block_m, tn * block_n, dtype=torch.bool)
    pad_any[:n_q, :n_k] = vis
    pad_all[:n_q, :n_k] = vis
    shape = (tm, block_m, tn, block_n)
    return pad_any.view(shape).any(3).any(1), pad_all.view(shape).all(3).all(1)


@settings(max_examples=150, deadline=None)
@given(
    case=st.sampled_from(CASES).flatmap(lambda c: st.tuples(st.just(c), st.fixed_dictionaries(c[1]))),
    n_q=st.integers(1, 300),
    n_k=st.integers(1, 300),
    block_m=TILES,
    block_n=TILES,
    h=st.integers(0, 3),
    q_offset=OFFSETS,
    kv_offset=OFFSETS,
)
@example(case=(("kv_idx * 16 + 31 <= q_idx", {}), {}), n_q=129, n_k=77, block_m=16, block_n=64, h=0, q_offset=0, kv_offset=0)
@example(case=(("chunked(c)", {"c": DIVISORS}), {"c": 5}), n_q=250, n_k=41, block_m=128, block_n=16, h=0, q_offset=0, kv_offset=0)
@example(case=(("prefix_lm(p)", {"p": INTS}), {"p": 0}), n_q=33, n_k=250, block_m=32, block_n=16, h=0, q_offset=0, kv_offset=0)
@example(case=(("causal", {}), {}), n_q=40, n_k=300, block_m=16, block_n=32, h=0, q_offset=260, kv_offset=0)
@example(case=(("chunked(c)", {"c": DIVISORS}), {"c": 24}), n_q=50, n_k=100, block_m=16, block_n=32, h=0, q_offset=613, kv_offset=517)
def test_tiles_never_skip_a_visible_pair_and_full_tiles_are_all_visible(case, n_q, n_k, block_m, block_n, h, q_offset, kv_offset):
    (mask, strategies), params = case
    rule = _rule(mask, strategies)
    vis = _visible(mask, strategies, params, n_q, n_k, h, q_offset, kv_offset)
    any_vis, all_vis = brute_tiles(vis, block_m, block_n)
    # raises on a tile visited twice
    classes = classify_tiles(rule, n_q, n_k, block_m, block_n, params, h=h, q_offset=q_offset, kv_offset=kv_offset)
    for kernel, grid in (("fwd", classes.fwd), ("dkdv", classes.dkdv)):
        cls = torch.tensor([[{"empty": 0, "partial": 1, "full": 2}[c] for c in row] for row in grid])
        where = f"{kernel} {mask} {params} offsets ({q_offset}, {kv_offset})"
        assert not (any_vis & (cls == 0)).any(), f"{where}: a skipped tile holds a visible pair"
        assert not ((cls == 2) & ~all_vis).any(), f"{where}: a tile run unmasked holds a hidden pair"
        if rule.tight:
            assert not ((cls > 0) & ~any_vis).any(), f"{where}: a visited tile is wholly masked"


@pytest.mark.parametrize("mask, params, path", [
    ("kv_idx * 16 + 31 <= q_idx", (), "closed-form tile bounds (one conjunction of affine inequalities with integer"),
    ("sliding_window(w)", (("w", "int"),), "closed-form tile bounds (one conjunction of affine inequalities)"),
    ("chunked(c)", (("c", "int"),), "closed-form tile bounds (one conjunction"),
    ("dilated(w, d)", (("w", "int"), ("d", "int")), "closed-form visited range"),
    ("prefix_lm(p)", (("p", "int"),), "closed-form tile bounds for a disjunction of 2"),
    ("global_tokens(g) or sliding_window(w)", (("g", "int"), ("w", "int")), "closed-form tile bounds for a disjunction of 3"),
    ("(q_idx * kv_idx) % 3 == 0", (), "safe path (not bounded: Mod(kv_idx*q_idx, 3) == 0)"),
    ("q_idx < 0", (), "never true"),
])
def test_paths(mask, params, path):
    assert rule_for(mask, params).path.startswith(path)


def test_tensor_reads_take_the_safe_path():
    from attngen.planning.classify import classify

    decls = parse_params({"ids": {"tensor": "int32", "dims": 2}})
    c = classify(parse_expr("document(ids)", kind="mask", params=decls).sympy)
    assert c.path.startswith("safe path") and (c.fwd.start, c.fwd.end, c.fwd.full_end) == ("0", "N_K", "0")
    c = classify(parse_expr("document(ids) and causal", kind="mask", params=decls).sympy)
    assert c.path.startswith("closed-form visited range") and c.fwd.end != "N_K" and c.fwd.full_end == "0"


_NATTEN_ROWS = "abs(q_idx // W - kv_idx // W) <= r"


@pytest.mark.parametrize("mask, params, bounded", [
    ("causal", {}, None),
    ("sliding_window(w)", {"w": 40}, None),
    ("chunked(c)", {"c": 64}, None),
    ("chunked(c)", {"c": 40}, None),
    ("prefix_lm(p)", {"p": 100}, None),
    ("kv_idx * 16 + 31 <= q_idx", {}, None),
    ("dilated(w, d)", {"w": 32, "d": 2}, "sliding_window(w)"),
    (_NATTEN_ROWS, {"W": 16, "r": 1}, None),
    (_NATTEN_ROWS + " and abs(q_idx % W - kv_idx % W) <= r", {"W": 16, "r": 1}, _NATTEN_ROWS),
])
@pytest.mark.parametrize("q_offset, kv_offset", [(0, 0), (37, 5), (5, 37), (1000, 990), (20, 300), (513, 0)])
def test_closed_forms_are_exact_on_these_masks(mask, params, bounded, q_offset, kv_offset):
    """Not vacuous: here the bounds visit exactly the tiles holding a visible pair, and run unmasked
    exactly the tiles whose pairs are all visible, with the positions shifted by runtime offsets
    too (tiles are over rows, not aligned to positions; floor division stays exact). Where a modulo
    condition remains (`bounded`: the mask without it), nothing runs unmasked and the visited tiles
    are exactly those of the bounded part (with offsets, tiles no longer align to the grid width,
    so some of them hold no pair passing the modulo condition)."""
    n, bm, bn = 256, 16, 16
    any_vis, all_vis = brute_tiles(_visible(mask, params, params, n, n, 0, q_offset, kv_offset), bm, bn)
    if bounded:
        any_vis, _ = brute_tiles(_visible(bounded, params, params, n, n, 0, q_offset, kv_offset), bm, bn)
    c = classify_tiles(_rule(mask, params), n, n, bm, bn, params, q_offset=q_offset, kv_offset=kv_offset)
    for kernel in ("fwd", "dkdv"):
        counts = c.counts(kernel)
        assert counts["visited"] == int(any_vis.sum()), kernel
        assert counts["full"] == (0 if bounded else int(all_vis.sum())), kernel


@pytest.mark.parametrize("c", [0, -1, -16])
def test_non_positive_divisor_falls_back_to_the_safe_range(c):
    """A divisor <= 0 at run time (undefined, or chunks unlike the positive case): the floor-division
    bounds give way to the causal ones and no tile runs unmasked."""
    causal = classify_tiles(MASK_RULES["causal"], 100, 100, 16, 32)
    got = classify_tiles(_rule("chunked(c)", {"c": 0}), 100, 100, 16, 32, {"c": c})
    for kernel in ("fwd", "dkdv"):
        assert got.counts(kernel)["full"] == 0
        assert got.counts(kernel)["visited"] == causal.counts(kernel)["visited"]


@pytest.mark.parametrize("mask, params", [
    ("abs(q_idx // W - kv_idx // W) <= r and abs(q_idx % W - kv_idx % W) <= r", {"W": 1000, "r": 2**30}),
    ("abs(q_idx // W - kv_idx // W) <= r", {"W": 2**30, "r": -(2**30)}),
    ("chunked(c)", {"c": 2**30}),
    ("sliding_window(w)", {"w": 2**30}),
    ("sliding_window(w)", {"w": -(2**30)}),
    ("kv_idx * 16 + 31 <= q_idx or kv_idx < g", {"g": 2**30}),
])
def test_extreme_parameters_do_not_overflow_the_bounds(mask, params):
    """Parameters at the ends of the accepted range (runtime.PARAM_INT_RANGE): the mirror wraps at
    32 bits as the kernels do, so a bound that overflowed would skip visible pairs here."""
    n_q, n_k = 200, 150
    any_vis, all_vis = brute_tiles(_visible(mask, params, params, n_q, n_k, 0), 32, 16)
    c = classify_tiles(_rule(mask, params), n_q, n_k, 32, 16, params)
    for grid in (c.fwd, c.dkdv):
        cls = torch.tensor([[{"empty": 0, "partial": 1, "full": 2}[x] for x in row] for row in grid])
        assert not (any_vis & (cls == 0)).any() and not ((cls == 2) & ~all_vis).any()


def test_tile_counts_of_expressions():
    assert tile_counts("causal", 64, 64, 16, 16) == {"full": 6, "partial": 4, "visited": 10, "total": 16}
    assert tile_counts("chunked(c)", 64, 64, 16, 16, {"c": 32}) == {"full": 2, "partial": 4, "visited": 6, "total": 16}
    # a chunk of 16 queries at position 48 over keys 0..63: three full KV tiles and the diagonal one
    assert tile_counts("causal", 16, 64, 16, 16, q_offset=48) == {"full": 3, "partial": 1, "visited": 4, "total": 4}
    # the same queries with a window of 20 keys: tiles from key 29 on, none of them whole
    assert tile_counts("sliding_window(w)", 16, 64, 16, 16, {"w": 20}, q_offset=48) == {"full": 0, "partial": 3, "visited": 3, "total": 4}


def test_mirror_uses_triton_integer_semantics_and_refuses_other_text():
    assert evaluate("-7 // 2", {}) == -3 and evaluate("-7 % 2", {}) == -1  # C truncation, as Triton
    assert evaluate("x * 4", {"x": 2**30}) == 0 and evaluate("x + 1", {"x": 2**31 - 1}) == -(2**31)  # 32 bits
    assert evaluate("tl.cdiv(x, 16)", {"x": 17}) == 2
    assert evaluate("tl.where((a < b) & (b > 0), a, b)", {"a": 1, "b": 2}) == 1
    for bad in ("__import__('os')", "x.real", "open('f')", "'a'", "[1]", "tl.load(x)", "lambda: 1", "_tdiv", "1.5"):
        with pytest.raises(ValueError):
            evaluate(bad, {"x": 1})


@pytest.mark.parametrize("name", [n for n, s in SHIPPED.items() if s.mask not in MASK_RULES])
def test_module_docstrings_name_each_kernels_path(name):
    rule = mask_rule(SHIPPED[name])
    text = (SPEC_PATHS[0].parent.parent / "generated" / f"{name}.py").read_text()
    for line in (f"mask: {rule.path}.", *rule.notes):
        assert line in text


# A generated module with a mask no shipped spec has: integer coefficients in a disjunction.
EXTRA_SPEC = """\
name: {name}
heads: {{q: 2, kv: 1}}
head_dim: 16
dtypes: [fp16]
params: {{g: int}}
mask: {mask}
tiles: {{block_m: [16], block_n: [16], num_warps: [4], num_stages: [1]}}
"""


@pytest.fixture(scope="module")
def extra_module(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classify")
    spec = tmp / "strided_blocks.yaml"
    spec.write_text(EXTRA_SPEC.format(name="strided_blocks", mask="kv_idx * 4 + 3 <= q_idx or kv_idx < g"))
    [(path, _)] = build([spec], tmp / "out")
    return import_generated(path)


@pytest.mark.kernel
@settings(max_examples=5, deadline=None)
@given(n_q=st.integers(1, 90), n_k=st.integers(1, 40), g=st.integers(-2, 20), seed=st.integers(0, 99))
@example(n_q=70, n_k=33, g=0, seed=0)
def test_integer_coefficient_disjunction_kernel_matches_reference(extra_module, n_q, n_k, g, seed):
    assert "closed-form" in extra_module.__doc__
    q, k, v = random_inputs(extra_module, batch=1, n_q=n_q, n_k=n_k, dtype=runtime.TORCH_DTYPES["fp16"], seed=seed)
    assert_all_ok(check_module(extra_module, q, k, v, seed=seed, params={"g": g}), f"Nq={n_q} Nk={n_k} g={g}")


# Random masks: affine atoms with small integer coefficients, floor division by a literal or a
# parameter, a modulo, abs, combined with and / or / not.
_OPS = st.sampled_from(["<", "<=", ">", ">=", "==", "!="])
_COEF = st.integers(-3, 3)
_ATOMS = st.one_of(
    st.builds("{} * q_idx + {} * kv_idx + {} {} s".format, _COEF, _COEF, st.integers(-40, 40), _OPS),
    st.builds("q_idx // {0} {1} kv_idx // {0} + {2}".format, st.sampled_from(["3", "16", "p"]), _OPS, st.integers(-2, 2)),
    st.builds("{} * (kv_idx // {}) <= q_idx + {}".format, st.integers(1, 5), st.sampled_from(["5", "p"]), st.integers(-9, 9)),
    st.builds("abs(q_idx - kv_idx) <= {}".format, st.sampled_from(["s", "7", "-1"])),
    st.just("(q_idx - kv_idx) % 3 == 0"),
    st.just("q_idx < s"),
)
_MASKS = st.recursive(
    _ATOMS,
    lambda inner: st.one_of(
        st.builds("({}) and ({})".format, inner, inner),
        st.builds("({}) or ({})".format, inner, inner),
        st.builds("not ({})".format, inner),
    ),
    max_leaves=4,
)


@settings(max_examples=20, deadline=None)
@given(mask=_MASKS, p=DIVISORS, s=st.integers(-20, 60), n_q=st.integers(1, 200), n_k=st.integers(1, 200),
       block_m=TILES, block_n=TILES, q_offset=OFFSETS, kv_offset=OFFSETS)
def test_random_masks_are_classified_soundly(mask, p, s, n_q, n_k, block_m, block_n, q_offset, kv_offset):
    params = {"p": p, "s": s}
    rule = _rule(mask, ("p", "s"))
    vis = _visible(mask, ("p", "s"), params, n_q, n_k, 0, q_offset, kv_offset)
    any_vis, all_vis = brute_tiles(vis, block_m, block_n)
    classes = classify_tiles(rule, n_q, n_k, block_m, block_n, params, q_offset=q_offset, kv_offset=kv_offset)
    for kernel, grid in (("fwd", classes.fwd), ("dkdv", classes.dkdv)):
        cls = torch.tensor([[{"empty": 0, "partial": 1, "full": 2}[c] for c in row] for row in grid])
        assert not (any_vis & (cls == 0)).any(), f"{kernel} {mask} {params}: a skipped tile holds a visible pair"
        assert not ((cls == 2) & ~all_vis).any(), f"{kernel} {mask} {params}: an unmasked tile holds a hidden pair"
        if rule.tight:
            assert not ((cls > 0) & ~any_vis).any(), f"{kernel} {mask} {params}: a visited tile is wholly masked"


# Random masks with int tensor reads inside inequalities, abs and min / max: a per-head window
# win[h] and a per-batch length lens[b]. The reads bound nothing; the other atoms still do.
_TENSOR_DECLS = {"win": {"tensor": "int32", "dims": 1}, "lens": {"tensor": "int64", "dims": 1}}
_TENSOR_ATOMS = st.one_of(
    st.builds("{} {} {}".format, st.sampled_from(["kv_idx", "q_idx - kv_idx", "abs(q_idx - kv_idx)", "max(q_idx, kv_idx)"]),
              _OPS, st.sampled_from(["win[h]", "lens[b]", "min(win[h], lens[b])", "win[h] + s"])),
    st.just("kv_idx < lens[b] and q_idx >= kv_idx"),
)
_TENSOR_MASKS = st.tuples(_TENSOR_ATOMS, _MASKS, st.sampled_from(["and", "or", "and not", "or not"])).map(
    lambda t: f"({t[0]}) {t[2]} ({t[1]})")


@settings(max_examples=20, deadline=None)
@given(mask=_TENSOR_MASKS, p=DIVISORS, s=st.integers(-20, 60), n_q=st.integers(1, 200), n_k=st.integers(1, 200),
       block_m=TILES, block_n=TILES, b=st.integers(0, 1), h=st.integers(0, 1), seed=st.integers(0, 2**16))
@example(mask="(kv_idx < lens[b] and q_idx >= kv_idx) and (q_idx < s)", p=1, s=10, n_q=100, n_k=100, block_m=16,
         block_n=16, b=1, h=0, seed=0)
def test_tensor_reading_masks_are_classified_soundly(mask, p, s, n_q, n_k, block_m, block_n, b, h, seed):
    """The mirror needs no tensor values (a read bounds nothing); the brute force reads them."""
    decls = parse_params({"p": "int", "s": "int", **_TENSOR_DECLS})
    e = parse_expr(mask, kind="mask", params=decls)
    g = torch.Generator().manual_seed(seed)
    tensors = {"win": torch.randint(-2, 60, (2,), generator=g, dtype=torch.int32),
               "lens": torch.randint(0, 200, (2,), generator=g)}
    scalars = {"p": p, "s": s}
    qi, ki = torch.arange(n_q).view(-1, 1), torch.arange(n_k).view(1, -1)
    vis = torch.as_tensor(to_torch(e)(b, h, qi, ki, n_q, n_k, **{n: {**scalars, **tensors}[n] for n in e.params | e.tensors}),
                          dtype=torch.bool).expand(n_q, n_k)
    rule = rule_for(mask, (("p", "int"), ("s", "int"), *_TENSOR_DECLS.items()))
    any_vis, all_vis = brute_tiles(vis, block_m, block_n)
    classes = classify_tiles(rule, n_q, n_k, block_m, block_n, scalars, b=b, h=h)
    for kernel, grid in (("fwd", classes.fwd), ("dkdv", classes.dkdv)):
        cls = torch.tensor([[{"empty": 0, "partial": 1, "full": 2}[c] for c in row] for row in grid])
        where = f"{kernel} {mask} {scalars} {tensors} b={b} h={h}"
        assert not (any_vis & (cls == 0)).any(), f"{where}: a skipped tile holds a visible pair"
        assert not ((cls == 2) & ~all_vis).any(), f"{where}: an unmasked tile holds a hidden pair"


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 200),
    docs=st.integers(1, 6),
    block_m=TILES,
    block_n=TILES,
    seed=st.integers(0, 2**16),
)
def test_document_mask_bounds_come_from_its_causal_part(n, docs, block_m, block_n, seed):
    """The shipped document spec's mask reads a tensor: the bounds use only its causal part, every
    visited tile is masked, and no tile holding a visible pair is skipped."""
    spec = SHIPPED["document"]
    decls = parse_params(dict(spec.params))
    g = torch.Generator().manual_seed(seed)
    doc = torch.sort(torch.randint(0, docs, (1, n), generator=g), dim=1).values.to(torch.int32)
    qi, ki = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    fn = to_torch(parse_expr(spec.mask, kind="mask", params=decls))
    vis = torch.as_tensor(fn(0, 0, qi, ki, n, n, doc=doc), dtype=torch.bool).expand(n, n)
    rule = mask_rule(spec)
    any_vis, _ = brute_tiles(vis, block_m, block_n)
    causal_any, _ = brute_tiles(qi >= ki, block_m, block_n)
    classes = classify_tiles(rule, n, n, block_m, block_n, {})
    for kernel, grid in (("fwd", classes.fwd), ("dkdv", classes.dkdv)):
        cls = torch.tensor([[{"empty": 0, "partial": 1, "full": 2}[c] for c in row] for row in grid])
        assert not (any_vis & (cls == 0)).any(), f"{kernel}: a skipped tile holds a visible pair"
        assert not (cls == 2).any(), f"{kernel}: a tile of a tensor-reading mask runs unmasked"
        assert ((cls > 0) == causal_any).all(), f"{kernel}: the visited tiles are not the causal ones"


# Disjunctions whose conjunctions each have exact bounds: the kernels walk the union of their
# tiles, so the visited tiles are exactly those holding a visible pair (no tile in a gap between
# the parts), each once. Parts: bands and half-planes with unit coefficients, and conditions on
# one index alone (each exact in both directions).
_PARTS = st.one_of(
    st.builds("q_idx - kv_idx >= {} and q_idx - kv_idx <= {}".format, st.integers(-60, 60), st.integers(-60, 60)),
    st.builds("abs(q_idx - kv_idx - {}) <= {}".format, st.integers(-60, 60), st.integers(-2, 20)),
    st.builds("kv_idx >= q_idx + {}".format, st.integers(-80, 80)),
    st.builds("kv_idx <= q_idx + {}".format, st.integers(-80, 80)),
    st.builds("{} {} {}".format, st.sampled_from(["q_idx", "kv_idx"]), st.sampled_from(["<", ">="]), st.integers(-5, 200)),
)
_DISJ_SHIPPED = [("global_tokens(g) or sliding_window(w)", {"g": st.integers(-3, 90), "w": INTS}),
                 ("prefix_lm(p)", {"p": INTS})]
_DISJ = st.one_of(
    st.sampled_from(_DISJ_SHIPPED).flatmap(lambda c: st.tuples(st.just(c[0]), st.fixed_dictionaries(c[1]))),
    st.tuples(st.builds("({}) or ({})".format, _PARTS, _PARTS), st.just({})),
    st.tuples(st.builds("({}) or ({}) or ({})".format, _PARTS, _PARTS, _PARTS), st.just({})),
)


def _classes(grid):
    return torch.tensor([[{"empty": 0, "partial": 1, "full": 2}[c] for c in row] for row in grid])


@settings(max_examples=50, deadline=None)
@given(case=_DISJ, n_q=st.integers(1, 300), n_k=st.integers(1, 300), block_m=TILES, block_n=TILES,
       q_offset=OFFSETS, kv_offset=OFFSETS)
@example(case=("kv_idx < g or q_idx < g or abs(q_idx - kv_idx) <= w", {"g": 4, "w": 6}), n_q=160, n_k=160,
         block_m=32, block_n=16, q_offset=0, kv_offset=0)
@example(case=("(abs(q_idx - kv_idx - 40) <= 3) or (abs(q_idx - kv_idx + 30) <= 2) or (kv_idx >= q_idx + 70)", {}),
         n_q=200, n_k=200, block_m=16, block_n=16, q_offset=0, kv_offset=0)
def test_disjunctions_visit_exactly_the_tiles_with_a_visible_pair(case, n_q, n_k, block_m, block_n, q_offset, kv_offset):
    mask, params = case
    rule = _rule(mask, tuple(params))
    assert rule.tight, mask  # every part's bounds are exact, and so is the walk of their union
    vis = _visible(mask, tuple(params), params, n_q, n_k, 0, q_offset, kv_offset)
    any_vis, all_vis = brute_tiles(vis, block_m, block_n)
    # raises on a tile visited twice or outside the sequences
    c = classify_tiles(rule, n_q, n_k, block_m, block_n, params, q_offset=q_offset, kv_offset=kv_offset)
    for kernel, grid in (("fwd", c.fwd), ("dkdv", c.dkdv)):
        cls = _classes(grid)
        where = f"{kernel} {mask} {params} offsets ({q_offset}, {kv_offset})"
        assert ((cls > 0) == any_vis).all(), f"{where}: visited tiles are not those holding a visible pair"
        assert not ((cls == 2) & ~all_vis).any(), f"{where}: a tile run unmasked holds a hidden pair"


def test_global_tokens_and_window_tile_counts():
    """The measured case: 29 of the 50 tiles hold a visible pair; the hull of the parts' ranges
    visited 41 (forward) and 38 (dK/dV)."""
    mask = "kv_idx < 4 or q_idx < 4 or abs(q_idx - kv_idx) <= 6"
    any_vis, _ = brute_tiles(_visible(mask, (), {}, 160, 160, 0), 32, 16)
    assert int(any_vis.sum()) == 29
    c = classify_tiles(rule_for(mask), 160, 160, 32, 16)
    assert c.counts("fwd")["visited"] == c.counts("dkdv")["visited"] == 29


@pytest.mark.parametrize("g, w, q_offset", [(64, 8, 0), (16, 200, 0), (40, 40, 100), (0, 50, 0), (300, 4, 0)])
def test_global_window_keeps_its_full_tiles(g, w, q_offset):
    """The longer of the global columns' and the window's full ranges still runs unmasked: with
    tiles of 16 and g or w a few tiles wide, some tile of every query tile past the first runs
    unmasked, and none of those holds a hidden pair."""
    mask, params = "global_tokens(g) or sliding_window(w)", {"g": g, "w": w}
    n = 256
    any_vis, all_vis = brute_tiles(_visible(mask, ("g", "w"), params, n, n, 0, q_offset), 16, 16)
    c = classify_tiles(_rule(mask, ("g", "w")), n, n, 16, 16, params, q_offset=q_offset)
    for grid in (c.fwd, c.dkdv):
        cls = _classes(grid)
        assert ((cls > 0) == any_vis).all() and not ((cls == 2) & ~all_vis).any()
        assert (cls == 2).sum() > 0
    if min(g, w) >= 32 or g >= n:
        assert ((_classes(c.fwd) == 2).any(1)[2:]).all()


@pytest.mark.parametrize("mask, params", [
    ("(abs(q_idx - kv_idx - 40) <= 3) or (abs(q_idx - kv_idx + 30) <= 2) or (kv_idx >= q_idx + 70)", ()),
    ("global_tokens(g) or sliding_window(w)", (("g", "int"), ("w", "int"))),
])
def test_disjunction_statements_sort_and_walk_in_one_loop(mask, params):
    """What the kernels print for a disjunction with ranges whose order is known only at run time:
    compare-and-swap statements, one masked loop computing its tile start, one full loop."""
    from attngen.planning.masks import tile_loops

    rule = rule_for(mask, params)
    for kernel, var in (("fwd", "part_n"), ("dkdv", "part_m")):
        loops = tile_loops(rule, kernel)
        assert [x.masked for x in loops] == [True, False] and loops[0].var == var
        b = rule.fwd if kernel == "fwd" else rule.dkdv
        assert any("sw" in name for name, _ in b.walk) == (len(b.pieces) > 2)


@pytest.fixture(scope="module")
def sorted_parts_module(tmp_path_factory):
    """Two bands whose order is known only at run time, and the first g keys: the kernels sort the
    bands' ranges (compare-and-swap statements) and walk the three parts' tiles in one loop."""
    tmp = tmp_path_factory.mktemp("classify_sorted")
    spec = tmp / "two_bands.yaml"
    spec.write_text(EXTRA_SPEC.format(name="two_bands", mask="abs(q_idx - kv_idx - 20) <= 3 or abs(q_idx - kv_idx + 9) <= 2 or kv_idx < g"))
    [(path, _)] = build([spec], tmp / "out")
    return import_generated(path)


@pytest.mark.kernel
@settings(max_examples=4, deadline=None)
@given(n_q=st.integers(1, 80), n_k=st.integers(1, 80), g=st.integers(-2, 40), seed=st.integers(0, 99))
@example(n_q=70, n_k=61, g=5, seed=0)
def test_sorted_disjunction_kernel_matches_reference(sorted_parts_module, n_q, n_k, g, seed):
    mod = sorted_parts_module
    assert "part_n" in inspect.getsource(mod) and "t_sw" in inspect.getsource(mod)
    q, k, v = random_inputs(mod, batch=1, n_q=n_q, n_k=n_k, dtype=runtime.TORCH_DTYPES["fp16"], seed=seed)
    assert_all_ok(check_module(mod, q, k, v, seed=seed, params={"g": g}), f"Nq={n_q} Nk={n_k} g={g}")


def test_many_unordered_parts_walk_their_hull_soundly():
    """Past MAX_SORTED ranges of unknown order, their hull is walked as one range: still each tile
    once and no visible pair skipped, but no longer exact (rule.tight is False)."""
    from attngen.planning.classify import MAX_SORTED

    mask = " or ".join(f"abs(q_idx - kv_idx - {d}) <= 1" for d in range(-60, 61, 120 // MAX_SORTED))
    rule = rule_for(mask)
    assert not rule.tight and "walked whole" in rule.fwd.note
    for q_offset in (0, 37):
        any_vis, all_vis = brute_tiles(_visible(mask, (), {}, 150, 170, 0, q_offset), 16, 32)
        c = classify_tiles(rule, 150, 170, 16, 32, q_offset=q_offset)
        for grid in (c.fwd, c.dkdv):
            cls = _classes(grid)
            assert not (any_vis & (cls == 0)).any() and not ((cls == 2) & ~all_vis).any()
