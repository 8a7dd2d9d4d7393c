"""The package's shape: imports go one way, and a build parses each expression text once."""

from __future__ import annotations

import ast
from pathlib import Path
from unittest import mock

import pytest

import attngen.language.expr as expr_mod
from attngen.codegen.build import render_all
from attngen.language.spec import load_spec

PACKAGE = Path(__file__).resolve().parent.parent / "attngen"
SPECS = sorted((Path(__file__).resolve().parent.parent / "specs").glob("*.yaml"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """attngen module -> the attngen modules it imports anywhere in its source (module level or
    inside a function: a deferred import is still a dependency)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from . import x` may name a submodule; otherwise the module itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:  # `import attngen.language.expr.x` -> attngen.language.expr
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert "attngen.language.spec" in graph["attngen.codegen.build"]  # the walk sees relative imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_language_does_not_import_the_spec_reader():
    graph = import_graph()
    assert "attngen.language.spec" not in graph["attngen.language.expr"]
    assert graph["attngen.errors"] == set()


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_a_build_parses_each_expression_text_once(path):
    """Reading a spec and rendering every module it builds parses each mask / score_mod text at
    most once, and the parameter declarations at most once (the plan consumes the Spec's parsed
    expressions)."""
    parsed: list[str] = []
    declared: list[dict] = []
    real_parse, real_params = expr_mod._Converter.parse, expr_mod.parse_params

    def counting_parse(conv, text):
        if conv.helper_depth == 0:  # a user's (or a derived spec's) text, not a helper's body
            parsed.append(text)
        return real_parse(conv, text)

    def counting_params(*args, **kwargs):
        declared.append(args[0])
        return real_params(*args, **kwargs)

    with mock.patch.object(expr_mod._Converter, "parse", counting_parse), \
            mock.patch.object(expr_mod, "parse_params", counting_params), \
            mock.patch("attngen.language.spec.parse_params", counting_params):
        spec = load_spec(path)
        files = render_all(spec)
    assert files
    repeated = sorted({t for t in parsed if parsed.count(t) > 1})
    assert not repeated, f"parsed more than once: {repeated}"
    assert len(declared) <= 1
    texts = {spec.mask, spec.score_mod} - {"", "none", "causal"}
    assert texts <= set(t.strip() for t in parsed)  # the counter sees the reader's parses
