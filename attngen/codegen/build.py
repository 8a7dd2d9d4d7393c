"""Render specs into generated modules: deterministic, atomic, written only when changed."""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jinja2
import yaml

from attngen import __version__
from attngen.planning.nsa_plan import branches, make_nsa_plan
from attngen.planning.plan import StageError, make_plan, stage
from attngen.language.expr import parse_expr
from attngen.language.spec import Spec, SpecError, load_spec

TEMPLATES = Path(__file__).resolve().parent / "templates"
DEFAULT_OUT = "generated"


@dataclass(frozen=True)
class Header:
    version: str
    spec_path: str
    spec_sha256: str
    command: str
    derived_from: str = ""  # for a branch of an NSA spec: that spec's name


def _env() -> jinja2.Environment:
    if not TEMPLATES.is_dir():
        raise FileNotFoundError(f"attngen templates not found at {TEMPLATES} (package data of attngen.codegen)")
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


def derived_specs(spec: Spec) -> list[Spec]:
    """The dense specs of an NSA spec's compression and window branches (nsa_plan.branches): same
    heads, dims, dtypes, tiles and backward, their own name and mask. Empty for a dense spec."""
    return [
        dataclasses.replace(
            spec, name=name, mask=mask, description=doc, sparse=None, derived_from=spec.name,
            mask_expr=parse_expr(mask, kind="mask", file=spec.path),
        )
        for name, mask, doc in branches(spec)
    ]


def output_names(spec: Spec) -> list[str]:
    """Module names a spec builds: its own, then its derived branches'."""
    return [spec.name] + [name for name, _, _ in branches(spec)]


def render(spec: Spec) -> str:
    """The generated module's source for a spec: a pure function of the spec and attngen's version.
    For an NSA spec this is the module with nsa_attention; `render_all` adds its branches."""
    shown = display_path(spec.path)
    header = Header(__version__, shown, spec.sha256, f"attngen build {shown}", spec.derived_from)
    if spec.sparse is not None:
        with stage("sparse"):
            plan = make_nsa_plan(spec)
        text = _env().get_template("nsa.py.jinja").render(p=plan, h=header)
    else:
        text = _env().get_template("dense.py.jinja").render(p=make_plan(spec), h=header)
    text = re.sub(r"\n{4,}", "\n\n\n", text)  # at most two blank lines, as PEP 8 asks
    return text.rstrip("\n") + "\n"


def render_all(spec: Spec) -> list[tuple[str, str]]:
    """(file name, source) of every module a spec builds (three for an NSA spec with a window).
    An unexpected exception (a bug in attngen, never the spec's fault) becomes a SpecError at the
    line of the spec key being planned, with a bug-report hint, the exception as its __cause__."""
    out = []
    for s in [spec, *derived_specs(spec)]:
        try:
            out.append((f"{s.name}.py", render(s)))
        except SpecError:
            raise
        except Exception as e:
            error = e.error if isinstance(e, StageError) else e
            # a branch of an NSA spec takes its mask from sparse:; an error outside the planned
            # keys (the template) is the module's, which `name` names
            key = "sparse" if s.derived_from else e.key if isinstance(e, StageError) else "name"
            msg = " ".join(f"{type(error).__name__}: {error}".split())
            msg = msg if len(msg) <= 160 else msg[:157] + "..."
            raise SpecError([(s.path, _key_line(s.path, key), (
                f"{key}: internal error while generating {s.name}.py ({msg}); this is a bug in attngen "
                f"{__version__}, not in the spec: please report it with this spec file"))]) from e
    return out


def _key_line(path: str, key: str) -> int:
    """The line of top-level `key` in the spec file at `path` (1 if it cannot be found)."""
    try:
        node = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return 1
    if isinstance(node, yaml.MappingNode):
        for k, _ in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return k.start_mark.line + 1
    return 1


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
    """Load every spec, collecting all problems before failing, and reject two specs that would
    write the same module (equal names, or a name equal to another spec's NSA branch)."""
    specs, problems = [], []
    for path in paths:
        try:
            specs.append(load_spec(path))
        except SpecError as e:
            problems.extend(e.problems)
    built_by: dict[str, Spec] = {}
    for s in specs:
        for out in output_names(s):
            other = built_by.setdefault(out, s)
            if other is s:
                continue
            if out == s.name == other.name:
                problems.append((s.path, 1, f"name: {s.name!r} is also the name in {other.path}"))
            else:
                problems.append((s.path, 1, f"name: {s.name!r} builds {out}.py, which {other.name!r} in {other.path} builds too"))
    if problems:
        raise SpecError(problems)
    return specs


def build(paths: list[str | Path], out_dir: str | Path = DEFAULT_OUT) -> list[tuple[Path, bool]]:
    """Build each spec into out_dir/<name>.py (and an NSA spec's branches beside it). All specs are
    validated and rendered before any file is written, so a bad spec writes nothing. Returns
    (path, changed) pairs."""
    specs = load_all(paths)
    rendered, problems = [], []
    for s in specs:
        try:
            rendered += [(Path(out_dir) / fname, text) for fname, text in render_all(s)]
        except SpecError as e:
            problems.extend(e.problems)
    if problems:
        raise SpecError(problems)
    return [(path, write_if_changed(path, text)) for path, text in rendered]


def spec_files(spec_dir: str | Path = "specs") -> list[Path]:
    return sorted(Path(spec_dir).glob("*.yaml")) + sorted(Path(spec_dir).glob("*.yml"))


def check(spec_dir: str | Path = "specs", out_dir: str | Path = DEFAULT_OUT) -> list[str]:
    """Problems that make out_dir differ from a fresh build of spec_dir (empty when fresh)."""
    specs = load_all(spec_files(spec_dir))
    problems = []
    expected = set()
    for s in specs:
        for fname, text in render_all(s):
            path = Path(out_dir) / fname
            expected.add(fname)
            if not path.exists():
                problems.append(f"{path}: missing (run: attngen build {display_path(s.path)})")
            elif path.read_text(encoding="utf-8") != text:
                problems.append(f"{path}: stale (run: attngen build {display_path(s.path)})")
    for path in sorted(Path(out_dir).glob("*.py")):
        if path.name not in expected and path.name != "__init__.py":
            problems.append(f"{path}: no spec in {spec_dir} builds this file")
    return problems
