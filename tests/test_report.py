"""flagcore.report: result records, their Markdown table, and the JSON copy the dashboard reads back."""

from __future__ import annotations

import json
import math

import nbformat
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flagcore import report
from flagcore.report import MIME_TYPE, PAPERS, STATUSES, Result, ResultTable, format_value


def _row(**kw):
    args = dict(paper="flag", ref="Theorem 5.4", claim="commutator obstructs Level 3", status="verified")
    args.update(kw)
    return report.result(args.pop("paper"), args.pop("ref"), args.pop("claim"), args.pop("status"), **args)


# --- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, ""),
        (0, "0"),
        (0.0, "0"),
        (12, "12"),
        (123456, "123456"),  # integers exactly, even large ones (dimensions, parameter counts)
        (np.int64(768), "768"),
        (0.123456, "0.1235"),
        (1234.5678, "1235"),
        (3.2e-15, "3.200e-15"),
        (2.5e7, "2.500e+07"),
        (-0.5, "-0.5"),
        (True, "True"),
        (np.float64(0.25), "0.25"),
        (torch.tensor(1e-12, dtype=torch.float64), "1.000e-12"),
        (torch.tensor(7), "7"),
        ((8, 12), "8, 12"),
        ([0.5, torch.tensor(2)], "0.5, 2"),
        (np.array([1.0, 2.0]), "1, 2"),
        ("  MiniLM 0.42 ", "MiniLM 0.42"),
    ],
)
def test_format_value(value, text):
    assert format_value(value) == text


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300))
def test_formatted_reals_keep_four_significant_digits(x):
    back = float(format_value(x))
    assert math.isclose(back, x, rel_tol=1e-3, abs_tol=0.0) or x == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), torch.tensor(float("nan")), [1.0, float("nan")]])
def test_non_finite_values_are_refused(bad):
    with pytest.raises(ValueError, match="finite"):
        format_value(bad)


@pytest.mark.parametrize("bad", [[], (), np.array([])])
def test_empty_sequences_are_refused(bad):
    with pytest.raises(ValueError, match="empty"):
        format_value(bad)


@pytest.mark.parametrize("bad", [{"a": 1}, object(), {1, 2}])
def test_other_types_are_refused(bad):
    with pytest.raises(TypeError):
        format_value(bad)


# --- validation ------------------------------------------------------------------------------


def test_result_fields():
    row = _row(ours=torch.tensor(0.4217), theirs=0.46, note="MiniLM for GPT-2", model="minilm")
    assert (row.paper, row.ref, row.status, row.ours, row.theirs) == ("flag", "Theorem 5.4", "verified", "0.4217", "0.46")
    assert row.note == "MiniLM for GPT-2" and row.extra == {"model": "minilm"}


@pytest.mark.parametrize("paper", ["Flag", "dong", "", None])
def test_bad_paper(paper):
    with pytest.raises(ValueError, match="paper"):
        _row(paper=paper)


@pytest.mark.parametrize("status", ["Verified", "partially", "ok", "", None])
def test_bad_status(status):
    with pytest.raises(ValueError, match="status"):
        _row(status=status)


@pytest.mark.parametrize(("field", "value"), [("ref", ""), ("ref", "   "), ("claim", ""), ("claim", 3), ("ref", None)])
def test_empty_ref_or_claim(field, value):
    with pytest.raises(ValueError, match=field):
        _row(**{field: value})


def test_bad_note_and_extra():
    with pytest.raises(TypeError, match="note"):
        _row(note=3)
    with pytest.raises(TypeError, match="JSON"):
        _row(tensor=torch.zeros(2))
    with pytest.raises(TypeError, match="JSON"):
        _row(x=float("nan"))


def test_every_status_and_paper_is_accepted():
    for paper in PAPERS:
        for status in STATUSES:
            assert _row(paper=paper, status=status).status == status


def test_table_needs_result_rows():
    with pytest.raises(ValueError, match="at least one"):
        report.results()
    with pytest.raises(TypeError, match="Result rows"):
        report.results({"paper": "flag"})
    with pytest.raises(TypeError, match="Result rows"):
        report.results(_row(), "verified")


# --- formatting ------------------------------------------------------------------------------


def test_markdown_table_escapes_pipes_and_newlines():
    table = report.results(
        _row(claim="|a| = 1\nfor all a", ours=1e-15, theirs=None, note="note | with pipe"),
        _row(ref="Corollary 3.5", status="partial", ours=(8, 12)),
    )
    lines = table.to_markdown().splitlines()
    rows = [line for line in lines if line.startswith("| ") and "---" not in line]
    assert len(rows) == 3  # header + two results
    header = rows[0]
    n_cols = header.count(" | ") + 1
    for line in rows[1:]:
        unescaped = line.replace("\\|", "")
        assert unescaped.count(" | ") + 1 == n_cols, line
    assert "\\|a\\| = 1 for all a" in rows[1] and "1.000e-15" in rows[1] and "note \\| with pipe" in rows[1]
    assert "| Corollary 3.5 |" in rows[2] and "| partial |" in rows[2] and "8, 12" in rows[2]
    assert repr(table) == table.to_markdown()


def test_mimebundle_carries_json_and_markdown():
    table = report.results(_row(ours=0.5), _row(paper="collapse", ref="Theorem 2", status="heuristic"))
    bundle = table._repr_mimebundle_()
    assert set(bundle) == {MIME_TYPE, "text/markdown", "text/plain"}
    json.dumps(bundle[MIME_TYPE])  # serialisable as-is
    assert [r["ref"] for r in bundle[MIME_TYPE]] == ["Theorem 5.4", "Theorem 2"]
    assert bundle["text/markdown"] == table.to_markdown()


# --- round trip --------------------------------------------------------------------------------


def test_from_dict_round_trip_and_revalidation():
    row = _row(ours=3, theirs="2 (Table 1)", note="n", seed=0)
    assert Result.from_dict(json.loads(json.dumps(row.as_dict()))) == row
    bad = row.as_dict() | {"status": "proved"}
    with pytest.raises(ValueError, match="status"):
        Result.from_dict(bad)
    with pytest.raises(ValueError, match="unknown"):
        Result.from_dict(row.as_dict() | {"colour": "red"})
    missing = row.as_dict()
    del missing["claim"]
    with pytest.raises(ValueError, match="claim"):
        Result.from_dict(missing)
    with pytest.raises(TypeError, match="ours"):
        Result.from_dict(row.as_dict() | {"ours": 3.0})
    with pytest.raises(TypeError):
        Result.from_dict(["flag"])
    with pytest.raises(TypeError):
        ResultTable.from_json({"paper": "flag"})


def test_mimebundle_round_trip_through_nbformat(tmp_path):
    """Write a notebook whose output is the table's bundle, read it back, rebuild the same rows."""
    table = report.results(
        _row(ours=torch.tensor(2.0e-14, dtype=torch.float64), theirs=None),
        _row(paper="lightning", ref="Conjecture 3.10", claim="softmax dimension", status="open", ours=(5, 9, 14), theirs=(5, 9, 14)),
    )
    bundle = table._repr_mimebundle_()
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("report.results(...)")
    cell.outputs = [nbformat.v4.new_output("execute_result", data=bundle, execution_count=1)]
    nb.cells = [cell]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    nbformat.validate(nbformat.read(path, as_version=4))
    back = nbformat.read(path, as_version=4).cells[0].outputs[0]["data"]
    assert back["text/markdown"] == table.to_markdown()
    again = ResultTable.from_json(back[MIME_TYPE])
    assert again.rows == table.rows
    assert again.rows[1].ours == "5, 9, 14"
