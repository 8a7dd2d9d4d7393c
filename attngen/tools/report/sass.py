"""Worker side, third step: read facts off a compiled kernel's SASS (the GPU's own instructions).

The cubin Triton produced is disassembled with the nvdisasm that Triton bundles, and the text is
read for what the PTX cannot say for sure: which tensor-core instructions ptxas kept, whether the
main loop still issues plain global loads (LDG, LDGSTS) or loads through TMA (UTMALDG), and whether
registers spill to local memory (STL, LDL).

The main loop: a loop in SASS is a backward branch (a BRA whose target label lies at or before it);
its body is the address range from the label to the branch. The main loops are the loop bodies that
hold a tensor-core instruction (a forward kernel has two, its unmasked and its masked tile loop).

Tensor-core instructions are sorted by the product they belong to, told apart by their accumulator:
an instruction whose accumulator operand is RZ (zero), or the result of such an instruction earlier
in the same loop body, computes a product from zero: a score tile (the forward's Q K^T; the
backward's Q K^T or K Q^T, and dO V^T or V dO^T). One that adds to any other register adds to an
accumulator carried across the loop: the forward's P V, the backward's dS K, P^T dO and dS^T Q. So
the forward's two products are told apart exactly; a backward kernel's two score products (and the
dK/dV kernel's two accumulating ones) are not told apart by this, only by their shapes: a wgmma
(HGMMA.MxNxK) names its N, which is BLOCK_N for the forward's Q K^T and BLOCK_DV for its P V, but an
mma.sync (HMMA.16816: 16 x 8 x 16 for every product) names nothing. When two products have the
same N (BLOCK_N == BLOCK_DV) only the accumulator tells them apart.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


TENSOR_CORE = re.compile(r"^(HGMMA|HMMA|UTC\w*MMA)\b")
"""wgmma (sm_90), mma.sync (sm_80 and later) and tcgen05 (sm_100) tensor-core instructions."""

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:(@!?U?P[T\d]+)\s+)?([A-Z][\w.]*)\s*(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L\w+):")
_TARGET = re.compile(r"`\((\.L\w+)\)")
_SHAPE = re.compile(r"\.(\d+)x(\d+)x(\d+)\b")


@dataclass(frozen=True)
class Instr:
    addr: int
    opcode: str  # with its modifiers: 'HGMMA.64x64x16.F32.BF16', 'LDG.E.128'
    operands: tuple[str, ...]
    predicate: str | None = None

    @property
    def op(self) -> str:
        """The opcode without modifiers: 'HGMMA', 'LDG'."""
        return self.opcode.split(".", 1)[0]


def parse(text: str) -> tuple[list[Instr], dict[str, int]]:
    """Instructions and labels (label -> address of the instruction that follows it) of nvdisasm's
    text for one kernel."""
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _LINE.match(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        operands = tuple(o.strip() for o in m.group(4).split(",")) if m.group(4) else ()
        instrs.append(Instr(addr, m.group(3), operands, m.group(2)))
        for name in pending:
            labels[name] = addr
        pending = []
    return instrs, labels


def loops(instrs: list[Instr], labels: dict[str, int]) -> list[tuple[int, int]]:
    """(first, last) address of each loop body: from a backward branch's target to the branch."""
    out = []
    for i in instrs:
        if i.op == "BRA":
            m = _TARGET.search(" ".join(i.operands))
            if m and m.group(1) in labels and labels[m.group(1)] <= i.addr:
                out.append((labels[m.group(1)], i.addr))
    return out


def _accumulator(i: Instr) -> str | None:
    """The accumulator (C) operand of a tensor-core instruction: the operand after its inputs (a
    wgmma reads B, or A and B, through one shared-memory descriptor, gdesc)."""
    ops = [o.removesuffix(".reuse") for o in i.operands]
    if i.op == "HGMMA":  # D, [A,] gdesc (B, or A and B), C
        at = next((k for k, o in enumerate(ops) if o.startswith("gdesc")), None)
        return ops[at + 1] if at is not None and at + 1 < len(ops) else None
    return ops[3] if len(ops) > 3 else None  # HMMA D, A, B, C


def _regs(operand: str, width: int) -> set[int]:
    m = re.fullmatch(r"R(\d+)", operand.removesuffix(".reuse"))
    return set(range(int(m.group(1)), int(m.group(1)) + width)) if m else set()


def _result_width(i: Instr) -> int:
    """32-bit registers an instruction's destination spans (R24 of a .128 load is R24..R27)."""
    if i.op == "HMMA":  # m16n8: 4 fp32 or 2 packed fp16 accumulator registers per thread
        return 4 if ".F32" in i.opcode else 2
    if i.op == "HGMMA":  # 64 x N per warpgroup: N / 2 fp32 (N / 4 packed fp16) registers per thread
        mnk = shape(i.opcode)
        return (mnk[1] // 2 if ".F32" in i.opcode else mnk[1] // 4) if mnk else 1
    return 4 if ".128" in i.opcode else 2 if ".64" in i.opcode else 1


def classify_products(body: list[Instr]) -> tuple[Counter, Counter]:
    """(from zero, accumulating): tensor-core instructions of one loop body by opcode, told apart
    by their accumulator as the module docstring says. Registers holding a from-zero product are
    followed through the body; any other instruction writing one of them ends that."""
    fresh: set[int] = set()
    zero, acc = Counter(), Counter()
    for i in body:
        if not i.operands:
            continue
        dest = _regs(i.operands[0], _result_width(i))
        if TENSOR_CORE.match(i.opcode):
            c = _accumulator(i)
            if c == "RZ" or (c is not None and _regs(c, len(dest) or 1) <= fresh and dest):
                zero[i.opcode] += 1
                fresh |= dest
            else:
                acc[i.opcode] += 1
                fresh -= dest
        else:
            fresh -= dest
    return zero, acc


@dataclass
class SassFacts:
    """What the report shows of one kernel's SASS (counts of instructions in the code, not of
    instructions executed)."""

    tensor_cores: str  # 'HGMMA', 'HMMA', 'UTC*MMA' (the family in SASS) or 'none'
    score_products: dict  # opcode -> count, in the main loops: products from zero (Q K^T, dO V^T)
    accumulating_products: dict  # opcode -> count, in the main loops: P V, dS K, P^T dO, dS^T Q
    main_loops: int  # loop bodies holding a tensor-core instruction
    loop_global_loads: dict  # LDG / LDGSTS -> count in the main loops
    loop_tma_loads: int  # UTMALDG in the main loops
    tma_loads: int  # UTMALDG in the whole kernel
    local_stores: int  # STL in the whole kernel (register spills, or local arrays)
    local_loads: int  # LDL in the whole kernel

    def to_json(self) -> dict:
        return dict(self.__dict__)


def facts(text: str) -> SassFacts:
    instrs, labels = parse(text)
    ops = Counter(i.op for i in instrs)
    tc = sorted({TENSOR_CORE.match(i.opcode).group(1) for i in instrs if TENSOR_CORE.match(i.opcode)})
    main = [
        (lo, hi) for lo, hi in loops(instrs, labels)
        if any(lo <= i.addr <= hi and TENSOR_CORE.match(i.opcode) for i in instrs)
    ]
    zero, acc, loads, tma = Counter(), Counter(), Counter(), 0
    for lo, hi in main:
        body = [i for i in instrs if lo <= i.addr <= hi]
        z, a = classify_products(body)
        zero += z
        acc += a
        loads += Counter(i.op for i in body if i.op in ("LDG", "LDGSTS"))
        tma += sum(1 for i in body if i.op == "UTMALDG")
    return SassFacts(
        tensor_cores="+".join(tc) or "none",
        score_products=dict(sorted(zero.items())),
        accumulating_products=dict(sorted(acc.items())),
        main_loops=len(main),
        loop_global_loads=dict(sorted(loads.items())),
        loop_tma_loads=tma,
        tma_loads=ops["UTMALDG"],
        local_stores=ops["STL"],
        local_loads=ops["LDL"],
    )


def nvdisasm_path() -> Path:
    """The nvdisasm Triton bundles (triton/backends/nvidia/bin)."""
    import triton.backends.nvidia as nvidia

    path = Path(nvidia.__file__).parent / "bin" / "nvdisasm"
    if not path.exists():
        raise FileNotFoundError(f"Triton's nvdisasm is missing ({path})")
    return path


def disassemble(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "kernel.cubin"
        src.write_bytes(cubin)
        return subprocess.run(
            [str(nvdisasm_path()), "-c", str(src)], capture_output=True, text=True, check=True
        ).stdout


def shape(opcode: str) -> tuple[int, int, int] | None:
    """(M, N, K) of a wgmma opcode ('HGMMA.64x128x16.F32.BF16'); None for mma.sync's fixed shapes."""
    m = _SHAPE.search(opcode)
    return tuple(int(x) for x in m.groups()) if m else None


def _products(counts: dict) -> str:
    """'HGMMA 64x64x16 x16', 'HMMA x128': a loop's tensor-core instructions of one kind."""
    parts = []
    for opcode, n in counts.items():
        mnk = shape(opcode)
        parts.append(f"{opcode.split('.', 1)[0]} {'x'.join(map(str, mnk)) + ' ' if mnk else ''}x{n}")
    return ", ".join(parts) or "-"


def describe_products(f: dict) -> str:
    """The table's products column: score products | accumulating products, in the main loops."""
    if not f["main_loops"]:
        return f["tensor_cores"] + " (no loop)" if f["tensor_cores"] != "none" else "none"
    return f"{_products(f['score_products'])} | {_products(f['accumulating_products'])}"


def describe_loads(f: dict) -> str:
    """The table's loop-loads column: TMA and plain global loads in the main loops."""
    if not f["main_loops"]:
        return "-"
    parts = [f"TMA {f['loop_tma_loads']}"] if f["loop_tma_loads"] else []
    parts += [f"{op} {n}" for op, n in f["loop_global_loads"].items()]
    return ", ".join(parts) or "none"


def describe_local(f: dict) -> str:
    """The table's local-memory column: STL / LDL instructions in the kernel."""
    return f"{f['local_stores']}/{f['local_loads']}"
