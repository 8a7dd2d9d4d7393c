"""Hopper (sm_90) paths of the dense kernels: tiles through TMA tensor descriptors (forward: Q, K, V;
dQ: K, V; dK/dV: q, dO).

The selection (runtime.use_tma, the report's choice per architecture, what the wrappers pass) is
tested on the CPU; the TMA kernels run in Triton's interpreter, which executes tensor-descriptor
loads, against the float64 reference (ragged lengths, length 1, GQA, padded head dims, packed
sequences); and the compiled facts (wgmma for both products, TMA loads in the main loops, no plain
global loads, no spills) are read off an ahead-of-time compile for sm_90.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from attngen import runtime
from attngen.testing import check_module
from attngen.tools.report.compile import _target_values

from helpers import ROOT, assert_all_ok, build_and_import, dense_spec, generated


def _bhnd(b, h, n, d, dtype=torch.float16):
    return torch.randn(b, h, n, d).to(dtype)


# ----------------------------------------------------------------------------- selection (CPU)

def test_tma_layout_needs_unit_last_stride_and_16_byte_alignment():
    t = _bhnd(2, 4, 33, 128)
    assert runtime.tma_layout_ok(t)
    assert runtime.tma_layout_ok(t.transpose(1, 2).contiguous().transpose(1, 2))  # [B, N, H, D] storage
    assert not runtime.tma_layout_ok(t.transpose(2, 3))  # last stride not 1
    flat = torch.zeros(2 * 4 * 33 * 128 + 1, dtype=torch.float16)
    assert not runtime.tma_layout_ok(flat[1:].view(2, 4, 33, 128))  # base 2 bytes off
    assert not runtime.tma_layout_ok(_bhnd(1, 2, 5, 20))  # rows of 40 bytes
    assert runtime.tma_layout_ok(_bhnd(1, 2, 5, 24))  # rows of 48 bytes
    assert runtime.tma_layout_ok(_bhnd(1, 2, 5, 4, torch.float32))  # 16 bytes
    # a dim of length 1 is never stepped over, so its stride does not matter
    assert runtime.tma_layout_ok(_bhnd(1, 1, 6, 16).as_strided((1, 1, 6, 16), (3, 5, 16, 1)))
    packed = torch.randn(4, 30, 64).half().transpose(0, 1)  # attention_varlen's [total, H, D]
    assert runtime.tma_layout_ok(packed)


def test_use_tma_by_mode(monkeypatch):
    t = _bhnd(1, 2, 8, 32)
    odd = _bhnd(1, 2, 8, 20)
    monkeypatch.delenv("ATTNGEN_TMA", raising=False)
    assert runtime.tma_mode() == "auto"
    assert not runtime.use_tma(t, t, t)  # auto: only on a CUDA device of compute capability >= 9
    with runtime.force_tma(True):
        assert runtime.use_tma(t, t, t)
        assert not runtime.use_tma(t, odd, t)  # every tensor must be addressable
        with runtime.force_tma("off"):
            assert not runtime.use_tma(t, t, t)
        assert runtime.use_tma(t, t, t)
    monkeypatch.setenv("ATTNGEN_TMA", "on")
    assert runtime.use_tma(t, t, t)
    monkeypatch.setenv("ATTNGEN_TMA", "sometimes")
    with pytest.raises(ValueError, match="ATTNGEN_TMA"):
        runtime.use_tma(t, t, t)
    with pytest.raises(ValueError, match="force_tma"):
        with runtime.force_tma("maybe"):
            pass


def test_use_tma_installs_an_allocator_for_descriptor_scratch():
    from triton.runtime._allocation import NullAllocator, _allocator

    token = _allocator.set(NullAllocator())
    try:
        with runtime.force_tma("on"):
            t = _bhnd(1, 1, 4, 16)
            assert runtime.use_tma(t)
        buf = _allocator.get()(256, 128, None)
        assert buf.numel() == 256 and buf.device.type == runtime.DEVICE
        # one set by the caller is kept
        mine = lambda size, alignment, stream: torch.empty(size, dtype=torch.int8)  # noqa: E731
        _allocator.set(mine)
        with runtime.force_tma("on"):
            runtime.use_tma(t)
        assert _allocator.get() is mine
    finally:
        _allocator.reset(token)


def test_report_compiles_the_tma_path_for_sm90_only():
    t = _bhnd(1, 2, 16, 128)
    values = {"Q": t, "K": t, "V": t, "USE_TMA": False, "BLOCK_M": 64}
    assert _target_values(values, 90)["USE_TMA"] is True
    assert _target_values(values, 80)["USE_TMA"] is False
    assert _target_values({**values, "K": t.transpose(2, 3)}, 90)["USE_TMA"] is False
    assert values["USE_TMA"] is False  # the recorded launch is not changed
    assert _target_values({"Q": t, "BLOCK_M": 64}, 90) == {"Q": t, "BLOCK_M": 64}  # kernels without TMA


class _Recorder:
    """Stands for a kernel: records the keyword arguments of its launches, runs nothing."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(kwargs)


@pytest.mark.parametrize("mode", ["on", "off"])
def test_forward_wrappers_pass_the_selection(monkeypatch, mode):
    mod = generated("llama3_gqa")
    rec = _Recorder()
    monkeypatch.setattr(mod, "_fwd_kernel", rec)
    q, k = _bhnd(1, 32, 8, 128), _bhnd(1, 8, 8, 128)
    with runtime.force_tma(mode):
        mod._forward(q, k, k, 0.1, ())
        packed = [t[0].transpose(0, 1) for t in (q, k, k)]
        cu = torch.tensor([0, 3, 8], dtype=torch.int32)
        mod._forward_varlen(*packed, 0.1, (), cu, cu, 5, 5)
        mod._forward(q, k.transpose(2, 3).contiguous().transpose(2, 3), k, 0.1, ())  # K's last stride is not 1
    assert [c["USE_TMA"] for c in rec.calls] == [mode == "on", mode == "on", False]
    assert [c["VARLEN"] for c in rec.calls] == [False, True, False]


@pytest.mark.parametrize("mode", ["on", "off"])
def test_backward_wrappers_pass_the_selection(monkeypatch, mode):
    mod = generated("llama3_gqa")
    recs = {n: _Recorder() for n in ("_bwd_dkdv_kernel", "_bwd_dq_kernel", "_bwd_preprocess")}
    for n, r in recs.items():
        monkeypatch.setattr(mod, n, r)
    q, k = _bhnd(1, 32, 8, 128), _bhnd(1, 8, 8, 128)
    lse = torch.zeros(1, 32, 8)
    with runtime.force_tma(mode):
        mod._backward(q, k, k, q, lse, q, None, 0.1, ())
        mod._backward(q, k, k, q, lse, q.expand(1, 32, 8, 128).transpose(2, 3).contiguous().transpose(2, 3), None, 0.1, ())
    for n in ("_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        # dO with a last stride other than 1 takes the pointer loads
        assert [c["USE_TMA"] for c in recs[n].calls] == [mode == "on", False], n


# ----------------------------------------------------------------------------- the TMA kernels, interpreted

@pytest.mark.kernel
@pytest.mark.parametrize(
    "name, dtype, b, n_q, n_k",
    [
        ("llama3_gqa", torch.bfloat16, 2, 37, 50),  # GQA 4:1, ragged tails, causal with kv_offset
        ("llama3_gqa", torch.float16, 1, 1, 1),  # length 1
        ("gqa_hd80", torch.bfloat16, 1, 45, 45),  # head dims 80 / 48: padded columns zero-filled
        ("mqa", torch.float16, 1, 20, 70),
    ],
)
def test_tma_kernels_match_the_reference(name, dtype, b, n_q, n_k):
    mod = generated(name)
    g = torch.Generator().manual_seed(n_q)
    q = torch.randn(b, mod.Q_HEADS, n_q, mod.HEAD_DIM, generator=g).to(dtype)
    k = torch.randn(b, mod.KV_HEADS, n_k, mod.HEAD_DIM, generator=g).to(dtype)
    v = torch.randn(b, mod.KV_HEADS, n_k, mod.V_HEAD_DIM, generator=g).to(dtype)
    with runtime.force_tma("on"):
        assert runtime.use_tma(q, k, v)
        results = check_module(mod, q, k, v, kv_offset=0 if "mqa" in name else n_k - n_q)  # forward and backward
    assert_all_ok(results, f"{name} {dtype} {b}x{n_q}x{n_k}")


@pytest.mark.kernel
@pytest.mark.parametrize("n_q, n_k", [(37, 70), (1, 1)])
def test_tma_dkdv_with_64_row_kv_tiles_matches_the_reference(tmp_path, n_q, n_k):
    # dK/dV takes TMA only with KV tiles of 64 rows or more (the shipped specs' first, interpreted,
    # config has 32): a GQA spec of its own with 64-row KV tiles and a padded head dim
    mod = build_and_import(tmp_path, dense_spec(
        "tma_dkdv", q=4, kv=2, d=40, dtypes="[bf16]", tiles={"block_m": 16, "block_n": 64, "num_warps": 4, "num_stages": 1},
    ))
    g = torch.Generator().manual_seed(n_k)
    q = torch.randn(2, 4, n_q, 40, generator=g).to(torch.bfloat16)
    k = torch.randn(2, 2, n_k, 40, generator=g).to(torch.bfloat16)
    v = torch.randn(2, 2, n_k, 40, generator=g).to(torch.bfloat16)
    with runtime.force_tma("on"):
        assert_all_ok(check_module(mod, q, k, v, kv_offset=n_k - n_q), f"{n_q}x{n_k}")


@pytest.mark.kernel
def test_tma_kernels_of_packed_sequences_match_the_reference():
    from test_varlen import check_varlen

    mod = generated("llama3_gqa")
    lens_q, lens_k = [17, 0, 1, 40], [33, 5, 1, 40]  # ragged, empty, length 1
    with runtime.force_tma("on"):
        results = check_varlen(mod, lens_q, lens_k, torch.bfloat16, {})
    assert_all_ok(results, "llama3_gqa varlen with TMA")


# ----------------------------------------------------------------------------- compiled for sm_90

def _aot_facts(module, kernel, dtype, config, arch=90):
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "aot_facts.py"), str(module), kernel, dtype, ",".join(map(str, config)),
         "--arch", str(arch)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.aot
def test_llama3_bf16_forward_at_the_hopper_config_uses_wgmma_and_tma():
    mod = generated("llama3_gqa")
    config = (128, 64, 8, 2)
    assert dict(block_m=128, block_n=64, num_warps=8, num_stages=2, persistent=False) in mod._SPACES["_fwd_kernel"]  # grid per tile
    f = _aot_facts(ROOT / "generated" / "llama3_gqa.py", "_fwd_kernel", "bf16", config)
    assert f["use_tma"], f
    assert f["spills"] == 0 and f["regs"] <= 255, f
    # both products on wgmma: q k^T with both operands in shared memory, p v with p from registers
    assert f["wgmma_a_from_shared"] > 0 and f["wgmma_a_from_registers"] > 0, f
    assert f["sass_HGMMA"] == f["wgmma"], f
    # every global load is a TMA copy: none through registers or cp.async
    assert f["ptx_tma_loads"] > 0 and f["sass_UTMALDG"] > 0, f
    assert f["sass_LDG"] == 0 and f["sass_LDGSTS"] == 0 and f["ptx_cp_async"] == 0, f
    # the two main loops (partial tiles, full tiles) are pipelined: each body issues the next
    # tile's K and V copies and runs both products on wgmma
    assert len(f["loops"]) == 2, f
    for loop in f["loops"]:
        assert loop == {"tma_loads": 2, "loads": 0, "async_copies": 0, "wgmma": 2}, f


@pytest.mark.aot
def test_llama3_bf16_forward_for_sm80_keeps_pointer_loads():
    f = _aot_facts(ROOT / "generated" / "llama3_gqa.py", "_fwd_kernel", "bf16", (128, 64, 8, 2), arch=80)
    assert not f["use_tma"] and f["sass_UTMALDG"] == 0 and f["wgmma"] == 0, f
    assert all(loop["async_copies"] == 2 for loop in f["loops"]), f


@pytest.mark.aot
def test_llama3_bf16_backward_loads_its_streamed_tiles_by_tma_at_sm90():
    path = ROOT / "generated" / "llama3_gqa.py"
    dq = _aot_facts(path, "_bwd_dq_kernel", "bf16", (128, 64, 8, 2))
    assert dq["use_tma"] and dq["spills"] == 0, dq
    assert dq["wgmma"] == dq["sass_HGMMA"] > 0 and dq["wgmma_a_from_registers"] > 0, dq  # ds from registers
    assert dq["sass_LDGSTS"] == 0 and dq["ptx_cp_async"] == 0, dq  # q, dO, lse, delta: plain loads, once
    # both KV loops fetch K and V by TMA and run the three products (s, dp, dq) on wgmma
    assert [(x["tma_loads"], x["loads"], x["async_copies"], x["wgmma"]) for x in dq["loops"]] == [(2, 0, 0, 3)] * 2, dq
    dkdv = _aot_facts(path, "_bwd_dkdv_kernel", "bf16", (32, 64, 8, 2))
    assert dkdv["use_tma"] and dkdv["spills"] == 0, dkdv
    assert dkdv["wgmma"] == dkdv["sass_HGMMA"] > 0, dkdv
    # the query loops (inside the loop over the group's heads) fetch q and dO by TMA; only the row
    # statistics (lse, delta) come by cp.async
    inner = dkdv["loops"][1:]
    assert len(inner) == 2 and all(x["tma_loads"] == 2 and x["async_copies"] == 2 and x["loads"] == 0 for x in inner), dkdv
