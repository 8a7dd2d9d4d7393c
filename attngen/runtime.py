"""Helpers the generated modules import at run time: backend selection, input checks, allocation.

This module needs torch and triton only (never jinja2 or sympy), so a generated module works
wherever those two are installed alongside attngen.

Importing it on a machine without a CUDA device selects Triton's CPU interpreter (by setting
TRITON_INTERPRET=1 unless the caller has set it), which must happen before the kernels' @triton.jit
functions are defined: generated modules and attngen.kernels import this module first for that
reason. Whether triton itself was imported earlier does not matter (see _interpret_triton_stdlib).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402  (after the interpreter choice above)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
"""True when kernels run in Triton's interpreter (on the CPU) rather than compiled for a GPU."""


def _interpret_triton_stdlib() -> None:
    """Make triton.language's own @triton.jit helpers (tl.sum, tl.max, tl.cdiv, ...) interpreted.

    They are built when triton is first imported: if that happened before the interpreter was
    selected (a user or a library imported triton first), they are compiled-mode functions, which an
    interpreted kernel cannot call. Each such helper is swapped for its interpreted twin, built from
    the same Python function, wherever triton.language binds it (its modules and tensor methods), so
    the import order does not matter. Only triton's own helpers are touched.
    """
    if not INTERPRET:
        return
    import triton.language as tl
    from triton.language import core, standard
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if not isinstance(getattr(standard, "zeros", None), JITFunction):
        return  # triton was first imported with the interpreter selected: nothing to do
    spaces = [vars(tl), vars(standard), vars(core)]
    for extra in ("random", "math"):
        mod = getattr(tl, extra, None)
        if mod is not None:
            spaces.append(vars(mod))
    twins: dict[int, object] = {}
    for space in spaces:
        for name, obj in list(space.items()):
            if isinstance(obj, JITFunction):
                twin = twins.setdefault(id(obj), InterpretedFunction(obj.fn))
                space[name] = twin  # module dicts are the helpers' globals: their calls follow too
    for name, obj in list(vars(core.tensor).items()):
        if isinstance(obj, JITFunction):
            setattr(core.tensor, name, twins.setdefault(id(obj), InterpretedFunction(obj.fn)))
    if isinstance(getattr(standard, "zeros", None), JITFunction):  # a Triton laid out differently
        raise ImportError(
            "attngen: Triton was imported before attngen selected its CPU interpreter (there is no "
            "CUDA device), and this Triton's helpers could not be switched to it. Import the generated "
            "module (or attngen.runtime) before triton, or set TRITON_INTERPRET=1 in the environment."
        )


_interpret_triton_stdlib()


def _interpreter_rejects_numpy() -> bool:
    """True when this Triton's interpreter cannot run under this numpy: Triton 3.6's (and older)
    turns a one-element index array into a Python int with int(array), which numpy 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars") on every dense kernel; Triton
    3.9's squeezes the array first. Decided by reading the interpreter's own code, so a Triton that
    has the fix passes whatever its version number."""
    import inspect

    import numpy

    if tuple(int(x) for x in numpy.__version__.split(".")[:2]) < (2, 4):
        return False
    try:
        from triton.runtime import interpreter

        return "int(self.handle.data))" in inspect.getsource(interpreter._patch_lang_tensor)
    except (AttributeError, ImportError, OSError, TypeError):  # another layout: assume it works
        return False


if INTERPRET and _interpreter_rejects_numpy():
    import numpy

    raise ImportError(
        f"attngen: Triton {triton.__version__}'s CPU interpreter cannot run with numpy {numpy.__version__} "
        "(it needs numpy < 2.4; Triton 3.9 works with either). There is no CUDA device, so kernels would "
        "run in the interpreter: install 'numpy<2.4' or triton>=3.9."
    )

DEVICE = "cpu" if INTERPRET else "cuda"
"""Where generated modules expect their tensors in this process."""

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}

_POISON = False


def backend() -> str:
    """The path kernels take in this process: 'triton-interpreter' (CPU) or 'cuda'."""
    return "triton-interpreter" if INTERPRET else "cuda"


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Fill every output and gradient buffer with NaN before the kernels write it.

    For tests: an element a kernel forgets to write then shows up as NaN instead of stale memory.
    """
    global _POISON
    old, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = old


def empty(shape, *, dtype, device) -> torch.Tensor:
    """torch.empty, or poisoned inside poison_outputs(): NaN for floats, the most negative value
    for integers (never a valid index), so an entry a kernel forgets to write shows up."""
    if _POISON:
        fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def empty_like_layout(ref: torch.Tensor, shape, *, dtype) -> torch.Tensor:
    """A [B, H, N, D] buffer with `ref`'s memory layout when `ref` is a [B, N, H, D] tensor seen
    through .transpose(1, 2), so callers can transpose the result back without a copy."""
    b, h, n, d = shape
    if ref.dim() == 4 and ref.stride(1) < ref.stride(2) and ref.stride(3) == 1:
        return empty((b, n, h, d), dtype=dtype, device=ref.device).transpose(1, 2)
    return empty(shape, dtype=dtype, device=ref.device)


def empty_like(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t)
    if _POISON:
        out.fill_(float("nan"))
    return out


def configs(space: list[dict]) -> list[triton.Config]:
    """Autotune configs from the plan's space. The interpreter runs one (the first in the space,
    which the plan orders smallest tiles first): timing under the interpreter means nothing.
    ATTNGEN_CONFIGS=first does the same on a GPU (quick test runs without autotuning)."""
    only_first = INTERPRET or os.environ.get("ATTNGEN_CONFIGS", "all") == "first"
    chosen = space[:1] if only_first else space
    return [
        triton.Config(
            # a masked spec's forward entries also choose its grid (autotune.with_persistent)
            {"BLOCK_M": c["block_m"], "BLOCK_N": c["block_n"], **({"PERSISTENT": c["persistent"]} if "persistent" in c else {})},
            num_warps=c["num_warps"],
            num_stages=c["num_stages"],
        )
        for c in chosen
    ]


# ----------------------------------------------------------------------------- autotune cache

CACHE_VERSION = 1


def cache_path() -> Path:
    """Where tuned configs persist: $ATTNGEN_CACHE_DIR/autotune.json, else ~/.cache/attngen/."""
    root = os.environ.get("ATTNGEN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "attngen")
    return Path(root) / "autotune.json"


def _device_name() -> str:
    if INTERPRET or not torch.cuda.is_available():
        return "interpreter"
    return torch.cuda.get_device_name()


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"attngen: ignoring unreadable autotune cache {path} ({e}); configs will be re-tuned")
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        warnings.warn(f"attngen: ignoring autotune cache {path} with an unknown format; configs will be re-tuned")
        return {}
    return data["entries"]


def _config_dict(c: triton.Config) -> dict:
    d = {"block_m": c.kwargs["BLOCK_M"], "block_n": c.kwargs["BLOCK_N"], "num_warps": c.num_warps, "num_stages": c.num_stages}
    if "PERSISTENT" in c.kwargs:
        d["persistent"] = bool(c.kwargs["PERSISTENT"])
    return d


INTERPRETER_PROGRAMS = 3
"""Programs of a persistent grid under the interpreter (fewer than the work items of most tests, so
each program loops)."""


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device, work: int) -> int:
    """The program count of a persistent grid over `work` items: one per SM of a CUDA device
    (INTERPRETER_PROGRAMS elsewhere), never more than the items (at least 1)."""
    dev = torch.device(device)
    n = _sm_count(dev.index if dev.index is not None else torch.cuda.current_device()) if dev.type == "cuda" else INTERPRETER_PROGRAMS
    return max(1, min(n, work))


class TuneCache:
    """Persists each kernel's autotune winner across processes.

    Entries are keyed by kernel identity (module, kernel, spec hash), device name, Triton version and
    the autotune key (sequence-length buckets and dtype). A corrupt file or an entry naming a config
    that is not in the kernel's space gives a warning and a re-tune, never an error.
    """

    def __init__(self, kernel_id: str):
        self.kernel_id = kernel_id
        self.pending: str | None = None

    def entry_key(self, named_args: dict) -> str:
        dtype = next((str(v.dtype) for v in named_args.values() if hasattr(v, "dtype")), "-")
        parts = [self.kernel_id, _device_name(), triton.__version__, dtype]
        parts += [f"{k}={named_args[k]}" for k in sorted(named_args) if k.endswith("_BUCKET")]
        return "|".join(parts)

    def prune(self, configs, named_args, **kwargs):
        """Autotune early-prune hook: a cached winner short-cuts the benchmark."""
        key = self.entry_key(named_args)
        entry = _read_cache(cache_path()).get(key)
        if entry is not None:
            for c in configs:
                if _config_dict(c) == entry:
                    self.pending = None
                    return [c]
            warnings.warn(f"attngen: cached config {entry} for {key} is not in the kernel's space; re-tuning")
        self.pending = key
        return configs

    def record(self, kernel) -> None:
        """After a launch: persist the winner of a benchmark that just ran."""
        if self.pending is None or getattr(kernel, "best_config", None) is None:
            return
        key, self.pending = self.pending, None
        path = cache_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            entries = _read_cache(path)
            entries[key] = _config_dict(kernel.best_config)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".autotune.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError as e:
            warnings.warn(f"attngen: could not write autotune cache {path} ({e})")


def seq_bucket(n: int) -> int:
    """Autotune key for a sequence length: the next power of two, so new lengths in the same
    bucket reuse the tuned config instead of re-tuning."""
    return 1 << max(0, int(n) - 1).bit_length()


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether kernels must upcast tl.dot operands to float32.

    Triton's interpreter computes tl.dot on bf16 operands wrongly (errors around 1e10 on a 16x16
    product), while fp16 and fp32 are exact; bf16 operands are exact in float32, so upcasting there
    reproduces the GPU's bf16 x bf16 -> fp32 product.
    """
    return INTERPRET and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs are multiplied in full precision ('ieee'), not TF32: an fp32 kernel should be as
    accurate as fp32 PyTorch."""
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------- TMA (sm_90+)

TMA_MODES = ("auto", "on", "off")
_TMA_FORCED: str | None = None


def tma_mode() -> str:
    """'auto' (TMA on sm_90+ CUDA devices), 'on' (wherever the layout allows, the interpreter
    included: for tests) or 'off': force_tma() inside its block, else $ATTNGEN_TMA, else 'auto'."""
    mode = _TMA_FORCED or os.environ.get("ATTNGEN_TMA", "auto")
    if mode not in TMA_MODES:
        raise ValueError(f"attngen: ATTNGEN_TMA={mode!r}; expected one of {', '.join(TMA_MODES)}")
    return mode


@contextlib.contextmanager
def force_tma(mode: str | bool):
    """Within the block, use_tma() follows `mode` ('on' / True, 'off' / False, 'auto')."""
    global _TMA_FORCED
    mode = {True: "on", False: "off"}.get(mode, mode)
    if mode not in TMA_MODES:
        raise ValueError(f"force_tma: expected one of {', '.join(TMA_MODES)} or a bool, got {mode!r}")
    old, _TMA_FORCED = _TMA_FORCED, mode
    try:
        yield
    finally:
        _TMA_FORCED = old


def tma_layout_ok(t: torch.Tensor) -> bool:
    """Whether TMA can address every head of t: its last stride is 1, and its base address and
    every other stride (of a dim longer than 1) are non-zero multiples of 16 bytes, so each (batch,
    head)'s rows, and a packed sequence's first row, start 16-byte aligned (a broadcast, stride-0
    dim is refused)."""
    if t.dim() == 0 or (t.stride(-1) != 1 and t.shape[-1] > 1) or t.data_ptr() % 16:
        return False
    size = t.element_size()
    return all(s > 0 and s * size % 16 == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)


def tma_arch(arch: int) -> bool:
    """Whether kernels compiled for `arch` (sm_XY as XY) take the TMA path: Hopper (sm_90) on."""
    return arch >= 90


def use_tma(*tensors: torch.Tensor) -> bool:
    """The kernels' USE_TMA: tiles through TMA tensor descriptors rather than pointer loads. In mode
    'auto' on a CUDA device of compute capability 9.0 or more, in mode 'on' anywhere (the
    interpreter runs the descriptor loads), never in mode 'off'; always only when every tensor's
    layout allows it (tma_layout_ok). When it says yes it makes sure Triton has an allocator for the
    descriptors' scratch memory (tma_allocator)."""
    mode = tma_mode()
    if mode == "off" or not all(tma_layout_ok(t) for t in tensors):
        return False
    if mode == "auto":
        dev = tensors[0].device
        if INTERPRET or dev.type != "cuda" or not tma_arch(int("%d%d" % torch.cuda.get_device_capability(dev))):
            return False
    tma_allocator()
    return True


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device=DEVICE)


def tma_allocator() -> None:
    """Kernels that build tensor descriptors on the device need global scratch memory, which Triton
    asks of the allocator given to triton.set_allocator: install one over torch's allocator unless
    one is set already (Triton keeps it in a context variable, so this runs per context)."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
    except ImportError:  # another Triton layout: set ours
        triton.set_allocator(_scratch)
        return
    if isinstance(_allocator.get(), NullAllocator):
        triton.set_allocator(_scratch)


def check_inputs(
    name: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    v_head_dim: int,
    dtypes: tuple[str, ...],
) -> None:
    """Raise ValueError naming the tensor and what was expected."""
    allowed = ", ".join(dtypes)
    for tname, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: {tname} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: {tname} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}")
        if t.dtype not in DTYPE_NAMES or DTYPE_NAMES[t.dtype] not in dtypes:
            raise ValueError(f"{name}: {tname} has dtype {t.dtype}; this module was built for {allowed}")
        if INTERPRET and t.device.type != "cpu":
            raise ValueError(
                f"{name}: {tname} is on {t.device}, but kernels run in Triton's CPU interpreter "
                "(no CUDA device, or TRITON_INTERPRET=1): pass CPU tensors"
            )
        if not INTERPRET and t.device.type != "cuda":
            raise ValueError(f"{name}: {tname} is on {t.device}; expected a CUDA tensor")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{name}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{name}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, hq, _, d = q.shape
    if hq != q_heads:
        raise ValueError(f"{name}: q has {hq} heads (dim 1 of [B, H, N, D]); expected {q_heads}")
    if d != head_dim:
        raise ValueError(f"{name}: q has head_dim {d}; expected {head_dim}")
    for tname, t, dim in (("k", k, head_dim), ("v", v, v_head_dim)):
        if t.shape[0] != b:
            raise ValueError(f"{name}: {tname} has batch {t.shape[0]}; expected {b} (q's batch)")
        if t.shape[1] != kv_heads:
            raise ValueError(f"{name}: {tname} has {t.shape[1]} heads; expected {kv_heads} KV heads")
        if t.shape[3] != dim:
            raise ValueError(f"{name}: {tname} has head_dim {t.shape[3]}; expected {dim}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"{name}: v has {v.shape[2]} keys but k has {k.shape[2]}")


# Kernel integer arithmetic is 32-bit: an int parameter enters sums with positions and lengths.
PARAM_INT_RANGE = (-(2**30), 2**30)


PARAM_DTYPES = {"int32": torch.int32, "int64": torch.int64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Pairs per query-row chunk of the learnable tensors' gradient pass (float32 value + int64 index
# each: 48 MiB per learnable tensor at this size).
PARAM_GRAD_ELEMS = 1 << 22


def check_params(name: str, decls: dict, values: dict, unknown: dict | None = None, *, device=None) -> tuple:
    """The parameters as a tuple in declaration order; ValueError naming a missing, unknown or
    ill-typed one. `decls` maps name -> 'int' | 'float' | {'tensor': DTYPE, 'dims': N}; a tensor
    must have that dtype and number of dims, at least one element, and live on `device`."""
    import math
    import numbers

    if unknown:
        extra = sorted(unknown)
        expected = ", ".join(decls) or "none"
        raise ValueError(f"{name}: unknown parameter{'s' * (len(extra) > 1)} {', '.join(extra)} (parameters: {expected})")
    out = []
    for pname, kind in decls.items():
        v = values.get(pname)
        if v is None:
            what = f"{kind['tensor']} tensor, {kind['dims']} dims" if isinstance(kind, dict) else kind
            raise ValueError(f"{name}: missing parameter {pname} ({what}); pass {pname}=...")
        if isinstance(kind, dict):
            dtype, dims = PARAM_DTYPES[kind["tensor"]], kind["dims"]
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"{name}: parameter {pname} must be a {kind['tensor']} tensor, got {type(v).__name__}")
            if v.dtype != dtype:
                raise ValueError(f"{name}: parameter {pname} must have dtype {dtype}, got {v.dtype}")
            if v.dim() != dims:
                raise ValueError(f"{name}: parameter {pname} must have {dims} dims, got shape {tuple(v.shape)}")
            if v.numel() == 0:
                raise ValueError(f"{name}: parameter {pname} must have at least one element, got shape {tuple(v.shape)}")
            if device is not None and v.device != torch.device(device):
                raise ValueError(f"{name}: parameter {pname} is on {v.device}, expected {device} (where q is)")
            out.append(v)
        elif kind == "int":
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"{name}: parameter {pname} must be an int, got {type(v).__name__}")
            lo, hi = PARAM_INT_RANGE
            if not lo <= int(v) <= hi:
                raise ValueError(f"{name}: parameter {pname} = {int(v)} is out of range [{lo}, {hi}]")
            out.append(int(v))
        else:
            # abs(v) < inf: false for nan and +-inf, and traceable by torch.compile for a symbolic float
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not abs(v) < math.inf:
                raise ValueError(f"{name}: parameter {pname} must be a finite float, got {v!r}")
            out.append(float(v))
    return tuple(out)


# Positions (an offset plus a row) stay within this bound, so that sums with int parameters
# (PARAM_INT_RANGE) and lengths stay inside the kernels' 32-bit integers.
POSITION_MAX = 2**30


def check_offsets(name: str, q_offset, kv_offset, n_q: int, n_k: int) -> tuple[int, int]:
    """attention()'s q_offset and kv_offset as ints: each an int >= 0 (not a bool, float or
    tensor) with offset + length <= POSITION_MAX; ValueError naming the argument."""
    import numbers

    out = []
    for arg, v, n in (("q_offset", q_offset, n_q), ("kv_offset", kv_offset, n_k)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"{name}: {arg} must be an int, got {type(v).__name__}")
        v = int(v)
        if v < 0:
            raise ValueError(f"{name}: {arg} must be >= 0, got {v}")
        if v + n > POSITION_MAX:
            raise ValueError(f"{name}: {arg} + the sequence length ({v} + {n}) exceeds {POSITION_MAX} (32-bit positions)")
        out.append(v)
    return out[0], out[1]


# ----------------------------------------------------------------------------- generated modules


def import_path(path: str | os.PathLike):
    """Import a generated module from its file (no package or sys.path changes needed). It is
    registered in sys.modules under a name of its own (`attngen_generated.<stem>`, then
    `<stem>_2`, ... for later imports), because torch.compile looks a traced function's module up there."""
    import sys

    path = Path(path)
    name, n = f"attngen_generated.{path.stem}", 1
    while name in sys.modules:
        n += 1
        name = f"attngen_generated.{path.stem}_{n}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


def import_sibling(module_file: str, name: str):
    """Import the generated module `name` from the directory of `module_file` (a generated
    module's __file__): an NSA module imports its branch modules this way, so it works however it
    was itself imported (by file path or as part of a package)."""
    path = Path(module_file).resolve().parent / f"{name}.py"
    if not path.is_file():
        raise ImportError(f"attngen: {path} is missing; it is built with {Path(module_file).name} (run attngen build)")
    return import_path(path)


# ----------------------------------------------------------------------------- NSA

# The block arithmetic and mean pooling are the oracle's own (torch only, at the input's dtype):
# generated NSA modules pool k and v with exactly the function the reference uses.
from attngen.reference.nsa import compress_mean, num_compressed  # noqa: E402


def check_nsa_inputs(
    name: str, q, k, v, gates, k_cmp, v_cmp, *, q_heads: int, kv_heads: int, head_dim: int, v_head_dim: int,
    dtypes: tuple[str, ...], block: int, stride: int,
) -> None:
    """check_inputs for q, k, v, plus what NSA needs: one sequence length for queries and keys,
    gates [B, Hq, N, 3] and, when given, k_cmp [B, Hkv, C, D] / v_cmp [B, Hkv, C, Dv] with
    C = num_compressed(N, block, stride), all in q's dtype and on q's device. ValueError naming
    the tensor."""
    check_inputs(name, q, k, v, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, v_head_dim=v_head_dim, dtypes=dtypes)
    b, _, n, _ = q.shape
    if k.shape[2] != n:
        raise ValueError(f"{name}: k has {k.shape[2]} keys but q has {n} queries; NSA is self-attention (one length)")
    if (k_cmp is None) != (v_cmp is None):
        raise ValueError(f"{name}: give both k_cmp and v_cmp, or neither (then both are mean-pooled from k, v)")
    c = num_compressed(n, block, stride)
    wanted = [("gates", gates, (b, q_heads, n, 3))]
    if k_cmp is not None:
        wanted += [("k_cmp", k_cmp, (b, kv_heads, c, head_dim)), ("v_cmp", v_cmp, (b, kv_heads, c, v_head_dim))]
    check_like_q(name, q, wanted)


def check_like_q(fn: str, q, wanted) -> None:
    """Each (name, tensor, shape) of `wanted` is a tensor of exactly that shape with q's dtype and
    device; else a ValueError naming it (`fn` prefixes the message)."""
    for tname, t, shape in wanted:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{fn}: {tname} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{fn}: {tname} has shape {tuple(t.shape)}; expected {shape}")
        if t.dtype != q.dtype:
            raise ValueError(f"{fn}: {tname} has dtype {t.dtype}; expected q's dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{fn}: {tname} is on {t.device}; expected q's device {q.device}")


def index_sum_(total: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """total[idx[i]] += val[i] for every i (1-D total), summed in an order fixed by the data: the
    pairs sorted by index (stably), a float64 running sum, one difference per index. Deterministic
    on every device and thread count, unlike index_put_(accumulate=True), which on the CPU adds
    float32 in parallel with atomics. Costs a sort of idx."""
    idx, val = idx.reshape(-1), val.reshape(-1)
    if idx.numel() == 0:
        return total
    idx_s, order = torch.sort(idx, stable=True)
    run = val[order].to(torch.float64).cumsum(0)
    last = torch.ones_like(idx_s, dtype=torch.bool)
    last[:-1] = idx_s[1:] != idx_s[:-1]
    ends = run[last]
    sums = torch.diff(ends, prepend=ends.new_zeros(1))
    at = idx_s[last]  # distinct indices: no two updates meet
    total[at] += sums.to(total.dtype)
    return total


def kernel_params(params: tuple) -> tuple:
    """The kernel arguments of checked parameters: a scalar as itself, a tensor as its data,
    strides and sizes (expr.tensor_args's order)."""
    out = []
    for v in params:
        if isinstance(v, torch.Tensor):
            out += [v.detach(), *v.stride(), *v.shape]
        else:
            out.append(v)
    return tuple(out)


ID_CHUNK = 16  # positions per [min, max] entry of id_ranges: the smallest tile
_ID_PAD = 256  # the largest tile: a tile's chunks are always inside the padded arrays


def id_ranges(ids: torch.Tensor, batch: int, n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (batch row, ID_CHUNK rows): the min and max of the ids the mask reads, as contiguous
    [batch, P // ID_CHUNK] tensors (P: n rounded up to _ID_PAD). Row (b, i) is at position
    offset + i and reads ids[b, offset + i], or 0 outside the tensor (as the kernels' loads); rows
    past n repeat row n - 1, so a tile that reaches past the end has the range of its real rows.
    O(batch * n)."""
    rows, cols = min(batch, ids.shape[0]), max(0, min(n, ids.shape[1] - offset))
    full = torch.zeros((batch, n), dtype=ids.dtype, device=ids.device)
    full[:rows, :cols] = ids[:rows, offset:offset + cols]
    padded = -(-n // _ID_PAD) * _ID_PAD
    pos = torch.arange(padded, device=ids.device).clamp_(max=n - 1)
    chunks = full[:, pos].view(batch, padded // ID_CHUNK, ID_CHUNK)
    return chunks.amin(-1).contiguous(), chunks.amax(-1).contiguous()


# ----------------------------------------------------------------------------- packed sequences

def check_varlen(
    name: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    *,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    v_head_dim: int,
    dtypes: tuple[str, ...],
    values: bool = True,
) -> None:
    """attention_varlen()'s inputs: q [total_q, Hq, D], k [total_k, Hkv, D], v [total_k, Hkv, Dv];
    cu_seqlens_* int32 [B + 1] on q's device; max_seqlen_* ints at most POSITION_MAX; with
    values=True also check_cu_seqlens (which reads cu_seqlens on the host). ValueError naming the
    argument. values=False checks only what needs no tensor's values (the module's wrapper does
    that; its op reads the values, so that a compiled caller keeps one graph)."""
    import numbers

    for tname, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: {tname} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name}: {tname} must be 3-D [total, H, D] (packed sequences), got shape {tuple(t.shape)}")
    # the [B, H, N, D] checks on the packed tensors seen as one batch of [1, H, total, D]
    check_inputs(
        name, *(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)),
        q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, v_head_dim=v_head_dim, dtypes=dtypes,
    )
    for arg, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise ValueError(f"{name}: {arg} must be an int32 torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise ValueError(f"{name}: {arg} must have dtype torch.int32, got {cu.dtype}")
        if cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"{name}: {arg} must be 1-D [B + 1], got shape {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name}: {arg} is on {cu.device}, expected {q.device} (where q is)")
    for arg, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, (numbers.Integral, torch.SymInt)):
            raise ValueError(f"{name}: {arg} must be an int, got {type(m).__name__}")
        if m > POSITION_MAX:
            raise ValueError(f"{name}: {arg} = {int(m)} exceeds {POSITION_MAX} (32-bit positions)")
    if values:
        check_cu_seqlens(name, cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)


def check_cu_seqlens(name: str, cu_seqlens_q, cu_seqlens_k, total_q: int, total_k: int, max_seqlen_q: int, max_seqlen_k: int) -> int:
    """The values of checked cu_seqlens (int32 [B + 1] each): starting at 0, non-decreasing, ending at
    total_q / total_k, as many sequences in both, every sequence at most max_seqlen_*. Returns B; ValueError naming the argument.
    Reads cu_seqlens once on the host."""
    cus = []
    for arg, cu, total in (("cu_seqlens_q", cu_seqlens_q, total_q), ("cu_seqlens_k", cu_seqlens_k, total_k)):
        vals = cu.tolist()
        if vals[0] != 0:
            raise ValueError(f"{name}: {arg} must start at 0, got {vals[0]}")
        for i in range(len(vals) - 1):
            if vals[i + 1] < vals[i]:
                raise ValueError(f"{name}: {arg} must be non-decreasing, got {vals[i]} then {vals[i + 1]} at index {i}")
        if vals[-1] != total:
            raise ValueError(f"{name}: {arg} ends at {vals[-1]}, but {'q' if arg == 'cu_seqlens_q' else 'k'} has {total} rows")
        cus.append(vals)
    if len(cus[0]) != len(cus[1]):
        raise ValueError(
            f"{name}: cu_seqlens_q has {len(cus[0]) - 1} sequences but cu_seqlens_k has {len(cus[1]) - 1}"
        )
    for arg, m, vals in (("max_seqlen_q", max_seqlen_q, cus[0]), ("max_seqlen_k", max_seqlen_k, cus[1])):
        longest = max((b - a for a, b in zip(vals, vals[1:])), default=0)
        if int(m) < longest:
            raise ValueError(f"{name}: {arg} = {int(m)} is smaller than a sequence's length ({longest})")
    return len(cus[0]) - 1


def packed_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """The [B, H, N, D] strides under which the kernels address a packed [total, H, D] tensor: batch
    stride 0 (a program finds its sequence's first row from cu_seqlens), then head, row, column."""
    return 0, t.stride(1), t.stride(0), t.stride(2)


def packed_rows(t: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of a packed [total, H, D] tensor as a [1, H, end - start, D] view with batch
    stride 0 (no copy)."""
    s = t[start:end]
    return s.as_strided((1, s.shape[1], s.shape[0], s.shape[2]), packed_strides(s), s.storage_offset())


# ----------------------------------------------------------------------------- torch.library ops

# A generated module's entry points run their kernels inside custom ops of this namespace, so
# torch.compile records each as one graph node (no graph break) whose output metadata comes from a
# fake function, and autograd (eager or compiled) reaches the backward through another op.
OP_NAMESPACE = "attngen"
_OPS: dict = {}  # qualified name -> torch.library CustomOpDef, defined once per process
_OP_FNS: dict = {}  # qualified name -> {role: function} of the module that defined it last


def op_name(module: str, spec_sha256: str, what: str) -> str:
    """A generated module's op name, `<module>_<spec sha prefix>_<what>`: a rebuilt spec gets new ops."""
    return f"{module}_{spec_sha256[:12]}_{what}"


def _latest(qual: str, role: str):
    def call(*args, **kwargs):
        return _OP_FNS[qual][role](*args, **kwargs)

    call.__name__ = call.__qualname__ = f"{qual.replace('::', '_')}_{role}"
    return call


def define_op(name: str, impl, fake, *, mutates_args=(), backward=None, setup_context=None):
    """The custom op attngen::`name` running `impl`, whose type annotations give the op's schema;
    `fake(*args)` returns outputs of the exact shapes, dtypes and strides without computing;
    `backward(ctx, *grads)` and `setup_context(ctx, inputs, output)` as torch.library.register_autograd.

    The op is defined once per process; a module imported again (same name and spec hash) re-points
    it at its own functions instead of registering the name twice."""
    qual = f"{OP_NAMESPACE}::{name}"
    _OP_FNS[qual] = {"impl": impl, "fake": fake, "backward": backward, "setup_context": setup_context}
    op = _OPS.get(qual)
    if op is None:
        infer = getattr(torch.library, "infer_schema", None)  # public from torch 2.5
        if infer is None:
            from torch._library.infer_schema import infer_schema as infer
        schema = infer(impl, mutates_args=mutates_args)
        op = torch.library.custom_op(qual, _latest(qual, "impl"), mutates_args=mutates_args, schema=schema)
        op.register_fake(_latest(qual, "fake"))
        if backward is not None:
            op.register_autograd(_latest(qual, "backward"), setup_context=_latest(qual, "setup_context"))
        _OPS[qual] = op
    return op


def save_with_params(ctx, tensors, params) -> None:
    """setup_context helper: save `tensors` and the tensor parameters for the backward, and keep the
    scalar parameters on ctx (params: the spec's parameters in declaration order)."""
    ctx.save_for_backward(*tensors, *(x for x in params if isinstance(x, torch.Tensor)))
    ctx.attngen_saved = (len(tensors), tuple(None if isinstance(x, torch.Tensor) else x for x in params))


def saved_with_params(ctx) -> tuple[tuple, tuple]:
    """The (tensors, params) that save_with_params kept, params in declaration order again."""
    n, scalars = ctx.attngen_saved
    saved = ctx.saved_tensors
    rest = iter(saved[n:])
    return tuple(saved[:n]), tuple(next(rest) if x is None else x for x in scalars)


def attention_outputs(q: torch.Tensor, heads: int, v_head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (o [B, heads, N, Dv] in q's dtype laid out as empty_like_layout, lse float32 [B, heads, N]):
    what a forward kernel writes, for fake functions and wrappers alike."""
    b, _, n, _ = q.shape
    o = empty_like_layout(q, (b, heads, n, v_head_dim), dtype=q.dtype)
    return o, empty((b, heads, n), dtype=torch.float32, device=q.device)
