"""Result records: what a notebook established, in a form the book's results dashboard can collect.

A notebook ends with ``flagcore.report.results(...)`` as the last expression of its last code cell.
The returned :class:`ResultTable` shows itself as an HTML table with coloured status chips and also
carries a JSON copy under :data:`MIME_TYPE`, which ``tools/results.py`` reads back from the executed
notebooks to build the book's results dashboard (with the same HTML helpers, :func:`chip` and
:func:`html_text`). Nothing here prints or touches notebook state; values must be computed live by
the caller.

Three kinds of reference number, never mixed up:

* ``theirs=``: a number the paper *measured or reports* (labelled "paper" on the page);
* ``expected=``: a value a *formula* predicts (an equation of the paper, a closed form), labelled
  "expected" and never shown as the paper's measurement;
* ``on=``: what *our* number was computed on (model, data set, scale) when it is not the paper's own
  setting, shown inside the *ours* cell, so a substitute can never pass for a reproduction.

A row whose number disagrees with the paper's gets the status ``"differs"`` and must say why
(``why=``: data set, scale, model, unknown hyper-parameter ...).
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from numbers import Integral, Real

__all__ = [
    "MIME_TYPE",
    "PAPERS",
    "STATUSES",
    "STATUS_COLORS",
    "Result",
    "ResultTable",
    "chip",
    "format_value",
    "html_text",
    "result",
    "results",
    "table",
]

MIME_TYPE = "application/vnd.flagcore.results+json"

#: The three papers, by the short name used in ``result(paper, ...)``.
PAPERS = ("flag", "lightning", "collapse")

#: What a notebook may say about a numbered result, in the order the dashboard lists them
#: ("differs" first: a disagreement with the paper is what a reader most needs to see).
STATUSES = {
    "differs": "our number differs from the paper's; the reason (data set, scale, model, an unknown "
    "hyper-parameter) is given beside it",
    "corrected": "false as literally stated (or, for the rank-collapse paper, under our reading of its "
    "abstract); a counterexample and a true version are checked live",
    "verified": "checked live, to the stated tolerance, under the stated hypotheses",
    "partial": "some of the claim is checked live; the row says which part is not",
    "reconstructed-only": "the statement had to be reconstructed; only the reconstruction is checked",
    "heuristic": "the paper's argument is heuristic; the notebook measures how well it holds",
    "open": "a conjecture or open question; the notebook reports evidence, not a proof",
}

#: Chip colours (background, text), colour-blind-safe hues with dark text where the fill is light.
STATUS_COLORS = {
    "differs": ("#D55E00", "#ffffff"),
    "corrected": ("#0072B2", "#ffffff"),
    "verified": ("#009E73", "#ffffff"),
    "partial": ("#F0E442", "#222222"),
    "reconstructed-only": ("#CC79A7", "#222222"),
    "heuristic": ("#bbbbbb", "#222222"),
    "open": ("#56B4E9", "#222222"),
}
assert set(STATUS_COLORS) == set(STATUSES)


def format_value(value: object) -> str:
    """A number, a 0-d array/tensor, a sequence of those, a string or ``None``, as a short string.

    Integers are printed exactly, reals to 4 significant digits (scientific outside [1e-3, 1e5)),
    sequences as comma-separated values. Non-finite numbers are refused: a NaN on the dashboard
    is a bug in the notebook, not a result.
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):
        return str(value)
    if hasattr(value, "ndim") and hasattr(value, "tolist"):  # numpy arrays and torch tensors
        value = value.tolist()
        if isinstance(value, (list, tuple)) and not value:
            raise ValueError("an empty array is not a result value")
        return format_value(value)
    if isinstance(value, Integral):
        return str(int(value))
    if isinstance(value, Real):
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"a result value must be finite, got {value}")
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("an empty sequence is not a result value")
        return ", ".join(format_value(v) for v in value)
    raise TypeError(f"a result value must be a number, a string, a sequence of those or None, got {type(value).__name__}")


@dataclass(frozen=True)
class Result:
    """One row of the dashboard: a numbered result of a paper and what the notebook found."""

    paper: str  # "flag", "lightning" or "collapse"
    ref: str  # the paper's numbering, e.g. "Theorem 5.3"
    claim: str  # the claim in a few words
    status: str  # a key of STATUSES
    ours: str = ""  # our number(s), formatted; computed live by the notebook
    on: str = ""  # what ours was computed on when it is not the paper's setting (model, data, scale)
    theirs: str = ""  # the paper's measured/reported number(s)
    expected: str = ""  # a value a formula predicts (never the paper's measurement)
    why: str = ""  # status "differs": why ours and the paper's disagree
    note: str = ""  # caveats, provenance
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Result:
        """Rebuild (and re-validate) a row from its JSON copy, e.g. read back from an executed notebook."""
        if not isinstance(data, dict):
            raise TypeError(f"a result record must be a dict, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown result fields: {sorted(unknown)}")
        missing = {"paper", "ref", "claim", "status"} - set(data)
        if missing:
            raise ValueError(f"result record lacks {sorted(missing)}")
        texts = ("ours", "on", "theirs", "expected", "why", "note")
        for name in texts:
            if not isinstance(data.get(name, ""), str):
                raise TypeError(f"{name} must be a string in a result record")
        return result(
            data["paper"],
            data["ref"],
            data["claim"],
            data["status"],
            **{name: data.get(name, "") for name in texts},
            **dict(data.get("extra") or {}),
        )


def result(
    paper: str,
    ref: str,
    claim: str,
    status: str,
    *,
    ours: object = None,
    on: str = "",
    theirs: object = None,
    expected: object = None,
    why: str = "",
    note: str = "",
    **extra: object,
) -> Result:
    """Build one validated :class:`Result`; numbers are formatted by :func:`format_value`.

    ``ours``/``theirs``/``expected`` may be a number, a 0-d tensor, a sequence of numbers, a string,
    or ``None``. ``theirs`` is what the paper measured or reports; ``expected`` what a formula
    predicts. ``on`` names the model / data set / scale of ``ours`` when it is not the paper's.
    Status ``"differs"`` requires ``why`` (and ``why`` is only for that status). Extra keyword
    arguments must be JSON-serialisable (kept in the JSON copy, not in the visible table).
    """
    if paper not in PAPERS:
        raise ValueError(f"paper must be one of {PAPERS}, got {paper!r}")
    if status not in STATUSES:
        raise ValueError(f"status must be one of {sorted(STATUSES)}, got {status!r}")
    for name, text in (("ref", ref), ("claim", claim)):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{name} must be a non-empty string")
    for name, text in (("on", on), ("why", why), ("note", note)):
        if not isinstance(text, str):
            raise TypeError(f"{name} must be a string, got {type(text).__name__}")
    if status == "differs" and not why.strip():
        raise ValueError("status 'differs' needs why=: the reason ours and the paper's disagree")
    if why.strip() and status != "differs":
        raise ValueError(f"why= is for status 'differs' only (got status {status!r}); use note=")
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"extra fields must be JSON-serialisable: {exc}") from None
    return Result(
        paper,
        ref.strip(),
        claim.strip(),
        status,
        ours=format_value(ours),
        on=on.strip(),
        theirs=format_value(theirs),
        expected=format_value(expected),
        why=why.strip(),
        note=note.strip(),
        extra=dict(extra),
    )


# --- HTML, shared by the notebook tables and the dashboard (tools/results.py) --------------------

_MATH = re.compile(r"\$([^$]+)\$")


def html_text(text: str) -> str:
    """Plain text with ``$...$`` TeX as HTML: escaped, the TeX wrapped as Sphinx wraps inline math.

    The ``math`` class makes MathJax typeset it inside notebook outputs and generated pages alike,
    and no literal ``$`` reaches the reader.
    """
    parts = []
    last = 0
    for match in _MATH.finditer(text):
        parts.append(html.escape(text[last : match.start()]))
        parts.append(f'<span class="math notranslate nohighlight">\\({html.escape(match.group(1))}\\)</span>')
        last = match.end()
    parts.append(html.escape(text[last:]))
    return "".join(parts)


def chip(status: str, count: int | None = None) -> str:
    """A coloured status label (with a count, for the dashboard's count strip)."""
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}")
    background, color = STATUS_COLORS[status]
    label = status if count is None else f"{count} {status}"
    return (
        f'<span class="fg-chip fg-chip-{status}" title="{html.escape(STATUSES[status])}" '
        f'style="background:{background};color:{color};border-radius:0.8em;padding:0.05em 0.6em;'
        f'white-space:nowrap;font-size:0.85em;font-weight:600">{html.escape(label)}</span>'
    )


def ours_html(row: Result) -> str:
    """The *ours* cell: the number, then what it was computed on when that is not the paper's setting."""
    text = html_text(row.ours) if row.ours else "—"
    if row.on:
        text += f'<br><span class="fg-on" style="font-size:0.85em;opacity:0.8">on {html_text(row.on)}</span>'
    return text


def reference_html(row: Result) -> str:
    """The reference cell: the paper's measurement and/or a formula's expected value, each labelled."""
    parts = []
    if row.theirs:
        parts.append(f"<b>paper:</b> {html_text(row.theirs)}")
    if row.expected:
        parts.append(f"<b>expected (formula):</b> {html_text(row.expected)}")
    return "<br>".join(parts) or "—"


def notes_html(row: Result) -> str:
    """Why it differs (always visible), then the note folded in a ``<details>``."""
    parts = []
    if row.why:
        parts.append(f"<b>differs because:</b> {html_text(row.why)}")
    if row.note:
        summary = "note"
        parts.append(f"<details><summary>{summary}</summary>{html_text(row.note)}</details>")
    return "".join(parts)


TABLE_STYLE = "border-collapse:collapse;width:100%;font-size:0.9em"
#: Column widths of a notebook's results table: result, claim, status, ours, reference, notes.
RESULT_WIDTHS = [0.13, 0.19, 0.11, 0.22, 0.17, 0.18]
CELL_STYLE = "border-top:1px solid #ddd;padding:0.3em 0.5em;text-align:left;vertical-align:top"


def table_html(
    header: list[str], rows: list[list[str]], caption: str = "", cls: str = "fg-results", widths: list[float] | None = None
) -> str:
    """A plain HTML table (header and cells already HTML), styled inline so it also reads in Colab.

    ``widths`` (fractions of the table's width, one per column) fix the layout: the table then never grows
    wider than its container, whatever a cell holds (a long formula scrolls inside its cell instead).
    """
    head = "".join(f'<th style="{CELL_STYLE}">{h}</th>' for h in header)
    body = "".join("<tr>" + "".join(f'<td style="{CELL_STYLE}">{c}</td>' for c in row) + "</tr>" for row in rows)
    cap = f'<caption style="caption-side:top;text-align:left;font-weight:600">{caption}</caption>' if caption else ""
    style, cols = TABLE_STYLE, ""
    if widths is not None:
        if len(widths) != len(header) or any(w <= 0 for w in widths):
            raise ValueError("widths needs one positive fraction per column")
        total = sum(widths)
        cols = "<colgroup>" + "".join(f'<col style="width:{100 * w / total:.1f}%">' for w in widths) + "</colgroup>"
        style += ";table-layout:fixed;overflow-wrap:anywhere"
    return f'<table class="{cls}" style="{style}">{cap}{cols}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class ResultTable:
    """The results of one notebook; displays as an HTML table and carries JSON for the dashboard."""

    def __init__(self, rows: list[Result]):
        if not rows:
            raise ValueError("record at least one result")
        for row in rows:
            if not isinstance(row, Result):
                raise TypeError(f"expected Result rows (from flagcore.report.result), got {type(row).__name__}")
        self.rows = list(rows)

    def to_json(self) -> list[dict]:
        return [row.as_dict() for row in self.rows]

    @classmethod
    def from_json(cls, data: list[dict]) -> ResultTable:
        if not isinstance(data, list):
            raise TypeError(f"a result table is a list of records, got {type(data).__name__}")
        return cls([Result.from_dict(d) for d in data])

    def to_html(self) -> str:
        rows = [
            [html_text(r.ref), html_text(r.claim), chip(r.status), ours_html(r), reference_html(r), notes_html(r)]
            for r in self.rows
        ]
        return table_html(
            ["result", "claim", "status", "ours", "reference", "notes"],
            rows,
            caption="Results checked in this notebook (collected on the book's results dashboard)",
            widths=RESULT_WIDTHS,
        )

    def to_text(self) -> str:
        """A short plain-text summary (terminals, logs): one line per row."""
        return "\n".join(f"{r.ref}: {r.status}" + (f" ({r.ours})" if r.ours else "") for r in self.rows)

    def __repr__(self) -> str:
        return f"ResultTable({len(self.rows)} rows)"

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        return {MIME_TYPE: self.to_json(), "text/html": self.to_html(), "text/plain": self.to_text()}


def results(*rows: Result) -> ResultTable:
    """Collect a notebook's :func:`result` rows; make it the last expression of the last code cell."""
    return ResultTable(list(rows))


#: Tables longer than this many rows are folded (a ``<details>`` the reader opens).
FOLD_ROWS = 12


class Table:
    """A small table a notebook shows: HTML in the page (TeX in ``$...$`` typeset), text in a terminal.

    Built by :func:`table`; displaying it is the point, so it has no other behaviour.
    """

    def __init__(self, columns: list[str], rows: list[list[str]], caption: str, fold: bool):
        self.columns, self.rows, self.caption, self.fold = columns, rows, caption, fold

    def to_html(self) -> str:
        body = table_html(
            [html_text(c) for c in self.columns],
            [[html_text(c) for c in row] for row in self.rows],
            caption=html_text(self.caption) if self.caption and not self.fold else "",
            cls="fg-table",
        )
        if self.fold:
            label = html_text(self.caption) if self.caption else "table"
            return f"<details><summary>{label} ({len(self.rows)} rows; click to open)</summary>{body}</details>"
        return body

    def to_text(self) -> str:
        cells = [self.columns] + self.rows
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        lines = [self.caption] if self.caption else []
        lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Table({len(self.columns)} columns, {len(self.rows)} rows)"

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        return {"text/html": self.to_html(), "text/plain": self.to_text()}


def table(columns, rows, caption: str = "", fold: bool | None = None) -> Table:
    """A table for a notebook's output: ``columns`` names, ``rows`` of values (formatted by
    :func:`format_value`: integers exactly, reals to 4 significant digits, NaN refused).

    ``fold=None`` folds tables longer than :data:`FOLD_ROWS` rows. Use it instead of printing
    aligned text: the page shows a real table, and MathJax typesets ``$...$`` in cells and caption.
    """
    columns = [str(c) for c in columns]
    if not columns:
        raise ValueError("a table needs at least one column")
    cells = []
    for i, row in enumerate(rows):
        row = list(row)
        if len(row) != len(columns):
            raise ValueError(f"row {i} has {len(row)} cells for {len(columns)} columns")
        cells.append([format_value(v) for v in row])
    if not cells:
        raise ValueError("a table needs at least one row")
    if not isinstance(caption, str):
        raise TypeError("caption must be a string")
    return Table(columns, cells, caption.strip(), len(cells) > FOLD_ROWS if fold is None else bool(fold))
