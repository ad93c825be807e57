"""tools/performance_page.py: the performance page shows the benchmark JSON's numbers, and only those."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import performance_page  # noqa: E402

PAGE = ROOT / "book" / "performance.md"


def _bench(tmp_path: Path, with_run: bool = True) -> Path:
    bench = tmp_path / "bench"
    bench.mkdir()
    if with_run:
        (bench / "run.json").write_text(json.dumps({
            "machine": "m", "quick": True, "failed": [], "seconds": {"run.py": 1.5, "heads.py": 2.0, "lightning_fig3.py": 3.0},
            "machine_info": {"cpu": "Test CPU 9000", "arch": "x86_64", "cores": 7, "torch": "9.9.9", "torch_threads": 3,
                             "python": "3.11.7", "os": "Linux", "date": "2026-01-02 03:04 UTC", "commit": "abc1234"},
            "cases": {"principal_angles n=256 d=16 k=4": {"batched_s": 0.001, "loop_over_flagcore_x": 123.456, "loop_over_scipy_x": 78.9}},
        }))
    (bench / "heads.json").write_text(json.dumps({"machine": "m", "cases": {
        "profile minilm": {"profile_s": 0.1, "floor_s": 0.08, "ratio_x": 1.2345, "layers": 6},
        "head_overlap H=12 d=768 d_k=64": {"batched_s": 0.01, "loop_s": 0.5, "speedup_x": 41.7},
    }}))
    (bench / "lightning_fig3.json").write_text(json.dumps({
        "machine": "m", "deltas": [3, 4], "samples_public": 250, "speedup_x": 512.3, "speedup_equal_rows_x": 77.1,
        "ours_correct_deltas": [3, 4], "public_style_correct_deltas": [3], "ours_s": 0.25, "public_style_s": 128.0,
    }))
    return bench


def _staged(tmp_path: Path) -> Path:
    stage = tmp_path / "src"
    (stage / "book").mkdir(parents=True)
    (stage / "book" / "performance.md").write_text(PAGE.read_text())
    return stage


def test_page_is_filled_from_the_json(tmp_path):
    stage, bench = _staged(tmp_path), _bench(tmp_path)
    assert performance_page.main(["--stage", str(stage), "--bench", str(bench)]) == 0
    text = (stage / "book" / "performance.md").read_text()
    for shown in ("Test CPU 9000", "| cores | 7 |", "torch | 9.9.9, 3 intra-op", "abc1234", "quick", "123×", "78.9×",
                  "1.23×", "41.7×", "512×", "77.1×", "| ours: correct and certified at delta | 3, 4 |", "correct at delta | 3 |"):
        assert shown in text, shown
    assert "No benchmark results were found" not in text
    assert (ROOT / "book" / "performance.md").read_text() == PAGE.read_text()  # the working tree is untouched


def test_without_json_the_page_says_how_to_fill_it(tmp_path):
    stage = _staged(tmp_path)
    empty = tmp_path / "none"
    empty.mkdir()
    assert performance_page.main(["--stage", str(stage), "--bench", str(empty)]) == 0
    text = (stage / "book" / "performance.md").read_text()
    assert text == PAGE.read_text()
    assert "make bench" in text and "No benchmark results were found" in text


def test_files_not_from_one_run_are_flagged(tmp_path):
    block = performance_page.render(performance_page.load(_bench(tmp_path, with_run=False)))
    assert "not necessarily measured in one run" in block and "41.7×" in block


def test_source_page_types_no_numbers():
    """Negative control for 'numbers are never typed': between the markers the source holds only the note."""
    text = PAGE.read_text()
    inside = text.split(performance_page.START, 1)[1].split(performance_page.END, 1)[0]
    assert "×" not in inside and not any(ch.isdigit() for ch in inside)


def test_fill_needs_the_markers():
    with pytest.raises(ValueError, match="markers"):
        performance_page.fill("# no markers\n", "block")
