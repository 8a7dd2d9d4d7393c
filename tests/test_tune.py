"""The persistent autotune cache: a second process reuses winners; bad entries re-tune, never crash."""

import json

import pytest
import triton

from attngen import runtime
from attngen.tools.cli import main as cli
from attngen.planning.autotune import KERNELS, SMEM_BUDGET, autotune_spaces, footprint, keep
from attngen.language.spec import parse_spec


def _configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=2)
        for bm, bn in ((32, 32), (64, 32), (64, 64))
    ]


class _FakeKernel:
    def __init__(self, best):
        self.best_config = best


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path))
    return tmp_path


ARGS = {"Q": runtime.empty((1,), dtype=runtime.torch.float16, device="cpu"), "N_Q_BUCKET": 1024, "N_K_BUCKET": 1024}


def test_winner_is_persisted_and_reused(cache_dir):
    configs = _configs()
    tuner = runtime.TuneCache("mod._fwd_kernel@abc")
    assert tuner.prune(configs, ARGS) == configs, "a miss benchmarks every config"
    tuner.record(_FakeKernel(configs[1]))
    saved = json.loads((cache_dir / "autotune.json").read_text())
    assert list(saved["entries"].values()) == [{"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2}]
    fresh = runtime.TuneCache("mod._fwd_kernel@abc")  # as in a second process
    assert fresh.prune(_configs(), ARGS)[0].kwargs == configs[1].kwargs
    other_bucket = dict(ARGS, N_Q_BUCKET=2048)
    assert len(fresh.prune(_configs(), other_bucket)) == 3, "another length bucket is tuned on its own"


def test_corrupt_cache_warns_and_retunes(cache_dir):
    (cache_dir / "autotune.json").write_text("{not json")
    tuner = runtime.TuneCache("k")
    with pytest.warns(UserWarning, match="unreadable autotune cache"):
        assert len(tuner.prune(_configs(), ARGS)) == 3
    with pytest.warns(UserWarning):
        tuner.record(_FakeKernel(_configs()[0]))
    assert json.loads((cache_dir / "autotune.json").read_text())["version"] == runtime.CACHE_VERSION


def test_stale_entry_warns_and_retunes(cache_dir):
    tuner = runtime.TuneCache("k")
    key = tuner.entry_key(ARGS)
    stale = {"block_m": 256, "block_n": 256, "num_warps": 8, "num_stages": 5}
    (cache_dir / "autotune.json").write_text(json.dumps({"version": runtime.CACHE_VERSION, "entries": {key: stale}}))
    with pytest.warns(UserWarning, match="not in the kernel's space"):
        assert len(tuner.prune(_configs(), ARGS)) == 3


def test_pruning_rule():
    # D = 128 bf16 forward: a 128x128 tile with 3 stages needs more than the sm_80 budget
    big = {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3}
    smem, _ = footprint("_fwd_kernel", big, 128, 128)
    assert smem * 2 > SMEM_BUDGET and not keep("_fwd_kernel", big, 128, 128, 2)
    assert keep("_fwd_kernel", {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2}, 128, 128, 2)
    # the accumulator rule: a 128 x 128 fp32 accumulator over 4 warps is 128 per thread (spills at sm_90)
    assert not keep("_fwd_kernel", {"block_m": 128, "block_n": 16, "num_warps": 4, "num_stages": 1}, 128, 128, 2)
    # dK/dV accumulates [BLOCK_N, D + DV]: the same tiles are fine for dQ but not for dK/dV
    c = {"block_m": 32, "block_n": 64, "num_warps": 4, "num_stages": 2}
    assert keep("_bwd_dq_kernel", c, 128, 128, 2) and not keep("_bwd_dkdv_kernel", c, 128, 128, 2)
    # dK/dV's smallest score tile: 16 x 32 on 4 warps spills at sm_90; 16 x 64 and 32 x 16 are kept
    for bm, bn, w, kept in ((16, 32, 4, False), (16, 64, 4, True), (16, 64, 8, True), (64, 16, 8, True)):
        c = {"block_m": bm, "block_n": bn, "num_warps": w, "num_stages": 2}
        assert keep("_bwd_dkdv_kernel", c, 64, 64, 2) is kept, c
        assert keep("_bwd_dq_kernel", c, 64, 64, 2)  # the floor is dK/dV's alone
    # among equal tiles dK/dV lists more warps first (its first config runs in the interpreter)
    two = parse_spec(
        "name: y\nheads: {q: 1, kv: 1}\nhead_dim: 32\ndtypes: fp16\nbackward: true\n"
        "tiles: {block_m: [16, 64], block_n: [32, 64], num_warps: [4, 8], num_stages: 2}\n",
        "y.yaml",
    )
    spaces = autotune_spaces(two)
    firsts = {k: (s[0]["block_m"], s[0]["block_n"], s[0]["num_warps"]) for k, (s, _) in spaces.items()}
    assert firsts["_bwd_dkdv_kernel"] == (16, 64, 8) and firsts["_fwd_kernel"] == (16, 32, 4)
    spec = parse_spec(
        "name: x\nheads: {q: 1, kv: 1}\nhead_dim: 256\ndtypes: fp32\n"
        "tiles: {block_m: 256, block_n: 256, num_warps: 4, num_stages: 4}\n",
        "x.yaml",
    )
    spaces = autotune_spaces(spec)
    assert set(spaces) == set(KERNELS)
    assert all(len(space) == 1 and pruned == 0 for space, pruned in spaces.values()), (
        "when the rule prunes everything the smallest config stays"
    )


def test_tune_command_on_the_cpu(capsys):
    assert cli(["tune", "specs/mha.yaml", "--out", "generated"]) == 0
    assert "nothing to tune without a GPU" in capsys.readouterr().out
