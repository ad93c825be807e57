"""The library's declared dependencies are exactly what its code imports (pyproject.toml: the core list
and the hf extra), so that `pip install "flagcore[hf]"` in a bare environment (Colab) brings what
the notebooks need and nothing unused."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _imported_top_level() -> set[str]:
    names = set()
    for path in (ROOT / "flagcore").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("flagcore", "__future__")}


def _declared(groups: list[str]) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for group in groups:
        specs += project["optional-dependencies"][group]
    return {re.split(r"[<>=!~\[ ;]", spec, maxsplit=1)[0].replace("-", "_").lower() for spec in specs}


#: Declared but not imported by flagcore, each for a reason the test suite exercises.
INDIRECT = {"accelerate": "transformers requires it to load a GGUF file (test_gguf_cache_matches_transformers_gguf_loader)"}


def test_declared_dependencies_match_the_imports():
    imported = _imported_top_level()
    declared = _declared(["hf"])
    assert imported - declared == set(), "imported but not declared"
    assert declared - imported == set(INDIRECT), "declared but never imported"


def test_the_packaging_check_can_fail():
    """Negative control: a dependency list without transformers misses an import."""
    assert "transformers" in _imported_top_level() - (_declared(["hf"]) - {"transformers"})
