"""Every decision about a dense generated module, made in Python so the templates only print.

make_plan assembles the Plan from the planning modules: masks (tile rules and loops),
params (the score_mod and the parameters' kernel arguments), autotune (the tile space).

The plan turns a validated Spec into: padded head dims, the autotune space, and the values the
templates' hooks print (templates/_dense_hooks.jinja): the names of the parameters' kernel
arguments, the tile-range statements and which tile loops run, the mask predicate, the score_mod,
the load masks of padded head dims. Values and whole Triton expressions only: the templates own
the punctuation and the layout of the code. Nothing here imports torch or triton.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from attngen.language.spec import Spec, SpecError
from attngen.planning.autotune import autotune_spaces, next_pow2, with_persistent
from attngen.planning.classify import range_statements
from attngen.planning.decode import DecodePlan, decode_plan
from attngen.planning.masks import MASK_RULES, PARAM_PREFIX, MaskRule, TileLoop, id_skip, mask_rule, tile_loops
from attngen.planning.params import ScoreModPlan, kernel_param_names, param_docs, score_mod_plan


class StageError(Exception):
    """An unexpected exception while planning what one spec key asks for: a bug in attngen, which
    the build reports at that key's line (the original exception is the __cause__)."""

    def __init__(self, key: str, error: BaseException):
        super().__init__(f"{key}: {type(error).__name__}: {error}")
        self.key, self.error = key, error


@contextlib.contextmanager
def stage(key: str):
    """Attribute any exception but a SpecError raised inside to spec key `key` (StageError)."""
    try:
        yield
    except (SpecError, StageError):
        raise
    except Exception as e:
        raise StageError(key, e) from e


@dataclass(frozen=True)
class Plan:
    name: str
    summary: str
    q_heads: int
    kv_heads: int
    group: int
    head_dim: int
    v_head_dim: int
    block_d: int
    block_dv: int
    dtypes: tuple[str, ...]
    mask: str
    mask_doc: str
    mask_path: str
    params: dict[str, object]  # name -> 'int' | 'float' | {'tensor': DTYPE, 'dims': N}
    kernel_params: tuple[str, ...]  # the kernel arguments that carry the parameters (kernel_param_names)
    param_nospec: tuple[str, ...]  # the scalar kernel arguments of the parameters (never specialised)
    param_docs: tuple[str, ...]  # one docstring line per parameter of attention()
    score_mod: ScoreModPlan | None
    backward: bool
    spaces: dict[str, tuple[tuple[dict, ...], int]]
    # the padded forward has a PERSISTENT constexpr (its space's entries carry `persistent`): masked specs
    persistent: bool
    paths: tuple[str, ...]
    # -- tile ranges: the statements (name, expression, comment) of classify.range_statements, and
    # the loops over them (tile_loops) of the forward and dQ kernels (`fwd`) and of dK/dV
    fwd_ranges: tuple[tuple[str, str, str], ...]
    dkdv_ranges: tuple[tuple[str, str, str], ...]
    fwd_loops: tuple[TileLoop, ...]
    dkdv_loops: tuple[TileLoop, ...]
    # -- mask: the predicate over a [BM, BN] tile of positions (pos_m[:, None], pos_n[None, :]:
    # rows o_m, o_n plus the offsets Q_OFF, KV_OFF) and over a
    # transposed [BN, BM] one; "" for no mask
    mask_fwd: str
    mask_t: str
    # -- load and store masks (Triton boolean expressions; "" where a full tile needs none): rows
    # of a query / KV tile (m_m, m_n) and padded head dims; `_n`: a KV tile's sequence end too
    q_rows_mask: str
    o_rows_mask: str
    do_rows_mask: str
    qt_cols_mask: str
    k_rows_mask: str
    v_rows_mask_m: str
    k_cols_mask: str
    k_cols_mask_n: str
    v_rows_mask: str
    v_rows_mask_n: str
    vt_cols_mask: str
    vt_cols_mask_n: str
    # -- runtime skip: the position in the parameter tuple of the id tensor T of a
    # `T[b, q_idx] == T[b, kv_idx]` conjunct (classify.id_equality): the kernels skip tile pairs
    # whose id ranges are disjoint
    id_skip: int | None = None
    id_skip_name: str = ""
    id_args: tuple[str, ...] = ()  # the kernels' id-range arguments, () without the skip
    decode: DecodePlan | None = None  # the KV-cache decoding kernel's (planning.decode)


def make_plan(spec: Spec) -> Plan:
    """The Plan of a dense spec. Each step runs under the spec key it serves (`stage`), so an
    unexpected exception is reported at that key's line."""
    with stage("mask"):
        rule = mask_rule(spec)
        id_name = id_skip(spec)
        ranges = range_statements(rule, "fwd"), range_statements(rule, "dkdv")
        loops = tile_loops(rule, "fwd"), tile_loops(rule, "dkdv")
    decls = spec.param_decls
    with stage("score_mod"):
        sm = score_mod_plan(spec.score_mod_expr, decls, spec.backward)
    with stage("params"):
        docs = param_docs(spec)
        kernel_params = kernel_param_names(decls)
        pointers = {f"{PARAM_PREFIX}{n}_ptr" for n, d in decls.items() if d.kind == "tensor"}
    with stage("tiles"):
        spaces = autotune_spaces(spec)
    pred = rule.predicate
    if pred:  # masked: the padded forward's persistent grid is an autotune candidate
        spaces = with_persistent(spaces)
    return Plan(
        name=spec.name,
        summary=_summary(spec, rule, sm),
        q_heads=spec.q_heads,
        kv_heads=spec.kv_heads,
        group=spec.group,
        head_dim=spec.head_dim,
        v_head_dim=spec.v_head_dim,
        block_d=next_pow2(spec.head_dim),
        block_dv=next_pow2(spec.v_head_dim),
        dtypes=spec.dtypes,
        mask=spec.mask,
        mask_doc=rule.doc,
        mask_path=rule.path or ("hand-written tile bounds" if pred else "no mask"),
        params={n: (k if isinstance(k, str) else dict(k)) for n, k in spec.params},
        kernel_params=kernel_params,
        param_nospec=tuple(a for a in kernel_params if a not in pointers),
        score_mod=sm,
        param_docs=docs,
        backward=spec.backward,
        spaces=spaces,
        persistent=bool(pred),
        paths=_paths(rule, sm, id_name),
        fwd_ranges=ranges[0],
        dkdv_ranges=ranges[1],
        fwd_loops=loops[0],
        dkdv_loops=loops[1],
        mask_fwd=pred.format(q="pos_m[:, None]", kv="pos_n[None, :]") if pred else "",
        mask_t=pred.format(q="pos_m[None, :]", kv="pos_n[:, None]") if pred else "",
        **_load_masks(spec),
        id_skip=list(decls).index(id_name) if id_name else None,
        id_skip_name=id_name or "",
        id_args=("ID_QMIN", "ID_QMAX", "ID_KMIN", "ID_KMAX", "N_QC", "N_KC") if id_name else (),
        decode=_decode(spec),
    )


def _decode(spec: Spec) -> DecodePlan:
    with stage("mask"):
        return decode_plan(spec)


def _summary(spec: Spec, rule: MaskRule, sm: ScoreModPlan | None) -> str:
    """The module docstring's first line."""
    summary = (
        f"{spec.grouping} attention, {spec.q_heads} query heads over {spec.kv_heads} KV heads, "
        f"head_dim {spec.head_dim}" + (f" (v {spec.v_head_dim})" if spec.v_head_dim != spec.head_dim else "")
        + f", mask {spec.mask if spec.mask in MASK_RULES else rule.doc.removeprefix('expression ')}."
    )
    if sm:
        summary = f"{summary[:-1]}, score_mod {sm.doc}."
    if spec.description:
        summary = f"{spec.description.rstrip('.')}. {summary}"
    return summary


def _paths(rule: MaskRule, sm: ScoreModPlan | None, id_name: str | None) -> tuple[str, ...]:
    """The module docstring's "Tile paths": how each kernel treats the tiles, the score_mod and its
    gradients, and the runtime skip."""
    if rule.path:  # an expression mask
        paths = (f"mask: {rule.path}.", *rule.notes)
    elif rule.predicate:
        paths = (
            f"forward and dQ: KV tiles below ({rule.fwd.full_end}) run unmasked; tiles up to ({rule.fwd.end}) apply the mask; later tiles are skipped.",
            f"dK/dV: query tiles from ({rule.dkdv.start}) to ({rule.dkdv.full_start}) apply the mask; later ones run unmasked; earlier ones are skipped.",
        )
    else:
        paths = (
            "forward and dQ: every KV tile runs unmasked except the last partial one (sequence end).",
            "dK/dV: every query tile runs unmasked (rows past the end contribute p = 0).",
        )
    if sm:
        paths += (
            "score_mod: applied to q.k * scale (natural units) on every visited tile, before the mask; "
            "dQ and dK/dV multiply dL/d(score_mod) by its derivative in score.",
        )
        if sm.grads:
            paths += (
                f"gradients of {', '.join(g.name for g in sm.grads)} (only when one requires grad): a separate pass "
                "over query-row chunks recomputes p and dp for every (query, key) pair and writes each pair's "
                "contribution and element index (12 bytes a pair, at most runtime.PARAM_GRAD_ELEMS pairs a chunk), "
                "summed per element in index order (runtime.index_sum_): deterministic, no atomics, but about one "
                "more dQ pass plus a sort of B * H * Nq * Nk entries, with no tile skipped.",
            )
    if id_name:
        paths += (
            f"runtime tile skip: the mask implies {id_name}[b, q_idx] == {id_name}[b, kv_idx]; the wrapper takes the "
            f"[min, max] of {id_name} over every 16 positions (O(N) in torch) and the forward, dQ and dK/dV loops skip a "
            "visited tile pair whose query and key ranges are disjoint.",
        )
    return paths


def _load_masks(spec: Spec) -> dict[str, str]:
    """Load and store masks (Triton boolean expressions, "" where a full tile needs none): rows of a
    query / KV tile (m_m, m_n) and padded head dims, as literal bounds so the tile helpers need no
    extra constexpr arguments; `_n`: a KV tile's sequence end too."""
    d, dv = spec.head_dim, spec.v_head_dim
    d_row = f"(o_d[None, :] < {d})" if next_pow2(d) != d else ""  # D along columns
    d_col = f"(o_d[:, None] < {d})" if next_pow2(d) != d else ""  # D along rows (transposed tiles)
    dv_row = f"(o_dv[None, :] < {dv})" if next_pow2(dv) != dv else ""
    dv_col = f"(o_dv[:, None] < {dv})" if next_pow2(dv) != dv else ""
    return dict(
        q_rows_mask=_and("m_m[:, None]", d_row),
        o_rows_mask=_and("m_m[:, None]", dv_row),
        do_rows_mask=_and("m_m[:, None]", dv_row),
        qt_cols_mask=_and("m_m[None, :]", d_col),
        k_rows_mask=_and("m_n[:, None]", d_row),
        v_rows_mask_m=_and("m_n[:, None]", dv_row),
        k_cols_mask=d_col,
        k_cols_mask_n=_and("(o_n[None, :] < N_K)", d_col),
        v_rows_mask=dv_row,
        v_rows_mask_n=_and("(o_n[:, None] < N_K)", dv_row),
        vt_cols_mask=dv_col,
        vt_cols_mask_n=_and("(o_n[None, :] < N_K)", dv_col),
    )


def _and(*parts: str) -> str:
    return " & ".join(p for p in parts if p)
