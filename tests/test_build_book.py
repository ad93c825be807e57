"""The notebook runner fails loudly: a failing check in a notebook is a failed run, with the error shown."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import build_book  # noqa: E402


def _notebook(path: Path, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("fast = True")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(c) for c in cells]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


@pytest.fixture
def stage(tmp_path, monkeypatch):
    monkeypatch.setattr(build_book, "STAGE", tmp_path)
    return tmp_path


@pytest.mark.slow
def test_failing_check_fails_the_notebook_with_its_message(stage):
    path = _notebook(stage / "notebooks" / "bad.ipynb", "x = 1", "assert x == 2, 'the theorem check failed'")
    record = build_book.execute_one(path, {}, jobs=1)
    assert record["status"] == "failed"
    assert "AssertionError" in record["error"] and "the theorem check failed" in record["error"]


@pytest.mark.slow
def test_parameters_are_injected_and_success_is_recorded(stage):
    path = _notebook(stage / "notebooks" / "good.ipynb", "assert fast is False")
    record = build_book.execute_one(path, {"fast": False}, jobs=1)
    assert record["status"] == "ok", record.get("error")
    assert record["notebook"] == "notebooks/good" and record["seconds"] > 0
    executed = nbformat.read(path, as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
