"""The notebooks as a reader and as CI see them: pairs in sync, install and parameters cells, the toc.

These check structure only (fast); executing the notebooks is `make book`'s job.
"""

from __future__ import annotations

import ast
import json
import re
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


TORCH_PACKAGES = re.compile(r"^\s*(torch|torchvision|torchaudio)\b")


def install_cell_problems(notebook) -> list[str]:
    """What is wrong with a notebook's Colab install cell (an empty list when nothing is).

    The first code cell must be tagged ``remove-cell`` and ``install``, install flagcore from the repository
    only when it is missing, and install nothing else: not torch (Colab's CUDA build must be kept) and not
    requirements.txt (it pins the CPU build of torch used by CI).
    """
    code = [c for c in notebook.cells if c.cell_type == "code"]
    if not code:
        return ["no code cell"]
    first = code[0]
    problems = []
    tags = first.metadata.get("tags", [])
    if not ("install" in tags and "remove-cell" in tags):
        problems.append("the first code cell must be the hidden install cell (tags remove-cell, install)")
    if "import flagcore" not in first.source or "except ImportError" not in first.source:
        problems.append("install only when flagcore is missing (try: import flagcore / except ImportError)")
    if REPO_URL not in first.source:
        problems.append(f"the install cell must install from {REPO_URL} (_config.yml)")
    if "requirements" in first.source:
        problems.append("the install cell must not install requirements.txt (it pins the CPU build of torch)")
    try:
        strings = [n.value for n in ast.walk(ast.parse(first.source)) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    except SyntaxError as exc:
        return problems + [f"the install cell does not parse: {exc}"]
    packages = [text for text in strings if text.strip() and not text.startswith("-") and text not in ("pip", "install")]
    if any(TORCH_PACKAGES.match(text) for text in packages) or re.search(r"pip[^\n]*\btorch\b", first.source):
        problems.append("the install cell must not install torch (Colab's CUDA build is kept)")
    if not any(text.startswith("flagcore") for text in packages):
        problems.append("the install cell must pip-install flagcore")
    others = [text for text in packages if not text.startswith("flagcore")]
    if others:
        problems.append(f"the install cell installs more than flagcore: {others}")
    return problems


@pytest.mark.parametrize("source", [*NOTEBOOKS, TEMPLATE], ids=_ids([*NOTEBOOKS, TEMPLATE]))
def test_install_cell_is_first_and_keeps_torch(source):
    assert install_cell_problems(jupytext.read(source)) == []


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda s: s.replace('"-q", "flagcore', '"-q", "torch", "flagcore', 1), "must not install torch"),
        (lambda s: s.replace('"-q", "flagcore', '"-q", "-r", "requirements.txt", "flagcore', 1), "requirements.txt"),
        (lambda s: s.replace("tags: [remove-cell, install]", "tags: [install]", 1), "hidden install cell"),
        (lambda s: s.replace("except ImportError", "except Exception", 1), "only when flagcore is missing"),
        (lambda s: s.replace('"-q", "flagcore', '"-q", "numpy<2", "flagcore', 1), "more than flagcore"),
    ],
)
def test_install_cell_check_catches_bad_cells(edit, problem):
    """Negative controls: each doctored copy of the template's install cell is rejected, for its reason."""
    text = TEMPLATE.read_text()
    edited = edit(text)
    assert edited != text, "the edit did not apply: update this negative control"
    problems = install_cell_problems(jupytext.reads(edited, fmt="md:myst"))
    assert any(problem in p for p in problems), problems


def parameters_problems(notebook, require_scale: bool = True) -> list[str]:
    """What is wrong with a notebook's papermill parameters (an empty list when nothing is).

    One cell tagged ``parameters`` with plain literal assignments, among them ``fast = True`` (CI scale, the
    paper-scale value in its comment), ``device = "auto"``, an integer ``seed`` and ``dtype`` float64/float32;
    the paper scale is one edit away: a later ``if not fast:`` branch scales the same code, or every knob
    documents its paper-scale value in a comment (not required of the template, which has no knobs); the device parameter is resolved by
    ``flagcore.resolve_device(device)`` (CUDA when visible).
    """
    cells = _tagged(notebook, "parameters")
    if len(cells) != 1:
        return ["exactly one cell tagged `parameters` (papermill injects after it)"]
    cell = cells[0]
    problems, assigned = [], {}
    for node in ast.parse(cell.source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            problems.append("the parameters cell holds plain assignments only")
            continue
        try:
            assigned[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            problems.append(f"parameter {node.targets[0].id} is not a plain literal")
    missing = REQUIRED_PARAMETERS - set(assigned)
    if missing:
        problems.append(f"parameters missing: {sorted(missing)}")
    if assigned.get("fast", True) is not True:
        problems.append("the default must be the CI scale (fast = True)")
    if assigned.get("device", "auto") != "auto":
        problems.append('device must default to "auto" (the GPU when present)')
    if "seed" in assigned and (not isinstance(assigned["seed"], int) or isinstance(assigned["seed"], bool)):
        problems.append("seed must be an integer literal")
    if assigned.get("dtype", "float64") not in {"float64", "float32"}:
        problems.append("dtype must be float64 or float32")
    lines = {line.split("=")[0].strip(): line for line in cell.source.splitlines() if "=" in line and not line.startswith("#")}
    if "fast" in lines and "paper scale" not in lines["fast"]:
        problems.append("document the paper-scale value next to `fast`")
    later = "\n".join(c.source for c in notebook.cells[notebook.cells.index(cell) + 1 :] if c.cell_type == "code")
    branch = re.search(r"^\s*if not fast\s*:", later, re.M) is not None
    knobs = [name for name in assigned if name not in REQUIRED_PARAMETERS]
    documented = all("paper scale" in lines.get(name, "") for name in knobs)
    if require_scale and not (branch or (knobs and documented)):
        problems.append("the paper scale must be one edit away: an `if not fast:` branch after the parameters cell, or paper-scale values in comments")
    if "resolve_device(device)" not in later:
        problems.append("resolve the device parameter with flagcore.resolve_device(device) (picks the GPU when present)")
    return problems


@pytest.mark.parametrize("source", [*NOTEBOOKS, TEMPLATE], ids=_ids([*NOTEBOOKS, TEMPLATE]))
def test_parameters_cell(source):
    """One cell tagged `parameters`, with the CI-scale defaults and the paper-scale values one edit away."""
    assert parameters_problems(jupytext.read(source), require_scale=source != TEMPLATE) == []


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda s: s.replace("fast = True  #", "fast = False  #", 1), "CI scale"),
        (lambda s: s.replace('device = "auto"', 'device = "cpu"', 1), "device must default"),
        (lambda s: s.replace("seed = 0", "seed = 0.5", 1), "seed must be an integer"),
        (lambda s: s.replace("seed = 0", "seed = int('0')", 1), "not a plain literal"),
        (lambda s: s.replace(":tags: [parameters]", ":tags: []", 1), "exactly one cell tagged"),
        (lambda s: s.replace("DEVICE = resolve_device(device)", "DEVICE = torch.device(device)", 1), "resolve_device"),
        (lambda s: s.replace("; paper scale: fast = False", "", 1), "next to `fast`"),
    ],
)
def test_parameters_check_catches_bad_cells(edit, problem):
    """Negative controls on doctored copies of the template."""
    text = TEMPLATE.read_text()
    edited = edit(text)
    assert edited != text, "the edit did not apply: update this negative control"
    problems = parameters_problems(jupytext.reads(edited, fmt="md:myst"))
    assert any(problem in p for p in problems), problems


def test_paper_scale_check_needs_a_branch_or_documented_knobs():
    """Negative control for the one-edit-away rule: a knob with no paper-scale value and no `if not fast:` fails."""
    text = NOTEBOOKS[0].read_text()
    stripped = re.sub(r"^(\s*)if not fast\s*:", r"\1if False:", text, flags=re.M)
    notebook = jupytext.reads(stripped, fmt="md:myst")
    cell = _tagged(notebook, "parameters")[0]
    cell.source += "\nextra_knob = 3"
    assert any("one edit away" in p for p in parameters_problems(notebook))


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
