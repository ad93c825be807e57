"""tools/scale_study.py: the design, the values read from result rows, and the page it renders."""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import scale_study  # noqa: E402


def test_design_is_one_factor_at_a_time_from_the_ci_point():
    design = scale_study.DESIGNS["table-e4"]
    points = scale_study.design_points(design)
    assert points[0] == {**design["base"], "seed": 0}
    for point in points[1:]:
        changed = [k for k in design["base"] if point[k] != design["base"][k]]
        assert len(changed) == 1, point
    e15 = scale_study.design_points(scale_study.DESIGNS["e15"])
    assert len(e15) == 3 * 3 and {p["seed"] for p in e15} == {0, 1, 2}


def test_design_parameters_exist_in_the_notebooks():
    """Every parameter the study sets is one the notebook has (else papermill would ignore it)."""
    import ray_runner

    for design in scale_study.DESIGNS.values():
        for point in scale_study.design_points(design):
            ray_runner.notebook_job(ROOT / design["notebook"], point, "x")  # raises on an unknown parameter


def synthetic_study() -> dict:
    """A made-up study, for the renderer only (never written into the book)."""
    points = []
    for point in scale_study.design_points(scale_study.DESIGNS["table-e4"]):
        grow = point["epochs"] / 10 * point["width"] / 64 * point["per_class_train"] / 500
        points.append({"study": "table-e4", "parameters": point, "seconds": 60 * grow, "values": {
            "mean": 0.45 * grow, "sd": 0.01, "seeds": 4, "accuracy": 0.5, "relu10_mean": 0.3, "relu10_sd": 0.05}})
    for i, point in enumerate(scale_study.design_points(scale_study.DESIGNS["e15"])):
        points.append({"study": "e15", "parameters": point, "seconds": 30, "values": {
            "degenerate_cnn": i % 2, "degenerate_mixer": 0, "runs_per_arch": 6, "nc1_min": 1.0 + i,
            "delta_gc": {"ReLU": 0.1 * i, "SiLU": 0.2}}})
    return {"date": "2026-12-06", "machine": "test", "command": "python tools/scale_study.py run",
            "wall_seconds": 1.0, "designs": scale_study.DESIGNS, "points": points, "failed": []}


def test_page_renders_tables_trends_and_figure(tmp_path):
    stage = tmp_path / "stage"
    (stage / "book" / "scale-study").mkdir(parents=True)
    shutil.copy(ROOT / scale_study.PAGE, stage / scale_study.PAGE)
    (stage / scale_study.STUDY_JSON).write_text(json.dumps(synthetic_study()))
    assert scale_study.fill_page(stage)
    text = (stage / scale_study.PAGE).read_text()
    assert scale_study.MARKER not in text
    assert (stage / "book" / "scale-study" / "table-e4.png").stat().st_size > 10_000
    # epochs 10 -> 40 multiplies the synthetic mean by 4: 0.45 -> 1.8, from 1.011 to 0.339 off the paper's 1.461
    assert "epochs 10 → 40: 0.450 → 1.800 (sd ≤ 0.010): toward the paper's" in text
    # ViT delta_gc for ReLU over the three seeds of the CI point: 0.0, 0.1, 0.2
    assert f"ReLU 0.100 ± {statistics.stdev([0.0, 0.1, 0.2]):.3f}" in text
    assert "| CI point | 1/18 | 0/18 |" in text
    # synthetic ViT delta_gc: SiLU 0.2 (accepted, as the paper), ReLU mean 0.1 (accepted, the paper rejects)
    assert "CI point: Level 3 Degenerate in 1 of 36 CNN and Mixer runs (the paper: all); ViT verdicts at " \
        "τ_gc = 0.3 match the paper's in 1 of 2" in text
    # synthetic: ReLU-50 mean 0.45 x growth with sd 0.01, ReLU-10 0.3 ± 0.05: larger and more stable everywhere
    assert "* CI point: ReLU-50 (orth) 0.450 ± 0.010 vs ReLU-10 0.300 ± 0.050: larger, more stable (coefficient of " \
        "variation 0.02 vs 0.17)" in text
    assert "paused" not in text  # no note recorded, none shown
    noted = dict(synthetic_study(), note="The kernel was paused for a minute.")
    assert "`python tools/scale_study.py run` (the data are in `book/scale-study/study.json`). The kernel was paused" \
        in scale_study.render(noted, "x.png")


def test_page_without_study_says_so(tmp_path):
    stage = tmp_path / "stage"
    (stage / "book").mkdir(parents=True)
    shutil.copy(ROOT / scale_study.PAGE, stage / scale_study.PAGE)
    assert scale_study.fill_page(stage)
    assert "has not been run" in (stage / scale_study.PAGE).read_text()


def test_missing_row_is_an_error_not_a_silent_gap():
    with pytest.raises(KeyError):
        scale_study.point_values("table-e4", [{"ref": "something else", "extra": {}}])
