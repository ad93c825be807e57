"""flagcore.report: result records, their Markdown table, and the JSON copy the dashboard reads back."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser

import nbformat
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flagcore import report
from flagcore.report import MIME_TYPE, PAPERS, STATUS_COLORS, STATUSES, Result, ResultTable, format_value


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
            why = "a reason" if status == "differs" else ""
            assert _row(paper=paper, status=status, why=why).status == status


def test_table_needs_result_rows():
    with pytest.raises(ValueError, match="at least one"):
        report.results()
    with pytest.raises(TypeError, match="Result rows"):
        report.results({"paper": "flag"})
    with pytest.raises(TypeError, match="Result rows"):
        report.results(_row(), "verified")


# --- formatting ------------------------------------------------------------------------------


class _Tags(HTMLParser):
    """Checks that an HTML fragment is balanced (every opened element closed, in order)."""

    VOID = {"br", "img", "hr", "meta", "input", "col"}

    def __init__(self):
        super().__init__()
        self.stack, self.text = [], []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"

    def handle_data(self, data):
        self.text.append(data)


def _parse(fragment: str) -> _Tags:
    parser = _Tags()
    parser.feed(fragment)
    parser.close()
    assert parser.stack == [], parser.stack
    return parser


def test_html_text_escapes_and_typesets_tex():
    out = report.html_text("a <b> & $d_k/d$ then $x<1$")
    assert "<b>" not in out and "&lt;b&gt; &amp;" in out
    assert out.count('<span class="math notranslate nohighlight">') == 2
    assert "\\(d_k/d\\)" in out and "\\(x&lt;1\\)" in out and "$" not in out
    assert report.html_text("no math") == "no math"


def test_results_table_html_has_chips_labels_and_folded_notes():
    table = report.results(
        _row(claim="|a| = 1\nfor all a", ours=1e-15, note="a note <with> tags"),
        _row(ref="Section 7.2", status="differs", ours=0.1872, on="MiniLM-L6 (stands in for GPT-2)", theirs=0.1878,
             why="a different model"),
        _row(ref="Figure 3", status="open", ours=(25, 40), expected=(25, 40)),
    )
    page = table.to_html()
    parsed = _parse(page)
    text = " ".join(parsed.text)
    assert page.count("fg-chip-verified") == 1 and page.count("fg-chip-differs") == 1 and page.count("fg-chip-open") == 1
    assert "1.000e-15" in text and "on MiniLM-L6 (stands in for GPT-2)" in text
    assert "paper:" in text and "0.1878" in text and "differs because:" in text
    # a formula's value is labelled as expected, never as the paper's
    fig3 = page[page.index("Figure 3"):]
    assert "expected (formula):" in fig3 and "paper:" not in fig3
    assert "<details><summary>note</summary>a note &lt;with&gt; tags</details>" in page
    assert "|" not in text.replace("|a|", "")  # no Markdown table syntax


def test_results_table_has_a_fixed_layout_that_cannot_outgrow_the_page():
    page = report.results(_row(ours=1)).to_html()
    assert "table-layout:fixed" in page and page.count("<col ") == 6
    widths = [float(w) for w in __import__("re").findall(r'<col style="width:([\d.]+)%">', page)]
    assert abs(sum(widths) - 100) < 0.5
    with pytest.raises(ValueError, match="widths"):
        report.table_html(["a", "b"], [["1", "2"]], widths=[1.0])
    assert "table-layout" not in report.table_html(["a"], [["1"]])  # small tables size to their content


def test_differs_needs_a_reason_and_why_is_only_for_differs():
    with pytest.raises(ValueError, match="why"):
        _row(status="differs", ours=1, theirs=2)
    with pytest.raises(ValueError, match="why"):
        _row(status="differs", why="   ")
    with pytest.raises(ValueError, match="differs"):
        _row(status="verified", why="scale")
    assert _row(status="differs", why="CIFAR-10 vs MNIST").why == "CIFAR-10 vs MNIST"
    assert list(STATUSES)[0] == "differs"  # listed first on the dashboard


def test_mimebundle_carries_json_html_and_a_short_text():
    table = report.results(_row(ours=0.5), _row(paper="collapse", ref="Theorem 2", status="heuristic"))
    bundle = table._repr_mimebundle_()
    assert set(bundle) == {MIME_TYPE, "text/html", "text/plain"}
    json.dumps(bundle[MIME_TYPE])  # serialisable as-is
    assert [r["ref"] for r in bundle[MIME_TYPE]] == ["Theorem 5.4", "Theorem 2"]
    assert bundle["text/html"] == table.to_html()
    assert bundle["text/plain"].splitlines() == ["Theorem 5.4: verified (0.5)", "Theorem 2: heuristic"]
    assert repr(table) == "ResultTable(2 rows)"  # no wall of text when printed by accident


def test_chip_colours_every_status():
    for status in STATUSES:
        assert STATUS_COLORS[status][0] in report.chip(status) and status in report.chip(status, 3)
    assert "3 differs" in report.chip("differs", 3)
    with pytest.raises(ValueError):
        report.chip("proved")


def test_table_formats_folds_and_refuses_bad_rows():
    t = report.table(["n", "$d_k$", "error"], [[3, 64, 1.23456e-14], [4, 32, 0.5]], caption="sizes $n$")
    page = t.to_html()
    text = " ".join(_parse(page).text)
    assert "1.235e-14" in text and "$" not in page and "<details>" not in page
    assert t.to_text().splitlines()[0] == "sizes $n$"
    long = report.table(["i"], [[i] for i in range(report.FOLD_ROWS + 1)], caption="many")
    assert long.to_html().startswith("<details><summary>many (13 rows; click to open)</summary>")
    assert "<details>" not in report.table(["i"], [[i] for i in range(report.FOLD_ROWS)]).to_html()
    with pytest.raises(ValueError, match="cells"):
        report.table(["a", "b"], [[1]])
    with pytest.raises(ValueError, match="finite"):
        report.table(["a"], [[float("nan")]])
    with pytest.raises(ValueError, match="row"):
        report.table(["a"], [])
    assert set(t._repr_mimebundle_()) == {"text/html", "text/plain"}


# --- round trip --------------------------------------------------------------------------------


def test_from_dict_round_trip_and_revalidation():
    row = _row(ours=3, theirs="2 (Table 1)", note="n", on="MNIST", expected=2.5, seed=0)
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
    assert back["text/html"] == table.to_html()
    again = ResultTable.from_json(back[MIME_TYPE])
    assert again.rows == table.rows
    assert again.rows[1].ours == "5, 9, 14"
