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
import json
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from flagcore.report import MIME_TYPE, PAPERS, STATUSES, Result  # noqa: E402

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


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _date(iso: str | None) -> str:
    if not iso:
        return ""
    try:
        return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return iso


def _run_label(record: dict[str, object]) -> str:
    """Short run description for the main table: the scale, then any injected parameter."""
    params = record["parameters"]
    parts = []
    if "fast" in params:
        parts.append(f"`fast={params['fast']}`")
    parts += [f"`{k}={v}`" for k, v in record["injected"].items() if k != "fast"]
    return " ".join(parts) or "defaults"


def _link(name: str) -> str:
    return f"{{doc}}`{name.rsplit('/', 1)[-1]} </{name}>`"


def counts(records: list[dict[str, object]]) -> dict[str, dict[str, int]]:
    by_status = collections.Counter(row["status"] for r in records for row in r["rows"])
    by_paper = collections.Counter(row["paper"] for r in records for row in r["rows"])
    return {
        "status": {s: by_status[s] for s in STATUSES if by_status[s]},
        "paper": {p: by_paper[p] for p in PAPERS if by_paper[p]},
    }


def render(records: list[dict[str, object]]) -> str:
    """The Markdown that replaces the marker: summary, legend, one table per paper, the runs."""
    rows = [(r, row) for r in records for row in r["rows"]]
    tally = counts(records)
    executed = [r for r in records if r["executed"]]
    dates = sorted(_date(r["date"]) for r in executed)
    lines = [
        f"**{len(rows)} results** from {len(executed)} executed notebooks"
        + (f" (run {dates[0]} to {dates[-1]})" if dates else "")
        + ": "
        + ", ".join(f"{n} {s}" for s, n in tally["status"].items())
        + ".",
        "",
    ]
    not_run = [r["notebook"] for r in records if not r["executed"]]
    if not_run:
        lines += [
            "```{warning}",
            f"{len(not_run)} notebook(s) were not executed in this build, so their results are missing below: "
            + ", ".join(_link(n) for n in not_run)
            + ".",
            "```",
            "",
        ]
    silent = [r["notebook"] for r in records if not r["executed"] and not r.get("reports", True)]
    if silent:
        lines += ["```{error}", "These notebooks do not end with a results cell: " + ", ".join(_link(n) for n in silent) + ".", "```", ""]
    lines += ["Status legend:", ""]
    lines += [f"- **{s}**: {text}." for s, text in STATUSES.items()]
    lines.append("")
    for paper in PAPERS:
        paper_rows = [(r, row) for r, row in rows if row["paper"] == paper]
        if not paper_rows:
            continue
        lines += [
            f"## {PAPER_TITLES[paper]}",
            "",
            "| result | claim | status | ours | paper's | notebook | run | note |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for record, row in paper_rows:
            lines.append(
                f"| {_cell(row['ref'])} | {_cell(row['claim'])} | **{row['status']}** | {_cell(row['ours'])} | "
                f"{_cell(row['theirs'])} | {_link(record['notebook'])} | {_run_label(record)} | {_cell(row['note'])} |"
            )
        lines.append("")
    lines += [
        "## The runs",
        "",
        "Each notebook's run: when papermill finished it, and every parameter it ran with "
        "(its `parameters` cell, with any value papermill injected).",
        "",
        "| notebook | finished | parameters |",
        "|---|---|---|",
    ]
    for record in records:
        params = ", ".join(f"`{k}={v!r}`" for k, v in record["parameters"].items())
        finished = _date(record["date"]) if record["executed"] else "not executed"
        lines.append(f"| {_link(record['notebook'])} | {finished} | {_cell(params)} |")
    return "\n".join(lines)


def write(stage: Path = STAGE, build: Path = BUILD, source_page: Path | None = None) -> list[dict[str, object]]:
    """Collect the staged notebooks' results, fill the staged results page and write results.json."""
    records = collect(stage)
    source_page = source_page or ROOT / PAGE
    text = source_page.read_text()  # always from the source, so that a re-run starts from the marker
    if MARKER not in text:
        raise ResultsError(f"{source_page} lost its marker {MARKER!r}")
    target = stage / PAGE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text.replace(MARKER, render(records)))
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
