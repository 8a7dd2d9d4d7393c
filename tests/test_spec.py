"""Spec validation: every kind of bad spec is rejected with FILE:LINE naming the key."""

import pytest

from attngen.language.spec import DEFAULT_TILES, SpecError, parse_spec

GOOD = """\
name: demo
heads: {q: 8, kv: 2}
head_dim: 64
dtypes: [fp16, bf16]
mask: causal
"""


def error_of(text: str) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(text, "demo.yaml")
    return str(info.value)


def test_good_spec_parses_with_defaults():
    s = parse_spec(GOOD, "demo.yaml")
    assert (s.name, s.q_heads, s.kv_heads, s.group, s.grouping) == ("demo", 8, 2, 4, "GQA")
    assert s.v_head_dim == s.head_dim == 64
    assert s.dtypes == ("fp16", "bf16") and s.mask == "causal" and s.backward is True
    assert s.tiles.block_m == DEFAULT_TILES["block_m"]


def test_spec_is_frozen():
    s = parse_spec(GOOD, "demo.yaml")
    with pytest.raises(AttributeError):
        s.head_dim = 128


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD + "extra: 1\n", "demo.yaml:6: extra: unknown key"),
        (GOOD.replace("{q: 8, kv: 2}", "{q: 8, kv: 3}"), "demo.yaml:2: heads.kv: 3 does not divide heads.q = 8"),
        (GOOD.replace("{q: 8, kv: 2}", "{q: 8}"), "demo.yaml:2: heads.kv: required key is missing"),
        (GOOD.replace("{q: 8, kv: 2}", "{q: 0, kv: 1}"), "demo.yaml:2: heads.q: 0 is out of range"),
        (GOOD.replace("{q: 8, kv: 2}", "{q: 8, kv: 2, x: 1}"), "demo.yaml:2: heads.x: unknown key"),
        (GOOD.replace("head_dim: 64", "head_dim: 60"), "demo.yaml:3: head_dim: 60 is not a multiple of 8"),
        (GOOD.replace("head_dim: 64", "head_dim: 512"), "demo.yaml:3: head_dim: 512 is out of range"),
        (GOOD.replace("head_dim: 64", "head_dim: '64'"), "demo.yaml:3: head_dim: expected an integer, got a string"),
        (GOOD.replace("head_dim: 64", "head_dim: true"), "demo.yaml:3: head_dim: expected an integer, got a boolean"),
        (GOOD + "v_head_dim: 12\n", "demo.yaml:6: v_head_dim: 12 is out of range"),
        (GOOD.replace("[fp16, bf16]", "[fp16, fp8]"), "demo.yaml:4: dtypes: a string ('fp8') is not one of"),
        (GOOD.replace("[fp16, bf16]", "[fp16, fp16]"), "demo.yaml:4: dtypes: fp16 is listed twice"),
        (GOOD.replace("[fp16, bf16]", "[]"), "demo.yaml:4: dtypes: expected at least one"),
        (GOOD.replace("mask: causal", "mask: sliding"), "demo.yaml:5: mask: unknown name 'sliding'"),
        (GOOD.replace("name: demo", "name: 1st-module"), "demo.yaml:1: name: '1st-module' is not a valid Python module name"),
        (GOOD.replace("name: demo", "name: class"), "demo.yaml:1: name: 'class' is not a valid Python module name"),
        (GOOD.replace("name: demo", "name: _private"), "demo.yaml:1: name: '_private' must not start with an underscore"),
        (GOOD.replace("name: demo\n", ""), "demo.yaml:1: name: required key is missing"),
        (GOOD + "tiles: {block_m: 48}\n", "demo.yaml:6: tiles.block_m: 48 is not a power of two"),
        (GOOD + "tiles: {block_n: [32, 512]}\n", "demo.yaml:6: tiles.block_n[1]: 512 is out of range"),
        (GOOD + "tiles: {num_warps: 3}\n", "demo.yaml:6: tiles.num_warps: 3 is not one of 1, 2, 4, 8, 16"),
        (GOOD + "tiles: {num_stages: [2, 2]}\n", "demo.yaml:6: tiles.num_stages: 2 is listed twice"),
        (GOOD + "tiles: {blockm: 64}\n", "demo.yaml:6: tiles.blockm: unknown key"),
        (GOOD + "tiles: 64\n", "demo.yaml:6: tiles: expected a mapping"),
        (GOOD + "backward: 'no'\n", "demo.yaml:6: backward: expected true or false"),
        (GOOD + "mask: none\n", "demo.yaml:6: mask: duplicate key (first on line 5)"),
        (GOOD + "description: [a]\n", "demo.yaml:6: description: expected a string"),
        ("- 1\n- 2\n", "demo.yaml:1: spec: expected a mapping, got a list"),
        ("", "demo.yaml:1: spec is empty"),
        ("name: [demo\n", "demo.yaml:2: invalid YAML"),
        ("name: &n demo\nother: *n\n", "demo.yaml:1: YAML anchors are not allowed"),
        ("name: !!python/object/apply:os.system ['true']\n", "demo.yaml:1: YAML tag '!!python/object/apply:os.system' is not allowed"),
        ("name: !custom demo\n", "demo.yaml:1: YAML tag '!custom' is not allowed"),
        ("head_dim: 1" + "0" * 5000 + "\n", "demo.yaml:1: invalid YAML value"),
        ("a:\n" + "".join("  " * i + f"b{i}:\n" for i in range(1, 12)), "nested too deeply"),
        ("name: x\n" * 1 + "#" * 70000, "larger than"),
    ],
)
def test_bad_spec_is_rejected_with_location(text, expected):
    assert expected in error_of(text)


def test_all_problems_are_reported_in_line_order():
    text = GOOD.replace("head_dim: 64", "head_dim: 60").replace("mask: causal", "mask: x") + "zzz: 1\n"
    lines = error_of(text).splitlines()
    assert [ln.split(":")[1] for ln in lines] == ["3", "5", "6"]


def test_expression_mask_and_params_parse():
    s = parse_spec(GOOD.replace("mask: causal", "params: {w: int, t: float}\nmask: sliding_window(w)\nscore_mod: softcap(t)"), "demo.yaml")
    assert s.mask == "sliding_window(w)" and s.params == (("w", "int"), ("t", "float")) and s.score_mod == "softcap(t)"
    hash(s)  # frozen and hashable


def test_tensor_params_and_score_mod_parse():
    tail = "params:\n  doc: {tensor: int32, dims: 2}\n  rb: {tensor: fp32, dims: 2}\nmask: document(doc) and causal\nscore_mod: score + rb[h, q_idx - kv_idx]\n"
    s = parse_spec(GOOD.replace("mask: causal\n", tail), "demo.yaml")
    assert [(n, dict(k)) for n, k in s.params] == [("doc", {"tensor": "int32", "dims": 2}), ("rb", {"tensor": "fp32", "dims": 2})]
    assert s.score_mod == "score + rb[h, q_idx - kv_idx]"
    hash(s)


@pytest.mark.parametrize(
    "tail, expected",
    [
        ("mask: sliding_window(w)\n", "demo.yaml:5: mask: unknown name 'w'"),
        ("params: {w: int}\nmask: sliding_window(w\n", "demo.yaml:6: mask: invalid syntax"),
        ("params: {w: int}\nmask: q_idx + w\n", "demo.yaml:6: mask: a mask must be a boolean expression"),
        ("params: {w: int}\nmask: __import__('os')\n", "demo.yaml:6: mask:"),
        ("mask: [causal]\n", "demo.yaml:5: mask: expected an expression"),
        ("params:\n  w: int\n  d: {tensor: int32, dims: 2}\nmask: sliding_window(w)\n", "demo.yaml:7: params.d: declared but read by neither mask nor score_mod"),
        ("params:\n  w: int\nmask: causal\n", "demo.yaml:6: params.w: declared but read by neither mask nor score_mod"),
        ("params:\n  d: {tensor: int8, dims: 2}\nmask: document(d)\n", "demo.yaml:6: params.d: tensor dtype 'int8' is not one of"),
        ("params:\n  d: {tensor: int32, dims: 5}\nmask: document(d)\n", "demo.yaml:6: params.d: dims must be an integer in [1, 4]"),
        ("params:\n  d: {tensor: int32}\nmask: document(d)\n", "demo.yaml:6: params.d: a tensor is declared as {tensor: DTYPE, dims: N}"),
        ("params:\n  d: {tensor: fp32, dims: 1}\nmask: d[q_idx] > 0\n", "demo.yaml:7: mask: tensor parameter 'd' is fp32; a mask reads int32 / int64 tensors"),
        ("params:\n  d: {tensor: fp32, dims: 2}\nmask: document(d)\n", "demo.yaml:7: mask: document(): argument 'ids' must name a declared 2-dim int tensor"),
        # a tensor read inside an inequality with no such tensor declared
        ("mask: kv_idx < lens[b] and q_idx >= kv_idx\n", "demo.yaml:5: mask: unknown name 'lens'"),
        ("params:\n  win: int\nmask: abs(q_idx - kv_idx) <= win[h]\n", "demo.yaml:7: mask: only declared tensor parameters can be indexed: win[h]"),
        ("params:\n  rb: {tensor: fp32, dims: 1}\nmask: causal\nscore_mod: score + rb[q_idx] + rb[kv_idx]\n", "demo.yaml:8: score_mod: tensor 'rb' is read at 2 different indices"),
        ("params:\n  c: float\nmask: causal\nscore_mod: score > c\n", "demo.yaml:8: score_mod: a score_mod must be a number, got a boolean"),
        ("mask: causal\nscore_mod: [score]\n", "demo.yaml:6: score_mod: expected an expression over score"),
        ("mask: causal\nscore_mod: score + bias\n", "demo.yaml:6: score_mod: unknown name 'bias'"),
        ("mask: score > 0\n", "demo.yaml:5: mask:"),
        ("params:\n  w: int\n  x: str\nmask: causal\n", "demo.yaml:7: params.x: expected 'int', 'float'"),
        ("params:\n  causal: int\nmask: causal\n", "demo.yaml:6: params.causal: 'causal' is reserved"),
        ("params:\n  scale: float\nmask: causal\n", "demo.yaml:6: params.scale: a parameter name starts with a lower-case letter"),
        ("params:\n  W: int\nmask: causal\n", "demo.yaml:6: params.W: a parameter name starts with a lower-case letter"),
        ("params: [w]\nmask: causal\n", "demo.yaml:5: params: expected a mapping"),
    ],
)
def test_bad_mask_expressions_and_params_are_located(tail, expected):
    assert expected in error_of(GOOD.replace("mask: causal\n", tail))


NSA = GOOD.replace("mask: causal\n", "") + """\
sparse:
  kind: nsa
  compress: {block: 32, stride: 16, method: mlp}
  select: {block: 64, top_n: 16, initial: 1, local: 2, score: probs, per: token}
  window: 512
"""


def test_sparse_section_parses():
    s = parse_spec(NSA, "demo.yaml")
    sp = s.sparse
    assert (sp.kind, sp.block, sp.stride, sp.method) == ("nsa", 32, 16, "mlp")
    assert (sp.select_block, sp.top_n, sp.initial, sp.local, sp.score, sp.per, sp.window) == (64, 16, 1, 2, "probs", "token", 512)
    assert s.mask == "causal" and parse_spec(GOOD, "demo.yaml").sparse is None
    hash(s)


def test_sparse_defaults_and_no_window():
    text = NSA.replace(", method: mlp", "").replace(", initial: 1, local: 2, score: probs, per: token", "")
    sp = parse_spec(text.replace("  window: 512\n", ""), "demo.yaml").sparse
    assert (sp.method, sp.initial, sp.local, sp.score, sp.per, sp.window) == ("mean", 1, 2, "probs", "token", 0)
    assert parse_spec(NSA.replace("window: 512", "window: 0"), "demo.yaml").sparse.window == 0
    assert parse_spec(NSA.replace("window: 512", "window: null"), "demo.yaml").sparse.window == 0
    # a causal mask may be written out; the value head dim may differ
    assert parse_spec(NSA + "mask: causal\nv_head_dim: 32\n", "demo.yaml").v_head_dim == 32


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("kind: nsa", "kind: moba", "demo.yaml:6: sparse.kind: a string ('moba') is not one of nsa"),
        ("  kind: nsa\n", "", "demo.yaml:6: sparse.kind: required key is missing"),
        ("  window: 512\n", "  window: 512\n  extra: 1\n", "demo.yaml:10: sparse.extra: unknown key"),
        ("  compress: {block: 32, stride: 16, method: mlp}\n", "", "demo.yaml:6: sparse.compress: required key is missing"),
        ("compress: {block: 32, stride: 16, method: mlp}", "compress: 32", "demo.yaml:7: sparse.compress: expected a mapping"),
        ("block: 32, stride: 16,", "block: 32,", "demo.yaml:7: sparse.compress.stride: required key is missing"),
        ("block: 32, stride", "block: 0, stride", "demo.yaml:7: sparse.compress.block: 0 is out of range"),
        ("block: 32, stride", "block: '32', stride", "demo.yaml:7: sparse.compress.block: expected an integer, got a string"),
        ("stride: 16,", "stride: 12,", "demo.yaml:7: sparse.compress.stride: 12 does not divide compress.block 32"),
        ("stride: 16,", "stride: 0,", "demo.yaml:7: sparse.compress.stride: 0 is out of range"),
        ("method: mlp", "method: linear", "demo.yaml:7: sparse.compress.method: a string ('linear') is not one of mean, weighted, mlp"),
        ("select: {block: 64", "select: {block: 40", "demo.yaml:8: sparse.select.block: 40 is not a multiple of compress.stride 16"),
        ("select: {block: 64", "select: {block: -64", "demo.yaml:8: sparse.select.block: -64 is out of range"),
        ("top_n: 16", "top_n: 0", "demo.yaml:8: sparse.select.top_n: 0 is out of range"),
        ("top_n: 16", "top_n: 2", "demo.yaml:8: sparse.select: initial + local = 1 + 2 forced blocks exceed top_n 2"),
        ("top_n: 16, ", "", "demo.yaml:8: sparse.select.top_n: required key is missing"),
        ("initial: 1", "initial: -1", "demo.yaml:8: sparse.select.initial: -1 is out of range"),
        ("local: 2", "local: 1.5", "demo.yaml:8: sparse.select.local: expected an integer, got a number"),
        ("score: probs", "score: max", "demo.yaml:8: sparse.select.score: a string ('max') is not one of probs, dot, cosine"),
        ("per: token", "per: head", "demo.yaml:8: sparse.select.per: a string ('head') is not one of token, block"),
        ("per: token", "per: token, n: 2", "demo.yaml:8: sparse.select.n: unknown key"),
        ("window: 512", "window: -1", "demo.yaml:9: sparse.window: -1 is out of range"),
        ("window: 512", "window: [512]", "demo.yaml:9: sparse.window: expected an integer, got a list"),
        ("{q: 8, kv: 2}", "{q: 66, kv: 2}", "demo.yaml:2: heads: 33 query heads per KV head; a spec with sparse: allows at most 32"),
        ("{q: 8, kv: 2}", "{q: 8, kv: 3}", "demo.yaml:2: heads.kv: 3 does not divide heads.q = 8"),
    ],
)
def test_bad_sparse_section_is_located(old, new, expected):
    assert old in NSA
    assert expected in error_of(NSA.replace(old, new))


@pytest.mark.parametrize(
    "tail, expected",
    [
        ("mask: none\n", "demo.yaml:10: mask: a spec with sparse: is causal; leave mask out or write mask: causal"),
        ("mask: sliding_window(4)\n", "demo.yaml:10: mask: a spec with sparse: is causal"),
        ("params: {w: int}\n", "demo.yaml:10: params: not supported in a spec with sparse:"),
        ("", "demo.yaml:5: sparse: expected a mapping, got a string ('nsa')"),
    ],
)
def test_sparse_spec_rejects_other_masks_and_params(tail, expected):
    text = NSA + tail if tail else NSA[: NSA.index("sparse:")] + "sparse: nsa\n"
    assert expected in error_of(text)


def test_torch_dtype_spellings_read_as_the_short_names():
    # torch's names for the floating dtypes are accepted wherever a spec names a dtype, and a spec
    # written with them is the same spec as one written with the short names
    tail = "params:\n  rb: {tensor: float32, dims: 2}\nmask: causal\nscore_mod: score + rb[h, q_idx - kv_idx]\n"
    torch_names = GOOD.replace("[fp16, bf16]", "[float16, bfloat16, float32]").replace("mask: causal\n", tail)
    short_names = GOOD.replace("[fp16, bf16]", "[fp16, bf16, fp32]").replace("mask: causal\n", tail.replace("float32", "fp32"))
    a, b = parse_spec(torch_names, "demo.yaml"), parse_spec(short_names, "demo.yaml")
    assert a.dtypes == ("fp16", "bf16", "fp32") and dict(a.params[0][1])["tensor"] == "fp32"
    assert a == b


@pytest.mark.parametrize(
    "dtypes, expected",
    [
        ("[fp16, float16]", "demo.yaml:4: dtypes: float16 is fp16, listed twice"),
        ("[float64]", "demo.yaml:4: dtypes: a string ('float64') is not one of fp16, bf16, fp32 (or torch's float16, bfloat16, float32)"),
    ],
)
def test_dtype_spellings_are_checked(dtypes, expected):
    assert expected in error_of(GOOD.replace("[fp16, bf16]", dtypes))
