"""Result records: what a notebook established, in a form the book's results dashboard can collect.

A notebook ends with ``flagcore.report.results(...)`` as the last expression of its last code cell.
The returned :class:`ResultTable` shows itself as a small Markdown table in the page and also carries
a JSON copy under :data:`MIME_TYPE`, which ``tools/results.py`` reads back from the executed notebooks
to build the book's results page. Nothing here prints or touches notebook state; values must be
computed live by the caller (the paper's numbers go in ``theirs=``, labelled as the paper's).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from numbers import Integral, Real

__all__ = ["MIME_TYPE", "PAPERS", "STATUSES", "Result", "ResultTable", "format_value", "result", "results"]

MIME_TYPE = "application/vnd.flagcore.results+json"

#: The three papers, by the short name used in ``result(paper, ...)``.
PAPERS = ("flag", "lightning", "collapse")

#: What a notebook may say about a numbered result.
STATUSES = {
    "verified": "checked live, to the stated tolerance, under the stated hypotheses",
    "corrected": "false as literally stated; the counterexample and a true version are checked live",
    "partial": "some of the claim is checked live; the notebook says which part is not",
    "reconstructed-only": "the statement had to be reconstructed; only the reconstruction is checked",
    "heuristic": "the paper's argument is heuristic; the notebook measures how well it holds",
    "open": "a conjecture or open question; the notebook reports evidence, not a proof",
}


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
    theirs: str = ""  # the paper's number(s), when the paper gives one
    note: str = ""  # substitutes (MiniLM for GPT-2 ...), scale, caveats
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
        for name in ("ours", "theirs", "note"):
            if not isinstance(data.get(name, ""), str):
                raise TypeError(f"{name} must be a string in a result record")
        return result(
            data["paper"],
            data["ref"],
            data["claim"],
            data["status"],
            ours=data.get("ours", ""),
            theirs=data.get("theirs", ""),
            note=data.get("note", ""),
            **dict(data.get("extra") or {}),
        )


def result(
    paper: str,
    ref: str,
    claim: str,
    status: str,
    *,
    ours: object = None,
    theirs: object = None,
    note: str = "",
    **extra: object,
) -> Result:
    """Build one validated :class:`Result`; numbers are formatted by :func:`format_value`.

    ``ours``/``theirs`` may be a number, a 0-d tensor, a sequence of numbers, a string, or ``None``.
    Extra keyword arguments must be JSON-serialisable (they are kept in the JSON copy, not in the
    visible table).
    """
    if paper not in PAPERS:
        raise ValueError(f"paper must be one of {PAPERS}, got {paper!r}")
    if status not in STATUSES:
        raise ValueError(f"status must be one of {sorted(STATUSES)}, got {status!r}")
    for name, text in (("ref", ref), ("claim", claim)):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{name} must be a non-empty string")
    if not isinstance(note, str):
        raise TypeError(f"note must be a string, got {type(note).__name__}")
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"extra fields must be JSON-serialisable: {exc}") from None
    return Result(paper, ref.strip(), claim.strip(), status, format_value(ours), format_value(theirs), note.strip(), dict(extra))


def _cell(text: str) -> str:
    """Text safe inside one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


class ResultTable:
    """The results of one notebook; displays as Markdown and carries JSON for the dashboard."""

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

    def to_markdown(self) -> str:
        lines = [
            "**Results checked in this notebook** (collected on the book's results page)",
            "",
            "| result | claim | status | ours | paper's | note |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(f"| {_cell(r.ref)} | {_cell(r.claim)} | {r.status} | {_cell(r.ours)} | {_cell(r.theirs)} | {_cell(r.note)} |")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.to_markdown()

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        return {MIME_TYPE: self.to_json(), "text/markdown": self.to_markdown(), "text/plain": self.to_markdown()}


def results(*rows: Result) -> ResultTable:
    """Collect a notebook's :func:`result` rows; make it the last expression of the last code cell."""
    return ResultTable(list(rows))
