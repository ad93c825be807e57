"""The Colab install cell of every notebook: one text, generated here, pinned to a library commit.

    python tools/install_cell.py          # rewrite every notebook's install cell (.md and its .ipynb twin)
    python tools/install_cell.py --check  # exit 1 and say which notebooks are stale

A notebook opened in Colab has no clone around it: its first cell pip-installs flagcore from the
repository, only when it is missing, keeping Colab's torch. Two things make that install the right one:

* **the extras the notebook needs**: ``flagcore[hf]`` (transformers, safetensors, gguf, huggingface_hub,
  accelerate) when its code reads real models, plain ``flagcore`` otherwise (:func:`extras_for`);
* **the commit**: the cell installs the library at ``LIBRARY_COMMIT``, the latest commit that changed
  the library (``flagcore/`` or ``pyproject.toml``). A file cannot name its own commit, but it can name
  the library's: from that commit to the notebook's own, the library did not change, so the notebook
  and the library it installs are the code the book was built and tested with, and a later change on
  ``main`` cannot break a notebook opened from an older page. ``tests/test_notebooks.py`` fails when the
  pin is stale; the fix is to commit the library change and run this script (a second commit).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import jupytext
import yaml

ROOT = Path(__file__).resolve().parents[1]
#: What the wheel is built from: a change here is a change of the library the notebooks install.
LIBRARY_PATHS = ("flagcore", "pyproject.toml")
REPO_URL = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
#: Code that reads real models: such a notebook installs ``flagcore[hf]``.
NEEDS_HF = re.compile(
    r"\bimport transformers\b|\bfrom transformers\b|flagcore\.(weights|heads|layout_check|layouts|textlm)\b"
    r"|from flagcore import [^\n]*\b(weights|heads|layout_check|layouts|textlm)\b"
)
COMMIT_LINE = re.compile(r'^    LIBRARY_COMMIT = "([0-9a-f]{40})"$', re.M)

CELL = '''# Colab or a fresh kernel: install flagcore (the book's library) only if it is missing,
# with the extras this notebook needs, at the commit of the library the book was built
# with. Colab's torch is kept.
try:
    import flagcore
except ImportError:
    import subprocess
    import sys

    LIBRARY_COMMIT = "{commit}"
    subprocess.check_call(
        [
            sys.executable, "-m", "pip", "install", "-q",
            "{requirement} @ git+{repo}@"
            + LIBRARY_COMMIT,
        ]
    )
    import flagcore'''


def library_commit(root: Path = ROOT) -> str:
    """The latest commit that changed the library (:data:`LIBRARY_PATHS`)."""
    out = subprocess.run(["git", "log", "-1", "--format=%H", "--", *LIBRARY_PATHS], cwd=root,
                         capture_output=True, text=True, check=True).stdout.strip()
    if not re.fullmatch(r"[0-9a-f]{40}", out):
        raise RuntimeError(f"no commit of the library found in {root} (git log printed {out!r})")
    return out


def library_unchanged_since(commit: str, root: Path = ROOT) -> bool:
    """True when the committed library at HEAD is the library at ``commit``."""
    result = subprocess.run(["git", "diff", "--quiet", commit, "HEAD", "--", *LIBRARY_PATHS], cwd=root,
                            capture_output=True, text=True)
    if result.returncode not in (0, 1):
        raise RuntimeError(f"git diff {commit} HEAD failed: {result.stderr.strip()}")
    return result.returncode == 0


def code_of(notebook) -> str:
    return "\n".join(c.source for c in notebook.cells if c.cell_type == "code")


def extras_for(notebook) -> list[str]:
    """The extras of flagcore that ``notebook``'s code needs (its install cell excluded)."""
    code = "\n".join(c.source for c in notebook.cells if c.cell_type == "code" and "install" not in c.metadata.get("tags", []))
    return ["hf"] if NEEDS_HF.search(code) else []


def render(extras: list[str], commit: str) -> str:
    requirement = "flagcore" + (f"[{','.join(extras)}]" if extras else "")
    return CELL.format(commit=commit, requirement=requirement, repo=REPO_URL)


def pinned_commit(notebook) -> str | None:
    first = next((c for c in notebook.cells if c.cell_type == "code"), None)
    match = COMMIT_LINE.search(first.source) if first is not None else None
    return match.group(1) if match else None


def expected_cell(notebook, commit: str) -> str:
    return render(extras_for(notebook), commit)


def _install_cell(notebook):
    first = next((c for c in notebook.cells if c.cell_type == "code"), None)
    if first is None or "install" not in first.metadata.get("tags", []):
        raise ValueError("the first code cell is not the install cell (tag install)")
    return first


def rewrite(source: Path, commit: str) -> bool:
    """Set the install cell of ``source`` (a MyST .md) and its .ipynb twin; True when something changed."""
    notebook = jupytext.read(source)
    cell = _install_cell(notebook)
    wanted = expected_cell(notebook, commit)
    if cell.source == wanted:
        return False
    text = source.read_text()
    if text.count(cell.source) != 1:
        raise ValueError(f"{source}: cannot locate the install cell's text exactly once")
    source.write_text(text.replace(cell.source, wanted))
    if source.with_suffix(".ipynb").exists():  # the Colab twin, regenerated the way the README says
        subprocess.run([sys.executable, "-m", "jupytext", "-q", "--update", "--to", "ipynb", str(source)], check=True)
    return True


def sources(root: Path = ROOT) -> list[Path]:
    notebooks = sorted(p for p in (root / "notebooks").rglob("*.md") if ".ipynb_checkpoints" not in p.parts)
    return notebooks  # the template (notebooks/_template.md) included: new notebooks start right


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="report stale install cells instead of rewriting them")
    args = parser.parse_args(argv)
    commit = library_commit()
    stale = []
    for source in sources():
        notebook = jupytext.read(source)
        if _install_cell(notebook).source != expected_cell(notebook, commit):
            stale.append(source)
            if not args.check:
                rewrite(source, commit)
    verb = "stale" if args.check else "rewritten"
    for source in stale:
        print(f"{verb}: {source.relative_to(ROOT)}")
    print(f"library commit {commit[:12]}; {len(stale)} install cell(s) {verb}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
