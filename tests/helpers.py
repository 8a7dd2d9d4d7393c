"""Shared test helpers: the shipped modules, and writing, building and importing a spec of a test's own."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import yaml

from attngen.codegen.build import build, spec_files
from attngen.tools.verify import import_generated

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATHS = spec_files(ROOT / "specs")
_MODULES = {}

# Small tiles: the interpreter runs a few of them quickly, and one config means no autotuning.
INTERP_TILES = {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}


def generated(name: str):
    """The checked-in generated module for a shipped spec, imported once."""
    if name not in _MODULES:
        _MODULES[name] = import_generated(ROOT / "generated" / f"{name}.py")
    return _MODULES[name]


def assert_all_ok(results, context=""):
    bad = [str(r) for r in results if not r.ok]
    assert not bad, f"{context}\n" + "\n".join(bad)


def dense_spec(name: str = "user_attn", *, q: int = 4, kv: int = 2, d: int = 32, dtypes: str = "[fp16]",
               mask: str = "causal", tiles: dict | None = None, extra: str = "") -> str:
    """The YAML text of a small dense spec, one key a line in this order (name on line 1, heads on
    line 2, ...), then `extra` lines. `tiles` values may be lists (an autotune space)."""
    tiles = INTERP_TILES if tiles is None else tiles
    tile_text = ", ".join(f"{k}: {v}" for k, v in tiles.items())
    return (
        f"name: {name}\nheads: {{q: {q}, kv: {kv}}}\nhead_dim: {d}\ndtypes: {dtypes}\nmask: {mask}\n"
        f"tiles: {{{tile_text}}}\n{extra}"
    )


def write_spec(dirpath: Path, text: str) -> Path:
    """Write spec text as DIR/NAME.yaml, NAME being the spec's name: the path."""
    path = Path(dirpath) / f"{yaml.safe_load(text)['name']}.yaml"
    path.write_text(text)
    return path


def build_spec(dirpath: Path, text: str) -> list[tuple[Path, bool]]:
    """Write spec text (write_spec) and build it into DIR/gen: build()'s (path, changed) pairs."""
    return build([write_spec(dirpath, text)], Path(dirpath) / "gen")


def build_and_import(dirpath: Path, text: str) -> ModuleType:
    """Write, build (build_spec) and import a spec's module; an NSA spec's main module imports its
    branch modules from the same directory."""
    build_spec(dirpath, text)
    return import_generated(Path(dirpath) / "gen" / f"{yaml.safe_load(text)['name']}.py")
