"""The plan of an NSA spec's main module (templates/nsa.py.jinja): its constants and documentation.

The compression and window branches are dense modules built from derived specs (build.derived_specs);
the selection kernels live in the kernel library (attngen.kernels.nsa_topn, nsa_selected), which
takes every NSA parameter as an argument and which the module imports. So this plan only names things.
"""

from __future__ import annotations

from dataclasses import dataclass

from attngen.language.spec import SparseSpec, Spec


@dataclass(frozen=True)
class NsaPlan:
    spec: Spec  # heads, dims, dtypes, backward as the spec gives them
    sp: SparseSpec  # the NSA parameters
    summary: str
    cmp_module: str
    win_module: str  # "" without a window


def branches(spec: Spec) -> list[tuple[str, str, str]]:
    """(module name, mask, description) of the dense modules an NSA spec's branches are built from:
    `<name>_cmp`, attention over the compressed keys (key i is complete for query t once
    i*stride + block - 1 <= t), and with a window `<name>_win`, the last `window` keys with the
    query's own included. Masks carry the spec's numbers as literals. Empty for a dense spec."""
    sp = spec.sparse
    if sp is None:
        return []
    out = [(
        f"{spec.name}_cmp", f"kv_idx * {sp.stride} + {sp.block - 1} <= q_idx",
        f"Compression branch of NSA spec {spec.name}: attention over the compressed keys (blocks of {sp.block} tokens every {sp.stride})",
    )]
    if sp.window:
        out.append((
            f"{spec.name}_win", f"kv_idx <= q_idx and kv_idx > q_idx - {sp.window}",
            f"Window branch of NSA spec {spec.name}: the last {sp.window} keys, the query's own included",
        ))
    return out


_SCORE_DOC = {
    "probs": "the compression branch's softmax probabilities",
    "dot": "the scaled logits q.k_cmp",
    "cosine": "the cosine of q and k_cmp",
}


def make_nsa_plan(spec: Spec) -> NsaPlan:
    sp = spec.sparse
    assert sp is not None, "make_nsa_plan takes a spec with a sparse: section"
    mods = [name for name, _, _ in branches(spec)]
    summary = (
        f"Native Sparse Attention, {spec.q_heads} query heads over {spec.kv_heads} KV heads (group {spec.group}), "
        f"head_dim {spec.head_dim}" + (f" (v {spec.v_head_dim})" if spec.v_head_dim != spec.head_dim else "")
        + f"; selection scored by {_SCORE_DOC[sp.score]}, per {sp.per}."
    )
    if spec.description:
        summary = f"{spec.description.rstrip('.')}. {summary}"
    return NsaPlan(spec=spec, sp=sp, summary=summary, cmp_module=mods[0], win_module=mods[1] if sp.window else "")
