from pathlib import Path

from attngen.build import spec_files
from attngen.verify import import_generated

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATHS = spec_files(ROOT / "specs")
_MODULES = {}


def generated(name: str):
    """The checked-in generated module for a shipped spec, imported once."""
    if name not in _MODULES:
        _MODULES[name] = import_generated(ROOT / "generated" / f"{name}.py")
    return _MODULES[name]


def assert_all_ok(results, context=""):
    bad = [str(r) for r in results if not r.ok]
    assert not bad, f"{context}\n" + "\n".join(bad)
