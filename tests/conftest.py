import os
from pathlib import Path

# First, before any test module imports triton: on a machine without CUDA this selects Triton's
# interpreter, which must happen before triton builds its own @jit helpers.
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
