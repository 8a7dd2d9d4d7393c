"""`attngen report`'s SASS facts: the parser on hand-written SASS, then real kernels compiled ahead of
time (tensor-core families and products per architecture, local memory when registers run out)."""

from __future__ import annotations

import pytest

from attngen.tools import report
from attngen.tools.report import sass
from attngen.tools.report.compile import run_job
from attngen.tools.report.pool import Pool
from attngen.tools.report.rows import Job
from attngen.tools.verify import import_generated

from helpers import ROOT

# A loop (from .L_x_1 back to the BRA at 0x0100) holding a wgmma score product (from RZ, then
# chained) and an accumulating one, a plain load and a TMA load; a spill store before it and a
# reload after; a forward branch that is no loop.
WGMMA_LOOP = """
        /*0000*/                   STL [R1], R7 ;
        /*0010*/              @!P0 BRA `(.L_x_2) ;
.L_x_1:
        /*0020*/                   UTMALDG.2D [UR8], [UR4] ;
        /*0030*/              @!P3 LDG.E.128 R24, desc[UR32][R2.64] ;
        /*0040*/                   WARPGROUP.ARRIVE ;
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R88, gdesc[UR20], RZ, !UPT ;
        /*0060*/                   HGMMA.64x64x16.F32.BF16 R88, gdesc[UR20], R88, gsb0 ;
        /*0070*/                   FMUL R120, R88, R89 ;
        /*0080*/                   HGMMA.64x128x16.F32.BF16 R24, R120, gdesc[UR20].tnspB, R24 ;
        /*0090*/                   HGMMA.64x128x16.F32.BF16 R24, R124, gdesc[UR20].tnspB, R24, gsb0 ;
        /*0100*/               @P1 BRA `(.L_x_1) ;
.L_x_2:
        /*0110*/                   LDL.LU R21, [R1] ;
        /*0120*/                   LDG.E R5, desc[UR32][R2.64] ;
        /*0130*/                   EXIT ;
"""

# mma.sync: two score fragments from RZ whose chains continue in renamed registers, and an
# accumulator whose register a score chain used before a MOV overwrote it.
MMA_LOOP = """
.L_x_0:
        /*0000*/                   LDGSTS.E.BYPASS.128 [R178], desc[UR32][R62.64], P0 ;
        /*0010*/                   HMMA.16816.F32.BF16 R140, R88.reuse, R40, RZ ;
        /*0020*/                   HMMA.16816.F32.BF16 R92, R96, R40, RZ ;
        /*0030*/                   HMMA.16816.F32.BF16 R8, R4.reuse, R42, R140 ;
        /*0040*/                   HMMA.16816.F32.BF16 R92, R24, R66, R92 ;
        /*0050*/                   MOV R10, R3 ;
        /*0060*/                   HMMA.16816.F32.BF16 R8, R4, R44, R8 ;
        /*0070*/                   HMMA.16816.F32.BF16 R60, R4, R44, R60 ;
        /*0080*/               @P0 BRA `(.L_x_0) ;
        /*0090*/                   EXIT ;
"""


def test_parse_reads_instructions_predicates_and_labels():
    instrs, labels = sass.parse(WGMMA_LOOP)
    assert labels == {".L_x_1": 0x20, ".L_x_2": 0x110}
    assert [i.op for i in instrs][:4] == ["STL", "BRA", "UTMALDG", "LDG"]
    ldg = instrs[3]
    assert (ldg.addr, ldg.opcode, ldg.predicate, ldg.operands) == (0x30, "LDG.E.128", "@!P3", ("R24", "desc[UR32][R2.64]"))
    assert sass.shape("HGMMA.64x128x16.F32.BF16") == (64, 128, 16)
    assert sass.shape("HMMA.16816.F32.BF16") is None


def test_only_backward_branches_are_loops():
    assert sass.loops(*sass.parse(WGMMA_LOOP)) == [(0x20, 0x100)]


def test_wgmma_products_loads_and_local_memory():
    f = sass.facts(WGMMA_LOOP)
    assert f.tensor_cores == "HGMMA" and f.main_loops == 1
    assert f.score_products == {"HGMMA.64x64x16.F32.BF16": 2}
    assert f.accumulating_products == {"HGMMA.64x128x16.F32.BF16": 2}
    # the LDG after the loop is not the loop's
    assert f.loop_global_loads == {"LDG": 1} and f.loop_tma_loads == 1 and f.tma_loads == 1
    assert (f.local_stores, f.local_loads) == (1, 1)
    assert sass.describe_products(f.to_json()) == "HGMMA 64x64x16 x2 | HGMMA 64x128x16 x2"
    assert sass.describe_loads(f.to_json()) == "TMA 1, LDG 1"


def test_mma_chains_are_followed_through_renamed_and_overwritten_registers():
    f = sass.facts(MMA_LOOP)
    # from zero: the two RZ starts, R8 <- R140 and R92 <- R92; R8 (R8..R11) is overwritten in part by
    # the MOV, so the next HMMA adding to it adds to something else; R60 was never a score
    assert f.score_products == {"HMMA.16816.F32.BF16": 4}
    assert f.accumulating_products == {"HMMA.16816.F32.BF16": 2}
    assert f.loop_global_loads == {"LDGSTS": 1} and f.tma_loads == 0
    assert (f.local_stores, f.local_loads) == (0, 0)


def test_kernel_without_loop_or_tensor_cores():
    f = sass.facts("        /*0000*/                   LDG.E R5, desc[UR32][R2.64] ;\n        /*0010*/  EXIT ;\n")
    assert f.tensor_cores == "none" and f.main_loops == 0 and f.loop_global_loads == {}
    assert sass.describe_products(f.to_json()) == "none" and sass.describe_loads(f.to_json()) == "-"


@pytest.fixture(scope="module")
def triton_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("triton-cache")))
        yield


LLAMA = ROOT / "generated" / "llama3_gqa.py"  # head_dim 128
TILE64 = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2}
HEAD_DIM = 128


def _macs(opcode: str) -> int:
    """Multiply-adds one warpgroup's HGMMA.MxNxK or one warp's HMMA.16816 (m16 n8 k16) performs."""
    shape = sass.shape(opcode)
    if shape is None:
        assert opcode.startswith("HMMA.16816"), opcode
        return 16 * 8 * 16
    m, n, k = shape
    return m * n * k


@pytest.mark.aot
def test_llama3_gqa_products_on_sm80_and_sm90(triton_cache):
    # every kept 64 x 64 config of the forward and dQ kernels, at both architectures
    rows = report.run_report(
        [LLAMA], ["sm_80", "sm_90"], configs=lambda c: (c["block_m"], c["block_n"], c["num_stages"]) == (64, 64, 2) and not c.get("persistent"),
        dtypes=["bf16"], kernels=["_fwd_kernel", "_bwd_dq_kernel"], jobs=2,
    )
    assert all(r.error is None for r in rows), [r.error for r in rows]
    assert {(r.kernel, r.arch) for r in rows} == {(k, a) for k in ("_fwd_kernel", "_bwd_dq_kernel") for a in (80, 90)}
    for r in rows:
        f = r.sass
        assert set(r.to_json()["sass"]) >= {"score_products", "loop_global_loads", "local_stores"}
        assert f["tensor_cores"] == ("HGMMA" if r.arch == 90 else "HMMA") and f["main_loops"] >= 1, f
        # the instruction stream is one warp's (HMMA) or one warpgroup's (HGMMA); together the
        # program's warps compute each product whole: Q K^T (and dQ's dO V^T) is BLOCK_M x BLOCK_N x
        # HEAD_DIM multiply-adds, P V (dQ's dS K) BLOCK_M x HEAD_DIM x BLOCK_N, so the main loops
        # hold whole products of each kind. (How many copies of each the loops hold depends on the
        # software pipelining: at 64 x 64 on 8 warps the forward's loops hold 20 Q K^T and 10 P V.)
        units = r.config["num_warps"] // (4 if r.arch == 90 else 1)
        product = r.config["block_m"] * r.config["block_n"] * HEAD_DIM
        bn = r.config["block_n"]
        scores = 1 if r.kernel == "_fwd_kernel" else 2
        score_macs = sum(_macs(op) * n for op, n in f["score_products"].items()) * units
        acc_macs = sum(_macs(op) * n for op, n in f["accumulating_products"].items()) * units
        assert acc_macs % product == 0 and acc_macs >= product, (r.config, f)
        assert score_macs % product == 0 and score_macs >= scores * product, (r.config, f)
        if r.arch == 90:  # a wgmma's K step is 16; the score product's N divides BLOCK_N
            assert all(sass.shape(op)[2] == 16 and bn % sass.shape(op)[1] == 0 for op in f["score_products"]), f
        # the loop streams K and V tiles in, by TMA or plain loads
        assert f["loop_tma_loads"] + sum(f["loop_global_loads"].values()) > 0, f


@pytest.mark.aot
def test_a_kernel_short_of_registers_spills_to_local_memory(triton_cache):
    # the forward at 64 x 64 tiles holds a [64, 128] fp32 accumulator: 64 registers per thread of
    # 4 warps for it alone; capped at 64 registers the kernel must spill (at sm_80: ptxas refuses
    # to spill a wgmma's accumulator at sm_90)
    space = import_generated(LLAMA)._SPACES["_fwd_kernel"]
    # the 64 x 64 config on today's grid (a masked spec's space also lists it with persistent: True)
    index, config = next((i, c) for i, c in enumerate(space)
                         if {k: c[k] for k in TILE64} == TILE64 and not c.get("persistent"))

    def job(options):
        return Job("llama3_gqa", str(LLAMA), "_fwd_kernel", "bf16", 80, index, config, options)

    with Pool(2, report.DEFAULT_TIMEOUT) as pool:
        capped, free = pool.map(run_job, [job((("maxnreg", 64),)), job(())], lambda j, why: j.row(error=why))
    assert capped.error is None and free.error is None, (capped.error, free.error)
    assert capped.regs <= 64 and capped.spill_stores > 0
    assert capped.sass["local_stores"] > 0 and capped.sass["local_loads"] > 0
    assert free.spills == 0 and free.sass["local_stores"] == free.sass["local_loads"] == 0
