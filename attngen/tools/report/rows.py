"""What the report is made of: architectures, one Row per compiled (kernel, dtype, arch, config),
and the Job that produces it."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass


SMEM_LIMIT = {
    80: 166912,  # A100: 163 KB
    86: 101376,  # RTX 30xx, A40: 99 KB
    87: 166912,  # Jetson Orin
    89: 101376,  # RTX 40xx, L4, L40: 99 KB
    90: 232448,  # H100, H200: 227 KB
    100: 232448,  # B200: 227 KB
    120: 101376,  # RTX 50xx: 99 KB
}


DEFAULT_TIMEOUT = 300.0
"""Seconds one compilation may take; some oversized tiles keep LLVM busy for many minutes."""


def parse_arch(arch: str | int) -> int:
    """Compute capability from 'sm_90', 'sm90', 'sm_90a' or 90."""
    m = re.fullmatch(r"(?:sm_?)?(\d+)a?", str(arch).strip().lower())
    if not m or int(m.group(1)) not in SMEM_LIMIT:
        known = ", ".join(f"sm_{a}" for a in SMEM_LIMIT)
        raise ValueError(f"unknown GPU architecture {arch!r}; known: {known}")
    return int(m.group(1))


@dataclass
class Row:
    """One kernel compiled for one (dtype, architecture, config)."""

    spec: str
    module: str
    kernel: str
    dtype: str
    arch: int
    config: dict | None  # the module's _SPACES[kernel] entry; None for a kernel launched with fixed tiles
    label: str = ""  # the config as the table shows it
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    smem: int | None = None
    tensor_cores: str | None = None  # 'wgmma', 'mma', 'tcgen05' or 'none' (from the PTX)
    sass: dict | None = None  # sass.SassFacts.to_json(): what the GPU's own instructions show
    compile_s: float = 0.0
    error: str | None = None

    @property
    def spills(self) -> int:
        return (self.spill_stores or 0) + (self.spill_loads or 0)

    @property
    def problems(self) -> list[str]:
        if self.error is not None:
            return ["error: " + self.error.splitlines()[0]]
        out = []
        if self.spills > 0:
            out.append("spills")
        if self.smem is not None and self.smem > SMEM_LIMIT[self.arch]:
            out.append("smem overflow")
        return out

    @property
    def usable(self) -> bool:
        return not self.problems

    @property
    def verdict(self) -> str:
        return ", ".join(self.problems) or "ok"

    def to_json(self) -> dict:
        return {**asdict(self), "spills": self.spills, "verdict": self.verdict, "usable": self.usable}


@dataclass(frozen=True)
class Job:
    spec: str
    module: str
    kernel: str
    dtype: str
    arch: int
    index: int | None  # into the module's _SPACES[kernel]; None for a kernel launched with fixed tiles
    config: dict | None
    options: tuple = ()  # (name, value) compile options over the config's, e.g. (("maxnreg", 64),)

    def row(self, **fields) -> Row:
        label = "fixed" if self.config is None else space_label(self.config)
        return Row(self.spec, self.module, self.kernel, self.dtype, self.arch, self.config, label, **fields)


def space_label(entry: dict) -> str:
    persistent = " persistent" if entry.get("persistent") else ""  # a masked spec's forward (autotune.with_persistent)
    return f"BM{entry['block_m']} BN{entry['block_n']} w{entry['num_warps']} s{entry['num_stages']}{persistent}"
