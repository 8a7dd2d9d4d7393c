"""Every decision about a generated module, made in Python so the templates only print.

The plan turns a validated Spec into: padded head dims, the autotune space, and the Triton source
fragments the templates splice in (loop bounds of the full and partial tile ranges, the mask
predicate, load masks). Nothing here imports torch or triton.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

from .spec import Spec


@dataclass(frozen=True)
class MaskRule:
    """How a mask shapes the tile loops.

    Bounds are Triton expressions over the tile start (`start_m` for a query tile, `start_n` for a
    KV tile), BLOCK_M, BLOCK_N, N_Q and N_K:
      fwd_full_end   keys [0, this) are visible to every row of the query tile (rounded down to
                     whole KV tiles by the kernel): those tiles skip the mask;
      fwd_end        keys at or past this are invisible to every row: those tiles are not visited;
      dkdv_start     first query (a multiple of BLOCK_M) that can see any key of the KV tile;
      dkdv_full_start  first query (a multiple of BLOCK_M) from which every query sees every key of
                     the KV tile.
    `predicate` is the visibility test over `{q}` and `{kv}` index grids, or None.
    `visible(q_idx, kv_idx)` and `fwd_bounds(start_m, block_m, n_q, n_k)` are the same rule in Python,
    for counting tiles (benchmarks, `tile_counts`) and for checking the bounds against brute force.
    """

    doc: str
    predicate: str | None
    fwd_full_end: str
    fwd_end: str
    dkdv_start: str
    dkdv_full_start: str
    visible: Callable[[int, int], bool]
    fwd_bounds: Callable[[int, int, int, int], tuple[int, int]]


MASK_RULES = {
    "none": MaskRule(
        doc="none (every query sees every key).",
        predicate=None,
        fwd_full_end="N_K",
        fwd_end="N_K",
        dkdv_start="0",
        dkdv_full_start="0",
        visible=lambda q, kv: True,
        fwd_bounds=lambda start_m, block_m, n_q, n_k: (n_k, n_k),
    ),
    "causal": MaskRule(
        doc="causal, q_idx >= kv_idx (top-left aligned, as SDPA's is_causal).",
        predicate="({q} >= {kv})",
        fwd_full_end="tl.minimum(start_m + 1, N_K)",
        fwd_end="tl.minimum(tl.minimum(start_m + BLOCK_M, N_Q), N_K)",
        dkdv_start="start_n // BLOCK_M * BLOCK_M",
        dkdv_full_start="tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M",
        visible=lambda q, kv: q >= kv,
        fwd_bounds=lambda start_m, block_m, n_q, n_k: (min(start_m + 1, n_k), min(start_m + block_m, n_q, n_k)),
    ),
}


def tile_counts(mask: str, n_q: int, n_k: int, block_m: int, block_n: int) -> dict[str, int]:
    """How many (query tile, KV tile) pairs the forward kernel visits, split into full (mask
    skipped) and partial (mask applied), for one (batch, head). Mirrors the kernel's loops."""
    rule = MASK_RULES[mask]
    full = partial = 0
    for start_m in range(0, n_q, block_m):
        full_end, end = rule.fwd_bounds(start_m, block_m, n_q, n_k)
        n_full = full_end // block_n
        n_all = -(-end // block_n) if end > n_full * block_n else n_full
        full += n_full
        partial += n_all - n_full
    total = -(-n_q // block_m) * -(-n_k // block_n)
    return {"full": full, "partial": partial, "visited": full + partial, "total": total}


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _and(*parts: str) -> str:
    return " & ".join(p for p in parts if p)


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
    backward: bool
    spaces: dict[str, tuple[tuple[dict, ...], int]]
    paths: tuple[str, ...]
    # Triton source fragments
    fwd_full_end: str
    fwd_end: str
    dkdv_start: str
    dkdv_full_start: str
    mask_and_fwd: str
    mask_bwd_t: str
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


# Shared memory a config may plan for: the smaller opt-in maximum of the targets (A100, sm_80),
# so one generated module suits sm_80 and sm_90. `attngen report` shows the real figures.
SMEM_BUDGET = 163 * 1024
# Register words per thread each kernel may plan for (over num_warps * 32 threads), against the
# estimate in `footprint`. Calibrated with `attngen report` at sm_90, D = 128, fp16 (llama3_gqa):
# forward 128x128 w8 (64 words) compiles to 244 registers and 128x64 w4 (128 words) spills;
# dK/dV 32x32 w4 (112 words) compiles to 214 registers and 64x32 w4 (160 words) spills.
REGISTER_BUDGET = {"_fwd_kernel": 64, "_bwd_dq_kernel": 64, "_bwd_dkdv_kernel": 112}
BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
KERNELS = ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")


def footprint(kernel: str, c: dict, block_d: int, block_dv: int) -> tuple[int, int]:
    """(elements of shared memory, 32-bit register words) one program of `kernel` needs.

    Shared memory: the forward and dQ keep a query tile and stream num_stages K/V tiles; dK/dV
    keeps a K/V tile and streams num_stages Q/dO tiles. Registers: the fp32 accumulators (O
    [BM, DV]; dQ [BM, D]; dK and dV [BN, D + DV]); dK/dV also holds its [BN, BM] score and
    probability tiles and the streamed 16-bit Q/dO operands, which is where it runs out first.
    """
    bm, bn, st = c["block_m"], c["block_n"], c["num_stages"]
    if kernel == "_fwd_kernel":
        return bm * block_d + st * bn * (block_d + block_dv), bm * block_dv
    if kernel == "_bwd_dq_kernel":
        return bm * (block_d + block_dv) + st * bn * (block_d + block_dv), bm * block_d
    regs = bn * (block_d + block_dv) + 2 * bm * bn + bm * (block_d + block_dv) // 2
    return bn * (block_d + block_dv) + st * bm * (block_d + block_dv), regs


def keep(kernel: str, c: dict, block_d: int, block_dv: int, elem_bytes: int) -> bool:
    """The autotune pruning rule: the tiles fit shared memory and the estimate fits registers."""
    smem, regs = footprint(kernel, c, block_d, block_dv)
    return smem * elem_bytes <= SMEM_BUDGET and regs <= REGISTER_BUDGET[kernel] * 32 * c["num_warps"]


def autotune_spaces(spec: Spec) -> dict[str, tuple[tuple[dict, ...], int]]:
    """Per kernel: the spec's tile combinations that pass `keep`, smallest tiles first (the
    interpreter runs the first), and how many were pruned. Shared memory is sized for the spec's
    widest dtype; registers for 16-bit inputs (fp32 kernels may still spill: `attngen report`
    says). If the rule prunes everything the smallest combination is kept."""
    t = spec.tiles
    block_d, block_dv = next_pow2(spec.head_dim), next_pow2(spec.v_head_dim)
    elem = max(BYTES[d] for d in spec.dtypes)
    combos = [
        {"block_m": bm, "block_n": bn, "num_warps": w, "num_stages": s}
        for bm, bn, w, s in itertools.product(
            sorted(t.block_m), sorted(t.block_n), sorted(t.num_warps), sorted(t.num_stages)
        )
    ]
    spaces = {}
    for kernel in KERNELS if spec.backward else KERNELS[:1]:
        kept = [c for c in combos if keep(kernel, c, block_d, block_dv, elem)] or combos[:1]
        spaces[kernel] = (tuple(kept), len(combos) - len(kept))
    return spaces


def make_plan(spec: Spec) -> Plan:
    rule = MASK_RULES[spec.mask]
    block_d, block_dv = next_pow2(spec.head_dim), next_pow2(spec.v_head_dim)
    pad_d = block_d != spec.head_dim
    pad_dv = block_dv != spec.v_head_dim
    # Padded head dims: literal bounds, so the tile helpers need no extra constexpr arguments.
    d, dv = spec.head_dim, spec.v_head_dim
    d_row = f"(o_d[None, :] < {d})" if pad_d else ""  # D along columns
    d_col = f"(o_d[:, None] < {d})" if pad_d else ""  # D along rows (transposed tiles)
    dv_row = f"(o_dv[None, :] < {dv})" if pad_dv else ""
    dv_col = f"(o_dv[:, None] < {dv})" if pad_dv else ""

    def opt_mask(m: str) -> str:
        return f", mask={m}, other=0.0" if m else ""

    pred = rule.predicate
    mask_fwd = pred.format(q="o_m[:, None]", kv="o_n[None, :]") if pred else ""
    mask_t = pred.format(q="o_m[None, :]", kv="o_n[:, None]") if pred else "True"
    summary = (
        f"{spec.grouping} attention, {spec.q_heads} query heads over {spec.kv_heads} KV heads, "
        f"head_dim {spec.head_dim}" + (f" (v {spec.v_head_dim})" if spec.v_head_dim != spec.head_dim else "")
        + f", mask {spec.mask}."
    )
    if pred:
        paths = (
            f"forward and dQ: KV tiles below ({rule.fwd_full_end}) run unmasked; tiles up to ({rule.fwd_end}) apply the mask; later tiles are skipped.",
            f"dK/dV: query tiles from ({rule.dkdv_start}) to ({rule.dkdv_full_start}) apply the mask; later ones run unmasked; earlier ones are skipped.",
        )
    else:
        paths = (
            "forward and dQ: every KV tile runs unmasked except the last partial one (sequence end).",
            "dK/dV: every query tile runs unmasked (rows past the end contribute p = 0).",
        )
    if spec.description:
        summary = f"{spec.description.rstrip('.')}. {summary}"
    return Plan(
        name=spec.name,
        summary=summary,
        q_heads=spec.q_heads,
        kv_heads=spec.kv_heads,
        group=spec.group,
        head_dim=spec.head_dim,
        v_head_dim=spec.v_head_dim,
        block_d=block_d,
        block_dv=block_dv,
        dtypes=spec.dtypes,
        mask=spec.mask,
        mask_doc=rule.doc,
        backward=spec.backward,
        spaces=autotune_spaces(spec),
        paths=paths,
        fwd_full_end=rule.fwd_full_end,
        fwd_end=rule.fwd_end,
        dkdv_start=rule.dkdv_start,
        dkdv_full_start=rule.dkdv_full_start,
        mask_and_fwd=f" & {mask_fwd}" if mask_fwd else "",
        mask_bwd_t=mask_t,
        q_rows_mask=_and("m_m[:, None]", d_row),
        o_rows_mask=_and("m_m[:, None]", dv_row),
        do_rows_mask=_and("m_m[:, None]", dv_row),
        qt_cols_mask=_and("m_m[None, :]", d_col),
        k_rows_mask=_and("m_n[:, None]", d_row),
        v_rows_mask_m=_and("m_n[:, None]", dv_row),
        k_cols_mask=opt_mask(d_col),
        k_cols_mask_n=_and("(o_n[None, :] < N_K)", d_col),
        v_rows_mask=opt_mask(dv_row),
        v_rows_mask_n=_and("(o_n[:, None] < N_K)", dv_row),
        vt_cols_mask=opt_mask(dv_col),
        vt_cols_mask_n=_and("(o_n[None, :] < N_K)", dv_col),
    )
