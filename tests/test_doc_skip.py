"""Runtime tile skipping for masks with a `T[b, q_idx] == T[b, kv_idx]` conjunct (packed documents):
which masks get it, the skip decision against brute-force visibility, the kernels' own skips
(observed through NaN values that reach an output only from a visited tile), and forward and
backward against the float64 reference on many short, unsorted and extreme document ids."""

import pytest
import torch

from attngen import runtime
from attngen.planning.classify import classify_tiles, id_equality
from attngen.language.expr import parse_expr, parse_params
from attngen.planning.plan import make_plan
from mirror import rule_for
from attngen.language.spec import load_spec
from attngen.testing import check_module, random_inputs

from helpers import SPEC_PATHS, assert_all_ok, build_and_import, dense_spec, generated

I32_MIN, I32_MAX = -(2**31), 2**31 - 1


@pytest.mark.parametrize(
    "mask, found",
    [
        ("document(doc)", "doc"),
        ("document(doc) and causal", "doc"),
        ("causal and doc[b, kv_idx] == doc[b, q_idx]", "doc"),  # sides swapped
        ("document(doc) and sliding_window(4) and kv_idx < 9", "doc"),
        ("document(doc) or kv_idx < 2", None),  # a disjunction does not imply the equality
        ("not document(doc)", None),
        ("doc[b, q_idx] <= doc[b, kv_idx] and causal", None),
        ("doc[0, q_idx] == doc[0, kv_idx]", None),  # not per batch row
        ("doc[b, q_idx] == doc[b, kv_idx + 1]", None),
        ("doc[b, q_idx] == other[b, kv_idx]", None),
        ("causal", None),
    ],
)
def test_id_equality_recognised_only_where_the_mask_implies_it(mask, found):
    decls = parse_params({"doc": {"tensor": "int32", "dims": 2}, "other": {"tensor": "int32", "dims": 2}})
    assert id_equality(parse_expr(mask, kind="mask", params=decls).sympy) == found


def test_only_masks_with_the_equality_generate_the_skip():
    for path in SPEC_PATHS:
        spec = load_spec(path)
        if spec.sparse is not None:
            continue
        plan = make_plan(spec)
        text = (path.parent.parent / "generated" / f"{spec.name}.py").read_text()
        assert (plan.id_skip is not None) == (spec.name == "document"), spec.name
        assert ("_id_range" in text) == (spec.name == "document"), spec.name
        assert ("runtime tile skip" in text) == (spec.name == "document"), spec.name


# --------------------------------------------------------------------------- the decision


def _effective(ids, batch, n):
    """Position (b, i)'s id as the kernels read it: ids[b, i], 0 outside the tensor."""
    out = torch.zeros(batch, n, dtype=torch.int64)
    rows, cols = min(batch, ids.shape[0]), min(n, ids.shape[1])
    out[:rows, :cols] = ids[:rows, :cols].long()
    return out


def _skips(ids, batch, n_q, n_k, bm, bn):
    """The kernels' skip decision per (batch, query tile, KV tile), mirrored from the same
    runtime.id_ranges arrays: a tile's range is the min / max over its 16-position entries."""
    def tiles(n, block):
        lo, hi = runtime.id_ranges(ids, batch, n)
        t, c = -(-n // block), block // runtime.ID_CHUNK
        return lo[:, : t * c].view(batch, t, c).amin(-1), hi[:, : t * c].view(batch, t, c).amax(-1)

    (q_lo, q_hi), (k_lo, k_hi) = tiles(n_q, bm), tiles(n_k, bn)
    return (k_lo[:, None, :] > q_hi[:, :, None]) | (k_hi[:, None, :] < q_lo[:, :, None])


def _brute(ids, batch, n_q, n_k, bm, bn):
    """Per (batch, query tile, KV tile): some pair has equal ids; some pair is visible under
    `document(doc) and causal`; the tiles' true id ranges (over their real positions) are disjoint."""
    eq_q, eq_k = _effective(ids, batch, n_q), _effective(ids, batch, n_k)
    tm, tn = -(-n_q // bm), -(-n_k // bn)
    same = torch.zeros(batch, tm, tn, dtype=torch.bool)
    visible = torch.zeros_like(same)
    disjoint = torch.zeros_like(same)
    for i in range(tm):
        qs = slice(i * bm, min(n_q, i * bm + bm))
        for j in range(tn):
            ks = slice(j * bn, min(n_k, j * bn + bn))
            eq = eq_q[:, qs, None] == eq_k[:, None, ks]
            causal = torch.arange(qs.start, qs.stop)[:, None] >= torch.arange(ks.start, ks.stop)[None, :]
            same[:, i, j] = eq.flatten(1).any(1)
            visible[:, i, j] = (eq & causal).flatten(1).any(1)
            disjoint[:, i, j] = (eq_k[:, ks].amin(1) > eq_q[:, qs].amax(1)) | (eq_k[:, ks].amax(1) < eq_q[:, qs].amin(1))
    return same, visible, disjoint


def _sorted_docs(batch, n, lengths, seed):
    """Sorted ids: documents of random lengths in `lengths`, numbered from a random start per row."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        sizes = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=g)
        row = torch.repeat_interleave(torch.arange(n), sizes)[:n]
        rows.append(row + int(torch.randint(-5, 5, (1,), generator=g)))
    return torch.stack(rows).to(torch.int32)


def _id_cases():
    g = torch.Generator().manual_seed(7)
    extreme = _sorted_docs(2, 140, (3, 20), 3)
    extreme[0, :9] = -1
    extreme[0, 60:] = I32_MAX
    extreme[1, 100:] = I32_MIN
    return {
        "many short sorted": (_sorted_docs(2, 200, (4, 12), 1), 2, 200, 200),
        "random unsorted": (torch.randint(0, 4, (2, 90), generator=g, dtype=torch.int32), 2, 90, 77),
        "unsorted, long runs": (_sorted_docs(1, 150, (10, 30), 2).flip(1).contiguous(), 1, 150, 150),
        "-1 and int32 extremes": (extreme, 2, 140, 131),
        "tensor shorter than the sequence, one row": (_sorted_docs(1, 50, (5, 9), 4), 3, 100, 100),
        "int64 beyond 32 bits": (torch.tensor([[-(2**40)] * 30 + [2**40] * 40 + [-1] * 33]), 1, 103, 103),
    }


@pytest.mark.parametrize("case", list(_id_cases()))
@pytest.mark.parametrize("bm, bn", [(16, 16), (32, 64), (128, 32), (64, 128), (256, 16)])
def test_skip_is_sound_and_skips_every_disjoint_tile(case, bm, bn):
    ids, batch, n_q, n_k = _id_cases()[case]
    skip = _skips(ids, batch, n_q, n_k, bm, bn)
    same, visible, disjoint = _brute(ids, batch, n_q, n_k, bm, bn)
    assert not (skip & same).any(), "a tile with a pair of equal ids is skipped"
    assert not (skip & visible).any()
    assert torch.equal(skip, disjoint), "the ranges from id_ranges differ from the tiles' true ranges"


@pytest.mark.parametrize("offset", [0, 5, 37, 130])
def test_id_ranges_read_the_ids_at_positions(offset):
    """With an offset, row i of a side reads ids[b, offset + i] (0 past the tensor): each entry is
    the [min, max] over its 16 rows, rows past n repeating row n - 1."""
    ids, batch, n = _sorted_docs(2, 150, (3, 9), 5), 3, 70
    lo, hi = runtime.id_ranges(ids, batch, n, offset)
    at = _effective(ids, batch, offset + n)[:, offset:]  # [batch, n]: row i's id
    for c in range(lo.shape[1]):
        rows = torch.arange(c * runtime.ID_CHUNK, (c + 1) * runtime.ID_CHUNK).clamp(max=n - 1)
        assert torch.equal(lo[:, c].long(), at[:, rows].amin(1)) and torch.equal(hi[:, c].long(), at[:, rows].amax(1)), c


def test_many_short_documents_skip_most_causal_tiles():
    ids, batch, n_q, n_k = _id_cases()["many short sorted"]
    skip = _skips(ids, batch, n_q, n_k, 16, 16)
    tm = -(-n_q // 16)
    causal = torch.ones(tm, tm, dtype=torch.bool).tril()  # the tiles the causal bounds visit
    skipped = (skip & causal).sum().item() / (batch * causal.sum().item())
    assert skipped > 0.7, skipped


# --------------------------------------------------------------------------- the kernels' skips


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A module with 32 x 64 tiles (several 16-position entries per tile), int64 ids, the sides swapped."""
    return build_and_import(tmp_path_factory.mktemp("doc_wide"), dense_spec(
        "doc_wide", q=2, kv=1, d=16, dtypes="[fp32]", mask="doc[b, kv_idx] == doc[b, q_idx] and q_idx >= kv_idx",
        tiles={"block_m": 32, "block_n": 64, "num_warps": 4, "num_stages": 2},
        extra="params: {doc: {tensor: int64, dims: 2}}\n",
    ))


def _visits(mod, ids, batch, n_q, n_k):
    """The tiles the kernels run, from the build-time bounds (classify_tiles) and the skip mirror,
    at the first config of each kernel's space (what the interpreter runs): ([B, query tile, KV
    tile] of the forward / dQ, their (BLOCK_M, BLOCK_N)), and the same for dK/dV (whose first
    config may have other tiles)."""
    out = []
    for kernels in (("_fwd_kernel", "_bwd_dq_kernel"), ("_bwd_dkdv_kernel",)):
        tiles = {(mod._SPACES[k][0]["block_m"], mod._SPACES[k][0]["block_n"]) for k in kernels}
        assert len(tiles) == 1, tiles  # the forward and dQ share a grid of tiles here
        [(bm, bn)] = tiles
        grid = classify_tiles(rule_for(mod.MASK, mod.PARAMS), n_q, n_k, bm, bn)
        run = ~_skips(ids, batch, n_q, n_k, bm, bn)
        rows = grid.fwd if kernels[0] == "_fwd_kernel" else grid.dkdv
        out.append((torch.tensor([[x != "empty" for x in row] for row in rows]) & run, bm, bn))
    return out


def _tile_rows(per_tile, block, n):
    """[B, tiles] -> [B, n]: each position gets its tile's value."""
    return per_tile.repeat_interleave(block, dim=1)[:, :n]


@pytest.mark.kernel
@pytest.mark.parametrize("which", ["document", "wide"])
def test_kernels_skip_exactly_the_mirrored_tiles(which, wide):
    """NaN in V at one document's keys reaches o and dq only through a visited KV tile that holds
    such a key (0 * NaN in p @ v), and NaN in dO at one document's queries reaches dV only through
    a visited query tile: the NaN pattern of each output must be the mirrored visits exactly."""
    mod = generated("document") if which == "document" else wide
    batch, n_q, n_k = 2, 150, 137
    ids = _sorted_docs(batch, 150, (18, 30), 11)
    ids[1, 40:] += 1000  # a jump in the ids
    if which == "wide":
        ids = ids.long() * 2**33
    (fwd, bm, bn), (dkdv, bm2, bn2) = _visits(mod, ids, batch, n_q, n_k)
    eff_q, eff_k = _effective(ids, batch, n_q), _effective(ids, batch, n_k)
    dtype = runtime.TORCH_DTYPES[mod.DTYPES[0]]
    q, k, v = random_inputs(mod, batch=batch, n_q=n_q, n_k=n_k, dtype=dtype, seed=4)
    tn = -(-n_k // bn)

    # -- V NaN at the keys of each row's first document
    nan_k = eff_k == eff_k[:, :1]
    v = v.masked_fill(nan_k[:, None, :, None], float("nan"))
    nan_k_tile = torch.nn.functional.pad(nan_k, (0, tn * bn - n_k)).view(batch, tn, bn).any(-1)
    expect = _tile_rows((fwd & nan_k_tile[:, None, :]).any(-1), bm, n_q)  # [B, Nq]
    assert expect.any() and not expect.all()
    q = q.detach().requires_grad_()
    with runtime.poison_outputs():
        o = mod.attention(q, k, v, doc=ids)
        o.backward(torch.randn_like(o))
    assert torch.equal(o.isnan().any(-1), expect[:, None, :].expand(batch, mod.Q_HEADS, n_q))
    assert torch.equal(q.grad.isnan().any(-1), expect[:, None, :].expand(batch, mod.Q_HEADS, n_q))

    # -- dO NaN at the queries of each row's last document
    q, k, v = (t.detach().requires_grad_() for t in random_inputs(mod, batch=batch, n_q=n_q, n_k=n_k, dtype=dtype, seed=5))
    nan_q = eff_q == eff_q[:, -1:]
    tm2 = -(-n_q // bm2)
    nan_q_tile = torch.nn.functional.pad(nan_q, (0, tm2 * bm2 - n_q)).view(batch, tm2, bm2).any(-1)
    expect = _tile_rows((dkdv & nan_q_tile[:, :, None]).any(1), bn2, n_k)  # [B, Nk]
    assert expect.any() and not expect.all()
    with runtime.poison_outputs():
        o = mod.attention(q, k, v, doc=ids)
        o.backward(torch.randn_like(o).masked_fill(nan_q[:, None, :, None], float("nan")))
    assert torch.equal(v.grad.isnan().any(-1), expect[:, None, :].expand(batch, mod.KV_HEADS, n_k))


# --------------------------------------------------------------------------- against the reference


@pytest.mark.kernel
@pytest.mark.parametrize("case", ["many short sorted", "random unsorted", "-1 and int32 extremes", "tensor shorter than the sequence, one row"])
def test_document_matches_reference(case):
    ids, batch, n_q, n_k = _id_cases()[case]
    mod = generated("document")
    q, k, v = random_inputs(mod, batch=batch, n_q=n_q, n_k=n_k, dtype=torch.float16, seed=len(case), bnhd=True)
    assert_all_ok(check_module(mod, q, k, v, params={"doc": ids}), case)


@pytest.mark.kernel
def test_wide_tiles_match_reference(wide):
    ids, batch, n_q, n_k = _id_cases()["int64 beyond 32 bits"]
    q, k, v = random_inputs(wide, batch=batch, n_q=n_q, n_k=n_k - 20, dtype=torch.float32, seed=9)
    assert_all_ok(check_module(wide, q, k, v, params={"doc": ids}), "int64")
    ids, batch, n_q, n_k = _id_cases()["many short sorted"]
    q, k, v = random_inputs(wide, batch=batch, n_q=n_q, n_k=n_k, dtype=torch.float32, seed=10)
    assert_all_ok(check_module(wide, q, k, v, params={"doc": ids.long()}), "short docs")
