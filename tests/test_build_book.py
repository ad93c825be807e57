"""The notebook runner fails loudly: a failing check in a notebook is a failed run, with the error shown."""

from __future__ import annotations

import json
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


def _flaky_kernel(root: Path, failures: int) -> Path:
    """A real kernelspec named python3 whose first ``failures`` starts die as a port clash does; then ipykernel."""
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    counter = root / "starts"
    launcher = root / "launch.py"
    launcher.write_text(
        "import os, sys\n"
        f"counter = {str(counter)!r}\n"
        "n = int(open(counter).read()) if os.path.exists(counter) else 0\n"
        "open(counter, 'w').write(str(n + 1))\n"
        f"if n < {failures}:\n"
        "    sys.stderr.write('zmq.error.ZMQError: Address already in use (addr=tcp://127.0.0.1:5555)\\n')\n"
        "    sys.exit(1)\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'ipykernel_launcher'] + sys.argv[1:])\n"
    )
    argv = [sys.executable, str(launcher), "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))
    return counter


@pytest.mark.slow
@pytest.mark.parametrize(
    ("failures", "cell", "status", "starts"),
    [
        (1, "x = 1", "ok", "2"),  # a kernel that did not start is retried: one failed start, one run
        (0, "assert False, 'the check failed'", "failed", "1"),  # a notebook that ran and failed is not
    ],
)
def test_only_a_kernel_that_did_not_start_is_retried(stage, tmp_path, monkeypatch, failures, cell, status, starts):
    counter = _flaky_kernel(tmp_path / "jupyter", failures=failures)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    record = build_book.execute_one(_notebook(stage / "notebooks" / "nb.ipynb", cell), {}, jobs=1)
    assert record["status"] == status, record.get("error")
    assert status == "ok" or "the check failed" in record["error"]
    assert counter.read_text() == starts


# --- the results dashboard (tools/results.py) ------------------------------------------------------

import html  # noqa: E402

import results  # noqa: E402

from flagcore import report  # noqa: E402

RESULTS_CELL = (
    "from flagcore import report\n"
    "report.results(report.result('flag', 'Theorem 5.4', 'the claim', 'verified', ours=err, theirs=0.5, note='MiniLM for GPT-2'))"
)


def _executed(path: Path, rows, *, params=None, end="2026-01-02T03:04:05.000000", defaults="fast = True\nseed = 0"):
    """A notebook as papermill leaves it: papermill metadata, and the results cell's output."""
    nb = nbformat.v4.new_notebook()
    cell_params = nbformat.v4.new_code_cell(defaults)
    cell_params.metadata["tags"] = ["parameters"]
    last = nbformat.v4.new_code_cell("report.results(...)")
    if rows is not None:
        bundle = report.results(*rows)._repr_mimebundle_()
        last.outputs = [nbformat.v4.new_output("execute_result", data=bundle, execution_count=2)]
    nb.cells = [cell_params, last]
    if end is not None:
        nb.metadata["papermill"] = {"parameters": params or {}, "end_time": end}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


@pytest.fixture
def dashboard(tmp_path):
    stage = tmp_path / "src"
    (stage / "book").mkdir(parents=True)
    (stage / "_toc.yml").write_text(
        "format: jb-book\nroot: book/intro\nparts:\n  - caption: A\n    chapters:\n"
        "      - file: notebooks/flag/b\n      - file: notebooks/flag/a\n      - file: notebooks/collapse/c\n      - file: book/results\n"
    )
    page = tmp_path / "results.md"
    page.write_text("# Results\n\nintro\n\n" + results.MARKER + "\n")
    return stage, tmp_path / "build", page


def test_dashboard_collects_rows_in_toc_order_with_run_parameters(dashboard):
    stage, build, page = dashboard
    nbdir = stage / "notebooks"
    _executed(nbdir / "flag" / "a.ipynb", [report.result("flag", "Prop 3.3", "dims", "verified", ours=(8, 12), theirs=(8, 12))])
    _executed(
        nbdir / "flag" / "b.ipynb",
        [
            report.result("flag", "Theorem 5.4", "commutator | obstruction", "corrected", ours=1e-13),
            report.result("lightning", "Conj 3.10", "softmax", "open"),
        ],
        params={"fast": False, "n_draws": 7},
    )
    _executed(nbdir / "collapse" / "c.ipynb", [report.result("collapse", "Dong Thm 2.2", "collapse", "heuristic", ours=0.3)])
    records = results.write(stage, build, source_page=page)
    assert [r["notebook"] for r in records] == ["notebooks/flag/b", "notebooks/flag/a", "notebooks/collapse/c"]
    b = records[0]
    assert b["parameters"] == {"fast": False, "seed": 0, "n_draws": 7} and b["injected"] == {"fast": False, "n_draws": 7}
    assert records[1]["parameters"] == {"fast": True, "seed": 0}

    text = (stage / "book" / "results.md").read_text()
    assert results.MARKER not in text and text.startswith("# Results\n\nintro")
    assert "<b>4 results</b> from 3 executed notebooks" in text
    # the scale is stated once (two notebooks ran fast=True, one fast=False: so it is given per row)
    assert "every notebook ran with" not in text and "fast=False n_draws=7" in text
    for status, n in (("verified", 1), ("corrected", 1), ("heuristic", 1), ("open", 1)):
        assert f"fg-chip-{status}" in text and f">{n} {status}</span>" in text
    for status in report.STATUSES:  # the legend, folded
        assert report.STATUSES[status].split(";")[0][:40] in html.unescape(text)
    assert "## Where our numbers differ" not in text  # nothing differs here
    flag = text.index("## Flag varieties")
    lightning = text.index("## Lightning")
    collapse = text.index("## Rank collapse")
    assert flag < lightning < collapse < text.index("## The runs")
    flag_part = text[flag:lightning]
    assert flag_part.index("Theorem 5.4") < flag_part.index("Prop 3.3")  # toc order: b before a
    assert "commutator | obstruction" in flag_part and "1.000e-13" in flag_part
    assert '<a href="../notebooks/flag/b.html">b</a>' in flag_part
    assert "<b>paper:</b> 8, 12" in flag_part and "fg-chip-verified" in flag_part
    assert "| Prop 3.3 |" not in text and "|---|" not in text  # no Markdown table syntax is left
    # HTML blocks end at a blank line in MyST: none may contain one
    for block in text.split("\n\n"):
        if block.lstrip().startswith("<"):
            assert block.count("<table") == block.count("</table>"), block[:200]
    assert "Conj 3.10" in text[lightning:collapse]
    assert "2026-01-02 03:04 UTC" in text[text.index("## The runs"):]

    data = json.loads((build / "results.json").read_text())
    assert data["counts"]["status"] == {"corrected": 1, "verified": 1, "heuristic": 1, "open": 1}
    assert data["counts"]["paper"] == {"flag": 2, "lightning": 1, "collapse": 1}
    assert data["notebooks"][0]["rows"][0]["ref"] == "Theorem 5.4"

    # idempotent: a second run starts again from the source page's marker
    results.write(stage, build, source_page=page)
    assert (stage / "book" / "results.md").read_text() == text


def test_an_executed_notebook_without_results_is_an_error(dashboard):
    stage, build, page = dashboard
    _executed(stage / "notebooks" / "flag" / "a.ipynb", [report.result("flag", "P", "c", "verified")])
    _executed(stage / "notebooks" / "flag" / "b.ipynb", None)
    with pytest.raises(results.ResultsError, match="notebooks/flag/b: no results output"):
        results.write(stage, build, source_page=page)
    assert results.main(["--stage", str(stage), "--build", str(build)]) == 1


def test_a_corrupt_results_output_is_an_error(dashboard):
    stage, build, page = dashboard
    path = _executed(stage / "notebooks" / "flag" / "a.ipynb", [report.result("flag", "P", "c", "verified")])
    nb = nbformat.read(path, as_version=4)
    nb.cells[-1].outputs[0]["data"][report.MIME_TYPE][0]["status"] = "proved"
    nbformat.write(nb, path)
    with pytest.raises(results.ResultsError, match="unreadable results output"):
        results.write(stage, build, source_page=page)


def test_unexecuted_notebooks_are_listed_not_counted(dashboard):
    stage, build, page = dashboard
    _executed(stage / "notebooks" / "flag" / "a.ipynb", [report.result("flag", "P", "c", "verified")])
    _executed(stage / "notebooks" / "flag" / "b.ipynb", None, end=None)  # staged by --only, not run
    records = results.write(stage, build, source_page=page)
    assert [r["executed"] for r in records] == [False, True]
    text = (stage / "book" / "results.md").read_text()
    assert "were not executed in this build" in text and "{doc}`/notebooks/flag/b`" in text
    assert '<a href="../notebooks/flag/b.html">b</a></td><td style' in text and "not executed" in text


def test_the_page_must_keep_its_marker(dashboard, tmp_path):
    stage, build, page = dashboard
    _executed(stage / "notebooks" / "flag" / "a.ipynb", [report.result("flag", "P", "c", "verified")])
    page.write_text("# Results\n")
    with pytest.raises(results.ResultsError, match="marker"):
        results.write(stage, build, source_page=page)


def test_the_repository_page_has_the_marker_and_is_in_the_toc():
    assert results.MARKER in (ROOT / "book" / "results.md").read_text()
    assert results.STATUS_MARKER in (ROOT / "book" / "intro.md").read_text()
    toc = (ROOT / "_toc.yml").read_text()
    assert "book/results" in toc
    for paper in report.PAPERS:
        assert results.PAPER_MARKER in (ROOT / "book" / "papers" / f"{paper}.md").read_text()
        assert f"book/papers/{paper}" in toc


def test_differs_rows_come_first_and_the_landing_pages_and_intro_are_filled(dashboard, tmp_path):
    stage, build, page = dashboard
    root = tmp_path / "root"
    (root / "book" / "papers").mkdir(parents=True)
    (root / "book" / "intro.md").write_text("# Intro\n\n" + results.STATUS_MARKER + "\n")
    for paper in report.PAPERS:
        (root / "book" / "papers" / f"{paper}.md").write_text(f"# {paper}\n\n" + results.PAPER_MARKER + "\n")
    nbdir = stage / "notebooks"
    _executed(nbdir / "flag" / "a.ipynb", [
        report.result("flag", "Prop 3.3", "dims", "verified", ours=(8, 12), theirs=(8, 12)),
        report.result("flag", "Table 1", "commutator", "differs", ours=0.45, on="MNIST (paper: CIFAR-10)", theirs=1.461,
                      why="data set and scale"),
    ])
    _executed(nbdir / "flag" / "b.ipynb", [report.result("flag", "Fig 3", "dims", "open", ours=25, expected=25)])
    _executed(nbdir / "collapse" / "c.ipynb", [report.result("collapse", "Abstract", "n(H-1)d_k", "corrected", ours=0)])
    results.write(stage, build, source_page=page, source_root=root)
    text = (stage / "book" / "results.md").read_text()
    assert "every notebook ran with <code>fast=True</code> (the CI scale on two CPU cores)" in text  # stated once
    differs = text.index("## Where our numbers differ")
    assert differs < text.index("## Flag varieties")
    assert "differs because:</b> data set and scale" in text[differs:text.index("## Flag varieties")]
    assert "on MNIST (paper: CIFAR-10)" in text
    fig3 = text[text.index("Fig 3"):]
    assert "<b>expected (formula):</b> 25" in fig3[:fig3.index("</tr>")] and "paper:" not in fig3[:fig3.index("</tr>")]
    intro = (stage / "book" / "intro.md").read_text()
    assert '<a href="../book/results.html"><b>4 results</b> on the dashboard</a>' in intro and ">1 differs</span>" in intro
    flag = (stage / "book" / "papers" / "flag.md").read_text()
    assert flag.index("Table 1") < flag.index("Prop 3.3") < flag.index("Fig 3")  # differs first
    assert '<a href="../../notebooks/flag/a.html">a</a>' in flag
    assert "No results of this paper" in (stage / "book" / "papers" / "lightning.md").read_text()
    (root / "book" / "papers" / "flag.md").write_text("# no marker\n")
    with pytest.raises(results.ResultsError, match="marker"):
        results.write(stage, build, source_page=page, source_root=root)


@pytest.mark.slow
def test_results_cell_survives_papermill(stage, tmp_path):
    """End to end: papermill runs a notebook whose last cell reports; the dashboard reads it back."""
    (stage / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n  - file: notebooks/ok\n")
    path = _notebook(stage / "notebooks" / "ok.ipynb", "err = 2.0 ** -50", RESULTS_CELL)
    record = build_book.execute_one(path, {"fast": False}, jobs=1)
    assert record["status"] == "ok", record.get("error")
    [read] = results.collect(stage)
    assert read["executed"] and read["parameters"] == {"fast": False} and read["date"]
    [row] = read["rows"]
    assert row["ours"] == "8.882e-16" and row["theirs"] == "0.5" and row["note"] == "MiniLM for GPT-2"


def test_payloads_are_moved_out_of_sphinx_sight_and_still_read(dashboard):
    """After the dashboard is written, the staged output has no unknown MIME type; a re-run still finds the rows."""
    stage, build, page = dashboard
    path = _executed(stage / "notebooks" / "flag" / "a.ipynb", [report.result("flag", "P", "c", "verified", ours=2)])
    first = results.write(stage, build, source_page=page)
    output = nbformat.read(path, as_version=4).cells[-1].outputs[0]
    assert report.MIME_TYPE not in output["data"] and "text/html" in output["data"]
    assert output["metadata"][report.MIME_TYPE][0]["ours"] == "2"
    nbformat.validate(nbformat.read(path, as_version=4))
    assert results.write(stage, build, source_page=page) == first
