"""Test-only helpers around the kernels' tile loops (attngen.planning.classify's Python mirror): the
MaskRule of a mask given as text, and the forward kernel's tile counts."""

from __future__ import annotations

from attngen.planning.classify import classify_tiles
from attngen.language.expr import parse_expr, parse_params
from attngen.planning.masks import MASK_RULES, MaskRule, expr_rule


def rule_for(mask: str, params=()) -> MaskRule:
    """'none', 'causal' or a mask expression over the declared `params` ((name, kind) pairs or a
    mapping; kind 'int', 'float' or a tensor declaration) -> the MaskRule the generator uses."""
    if mask in MASK_RULES:
        return MASK_RULES[mask]
    decls = parse_params(dict(params)) if params else {}
    return expr_rule(parse_expr(mask, kind="mask", params=decls))


def tile_counts(mask: str, n_q: int, n_k: int, block_m: int, block_n: int, params=None, *,
                q_offset: int = 0, kv_offset: int = 0) -> dict[str, int]:
    """How many (query tile, KV tile) pairs the forward kernel visits, split into full (mask
    skipped) and partial (mask applied), for one (batch, head); `params` gives int parameters'
    values (name -> value); the offsets are attention()'s (query row i at position q_offset + i)."""
    params = dict(params or {})
    rule = rule_for(mask, tuple((n, "int") for n in params))
    return classify_tiles(rule, n_q, n_k, block_m, block_n, params, q_offset=q_offset, kv_offset=kv_offset).counts("fwd")
