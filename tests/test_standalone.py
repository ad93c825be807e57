"""tools/standalone_check.py: the parts that decide a verdict (the full run is `make standalone`, in CI)."""

from __future__ import annotations

import sys
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import standalone_check as sc  # noqa: E402


def test_rows_must_match_except_round_off_digits():
    book = [{"ref": "Thm", "ours": "largest error 3.3e-11; random V 1.25e-01", "status": "verified"}]
    same = [{"ref": "Thm", "ours": "largest error 3.3e-11; random V 1.25e-01", "status": "verified"}]
    roundoff = [{"ref": "Thm", "ours": "largest error 3.8e-11; random V 1.25e-01", "status": "verified"}]
    assert sc.compare(same, book) == ([], 0)
    assert sc.compare(roundoff, book) == ([], 1)
    # negative controls: a substantive number, a 1e-9-sized figure, a word, a status, a row count
    for field, value in [("ours", "largest error 3.3e-11; random V 1.26e-01"), ("ours", "largest error 3.3e-09; random V 1.25e-01"),
                         ("ours", "largest error 3.3e-11; random U 1.25e-01"), ("status", "differs")]:
        diffs, _ = sc.compare([{**book[0], field: value}], book)
        assert len(diffs) == 1 and field in diffs[0]
    assert sc.compare(book + book, book)[0] and sc.compare(book, None)[0]


def test_install_cell_is_pointed_at_the_wheel(tmp_path):
    """The generated install cell's repository address is replaced by the wheel's, and nothing else."""
    source = ROOT / "notebooks" / "flag" / "head-overlap.md"
    wheel = tmp_path / "flagcore-0.1.0-py3-none-any.whl"
    notebook = sc.prepare(source, tmp_path / "alone", wheel)
    assert list((tmp_path / "alone").iterdir()) == [notebook]  # the notebook alone in its folder
    cell = next(c for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code")
    original = next(c for c in jupytext.read(source).cells if c.cell_type == "code")
    assert f'"flagcore[hf] @ {wheel.as_uri()}"' in cell.source and "git+" not in cell.source
    assert cell.source.replace(f"{wheel.as_uri()}\"", "") == sc.INSTALL_SOURCE.sub("", original.source)
