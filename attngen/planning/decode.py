"""What the KV-cache decoding kernel (templates/_dense_decode.jinja) prints for a dense spec.

The decode kernel packs the G query heads of one KV head times the Nq queries into the rows of one
tile: row r is query head ``i_hk * G + r // Nq`` and query ``r % Nq``, at absolute position
``L - Nq + r % Nq`` (bottom-right, L = cache_seqlens[b] + Nnew; keys at 0..L-1; q_len = kv_len = L).
So the mask and the score_mod are printed with a per-row head (`o_hc[:, None]`) and per-row
positions (`o_qc[:, None]`), not the scalar `i_h` of the other kernels.

Which key tiles a row tile visits: the forward bounds of the mask's tile classification
(attngen.planning.classify) over the tile's query positions [start_m, last_m] (the hull of its rows'
positions), with N_Q = N_K = L. They are used only when their statements name nothing but the
tile's ends, the lengths, the batch index, the scalar parameters and their own temporaries; a bound
that depends on the head (`h` in an affine condition) or names anything else is replaced by the
sound rule "every key tile in [0, L), mask applied". Nothing here imports torch or triton.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from attngen.language.expr import Expr, parse_expr, to_triton
from attngen.language.spec import Spec
from attngen.planning.autotune import next_pow2
from attngen.planning.classify import Bounds
from attngen.planning.masks import expr_rule

PARAM_PREFIX = "arg_"  # as attngen.planning.masks: the kernels' names of the parameters

# Source names of the expression symbols inside the decode kernel.
_NAMES = {"b": "i_b", "h": "o_hc[:, None]", "q_idx": "o_qc[:, None]", "kv_idx": "o_n[None, :]", "q_len": "N_Q", "kv_len": "N_K"}

# The names a forward bound may use in the decode kernel (besides arg_* parameters and its own
# t_* temporaries); `i_h` is not one: the rows of a decode tile have different heads.
_ALLOWED = {"start_m", "last_m", "N_Q", "N_K", "i_b", "lo", "hi", "BLOCK_N", "tl", "minimum", "maximum", "where", "cdiv"}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_EVERY_TILE = (
    ("hi", "N_K", ""),
    ("lo", "0", "every key tile is visited with the mask applied"),
    ("full_lo", "hi", ""),
    ("full_hi", "hi", ""),
)


@dataclass(frozen=True)
class DecodePlan:
    """`ranges`: the statements (name, Triton expression, comment) giving the key tiles of one row
    tile: [lo, full_lo) and [full_hi, hi) with the mask, [full_lo, full_hi) without (every row of
    the tile sees all of it); `predicate`: the mask over a [BM, BN] tile ("" for none);
    `score_mod`: the score_mod's value over the natural-units score `b_z` ("" for none); `rule`:
    a sentence for the module docstring."""

    ranges: tuple[tuple[str, str, str], ...]
    block_n: int  # keys per tile: 64, or 32 for head dims padded above 128
    num_warps: int  # 8 for head dims padded above 128 (with 4, Triton 3.6 spills 28 bytes at sm_90 for
    # head_dim 192, nsa_paper_win; Triton 3.9 does not), else 4
    predicate: str
    score_mod: str
    rule: str


def _statements(b: Bounds) -> tuple[tuple[str, str, str], ...]:
    """classify.range_statements's forward statements, less the tile's last row (the decode kernel
    computes start_m and last_m from its rows' positions). The bounds are in row space with the
    runtime offsets Q_OFF and KV_OFF (attention()'s q_offset, kv_offset); a decode tile's rows are
    positions already, so both are 0."""
    return (
        ("Q_OFF", "0", "the rows here are positions"),
        ("KV_OFF", "0", ""),
        *((name, text, "") for name, text in b.prelude),
        ("hi", b.end, ""),
        ("lo", b.start, ""),
        ("lo", f"tl.where({b.visit}, lo // BLOCK_N * BLOCK_N, hi)", "no visible key: visit nothing"),
        ("full_lo", f"tl.minimum(tl.maximum(tl.cdiv({b.full_start}, BLOCK_N) * BLOCK_N, lo), hi)", ""),
        ("full_hi", f"tl.maximum(({b.full_end}) // BLOCK_N * BLOCK_N, full_lo)", ""),
    )


def _usable(statements, params: tuple[str, ...]) -> bool:
    temps = {name for name, _, _ in statements}
    allowed = _ALLOWED | temps | {PARAM_PREFIX + n for n in params}
    return all(set(_IDENT.findall(text)) <= allowed for _, text, _ in statements)


@functools.lru_cache(maxsize=1)
def _causal() -> Expr:
    """The causal mask as an expression (the other kernels use the hand-written rule)."""
    return parse_expr("q_idx >= kv_idx", kind="mask")


def decode_plan(spec: Spec) -> DecodePlan:
    decls = spec.param_decls
    names = {**_NAMES, **{n: PARAM_PREFIX + n for n in decls}}
    if spec.mask_expr is not None:
        mask: Expr | None = spec.mask_expr
    elif spec.mask == "causal":
        mask = _causal()
    else:
        mask = None
    if mask is None:
        ranges = (("hi", "N_K", ""), ("lo", "0", ""), ("full_lo", "0", ""), ("full_hi", "N_K // BLOCK_N * BLOCK_N", ""))
        rule = "every key tile of [0, L) is visited; all but the last run unmasked"
        predicate = ""
    else:
        c = expr_rule(mask)  # memoised: the same classification the other kernels' plan made
        ranges = _statements(c.fwd)
        if _usable(ranges, tuple(decls)):
            rule = (f"the forward tile bounds of the mask ({c.path}) over the positions of the tile's rows: "
                    "key tiles outside them are not read")
        else:
            ranges = _EVERY_TILE
            rule = "every key tile of [0, L) is visited with the mask applied (the mask's tile bounds depend on the head)"
        predicate = to_triton(mask, names)
    score_mod = ""
    if spec.score_mod_expr is not None:
        mod = spec.score_mod_expr
        score_mod = to_triton(mod, {**names, "score": "b_z"})
        if "score" not in mod.symbols:
            score_mod = f"({score_mod} + 0.0 * b_z)"  # a whole tile even when it reads no score
    wide = next_pow2(spec.head_dim) > 128
    return DecodePlan(ranges=ranges, block_n=32 if wide else 64, num_warps=8 if wide else 4,
                      predicate=predicate, score_mod=score_mod, rule=rule)
