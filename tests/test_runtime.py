"""Generated-module runtime behaviour: backend selection, input checks, layouts, tile bounds."""

import os
import subprocess
import sys

import pytest
import torch

from attngen import runtime
from attngen.testing import random_inputs

from helpers import ROOT, build_and_import, dense_spec, generated


@pytest.mark.kernel  # in a child process
def test_import_on_cpu_needs_no_environment_variable():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    code = (
        "import torch, sys; sys.path.insert(0, 'generated'); import mha;"
        "q = torch.randn(1, 4, 5, 64, dtype=torch.float16);"
        "print(mha.attention(q, q, q).shape, mha._rt.backend())"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "torch.Size([1, 4, 5, 64]) triton-interpreter" in r.stdout


def _inputs(mod, **kw):
    return random_inputs(mod, batch=1, n_q=4, n_k=6, dtype=torch.float16, **kw)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, k, v: (q.float(), k.float(), v.float()), "q has dtype torch.float32; this module was built for fp16, bf16"),
        (lambda q, k, v: (q, k.bfloat16(), v), "q, k, v must share one dtype"),
        (lambda q, k, v: (q[0], k, v), "q must be 4-D"),
        (lambda q, k, v: (q[:, :5], k, v), "q has 5 heads (dim 1 of [B, H, N, D]); expected 8"),
        (lambda q, k, v: (q, k.expand(1, 2, 6, 64), v), "k has 2 heads; expected 1 KV heads"),
        (lambda q, k, v: (q[..., :32], k, v), "q has head_dim 32; expected 64"),
        (lambda q, k, v: (q, k, v[..., :32]), "v has head_dim 32; expected 64"),
        (lambda q, k, v: (q, k, v[:, :, :5]), "v has 5 keys but k has 6"),
        (lambda q, k, v: (q, k.expand(2, 1, 6, 64), v), "k has batch 2; expected 1"),
        (lambda q, k, v: (q, k.to("meta"), v), "k is on meta"),
        (lambda q, k, v: ("q", k, v), "q must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_valueerror_naming_the_tensor(change, message):
    mod = generated("mqa")
    with pytest.raises(ValueError) as info:
        mod.attention(*change(*_inputs(mod)))
    assert message in str(info.value)
    assert str(info.value).startswith("mqa: ")


@pytest.mark.kernel
def test_bnhd_views_work_and_keep_their_layout():
    mod = generated("mqa")
    q, k, v = _inputs(mod, bnhd=True)
    assert not q.is_contiguous()
    o = mod.attention(q, k, v)
    assert o.transpose(1, 2).is_contiguous(), "o comes back in q's [B, N, H, D] layout"
    o_contig = mod.attention(q.contiguous(), k.contiguous(), v.contiguous())
    assert torch.equal(o, o_contig)


@pytest.mark.kernel
def test_backward_false_module(tmp_path):
    mod = build_and_import(tmp_path, dense_spec("fwd_only", extra="backward: false\n"))
    assert not hasattr(mod, "_backward")
    q, k, v = random_inputs(mod, batch=1, n_q=3, n_k=3, dtype=torch.float16)
    assert mod.attention(q, k, v).shape == (1, 4, 3, 32)
    with pytest.raises(RuntimeError, match="backward: false"):
        mod.attention(q.requires_grad_(), k, v)
    with torch.no_grad():
        mod.attention(q, k, v)


def test_empty_batch_and_queries():
    mod = generated("mha")
    q, k, v = random_inputs(mod, batch=1, n_q=0, n_k=5, dtype=torch.float16)
    assert mod.attention(q, k, v).shape == (1, 4, 0, 64)
    q, k, v = random_inputs(mod, batch=0, n_q=3, n_k=5, dtype=torch.float16)
    assert mod.attention(q, k, v).shape == (0, 4, 3, 64)


@pytest.mark.kernel  # in a child process
def test_triton_imported_first_still_runs_kernels():
    """On a CPU machine, importing triton (as a user or a library may) before the generated module
    leaves triton's own helpers (tl.max, tl.sum, ...) in compiled mode; the runtime switches them to
    the interpreter, so the kernels run and match the reference, forward and backward."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no CUDA device in the child, so the interpreter is chosen
    code = (
        "import triton, triton.language as tl, torch, sys; sys.path.insert(0, 'generated')\n"
        "from triton.runtime.jit import JITFunction\n"
        "assert isinstance(tl.sum, JITFunction)  # compiled-mode helpers before the module\n"
        "import mha\n"
        "from attngen import attention_reference\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q, k, v = (torch.randn(1, 4, 19, 64, generator=g, dtype=torch.float64) for _ in range(3))\n"
        "do = torch.randn(1, 4, 19, 64, generator=g, dtype=torch.float64)\n"
        "x = [t.float().requires_grad_() for t in (q, k, v)]\n"
        "o = mha.attention(*x)\n"
        "o.backward(do.float())\n"
        "r = [t.clone().requires_grad_() for t in (q, k, v)]\n"
        "ref = attention_reference(*r, mask=mha.MASK)[0]\n"
        "ref.backward(do)\n"
        "errs = [(o.double() - ref).abs().max().item()] + [(a.grad.double() - b.grad).abs().max().item() for a, b in zip(x, r)]\n"
        "print('max err', max(errs))\n"
        "assert max(errs) < 1e-4, errs\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "max err" in r.stdout

