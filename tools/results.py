"""Build the book's results dashboard from the executed notebooks.

    python tools/results.py [--stage _build/src]

Every notebook ends with ``flagcore.report.results(...)``, whose output carries a JSON copy of its
rows under the MIME type ``flagcore.report.MIME_TYPE``. After papermill has executed the staged
notebooks in place (tools/build_book.py), this script reads them back, in _toc.yml order, together
with each notebook's run date (``papermill.end_time``) and the parameters it ran with (the defaults
of its ``parameters`` cell, overridden by what papermill injected), and

* fills the marker ``<!-- results-table -->`` of the staged page ``book/results.md`` (the source in
  the repository keeps the marker; the filled copy lives only under _build/src), and
* writes the same data to ``_build/results.json``, and
* moves the JSON copy of each staged notebook's results output from the output's data to its
  metadata, because Sphinx warns about (and ``-W`` fails on) a MIME type it cannot render.

An executed notebook without a results output is an error (every notebook must report). A notebook
that was staged but not executed in this build (``build_book.py --only``) is listed as such (and
flagged if its last code cell does not call ``report.results``).
"""

from __future__ import annotations

import argparse
import ast
import collections
import datetime as dt
import html
import json
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from flagcore.report import MIME_TYPE, PAPERS, STATUSES, Result, chip, html_text, notes_html, ours_html, reference_html, table_html  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toc import toc_files  # noqa: E402  (tools/toc.py)

BUILD = ROOT / "_build"
STAGE = BUILD / "src"
PAGE = Path("book") / "results.md"
MARKER = "<!-- results-table -->"
PAPER_TITLES = {
    "flag": "Flag varieties (Ruan, Xiao & Sui 2026)",
    "lightning": "Lightning self-attention (Henry, Marchetti & Kohn 2025)",
    "collapse": "Rank collapse and head channels (Cirrincione 2026; Dong et al. 2021)",
}
assert set(PAPER_TITLES) == set(PAPERS)


class ResultsError(RuntimeError):
    """A notebook did not report its results, or reported them in a form the dashboard cannot read."""


def toc_order(stage: Path) -> list[str]:
    """Notebook names (``notebooks/part/name``) in the order of the staged _toc.yml."""
    return [f for f in toc_files(stage / "_toc.yml") if f.startswith("notebooks/")]


def default_parameters(nb) -> dict[str, object]:
    """The literal assignments of the cell tagged ``parameters`` (empty if there is none)."""
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            values = {}
            for node in ast.parse(cell.source).body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    try:
                        values[node.targets[0].id] = ast.literal_eval(node.value)
                    except ValueError:
                        values[node.targets[0].id] = ast.unparse(node.value)
            return values
    return {}


def _has_results_call(nb) -> bool:
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    return bool(code) and "report.results(" in code[-1].source


def read_notebook(path: Path, name: str) -> dict[str, object]:
    """One notebook's record: name, executed?, run date, parameters, and its result rows (as dicts)."""
    nb = nbformat.read(path, as_version=4)
    papermill = nb.metadata.get("papermill") or {}
    executed = bool(papermill.get("end_time"))
    injected = dict(papermill.get("parameters") or {})
    parameters = {**default_parameters(nb), **injected}
    payloads = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data") or {}
            if MIME_TYPE in data:
                payloads.append(data[MIME_TYPE])
            elif MIME_TYPE in (output.get("metadata") or {}):  # already moved by stash_payloads
                payloads.append(output["metadata"][MIME_TYPE])
    record: dict[str, object] = {
        "notebook": name,
        "executed": executed,
        "date": papermill.get("end_time"),
        "parameters": parameters,
        "injected": injected,
        "rows": [],
    }
    if not executed:  # staged but not run (build_book.py --only): nothing to read, only the call to check
        record["reports"] = _has_results_call(nb)
        return record
    if not payloads:
        raise ResultsError(
            f"{name}: no results output ({MIME_TYPE}); the notebook's last code cell must end with "
            "flagcore.report.results(report.result(...), ...) as its last expression"
        )
    for payload in payloads:
        if isinstance(payload, str):  # some writers store JSON outputs as text
            payload = json.loads(payload)
        try:
            rows = [Result.from_dict(row) for row in payload]
        except (TypeError, ValueError) as exc:
            raise ResultsError(f"{name}: unreadable results output: {exc}") from None
        record["rows"].extend(row.as_dict() for row in rows)
    return record


def stash_payloads(path: Path) -> bool:
    """Move the JSON copy from an output's data to its metadata, in the staged notebook.

    Sphinx (myst-nb) renders every MIME type of an output and warns about one it does not know,
    which fails a ``-W`` build; the Markdown twin is what the page shows. The JSON stays in the
    output's metadata, where :func:`read_notebook` still finds it, so this step is idempotent.
    """
    nb = nbformat.read(path, as_version=4)
    moved = False
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data") or {}
            if MIME_TYPE in data:
                output.setdefault("metadata", {})[MIME_TYPE] = data.pop(MIME_TYPE)
                moved = True
    if moved:
        nbformat.write(nb, path)
    return moved


def collect(stage: Path = STAGE) -> list[dict[str, object]]:
    """Records of every staged notebook, in _toc.yml order (then any others, by path)."""
    order = toc_order(stage)
    found = {str(p.relative_to(stage).with_suffix("")): p for p in sorted((stage / "notebooks").rglob("*.ipynb")) if ".ipynb_checkpoints" not in p.parts}
    names = [n for n in order if n in found] + sorted(set(found) - set(order))
    return [read_notebook(found[n], n) for n in names]


def _date(iso: str | None) -> str:
    if not iso:
        return ""
    try:
        return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return iso


def _scale(record: dict[str, object]) -> str:
    """The scale a notebook ran at: ``fast=...`` and any other injected parameter."""
    params = record["parameters"]
    parts = [f"fast={params['fast']}"] if "fast" in params else []
    parts += [f"{k}={v}" for k, v in record["injected"].items() if k != "fast"]
    return " ".join(parts) or "defaults"


def _href(name: str, page_dir: str) -> str:
    """Relative link from a page in ``page_dir`` (e.g. ``book``) to a built page ``name``."""
    up = "../" * (page_dir.count("/") + 1 if page_dir else 0)
    return f"{up}{name}.html"


def _nb_link(name: str, page_dir: str) -> str:
    return f'<a href="{_href(name, page_dir)}">{html.escape(name.rsplit("/", 1)[-1])}</a>'


def counts(records: list[dict[str, object]]) -> dict[str, dict]:
    """Counts by status, by paper, and by paper and status (statuses in dashboard order)."""
    rows = [row for r in records for row in r["rows"]]
    by_status = collections.Counter(row["status"] for row in rows)
    by_paper = collections.Counter(row["paper"] for row in rows)
    both = collections.Counter((row["paper"], row["status"]) for row in rows)
    return {
        "status": {s: by_status[s] for s in STATUSES if by_status[s]},
        "paper": {p: by_paper[p] for p in PAPERS if by_paper[p]},
        "paper_status": {p: {s: both[p, s] for s in STATUSES if both[p, s]} for p in PAPERS if by_paper[p]},
    }


def count_strip(tally: dict[str, int]) -> str:
    return " ".join(chip(s, n) for s, n in tally.items())


def _shared_scale(records: list[dict[str, object]]) -> str | None:
    """The one scale every executed notebook ran at, or None when they differ."""
    scales = {_scale(r) for r in records if r["executed"]}
    return scales.pop() if len(scales) == 1 else None


def _row_cells(record: dict[str, object], row: dict, page_dir: str, shared: str | None) -> list[str]:
    r = Result.from_dict(row)
    where = _nb_link(record["notebook"], page_dir)
    if shared is None:
        where += f'<br><span style="font-size:0.85em;opacity:0.8">{html.escape(_scale(record))}</span>'
    return [html_text(r.ref), html_text(r.claim), chip(r.status), ours_html(r), reference_html(r), notes_html(r), where]


HEADER = ["result", "claim", "status", "ours", "reference", "why / notes", "notebook"]
WIDTHS = [0.10, 0.15, 0.08, 0.19, 0.15, 0.22, 0.11]  # fixed layout: the table never outgrows the window


def render(records: list[dict[str, object]], page_dir: str = "book") -> str:
    """The MyST (headings + raw HTML blocks) that replaces the dashboard's marker."""
    rows = [(r, row) for r in records for row in r["rows"]]
    tally = counts(records)
    executed = [r for r in records if r["executed"]]
    dates = sorted(_date(r["date"]) for r in executed)
    shared = _shared_scale(records)
    out = ['<div class="fg-dashboard">']
    summary = f"<p><b>{len(rows)} results</b> from {len(executed)} executed notebooks"
    if dates:
        summary += f" (run {html.escape(dates[0])} to {html.escape(dates[-1])})"
    if shared is not None:
        scale = "the CI scale on two CPU cores" if shared == "fast=True" else "the paper scale" if shared == "fast=False" else ""
        summary += f"; every notebook ran with <code>{html.escape(shared)}</code>" + (f" ({scale})" if scale else "")
    out.append(summary + ".</p>")
    strip = ['<table class="fg-strip" style="border-collapse:collapse;margin-bottom:1em"><tbody>']
    for paper, by_status in tally["paper_status"].items():
        strip.append(
            f'<tr><td style="padding:0.2em 0.8em 0.2em 0"><a href="{_href("book/papers/" + paper, page_dir)}">'
            f"{html.escape(PAPER_TITLES[paper])}</a></td><td style=\"padding:0.2em 0.8em 0.2em 0\">{tally['paper'][paper]}</td>"
            f'<td style="padding:0.2em 0">{count_strip(by_status)}</td></tr>'
        )
    strip.append(f'<tr><td style="padding:0.2em 0.8em 0.2em 0"><b>all papers</b></td><td><b>{len(rows)}</b></td><td>{count_strip(tally["status"])}</td></tr>')
    strip.append("</tbody></table>")
    out.append("".join(strip))
    legend = "".join(f"<li>{chip(s)} {html.escape(text)}</li>" for s, text in STATUSES.items())
    out.append(f'<details><summary>What the statuses mean</summary><ul style="list-style:none;padding-left:0">{legend}</ul></details>')
    out.append("</div>")
    not_run = [r["notebook"] for r in records if not r["executed"]]
    if not_run:
        out += ["", "```{warning}", f"{len(not_run)} notebook(s) were not executed in this build, so their results are missing below: "
                + ", ".join(f"{{doc}}`/{n}`" for n in not_run) + ".", "```"]
    silent = [r["notebook"] for r in records if not r["executed"] and not r.get("reports", True)]
    if silent:
        out += ["", "```{error}", "These notebooks do not end with a results cell: " + ", ".join(f"{{doc}}`/{n}`" for n in silent) + ".", "```"]
    differs = [(r, row) for r, row in rows if row["status"] == "differs"]
    if differs:
        out += ["", "## Where our numbers differ from the papers'", ""]
        out.append(
            '<div class="fg-dashboard-table">'
            + table_html(
                ["paper"] + HEADER,
                [[html.escape(PAPER_TITLES[row["paper"]].split(" (")[0])] + _row_cells(r, row, page_dir, shared) for r, row in differs],
                cls="fg-results fg-differs",
                widths=[0.08] + WIDTHS,
            )
            + "</div>"
        )
    for paper in PAPERS:
        paper_rows = [(r, row) for r, row in rows if row["paper"] == paper]
        if not paper_rows:
            continue
        out += ["", f"## {PAPER_TITLES[paper]}", ""]
        out.append(f"<p>{count_strip(tally['paper_status'][paper])}</p>")
        out.append(
            '<div class="fg-dashboard-table">'
            + table_html(HEADER, [_row_cells(r, row, page_dir, shared) for r, row in paper_rows], cls="fg-results", widths=WIDTHS)
            + "</div>"
        )
    runs = []
    for record in records:
        params = ", ".join(f"{k}={v!r}" for k, v in record["parameters"].items())
        finished = _date(record["date"]) if record["executed"] else "not executed"
        runs.append([_nb_link(record["notebook"], page_dir), html.escape(finished), f"<code>{html.escape(params)}</code>"])
    out += [
        "",
        "## The runs",
        "",
        "<p>When papermill finished each notebook, and every parameter it ran with (its parameters cell, "
        "with any value papermill injected).</p>",
        "<details><summary>" + f"{len(runs)} runs (click to open)</summary>"
        + table_html(["notebook", "finished", "parameters"], runs, cls="fg-runs")
        + "</details>",
    ]
    return "\n".join(out)


def render_paper_summary(records: list[dict[str, object]], paper: str, page_dir: str = "book/papers") -> str:
    """For a paper's landing page: its count strip and its rows (differs first), from this build."""
    rows = [(r, row) for r in records for row in r["rows"] if row["paper"] == paper]
    if not rows:
        return "<p>No results of this paper were recorded in this build.</p>"
    order = {s: i for i, s in enumerate(STATUSES)}
    rows.sort(key=lambda item: order[item[1]["status"]])
    tally = counts(records)["paper_status"][paper]
    shared = _shared_scale(records)
    return "\n".join(
        [
            f'<div class="fg-dashboard"><p><b>{len(rows)} results</b> of this paper checked in this build: {count_strip(tally)}</p></div>',
            '<div class="fg-dashboard-table">'
            + table_html(HEADER, [_row_cells(r, row, page_dir, shared) for r, row in rows], cls="fg-results", widths=WIDTHS)
            + "</div>",
        ]
    )


def render_status_counts(records: list[dict[str, object]], page_dir: str = "book") -> str:
    """For the introduction: the counts by status, linked to the dashboard."""
    tally = counts(records)
    total = sum(tally["status"].values())
    return (
        f'<p class="fg-dashboard"><a href="{_href("book/results", page_dir)}"><b>{total} results</b> on the dashboard</a>: '
        f"{count_strip(tally['status'])}</p>"
    )


STATUS_MARKER = "<!-- status-counts -->"  # book/intro.md: the counts by status, linked to the dashboard
PAPER_MARKER = "<!-- paper-summary -->"  # book/papers/<paper>.md: that paper's counts and rows


def _fill(source: Path, target: Path, marker: str, text: str) -> None:
    page = source.read_text()  # always from the source, so that a re-run starts from the marker
    if marker not in page:
        raise ResultsError(f"{source} lost its marker {marker!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page.replace(marker, text))


def write(
    stage: Path = STAGE, build: Path = BUILD, source_page: Path | None = None, source_root: Path | None = None
) -> list[dict[str, object]]:
    """Collect the staged notebooks' results, fill the staged dashboard (and, from ``source_root``, the
    introduction's status counts and each paper's landing page), and write results.json."""
    records = collect(stage)
    if source_page is None:
        source_page, source_root = ROOT / PAGE, source_root or ROOT
    _fill(source_page, stage / PAGE, MARKER, render(records))
    if source_root is not None:
        _fill(source_root / "book" / "intro.md", stage / "book" / "intro.md", STATUS_MARKER, render_status_counts(records))
        for paper in PAPERS:
            name = Path("book") / "papers" / f"{paper}.md"
            _fill(source_root / name, stage / name, PAPER_MARKER, render_paper_summary(records, paper))
    summary = {
        "generated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "counts": counts(records),
        "notebooks": records,
    }
    build.mkdir(parents=True, exist_ok=True)
    (build / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    for record in records:
        if record["executed"]:
            stash_payloads(stage / f"{record['notebook']}.ipynb")
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=Path, default=STAGE, help="the staged book sources with executed notebooks (default _build/src)")
    parser.add_argument("--build", type=Path, default=BUILD, help="where results.json goes (default _build)")
    args = parser.parse_args(argv)
    try:
        records = write(args.stage, args.build)
    except ResultsError as exc:
        print(f"results dashboard: {exc}", file=sys.stderr)
        return 1
    tally = counts(records)
    print(
        f"results dashboard: {sum(tally['status'].values())} results from {len(records)} notebooks; "
        f"by status {tally['status']}; by paper {tally['paper']}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
