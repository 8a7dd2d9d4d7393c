"""The tile loops the plan emits (plan.tile_loops) walk exactly the tiles of the three loops over
classify.range_statements, in the same order and with the same masked flag: loops it leaves out
are empty for every tile, and loops it merges are contiguous. Checked with the Python mirror
(classify.evaluate) over shipped masks, lengths, tile sizes and parameter values; and the
generated modules print those loops and only those, with keyword flags."""

import random
import re

import pytest

from attngen.codegen.build import derived_specs
from attngen.planning.classify import evaluate, loops as all_loops, range_statements, walk
from attngen.planning.masks import LOOP_BOUNDS, mask_rule, tile_loops
from attngen.planning.plan import make_plan
from mirror import rule_for
from attngen.language.spec import load_spec
from helpers import ROOT, SPEC_PATHS

DENSE = {s.name: s for path in SPEC_PATHS for s0 in [load_spec(path)] for s in ([s0] if s0.sparse is None else derived_specs(s0))}
_OWN = {"fwd": ("m", "BLOCK_M", "BLOCK_N", "N_Q"), "dkdv": ("n", "BLOCK_N", "BLOCK_M", "N_K")}


def _walks(rule, kernel, env0):
    """Per tile of the kernel's own index: (the loops' visits over the range statements, the plan's
    loops' visits), each a list of (walked tile start, masked): for one conjunction the three
    loops [lo, full_lo), [full_lo, full_hi), [full_hi, hi); for a disjunction classify.loops."""
    t, own_block, walk_block, own_len = _OWN[kernel]
    lo, full_lo, full_hi, hi = LOOP_BOUNDS[kernel]
    loops = tile_loops(rule, kernel)
    step = env0[walk_block]
    disjunction = bool((rule.fwd if kernel == "fwd" else rule.dkdv).pieces)
    for start in range(0, env0[own_len], env0[own_block]):
        env = {**env0, f"start_{t}": start}
        for name, text, _ in range_statements(rule, kernel):
            env[name] = evaluate(text, env)
        if disjunction:
            three = [(s, x.masked) for x in all_loops(rule, kernel) for s in walk(x, env, step)]
        else:
            three = [(s, True) for s in range(env[lo], env[full_lo], step)]
            three += [(s, False) for s in range(env[full_lo], env[full_hi], step)]
            three += [(s, True) for s in range(env[full_hi], env[hi], step)]
        planned = [(s, x.masked) for x in loops for s in walk(x, env, step)]
        yield three, planned


@pytest.mark.parametrize("name", sorted(DENSE))
def test_planned_loops_walk_the_same_tiles_as_the_three_loops(name):
    spec = DENSE[name]
    rule = mask_rule(spec)
    ints = [n for n, k in spec.params if k == "int"]
    rng = random.Random(name)
    for _ in range(40):
        env0 = {
            "N_Q": rng.randint(1, 300), "N_K": rng.randint(1, 300),
            "BLOCK_M": rng.choice([16, 32, 64]), "BLOCK_N": rng.choice([16, 32, 64]),
            "i_b": rng.randint(0, 3), "i_h": rng.randint(0, 7),
            # the runtime offsets (query row i at position Q_OFF + i): 0, or up to past the lengths
            "Q_OFF": rng.choice([0, rng.randint(0, 400)]), "KV_OFF": rng.choice([0, rng.randint(0, 400)]),
            **{f"arg_{n}": rng.choice([rng.randint(-2, 8), rng.randint(0, 200)]) for n in ints},
        }
        for kernel in ("fwd", "dkdv"):
            for three, planned in _walks(rule, kernel, env0):
                assert planned == three, (kernel, env0)


@pytest.mark.parametrize("mask, fwd, dkdv", [
    ("none", [False, True], [False]),  # every tile full but the sequence end's; dK/dV all full
    ("causal", [False, True], [True, False]),
    ("kv_idx <= q_idx and kv_idx > q_idx - 4", [True, False, True], [True, False, True]),
    ("q_idx % 2 == kv_idx % 2", [True], [True]),  # nothing full: one masked loop
])
def test_empty_loops_are_left_out(mask, fwd, dkdv):
    rule = rule_for(mask)
    assert [x.masked for x in tile_loops(rule, "fwd")] == fwd
    assert [x.masked for x in tile_loops(rule, "dkdv")] == dkdv
    for q_off, kv_off in ((0, 0), (40, 3), (5, 77)):
        env0 = {"N_Q": 97, "N_K": 130, "BLOCK_M": 16, "BLOCK_N": 32, "i_b": 0, "i_h": 0, "Q_OFF": q_off, "KV_OFF": kv_off}
        for kernel in ("fwd", "dkdv"):
            for three, planned in _walks(rule, kernel, env0):
                assert planned == three


@pytest.mark.parametrize("name", sorted(DENSE))
def test_generated_modules_print_the_planned_loops_with_keyword_flags(name):
    plan = make_plan(DENSE[name])
    # the attention kernels' text: the KV-cache decoding section after it has loops of its own
    text = (ROOT / "generated" / f"{name}.py").read_text().split("\nfrom attngen.kernels import kvcache")[0]
    # a disjunction's masked walk runs part_n / part_m and computes the tile start from it
    kv_loops = re.findall(r"for (?:start_n|part_n) in range\((\w+), (\w+), BLOCK_N\)", text)
    q_loops = re.findall(r"for (?:start_m|part_m) in range\((\w+), (\w+), BLOCK_M\)", text)
    remaps = re.findall(r"for (part_[mn]) in range\(.*\n\s*start_[mn] = (.*)", text)
    assert remaps == [(x.var, x.remap) for x in plan.fwd_loops + plan.dkdv_loops * plan.backward + plan.fwd_loops * plan.backward
                      if x.var]
    fwd = [(x.start, x.end) for x in plan.fwd_loops]
    assert kv_loops == fwd * (2 if plan.backward else 1)  # the forward's, then dQ's
    assert q_loops == ([(x.start, x.end) for x in plan.dkdv_loops] if plan.backward else [])
    flags = re.findall(r"MASKED=(\w+)", text)
    assert flags == [str(x.masked) for x in plan.fwd_loops + plan.dkdv_loops * plan.backward + plan.fwd_loops * plan.backward]
    # no positional True / False among the tile calls' arguments
    for call in re.findall(r"= _(?:fwd|bwd_dq|bwd_dkdv)_tile\((.*?)\n\s*\)", text, re.S):
        assert not re.search(r"(^|[\s,(])(True|False)\s*,", call)
