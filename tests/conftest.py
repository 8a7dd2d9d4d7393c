import os
from pathlib import Path

# First: on a machine without CUDA this selects Triton's interpreter (TRITON_INTERPRET=1), which the
# kernels the tests define themselves need before they are decorated.
import attngen.runtime  # noqa: F401

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent

# Deterministic by default so CI is reproducible; ATTNGEN_HYPOTHESIS=explore draws fresh examples.
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("ATTNGEN_HYPOTHESIS", "ci"))


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    """Run every test from the repository root, where specs/ and generated/ live."""
    monkeypatch.chdir(ROOT)


@pytest.fixture(autouse=True)
def _fast_lane_runs_no_kernel(request, monkeypatch):
    """A test marked neither `kernel` nor `aot` (the fast lane, `make test-fast`) must not launch a
    Triton kernel: under the interpreter a launch fails the test, naming the kernel and the marker
    it needs. (On a GPU the launches are not watched.)"""
    if request.node.get_closest_marker("kernel") or request.node.get_closest_marker("aot"):
        return
    from attngen import runtime

    if not runtime.INTERPRET:
        return
    from triton.runtime.interpreter import GridExecutor

    def refuse(executor, *args, **kwargs):
        pytest.fail(
            f"{request.node.nodeid} launches the Triton kernel {executor.fn.__name__} but is not marked "
            "`kernel` (pytest.mark.kernel): kernel runs stay out of the fast lane",
            pytrace=False,
        )

    monkeypatch.setattr(GridExecutor, "__call__", refuse)
