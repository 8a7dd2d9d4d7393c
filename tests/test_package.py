"""The installed package: a wheel built from this checkout, installed elsewhere, builds and runs a
user's spec from a directory outside the checkout, needing nothing but the installed attngen."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import attngen
from helpers import ROOT

USER_SPEC = """\
name: user_window
heads: {q: 4, kv: 2}
head_dim: 32
dtypes: [float32, float16]
params: {w: int}
mask: sliding_window(w)
tiles: {block_m: 16, block_n: 16, num_warps: 4, num_stages: 1}
"""

RUN = """\
import sys
sys.path.insert(0, "my_pkg")
import torch
import attngen, user_window
from attngen import attention_reference
assert attngen.__file__.startswith(sys.argv[1]), attngen.__file__
g = torch.Generator().manual_seed(0)
q = torch.randn(2, 4, 21, 32, generator=g)
k, v = (torch.randn(2, 2, 21, 32, generator=g) for _ in range(2))
o = user_window.attention(q, k, v, w=5)
ref, _ = attention_reference(q.double(), k.double(), v.double(), mask=lambda b, h, qi, ki: (qi >= ki) & (qi - ki < 5))
print("err", (o.double() - ref).abs().max().item())
"""


def _run(args, cwd, env):
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{args}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.slow
@pytest.mark.kernel  # the child runs a kernel
def test_wheel_builds_and_runs_a_spec_outside_the_checkout(tmp_path):
    # build the wheel from a copy of what it ships, so the checkout gets no build/ or egg-info
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "attngen", src / "attngen", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
          "-w", str(wheels), str(src)], tmp_path, os.environ.copy())
    (wheel,) = wheels.glob("attngen-*.whl")
    assert wheel.name.startswith(f"attngen-{attngen.__version__}-")
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
         tmp_path, os.environ.copy())
    assert (site / "attngen" / "codegen" / "templates" / "dense.py.jinja").is_file()

    # a user's directory: the installed attngen first on the path, the checkout nowhere on it
    user = tmp_path / "user"
    user.mkdir()
    (user / "user_window.yaml").write_text(USER_SPEC)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(site)
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = _run([sys.executable, "-m", "attngen", "--version"], user, env)
    assert out.strip() == f"attngen {attngen.__version__}"
    out = _run([sys.executable, "-m", "attngen", "build", "user_window.yaml", "--out", "my_pkg/"], user, env)
    assert "user_window.py" in out and (user / "my_pkg" / "user_window.py").is_file()
    (user / "run.py").write_text(RUN)
    out = _run([sys.executable, "run.py", str(site)], user, env)
    err = float(out.split("err")[1])
    assert err < 1e-4, out
