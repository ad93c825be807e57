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


def test_unfavourable_numbers_are_commented_and_the_memory_case_is_shown():
    """A ratio below 1 and a missed target never stand without a word; the peak-memory case has a table."""
    table = "\n".join(
        performance_page._ratio_table(
            {
                "slow": {"loop_over_flagcore_x": 0.88, "loop_over_scipy_x": 0.69},
                "fast": {"loop_over_flagcore_x": 12.0},
                "profile": {"ratio_x": 1.66, "warm_back_to_back": {"ratio_x": 1.2}},
                "good profile": {"ratio_x": 1.3},
            }
        )
    )
    assert "0.88× (**slower**, see below)" in table and "0.69× (**slower**, see below)" in table
    assert "- **slow**, 0.88×:" in table and "- **slow**, 0.69×:" in table and "**fast**," not in table
    assert "1.66× (**target ≤ 1.3 missed**)" in table and "1.3× (target met)" in table
    assert "- **profile**: 1.66× misses the target" in table and "measured 1.2×" in table
    assert "**good profile**:" not in table
    memory = performance_page._memory_table(
        {"m": {"checkpoint_bytes": 2357 * 2**20, "peak_growth_bytes": 91 * 2**20, "one_layer_query_fp32_bytes": 16 * 2**20,
               "peak_over_one_layer_query_x": 5.7}}
    )
    assert "| m | 2,357 | 91 | 16 | 5.7× |" in memory
    assert performance_page._memory_table({"x": {"ratio_x": 1.0}}) == []


def test_memory_trace_becomes_a_numbered_figure(tmp_path):
    """A case with a per-layer trace is drawn next to the page, with its numbers in the caption; a case
    without one (or no directory to draw into) gives no figure."""
    mib = 2**20
    row = {"checkpoint_bytes": 589 * mib, "peak_growth_bytes": 76 * mib, "one_layer_query_fp32_bytes": 16 * mib,
           "peak_over_one_layer_query_x": 4.75, "peak_over_checkpoint": 76 / 589,
           "trace": [{"layer": i, "VmHWM_growth_bytes": (40 + 9 * i) * mib, "RssAnon_growth_bytes": 30 * mib,
                      "RssFile_growth_bytes": 2 * mib} for i in range(4)]}
    lines = performance_page._memory_figure({"streamed peak memory, Llama-3.2-1B-shaped, 4 layers": row}, tmp_path)
    text = "\n".join(lines)
    assert (tmp_path / performance_page.MEMORY_FIGURE).stat().st_size > 10_000
    assert f"```{{figure}} {performance_page.MEMORY_FIGURE}" in text and ":name: fig-performance-memory" in text
    assert "76 MiB" in text and "4.75 times" in text and "12.9% of the checkpoint" in text
    assert "(Llama-3.2-1B-shaped, 4 layers; 589 MiB)" in text
    assert performance_page._memory_figure({"x": {k: v for k, v in row.items() if k != "trace"}}, tmp_path) == []
    assert performance_page._memory_figure({"x": row}, None) == []
