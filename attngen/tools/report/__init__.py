"""`attngen report`: compile every kernel of a generated module ahead of time for GPU architectures
that need not be present, and say which autotune configs are usable there.

For each kernel the module launches, each config of its autotune space (kernels launched with fixed
tiles have one), each dtype and each architecture, Triton compiles the kernel down to a cubin for
that architecture; the report gives registers per thread and spill bytes (from ptxas -v), shared
memory per block (from Triton's metadata), whether tensor-core instructions were emitted (from the
PTX) and the compile time. A config is usable when it compiles, spills nothing and fits the
architecture's shared memory per block.

The signature each kernel is compiled with is taken from a recorded launch: the module's `_forward`
and `_backward` run on contiguous [1, H, N, D] CPU tensors (N = RECORD_LEN) with every kernel
replaced by a recorder, so the constexprs, argument types and Triton's launch-time specialisation
(integers equal to 1 become constants, 16-byte aligned pointers and multiples of 16 get divisibility
hints) match what the module would compile on a GPU for such inputs. An NSA module's kernels (block
selection and selected-block attention) live in the kernel library (attngen.kernels); they are
recorded the same way from the library's wrappers, nsa_topn.topn_select and
nsa_selected.selected_attention (forward and backward), called with the module's constants at
N = NSA_RECORD_LEN, and reported under the module's spec as `nsa_topn.<kernel>` and
`nsa_selected.<kernel>`. Its dense branch modules (<name>_cmp, <name>_win) are reported as modules
of their own.

The package's parts: rows (Row, architectures), record (import a module, record its launches),
compile (one ahead-of-time compile and its statistics), pool (worker processes under a time
limit), run (the driver, the table and the command).

Compilation runs in worker processes with TRITON_INTERPRET=0, since importing a generated module
on a machine without a GPU otherwise selects Triton's CPU interpreter (see attngen.runtime).
"""

from attngen.tools.report.compile import tensor_core_kind
from attngen.tools.report.record import NSA_RECORD_LEN, RECORD_LEN
from attngen.tools.report.rows import DEFAULT_TIMEOUT, SMEM_LIMIT, Row, parse_arch
from attngen.tools.report.run import format_table, main, run_report, unusable, usable_configs

__all__ = [
    "DEFAULT_TIMEOUT", "NSA_RECORD_LEN", "RECORD_LEN", "SMEM_LIMIT", "Row", "format_table", "main", "parse_arch",
    "run_report", "tensor_core_kind", "unusable", "usable_configs",
]
