"""Driver side: worker processes (spawned, each in its own process group) that run calls under a
time limit, replacing a worker that times out or dies."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections import deque
from multiprocessing.connection import wait

from attngen.tools.report.record import worker_init


def _worker_main(conn) -> None:
    """Serve (function, argument) calls from the driver until it sends None or goes away."""
    os.setpgid(0, 0)  # its own process group, so a timed-out compile is killed with its ptxas
    worker_init()
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        fn, arg = task
        conn.send(fn(arg))


class _Worker:
    def __init__(self):
        # spawn, not fork: the worker imports Triton and the modules afresh, with TRITON_INTERPRET=0
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child,), daemon=True)
        self.proc.start()
        child.close()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # not yet in its own group, or gone
            self.proc.kill()
        self.proc.join()

    def close(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.kill()


class Pool:
    """Worker processes that compute fn(arg) calls, each under a time limit."""

    def __init__(self, jobs: int, timeout: float):
        self.jobs, self.timeout = max(1, jobs), timeout
        self.idle: list[_Worker] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for w in self.idle:
            w.close()
        self.idle = []

    def map(self, fn, args: list, failed, progress=None) -> list:
        """[fn(a) for a in args]. A call that runs past the time limit, or whose worker dies,
        yields failed(a, reason) instead, and its worker is replaced."""
        results: list = [None] * len(args)
        pending = deque(range(len(args)))
        while len(self.idle) < min(self.jobs, len(args)):
            self.idle.append(_Worker())
        busy: dict = {}  # connection -> (worker, index, start time)
        done = 0
        try:
            while pending or busy:
                while self.idle and pending:
                    w, i = self.idle.pop(), pending.popleft()
                    w.conn.send((fn, args[i]))
                    busy[w.conn] = (w, i, time.monotonic())
                deadline = min(t for _, _, t in busy.values()) + self.timeout
                finished = 0
                for conn in wait(list(busy), timeout=max(0.0, deadline - time.monotonic())):
                    w, i, _ = busy.pop(conn)
                    try:
                        results[i] = conn.recv()
                        self.idle.append(w)
                    except EOFError:
                        w.kill()
                        results[i] = failed(args[i], f"worker process died (exit code {w.proc.exitcode})")
                        self.idle.append(_Worker())
                    finished += 1
                now = time.monotonic()
                for conn, (w, i, t) in list(busy.items()):
                    if now - t > self.timeout:
                        del busy[conn]
                        w.kill()
                        results[i] = failed(args[i], f"ran past the {self.timeout:g} s time limit")
                        self.idle.append(_Worker())
                        finished += 1
                done += finished
                if progress and finished:
                    progress(done, len(args))
        finally:
            for w, _, _ in busy.values():  # interrupted: nothing may outlive the report
                w.kill()
        return results
