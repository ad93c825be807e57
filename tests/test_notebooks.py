"""The notebooks as a reader and as CI see them: pairs in sync, install and parameters cells, the toc.

These check structure only (fast); executing the notebooks is `make book`'s job.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import build_book  # noqa: E402

NOTEBOOKS = build_book.all_notebook_sources(ROOT)
TEMPLATE = ROOT / "notebooks" / "_template.md"
REPO_URL = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
REQUIRED_PARAMETERS = {"fast", "device", "seed", "dtype"}


def _ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


def _cells(notebook):
    return [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", []))) for c in notebook.cells]


def _tagged(notebook, tag):
    return [c for c in notebook.cells if c.cell_type == "code" and tag in c.metadata.get("tags", [])]


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("source", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_pair_exists_and_is_in_sync(source):
    """The .md is the source of truth; its .ipynb twin (for Colab/Binder) must hold the same cells."""
    twin = source.with_suffix(".ipynb")
    assert twin.exists(), f"missing {twin.name}: run `jupytext --set-formats ipynb,md:myst {source}`"
    md, ipynb = jupytext.read(source), nbformat.read(twin, as_version=4)
    assert _cells(md) == _cells(ipynb), f"{twin.name} is out of sync with {source.name}: run `jupytext --sync {source}`"
    assert md.metadata.get("jupytext", {}).get("formats") == "ipynb,md:myst", "the pair must be declared in the .md header"


@pytest.mark.parametrize("source", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_paired_ipynb_is_output_free(source):
    raw = json.loads(source.with_suffix(".ipynb").read_text())
    for cell in raw["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, "commit the .ipynb without outputs"


@pytest.mark.parametrize("source", [*NOTEBOOKS, TEMPLATE], ids=_ids([*NOTEBOOKS, TEMPLATE]))
def test_install_cell_is_first_and_keeps_torch(source):
    notebook = jupytext.read(source)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    first = code[0]
    tags = first.metadata.get("tags", [])
    assert "install" in tags and "remove-cell" in tags, "the first code cell must be the hidden install cell"
    assert "import flagcore" in first.source and "except ImportError" in first.source, "install only when flagcore is missing"
    assert REPO_URL in first.source, f"the install cell must install from {REPO_URL} (_config.yml)"
    pip_line = next(line for line in first.source.splitlines() if "pip" in line)
    assert "torch" not in pip_line, "the install cell must not install torch (Colab's CUDA build is kept)"


@pytest.mark.parametrize("source", [*NOTEBOOKS, TEMPLATE], ids=_ids([*NOTEBOOKS, TEMPLATE]))
def test_parameters_cell(source):
    """One cell tagged `parameters`, with the CI-scale defaults and the paper-scale values beside them."""
    notebook = jupytext.read(source)
    cells = _tagged(notebook, "parameters")
    assert len(cells) == 1, "exactly one cell tagged `parameters` (papermill injects after it)"
    cell = cells[0]
    assigned = {}
    for node in ast.parse(cell.source).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, "the parameters cell holds plain assignments only"
        assigned[node.targets[0].id] = ast.literal_eval(node.value)
    missing = REQUIRED_PARAMETERS - set(assigned)
    assert not missing, f"parameters missing: {sorted(missing)}"
    assert assigned["fast"] is True, "the default must be the CI scale (fast = True)"
    assert assigned["device"] == "auto"
    assert assigned["dtype"] in {"float64", "float32"}
    for line in cell.source.splitlines():
        if line.startswith("fast"):
            assert "paper scale" in line, "document the paper-scale value next to `fast`"


@pytest.mark.parametrize("source", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_states_and_checks_a_result(source):
    """Each notebook has a labelled statement box, asserts its check, and closes on its scope."""
    notebook = jupytext.read(source)
    markdown = "\n".join(c.source for c in notebook.cells if c.cell_type == "markdown")
    code = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
    assert "{prf:" in markdown and ":label:" in markdown, "state the result in a labelled sphinx-proof box"
    assert "\nassert " in "\n" + code or "\n    assert " in code, "a notebook's checks must assert"
    assert "## What this shows, and what it does not" in markdown


def test_every_notebook_is_in_the_toc_and_every_toc_file_exists():
    listed = build_book.toc_notebooks(ROOT)
    assert set(NOTEBOOKS) <= set(listed), "notebooks missing from _toc.yml"
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [ch["file"] for part in toc["parts"] for ch in part["chapters"]]
    for name in files:
        assert (ROOT / f"{name}.md").exists(), f"_toc.yml lists {name} but {name}.md does not exist"


def test_toc_parser_finds_nested_files(tmp_path):
    (tmp_path / "_toc.yml").write_text(
        "format: jb-book\nroot: book/intro\nparts:\n  - caption: A\n    chapters:\n"
        "      - file: notebooks/a/x\n        sections:\n          - file: notebooks/a/y\n      - file: book/z\n"
    )
    assert build_book.toc_notebooks(tmp_path) == [tmp_path / "notebooks/a/x.md", tmp_path / "notebooks/a/y.md"]


def test_sync_check_detects_an_edited_source(tmp_path):
    """Negative control: the comparison used above does see a one-character edit."""
    source = NOTEBOOKS[0]
    md = jupytext.read(source)
    edited = jupytext.reads(source.read_text().replace("## Parameters", "## Parameter", 1), fmt="md:myst")
    assert _cells(md) != _cells(edited)
