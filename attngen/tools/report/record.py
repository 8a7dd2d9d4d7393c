"""Worker side, first step: import a generated module and record the launches of its kernels.

The module's `_forward` and `_backward` (an NSA module's kernel-library wrappers) run on contiguous
CPU tensors with every kernel replaced by a recorder, so each kernel's constexprs, argument types
and Triton's launch-time specialisation are those a GPU run would compile for such inputs."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


RECORD_LEN = 1024
"""Sequence length of the recorded launch: a multiple of 16, as in most runs, so sequence lengths
carry Triton's divisibility hint as they would on a GPU."""


NSA_RECORD_LEN = 4096
"""Sequence length of an NSA module's recorded launch: its block selection sizes a tile by the number
of selection blocks (up to a chunk of them), which a long sequence fills as real runs do."""

# Triton's names of the element types a launch passes tensors of (the pointer type is "*" + name).


def worker_init() -> None:
    # Before Triton or any generated module is imported in this process: compile, don't interpret;
    # autotune over the whole space (runtime.configs); have Triton print ptxas's -v log (registers,
    # spills) after each compilation.
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["ATTNGEN_CONFIGS"] = "all"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    import warnings

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION")


@dataclass
class Launch:
    fn: object  # the JITFunction
    configs: list | None  # the autotuner's triton.Config list; None when launched directly
    values: dict  # parameter name -> value at the recorded launch
    options: dict  # launch options given at the call (num_warps, ...)


VARLEN_SUFFIX = "[varlen]"
"""Report name suffix of a dense kernel's packed-sequence instantiation (attention_varlen)."""


def base_name(name: str) -> str:
    """The kernel a report name stands for (without VARLEN_SUFFIX)."""
    return name.removesuffix(VARLEN_SUFFIX)


_MODULES: dict[str, object] = {}


_LAUNCHES: dict[tuple[str, str], dict[str, Launch]] = {}


def _module(path: str):
    if path not in _MODULES:
        from attngen.tools.verify import import_generated

        _MODULES[path] = import_generated(path)
    return _MODULES[path]


def _jit_function(obj):
    from triton.runtime.jit import JITFunction

    while not isinstance(obj, JITFunction):  # autotuner / heuristics wrappers
        obj = obj.fn
    return obj


def _is_nsa(mod) -> bool:
    return hasattr(mod, "nsa_attention")


def _kernel_homes(mod) -> dict[str, object]:
    """The modules defining the kernels `mod` launches, by the prefix of their report names: a dense
    module's own kernels (no prefix); for an NSA module, the kernel library modules it calls."""
    if _is_nsa(mod):
        from attngen.kernels import nsa_decode, nsa_selected, nsa_topn

        return {"nsa_topn.": nsa_topn, "nsa_selected.": nsa_selected, "nsa_decode.": nsa_decode}
    return {"": mod}


def _record_launches(mod, dtype: str) -> dict[str, Launch]:
    """Run the module's wrappers with each kernel replaced by a recorder (in the module that defines
    it); return the first launch of each kernel, in launch order."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    homes = _kernel_homes(mod)
    # report name -> (defining module, attribute, kernel)
    found = {
        prefix + n: (home, n, o)
        for prefix, home in homes.items()
        for n, o in vars(home).items()
        if isinstance(o, (Autotuner, JITFunction))
    }
    kernels = {name: o for name, (_, _, o) in found.items()}
    calls: dict[str, tuple] = {}

    class _Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            # the packed-sequence instantiation (VARLEN=True) of a dense kernel is a kernel of its own
            return lambda *args, **kwargs: calls.setdefault(
                self.name + VARLEN_SUFFIX * bool(kwargs.get("VARLEN")), (args, kwargs)
            )

    try:
        for name, (home, attr, _) in found.items():
            setattr(home, attr, _Recorder(name))
        (_run_nsa if _is_nsa(mod) else _run_dense)(mod, dtype)
    finally:
        for home, attr, obj in found.values():
            setattr(home, attr, obj)

    launches = {}
    for name, (args, kwargs) in calls.items():
        obj = kernels[base_name(name)]
        fn = _jit_function(obj)
        values = dict(zip(fn.arg_names, args))
        values.update({a: x for a, x in kwargs.items() if a in fn.arg_names})
        options = {a: x for a, x in kwargs.items() if a not in fn.arg_names}
        configs = list(obj.configs) if isinstance(obj, Autotuner) else None
        launches[name] = Launch(fn, configs, values, options)
    return launches


def _qkv(mod, dtype: str, n: int):
    """Contiguous q, k, v [1, H, n, D] of the module's shapes (contents never read)."""
    import torch

    from attngen.runtime import TORCH_DTYPES

    t = TORCH_DTYPES[dtype]
    q = torch.empty(1, mod.Q_HEADS, n, mod.HEAD_DIM, dtype=t)
    k = torch.empty(1, mod.KV_HEADS, n, mod.HEAD_DIM, dtype=t)
    v = torch.empty(1, mod.KV_HEADS, n, mod.V_HEAD_DIM, dtype=t)
    return q, k, v


def _run_dense(mod, dtype: str) -> None:
    """A dense module's forward and backward, as attention() calls them."""
    import torch

    from attngen.testing import default_params

    n = RECORD_LEN
    q, k, v = _qkv(mod, dtype, n)
    scale = mod.HEAD_DIM**-0.5
    # parameters: scalars are never specialised on and tensors only by dtype: any representative value
    params = tuple(default_params(mod, batch=1, n_q=n, n_k=n, device="cpu").values())
    o, lse = mod._forward(q, k, v, scale, params)
    if hasattr(mod, "_backward"):
        mod._backward(q, k, v, o, lse, torch.empty_like(o), torch.zeros_like(lse), scale, params)
    if hasattr(mod, "_forward_varlen"):
        _run_varlen(mod, q, k, v, scale, params)
    if hasattr(mod, "_decode_forward"):
        _run_decode(mod, q, k, v, scale, params)


def _run_varlen(mod, q, k, v, scale, params) -> None:
    """Packed sequences as attention_varlen calls them: the [1, H, n, D] inputs' rows as two
    sequences of n / 2 rows each (the kernels' VARLEN instantiation, recorded as KERNEL[varlen])."""
    import torch

    n = q.shape[2]
    cu = torch.tensor([0, n // 2, n], dtype=torch.int32)
    q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))
    o, lse = mod._forward_varlen(q, k, v, scale, params, cu, cu, n // 2, n // 2)
    if hasattr(mod, "_backward_varlen"):
        mod._backward_varlen(q, k, v, o, lse, torch.empty_like(o), torch.zeros_like(lse), scale, params, cu, cu, n // 2, n // 2)


def _run_decode(mod, q, k, v, scale, params) -> None:
    """KV-cache decoding as attention_with_kvcache calls it: one query per sequence (Nq = 1) over a
    contiguous cache of RECORD_LEN positions, RECORD_LEN - 1 of them full and one appended, one split
    (the split count and a paged cache change runtime values and two constexprs only)."""
    import torch

    seqlens = torch.full((q.shape[0],), RECORD_LEN - 1, dtype=torch.int32)
    mod._decode_forward(q[:, :, :1], k, v, seqlens, None, 1, scale, params, 1, 0)


def _run_nsa(mod, dtype: str) -> None:
    """An NSA module's library kernels, as nsa_attention calls them: the block selection with the
    module's parameters, then selected-block attention forward and backward over int64 index lists
    (valid ones: every position selects block 0); and decoding's compression branch
    (nsa_attention_with_kvcache) for one query at the end of the sequence."""
    import torch

    from attngen.kernels import nsa_decode, nsa_selected, nsa_topn

    n = NSA_RECORD_LEN
    q, k, v = _qkv(mod, dtype, n)
    scale = mod.HEAD_DIM**-0.5
    n_cmp = max(0, (n - mod.BLOCK) // mod.STRIDE + 1)
    k_cmp = torch.zeros(1, mod.KV_HEADS, n_cmp, mod.HEAD_DIM, dtype=q.dtype)
    lse_cmp = torch.zeros(1, mod.Q_HEADS, n, dtype=torch.float32)
    # check=False: in a compiling process the checks demand CUDA tensors (the module's are CPU ones)
    nsa_topn.topn_select(
        q, k_cmp, lse_cmp, block=mod.BLOCK, stride=mod.STRIDE, select_block=mod.SELECT_BLOCK,
        top_n=mod.TOP_N, initial=mod.INITIAL, local=mod.LOCAL, score=mod.SCORE, per=mod.PER, scale=scale,
        check=False,
    )
    block_idx = torch.zeros(1, mod.KV_HEADS, n, mod.TOP_N, dtype=torch.int64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o, lse = nsa_selected.selected_attention(q, k, v, block_idx, mod.SELECT_BLOCK, scale)
    torch.autograd.backward((o, lse), (torch.empty_like(o), torch.zeros_like(lse)))
    # decoding's compression branch: one new query per sequence at the end of the cache
    q_pos = torch.full((1,), n - 1, dtype=torch.int32)
    v_cmp = torch.zeros(1, mod.KV_HEADS, n_cmp, mod.V_HEAD_DIM, dtype=q.dtype)
    nsa_decode.compressed_attention(
        q.detach()[:, :, -1:], k_cmp, v_cmp, q_pos, block=mod.BLOCK, stride=mod.STRIDE, scale=scale,
    )


def recorded_launches(path: str, dtype: str) -> dict[str, Launch]:
    if (path, dtype) not in _LAUNCHES:
        _LAUNCHES[path, dtype] = _record_launches(_module(path), dtype)
    return _LAUNCHES[path, dtype]


def describe(path: str) -> dict:
    """What to compile for one module: its dtypes, and each kernel with its configs."""
    try:
        mod = _module(path)
        launches = recorded_launches(path, mod.DTYPES[0])
        kernels = []
        for name, launch in launches.items():
            space = list(getattr(mod, "_SPACES", {}).get(base_name(name), ())) if launch.configs is not None else []
            if launch.configs is None:
                kernels.append((name, [None]))
            elif len(launch.configs) != len(space):
                raise RuntimeError(
                    f"{name} autotunes over {len(launch.configs)} configs but _SPACES has {len(space)}"
                )
            else:
                kernels.append((name, space))
        return {"name": mod.NAME, "dtypes": list(mod.DTYPES), "kernels": kernels, "error": None}
    except Exception as e:  # noqa: BLE001 - reported as a row, the report goes on
        return {"name": Path(path).stem, "dtypes": [], "kernels": [], "error": describe_error(e)}


def describe_error(e: BaseException) -> str:
    """A one-line cause first (the innermost exception), then the full text."""
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    text = str(root).strip()
    first = text.splitlines()[0] if text else ""
    ptxas = re.search(r"^ptxas[^\n]*error[^\n]*", text, re.MULTILINE | re.IGNORECASE)
    if ptxas:
        first = ptxas.group(0)
    elif getattr(root, "error_message", None):  # Triton's CompilationError: the cause, not "at L:C:"
        cause = root.error_message.strip().splitlines()[0].split(". ")[0]
        first = f"{cause} (line {getattr(root.node, 'lineno', '?')})"
    head = f"{type(root).__name__}: {first}".rstrip(": ")
    if len(head) > 160:
        head = head[:157] + "..."
    full = str(e) if root is e else f"{e}\n{text}"
    return f"{head}\n{full[:4000]}"
