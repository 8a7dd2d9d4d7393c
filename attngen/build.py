"""Render specs into generated modules: deterministic, atomic, written only when changed."""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jinja2

from . import __version__
from .plan import make_plan
from .spec import Spec, SpecError, load_spec

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
DEFAULT_OUT = "generated"


@dataclass(frozen=True)
class Header:
    version: str
    spec_path: str
    spec_sha256: str
    command: str


def _env() -> jinja2.Environment:
    if not TEMPLATES.is_dir():
        raise FileNotFoundError(f"attngen templates not found at {TEMPLATES} (install attngen from a checkout)")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["py"] = repr  # a Python literal of a plan value
    return env


def display_path(path: str | Path) -> str:
    """The spec path as written into headers: relative to the working directory when below it."""
    p = Path(path).resolve()
    try:
        return p.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return p.as_posix()


def render(spec: Spec) -> str:
    """The generated module's source for a spec: a pure function of the spec and attngen's version."""
    shown = display_path(spec.path)
    header = Header(__version__, shown, spec.sha256, f"attngen build {shown}")
    text = _env().get_template("dense.py.jinja").render(p=make_plan(spec), h=header)
    text = re.sub(r"\n{4,}", "\n\n\n", text)  # at most two blank lines, as PEP 8 asks
    return text.rstrip("\n") + "\n"


def write_if_changed(path: Path, text: str) -> bool:
    """Atomically replace `path` with `text` unless it already holds exactly that; True if written."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def load_all(paths: list[str | Path]) -> list[Spec]:
    """Load every spec, collecting all problems before failing, and reject duplicate names."""
    specs, problems = [], []
    for path in paths:
        try:
            specs.append(load_spec(path))
        except SpecError as e:
            problems.extend(e.problems)
    seen: dict[str, str] = {}
    for s in specs:
        if s.name in seen:
            problems.append((s.path, 1, f"name: {s.name!r} is also the name in {seen[s.name]}"))
        seen.setdefault(s.name, s.path)
    if problems:
        raise SpecError(problems)
    return specs


def build(paths: list[str | Path], out_dir: str | Path = DEFAULT_OUT) -> list[tuple[Path, bool]]:
    """Build each spec into out_dir/<name>.py. All specs are validated and rendered before any
    file is written, so a bad spec writes nothing. Returns (path, changed) pairs."""
    specs = load_all(paths)
    rendered = [(Path(out_dir) / f"{s.name}.py", render(s)) for s in specs]
    return [(path, write_if_changed(path, text)) for path, text in rendered]


def spec_files(spec_dir: str | Path = "specs") -> list[Path]:
    return sorted(Path(spec_dir).glob("*.yaml")) + sorted(Path(spec_dir).glob("*.yml"))


def check(spec_dir: str | Path = "specs", out_dir: str | Path = DEFAULT_OUT) -> list[str]:
    """Problems that make out_dir differ from a fresh build of spec_dir (empty when fresh)."""
    specs = load_all(spec_files(spec_dir))
    problems = []
    expected = set()
    for s in specs:
        path = Path(out_dir) / f"{s.name}.py"
        expected.add(path.name)
        if not path.exists():
            problems.append(f"{path}: missing (run: attngen build {display_path(s.path)})")
        elif path.read_text(encoding="utf-8") != render(s):
            problems.append(f"{path}: stale (run: attngen build {display_path(s.path)})")
    for path in sorted(Path(out_dir).glob("*.py")):
        if path.name not in expected and path.name != "__init__.py":
            problems.append(f"{path}: no spec in {spec_dir} builds this file")
    return problems
