"""The one error type of untrusted input, shared by the spec reader and the expression language.

It sits below both (it imports nothing of the package), so the spec reader can use the language
and the language can report at the spec's FILE:LINE without an import circle.
"""

from __future__ import annotations


class SpecError(ValueError):
    """One or more problems in a spec file, each located as FILE:LINE."""

    def __init__(self, problems: list[tuple[str, int, str]]):
        self.problems = sorted(problems, key=lambda p: p[1])
        super().__init__("\n".join(f"{f}:{line}: {msg}" for f, line, msg in self.problems))
