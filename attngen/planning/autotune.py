"""The autotune space of each dense kernel: the spec's tile combinations, pruned by a readable rule
(shared memory and an accumulator-register estimate) that `attngen report` calibrates."""

from __future__ import annotations

import itertools

from attngen.language.spec import Spec



def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()

# Shared memory a config may plan for: the smaller opt-in maximum of the targets (A100, sm_80),
# so one generated module suits sm_80 and sm_90. `attngen report` shows the real figures.
SMEM_BUDGET = 163 * 1024

# Register words per thread each kernel may plan for (over num_warps * 32 threads), against the
# estimate in `footprint`. Calibrated with `attngen report` at sm_90, D = 128, fp16 (llama3_gqa):
# forward 128x128 w8 (64 words) compiles to 244 registers and 128x64 w4 (128 words) spills;
# dK/dV 32x32 w4 (112 words) compiles to 214 registers and 64x32 w4 (160 words) spills.
REGISTER_BUDGET = {"_fwd_kernel": 64, "_bwd_dq_kernel": 64, "_bwd_dkdv_kernel": 112}

# fp32 score tiles ([BLOCK_M, BLOCK_N]: the forward's S; the backward's S and dP) each kernel holds
# at once, and the words per thread they may take together, whatever the head dim: with Triton 3.9
# (ptxas 13.4) and 3.6 (ptxas 12.8) at sm_90, llama3_gqa's forward spills at 64x128 w4 and 128x128
# w8 (64 words) and not at 64 words of accumulator with 32 of scores (64x64 w4); its dQ spills at
# 32x128 w4, 64x128 w8 (2 x 32 words) and not at 64x64 w4 (2 x 16).
SCORE_TILES = {"_fwd_kernel": 1, "_bwd_dq_kernel": 2, "_bwd_dkdv_kernel": 2}
SCORE_BUDGET = 32

# The fewest score elements per thread a config may give each thread: below it the warps split a
# tile too thin to keep them busy, and Triton 3.6's ptxas (12.8) spills a register of the dK/dV
# kernel at sm_90 (16x16 tiles on 4 warps: 2 elements per thread).
MIN_SCORES_PER_THREAD = 4

# The smallest dK/dV score tile (BLOCK_M * BLOCK_N elements). Measured at sm_90 with fresh Triton
# caches (2026-11-30): on 4 warps, 16x32 tiles (512) spill 8 to 24 bytes under both Triton 3.6
# (mqa, softcap and the varlen kernels of mqa, relpos_bias, nsa_g4_weighted_cmp / _win) and 3.9
# (dilated_window, nsa_g4_weighted_cmp / _win, mqa's varlen), each time at 128 or 168 registers
# (ptxas stopping at a step of occupancy and spilling the rest) or at 255 (relpos_bias varlen);
# 16x64 and 32x32 (1024) did not spill for any head dim up to 128 on 4 or 8 warps, with the
# exception below. Per thread the count is no guide: 16x64 on 8 warps (4 elements) never spilled.
MIN_DKDV_SCORE_TILE = 1024

# The same occupancy steps make small 4-warp dK/dV configs spill a little in a way that no
# head-dim rule predicts: gqa_hd80 (head dims 80 / 48) spills 32 bytes at 32x32 w4 s1 under 3.9
# (168 registers) and 24 at 32x16 w4 s2 under 3.6, while llama3_gqa (128) is clean at 32x32 w4
# (226). Every dK/dV config of up to 1024 score elements on 8 warps compiled without spilling
# under both (all shipped specs, head dims 16 to 192 / 128; nsa_paper's only such config, 32x32
# w8, included). So the dK/dV space lists, for equal tiles, more warps first: its first config,
# the one the interpreter and ATTNGEN_CONFIGS=first run, is the smallest tile on the most warps.
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
    """The autotune pruning rule: the tiles fit shared memory, the estimate fits registers, the
    score tiles fit their share of registers and give every thread some work. Checked with `attngen
    report` against Triton 3.6 and 3.9 (README, Autotuning)."""
    smem, regs = footprint(kernel, c, block_d, block_dv)
    threads = 32 * c["num_warps"]
    scores = c["block_m"] * c["block_n"] / threads
    return (
        smem * elem_bytes <= SMEM_BUDGET
        and regs <= REGISTER_BUDGET[kernel] * threads
        and SCORE_TILES[kernel] * scores <= SCORE_BUDGET
        and scores >= MIN_SCORES_PER_THREAD
        and (kernel != "_bwd_dkdv_kernel" or c["block_m"] * c["block_n"] >= MIN_DKDV_SCORE_TILE)
    )

def autotune_spaces(spec: Spec) -> dict[str, tuple[tuple[dict, ...], int]]:
    """Per kernel: the spec's tile combinations that pass `keep`, smallest tiles first (the
    interpreter runs the first; dK/dV puts more warps first among equal tiles), and how many were pruned. Shared memory is sized for the spec's
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
        if kernel == "_bwd_dkdv_kernel":  # equal tiles: more warps first (MIN_DKDV_SCORE_TILE)
            kept.sort(key=lambda c: (c["block_m"], c["block_n"], -c["num_warps"], c["num_stages"]))
        spaces[kernel] = (tuple(kept), len(combos) - len(kept))
    return spaces


PERSISTENT_KERNELS = ("_fwd_kernel",)


def with_persistent(spaces: dict[str, tuple[tuple[dict, ...], int]]) -> dict[str, tuple[tuple[dict, ...], int]]:
    """A masked spec's spaces with the persistent grid as a candidate of the padded forward: each
    kept config twice, `persistent` False (one program per query tile and batch x head) then True
    (about one program per SM looping over the work items, longest query tiles first), so the
    interpreter's first config stays the non-persistent one. The other kernels are unchanged."""
    out = dict(spaces)
    for kernel in PERSISTENT_KERNELS:
        if kernel in out:
            space, pruned = out[kernel]
            out[kernel] = (
                tuple({**c, "persistent": False} for c in space) + tuple({**c, "persistent": True} for c in space),
                pruned,
            )
    return out
