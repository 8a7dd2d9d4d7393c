"""The persistent grid of the padded forward of masked specs (autotune.with_persistent): a fixed
number of programs each looping over (query tile, batch x head) work items, longest query tiles
first, consecutive items sharing a KV head.

The work order is checked on the generated module's own index function (`_work_item`, plain integer
arithmetic, run in Python), the space and config plumbing on the CPU; the kernel with the persistent
config forced runs in Triton's interpreter against the float64 reference (forward and backward);
the sm_90 compile is in tests/test_hopper.py's style (aot)."""

from __future__ import annotations

import contextlib
import math
import sys

import pytest
import torch
import triton

from attngen import runtime
from attngen.testing import check_module

from helpers import ROOT, assert_all_ok, generated


def _schedule(mod, n_tiles, n_bh, programs):
    """Per program, the (tile, bh) items it runs, in order: the kernel's loop `for w in
    range(program, n_tiles * n_bh, programs)` over mod._work_item."""
    return [
        [tuple(mod._work_item.fn(w, n_tiles, n_bh)) for w in range(p, n_tiles * n_bh, programs)]
        for p in range(programs)
    ]


@pytest.mark.parametrize("n_tiles, batch, programs", [(1, 1, 3), (5, 2, 3), (7, 3, 132), (4, 1, 1), (33, 2, 16)])
def test_work_order_covers_every_item_once_longest_first(n_tiles, batch, programs):
    mod = generated("llama3_gqa")  # 32 query heads, groups of 4 on 8 KV heads
    n_bh = batch * mod.Q_HEADS
    sched = _schedule(mod, n_tiles, n_bh, programs)
    items = [it for prog in sched for it in prog]
    assert sorted(items) == [(t, bh) for t in range(n_tiles) for bh in range(n_bh)]  # each exactly once
    # in launch order (item w = round * programs + program): the query tiles never increase, so
    # under a causal mask (query tile t sees about t + 1 key tiles) the longest items go first
    order = [mod._work_item.fn(w, n_tiles, n_bh) for w in range(n_tiles * n_bh)]
    tiles = [t for t, _ in order]
    assert tiles == sorted(tiles, reverse=True) and tiles[0] == n_tiles - 1
    causal_work = [t + 1 for t in tiles]
    assert causal_work == sorted(causal_work, reverse=True)
    # each program's own items run longest first as well
    for prog in sched:
        assert [t for t, _ in prog] == sorted((t for t, _ in prog), reverse=True)
    # consecutive items (the programs running at the same time) share a KV head: every aligned run
    # of GROUP items is one query tile of one (batch, KV head)
    for w0 in range(0, n_tiles * n_bh, mod.GROUP):
        run = order[w0:w0 + mod.GROUP]
        assert len({(t, bh // mod.Q_HEADS, (bh % mod.Q_HEADS) // mod.GROUP) for t, bh in run}) == 1, run


def test_persistent_candidates_only_for_the_masked_forward():
    masked, plain = generated("llama3_gqa"), generated("mha")
    assert masked.MASK == "causal" and plain.MASK == "none"
    fwd = masked._SPACES["_fwd_kernel"]
    half = len(fwd) // 2
    # every kept config twice, the non-persistent one first (the interpreter runs the first)
    assert [c["persistent"] for c in fwd] == [False] * half + [True] * half
    assert [{**c, "persistent": True} for c in fwd[:half]] == fwd[half:]
    assert all("persistent" not in c for k in ("_bwd_dkdv_kernel", "_bwd_dq_kernel") for c in masked._SPACES[k])
    assert all("persistent" not in c for space in plain._SPACES.values() for c in space)
    assert "PERSISTENT" not in plain._fwd_kernel.fn.arg_names and not hasattr(plain, "_work_item")


def test_configs_and_the_tune_cache_carry_the_grid_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNGEN_CONFIGS", "all")
    monkeypatch.setattr(runtime, "INTERPRET", False)
    space = [dict(block_m=64, block_n=32, num_warps=4, num_stages=2, persistent=p) for p in (False, True)]
    cfgs = runtime.configs(space)
    assert [c.kwargs.get("PERSISTENT") for c in cfgs] == [False, True]
    assert [runtime._config_dict(c) for c in cfgs] == space
    assert "PERSISTENT" not in runtime.configs([{k: v for k, v in space[0].items() if k != "persistent"}])[0].kwargs
    # a persisted persistent winner is found again, not its non-persistent twin
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path))
    tc = runtime.TuneCache("m._fwd_kernel@x")
    args = {"N_Q_BUCKET": 64, "N_K_BUCKET": 64}

    class _Kernel:
        best_config = cfgs[1]

    assert tc.prune(cfgs, args) == cfgs and tc.pending
    tc.record(_Kernel())
    assert runtime.TuneCache("m._fwd_kernel@x").prune(cfgs, args) == [cfgs[1]]


def test_persistent_programs():
    assert runtime.persistent_programs(torch.device("cpu"), 100) == runtime.INTERPRETER_PROGRAMS
    assert runtime.persistent_programs(torch.device("cpu"), 2) == 2
    assert runtime.persistent_programs(torch.device("cpu"), 0) == 1


# ----------------------------------------------------------------------------- interpreted

@contextlib.contextmanager
def forced_persistent(mod):
    """Within the block the module's forward autotunes over one config: its first (the interpreter's)
    with the persistent grid; counts the persistent launches (runtime.persistent_programs calls).
    Every imported copy of the module is forced (the module's custom ops run the copy imported last,
    which another test may have imported, e.g. the report's)."""
    copies = {id(m): m for m in list(sys.modules.values())
              if getattr(m, "SPEC_SHA256", None) == mod.SPEC_SHA256 and getattr(m, "NAME", None) == mod.NAME}
    copies[id(mod)] = mod
    saved = []
    for m in copies.values():
        kernel = m._fwd_kernel
        saved.append((kernel, kernel.configs, dict(kernel.cache)))
        first = kernel.configs[0]
        kernel.configs = [triton.Config({**first.kwargs, "PERSISTENT": True}, num_warps=first.num_warps,
                                        num_stages=first.num_stages)]
        kernel.cache.clear()
    launches = []
    real = runtime.persistent_programs

    def counting(device, work):
        launches.append(work)
        return real(device, work)

    runtime.persistent_programs = counting
    try:
        yield launches
    finally:
        runtime.persistent_programs = real
        for kernel, configs, cache in saved:
            kernel.configs = configs
            kernel.cache.clear()
            kernel.cache.update(cache)


@pytest.mark.kernel
@pytest.mark.parametrize(
    "name, dtype, b, n_q, n_k, offsets, params",
    [
        ("llama3_gqa", torch.bfloat16, 2, 37, 50, dict(kv_offset=0, q_offset=13), {}),  # GQA, ragged tails
        ("llama3_gqa", torch.float16, 1, 1, 1, {}, {}),  # length 1
        ("llama3_gqa", torch.float16, 1, 40, 45, dict(kv_offset=9), {}),  # rows 0..8 see no key
        ("mqa", torch.float16, 2, 70, 20, dict(q_offset=5, kv_offset=60), {}),
        ("sliding_window", torch.float16, 1, 50, 50, dict(q_offset=7, kv_offset=7), {"w": 9}),
    ],
)
def test_persistent_forward_matches_the_reference(name, dtype, b, n_q, n_k, offsets, params):
    mod = generated(name)
    g = torch.Generator().manual_seed(n_q + n_k)
    q = torch.randn(b, mod.Q_HEADS, n_q, mod.HEAD_DIM, generator=g).to(dtype)
    k = torch.randn(b, mod.KV_HEADS, n_k, mod.HEAD_DIM, generator=g).to(dtype)
    v = torch.randn(b, mod.KV_HEADS, n_k, mod.V_HEAD_DIM, generator=g).to(dtype)
    if name == "sliding_window":
        params = {n: torch.tensor(x) if isinstance(mod.PARAMS.get(n), dict) else x for n, x in params.items()}
    with forced_persistent(mod) as launches:
        results = check_module(mod, q, k, v, params=params, **offsets)  # forward and backward
    assert launches, "the persistent grid was not launched"
    tiles = math.ceil(n_q / mod._SPACES["_fwd_kernel"][0]["block_m"])
    assert launches[0] == tiles * b * mod.Q_HEADS
    assert_all_ok(results, f"{name} {dtype} {b}x{n_q}x{n_k} {offsets}")


@pytest.mark.kernel
def test_persistent_forward_with_tma_matches_the_reference():
    mod = generated("llama3_gqa")
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 32, 33, 128, generator=g).to(torch.bfloat16)
    k = torch.randn(1, 8, 40, 128, generator=g).to(torch.bfloat16)
    v = torch.randn(1, 8, 40, 128, generator=g).to(torch.bfloat16)
    with runtime.force_tma("on"), forced_persistent(mod) as launches:
        results = check_module(mod, q, k, v, kv_offset=7)
    assert launches
    assert_all_ok(results, "llama3_gqa persistent + TMA")


# ----------------------------------------------------------------------------- compiled for sm_90

@pytest.mark.aot
def test_llama3_bf16_persistent_forward_at_the_hopper_config_keeps_wgmma_and_tma():
    from test_hopper import _aot_facts

    mod = generated("llama3_gqa")
    assert dict(block_m=128, block_n=64, num_warps=8, num_stages=2, persistent=True) in mod._SPACES["_fwd_kernel"]
    f = _aot_facts(ROOT / "generated" / "llama3_gqa.py", "_fwd_kernel", "bf16", (128, 64, 8, 2, 1))
    assert f["persistent"] and f["use_tma"], f
    assert f["spills"] == 0 and f["regs"] <= 255, f
    assert f["wgmma"] == f["sass_HGMMA"] > 0 and f["wgmma_a_from_registers"] > 0, f
    assert f["sass_UTMALDG"] > 0 and f["sass_LDG"] == 0 and f["sass_LDGSTS"] == 0 and f["ptx_cp_async"] == 0, f
    # the loop over work items (Q by TMA, descriptors per item) holds the two KV loops, each still
    # pipelined with K and V by TMA and both products on wgmma
    outer, *inner = f["loops"]
    assert outer["tma_loads"] > 0 and outer["wgmma"] > 0, f
    assert inner == [{"tma_loads": 2, "loads": 0, "async_copies": 0, "wgmma": 2}] * 2, f
