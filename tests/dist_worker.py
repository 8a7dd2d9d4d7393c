"""The process side of tests/test_distributed.py: each spawned rank joins a gloo process group, runs a
batch of cases through attngen.distributed and saves what it saw; the parent compares. Kept apart
from the test module so that a child imports neither pytest nor hypothesis."""

from __future__ import annotations

import datetime
import sys
import time
import traceback
from pathlib import Path

TIMEOUT_S = 120  # init_process_group's timeout: a collective that waits longer fails instead of hanging


def spawn(world: int, cases: list, workdir: Path, timeout_s: float) -> list:
    """Run `cases` on `world` spawned ranks; the list of each rank's results. Raises RuntimeError (with
    the ranks' tracebacks) when a rank fails or the ranks do not finish within timeout_s; every child
    is ended before returning."""
    import torch
    import torch.multiprocessing as mp

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    jobs = workdir / "cases.pt"
    torch.save(cases, jobs)
    ctx = mp.get_context("spawn")
    # children get the parent's environment (TRITON_INTERPRET included) and sys.path
    procs = [ctx.Process(target=_main, args=(r, world, str(workdir), TIMEOUT_S), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    finally:
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
    errors = [(workdir / f"rank{r}.err") for r in range(world)]
    text = "\n".join(f"rank {r}:\n{e.read_text()}" for r, e in enumerate(errors) if e.exists())
    if hung:
        raise RuntimeError(f"ranks {hung} did not finish within {timeout_s} s\n{text}")
    if text or any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"exit codes {[p.exitcode for p in procs]}\n{text}")
    return [torch.load(workdir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _main(rank: int, world: int, workdir: str, timeout_s: int) -> None:
    workdir = Path(workdir)
    try:
        import attngen.runtime  # noqa: F401  (first: the interpreter choice, as in the parent)
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{workdir / 'store'}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            cases = torch.load(workdir / "cases.pt", weights_only=False)
            out = [_run_case(case) for case in cases]
            torch.save(out, workdir / f"rank{rank}.pt")
        finally:
            dist.destroy_process_group()
    except BaseException:
        (workdir / f"rank{rank}.err").write_text(traceback.format_exc())
        sys.exit(1)


def _module(name: str):
    from attngen.tools.verify import import_generated

    root = Path(__file__).resolve().parent.parent
    return import_generated(root / "generated" / f"{name}.py")


def _count_calls(mod):
    """Wrap mod._forward / mod._backward with counters; returns (counts, undo)."""
    counts = {"forward": 0, "backward": 0}
    fwd, bwd = mod._forward, mod._backward

    def forward(*a, **kw):
        counts["forward"] += 1
        return fwd(*a, **kw)

    def backward(*a, **kw):
        counts["backward"] += 1
        return bwd(*a, **kw)

    mod._forward, mod._backward = forward, backward

    def undo():
        mod._forward, mod._backward = fwd, bwd

    return counts, undo


def _run_case(case: dict) -> dict:
    import torch
    import torch.distributed as dist

    from attngen import distributed as cp

    if case["kind"] == "error":
        return _run_error(case)
    mod = _module(case["module"])
    layout, mode = case["layout"], case["mode"]
    q, k, v = (cp.shard(t, 2, layout) for t in case["qkv"])
    for t in (q, k, v):
        t.requires_grad_()
    params = {}
    learn = {}
    for n, x in case["params"].items():
        if isinstance(x, torch.Tensor) and n in case.get("learn", ()):
            learn[n] = x.detach().clone().requires_grad_()
            params[n] = learn[n]
        else:
            params[n] = x
    counts, undo = _count_calls(mod)
    try:
        o, lse = cp.context_parallel_attention(mod, q, k, v, mode=mode, layout=layout, return_lse=True, **params)
        fwd_calls = counts["forward"]
        do, dlse = cp.shard(case["do"], 2, layout), cp.shard(case["dlse"], 2, layout)
        torch.autograd.backward((o, lse), (do.to(o.dtype), dlse))
        bwd_calls = counts["backward"]
    finally:
        undo()
    result = {
        "calls": (fwd_calls, bwd_calls),
        "rank": dist.get_rank(),
        "o": cp.unshard(o, 2, layout), "lse": cp.unshard(lse, 2, layout),
        "dq": cp.unshard(q.grad, 2, layout), "dk": cp.unshard(k.grad, 2, layout), "dv": cp.unshard(v.grad, 2, layout),
        **{f"d{n}": t.grad for n, t in learn.items()},
    }
    if case.get("twice"):  # determinism: a second run gives the same bits, forward and backward
        first = [t.detach().clone() for t in (o, lse, q.grad, k.grad, v.grad, *(x.grad for x in learn.values()))]
        for t in (q, k, v, *learn.values()):
            t.grad = None
        o2, lse2 = cp.context_parallel_attention(mod, q, k, v, mode=mode, layout=layout, return_lse=True, **params)
        torch.autograd.backward((o2, lse2), (do.to(o2.dtype), dlse))
        second = [o2, lse2, q.grad, k.grad, v.grad, *(x.grad for x in learn.values())]
        result["same_twice"] = all(torch.equal(a, b) for a, b in zip(first, second))
    if dist.get_rank() != 0:  # the parent compares rank 0's gathered tensors; every rank reports its calls
        result = {k_: v_ for k_, v_ in result.items() if k_ in ("calls", "rank", "same_twice")}
    return result


def _run_error(case: dict) -> dict:
    """A bad call; returns the ValueError's message (or None: no error) on this rank."""
    import torch
    import torch.distributed as dist

    from attngen import distributed as cp

    rank = dist.get_rank()
    mod = _module(case["module"])
    what = case["what"]
    q, k, v = case["qkv"]
    try:
        if what == "shard":
            cp.shard(q, 2, case["layout"])
        else:
            q, k, v = (cp.shard(t, 2, "contiguous") for t in (q, k, v))
            if what == "unequal" and rank == 1:
                q, k, v = q[:, :, :-2], k[:, :, :-2], v[:, :, :-2]
            if what == "odd":
                q, k, v = q[:, :, :-1], k[:, :, :-1], v[:, :, :-1]
            if what == "param" and rank == 1:
                case["params"] = {**case["params"], "w": case["params"]["w"] + 1}
            cp.context_parallel_attention(mod, q, k, v, mode=case.get("mode", "ring"), layout=case["layout"],
                                          **case["params"])
    except ValueError as e:
        # the group still works after the error: nothing is left half-sent
        t = torch.ones(1)
        dist.all_reduce(t)
        return {"error": str(e), "after": float(t)}
    return {"error": None}
