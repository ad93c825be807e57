"""The notebooks as a reader and as CI see them: pairs in sync, install and parameters cells, the toc.

These check structure only (fast); executing the notebooks is `make book`'s job.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
import yaml
from papermill.translators import PythonTranslator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import build_book  # noqa: E402
import install_cell  # noqa: E402

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
    """The .md is the source of truth; its .ipynb twin (for Colab) must hold the same cells."""
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
    packages = [text for text in strings if text.strip() and not text.startswith("-") and text not in ("pip", "install")
                and not re.fullmatch(r"[0-9a-f]{40}", text)]  # the pinned library commit
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


@pytest.mark.parametrize("source", [*NOTEBOOKS, TEMPLATE], ids=_ids([*NOTEBOOKS, TEMPLATE]))
def test_install_cell_is_the_generated_one_with_the_right_extras(source):
    """Every install cell is tools/install_cell.py's text: the extras its code needs, the pinned commit."""
    notebook = jupytext.read(source)
    commit = install_cell.pinned_commit(notebook)
    assert commit is not None, "no LIBRARY_COMMIT in the install cell: run `python tools/install_cell.py`"
    first_code = next(c for c in notebook.cells if c.cell_type == "code")
    assert first_code.source == install_cell.expected_cell(notebook, commit), (
        "the install cell differs from the generated one: run `python tools/install_cell.py`"
    )


def test_install_cells_pin_the_library_of_this_commit():
    """All notebooks pin one commit, and the library there is the library here (so a notebook opened in
    Colab installs the code the book was built with). Fails after a library change until the pin is
    renewed: commit the change, then run `python tools/install_cell.py` and commit that."""
    if subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True,
                      text=True).stdout.strip() != "false":
        pytest.skip("a shallow clone or no git history: the pinned commit cannot be looked up")
    pins = {install_cell.pinned_commit(jupytext.read(source)) for source in [*NOTEBOOKS, TEMPLATE]}
    assert len(pins) == 1, f"the notebooks pin different commits: {sorted(map(str, pins))}"
    (pin,) = pins
    assert subprocess.run(["git", "cat-file", "-e", f"{pin}^{{commit}}"], cwd=ROOT).returncode == 0, f"{pin} is no commit here"
    assert install_cell.library_unchanged_since(pin), (
        f"the library changed since the pinned commit {pin[:12]}: commit, then run `python tools/install_cell.py`"
    )


#: A notebook that sets these itself overrides the reader's own choice (in Colab: the Hub download); CI sets them.
ENV_WRITE = re.compile(r"os\.environ(\[[^]]+\]\s*=|\.setdefault|\.update)|os\.putenv|set_num_threads")


def environment_writes(notebook) -> list[str]:
    """Lines of ``notebook``'s code that change the process environment or torch's thread count."""
    return [line.strip() for c in notebook.cells if c.cell_type == "code" for line in c.source.splitlines()
            if ENV_WRITE.search(line)]


@pytest.mark.parametrize("source", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebooks_leave_the_environment_alone(source):
    """No notebook sets HF_HUB_OFFLINE & co. or the thread count: the reader's setting (Colab's network,
    its two cores) is the one that counts, and CI sets what it needs from outside."""
    assert environment_writes(jupytext.read(source)) == []


def test_environment_writes_are_caught():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('os.environ.setdefault("HF_HUB_OFFLINE", "1")'),
                                         nbformat.v4.new_code_cell('os.environ["X"] = "1"\ntorch.set_num_threads(1)')])
    assert len(environment_writes(nb)) == 3


def test_extras_follow_the_code():
    """Negative control of extras_for: a notebook that imports transformers needs [hf]; prose does not count."""
    base = jupytext.read(TEMPLATE)
    assert install_cell.extras_for(base) == []
    base.cells.append(nbformat.v4.new_markdown_cell("we load transformers here"))
    assert install_cell.extras_for(base) == []
    base.cells.append(nbformat.v4.new_code_cell("from transformers import AutoModel"))
    assert install_cell.extras_for(base) == ["hf"]


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda s: s.replace('"-q",', '"-q", "torch",', 1), "must not install torch"),
        (lambda s: s.replace('"-q",', '"-q", "-r", "requirements.txt",', 1), "requirements.txt"),
        (lambda s: s.replace("tags: [remove-cell, install]", "tags: [install]", 1), "hidden install cell"),
        (lambda s: s.replace("except ImportError", "except Exception", 1), "only when flagcore is missing"),
        (lambda s: s.replace('"-q",', '"-q", "numpy<2",', 1), "more than flagcore"),
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
    # What papermill itself reads (``papermill --help-notebook``, the names it accepts with -p): its parser
    # skips a line whose comment holds a second "=", so every assigned name must come back, with help text
    # that gives the paper-scale value (issue 15).
    inferred = {p.name: p.help for p in PythonTranslator.inspect(cell)}
    unread = sorted(set(assigned) - set(inferred))
    if unread:
        problems.append(f"papermill cannot read parameters {unread} (a second '=' in the comment?)")
    if require_scale:
        undocumented = sorted(name for name, text in inferred.items() if "paper scale:" not in text)
        if undocumented:
            problems.append(f"papermill's help gives no paper-scale value for {undocumented}")
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
        (lambda s: s.replace("; paper scale: False", "", 1), "next to `fast`"),
        (lambda s: s.replace("seed = 0", "seed = 0  # x = 1", 1), "papermill cannot read"),
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
    problems = parameters_problems(notebook)
    assert any("one edit away" in p for p in problems)
    assert any("no paper-scale value for ['extra_knob']" in p for p in problems), problems


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


# === The sources as a reader will meet them (issue 12) ====================================================
# The book's sources as a reader will meet them (issue 12): the rules the page check enforces on the built
# HTML, caught earlier and with a line number on the sources. Each rule has a negative control below.
#
# - display math ``$$`` on lines of its own, with a blank line before and after;
# - no reference to material outside the book (our internal notes);
# - a referenced ``prf:`` box is numbered (or every reference to it gives its own text);
# - figure cells: hidden input, a numbered caption (``mystnb.figure`` caption and name), at most
#   ``MAX_FIG_WIDTH_IN`` wide, at most two panels per row unless they share an axis, no text below the style's
#   minimum;
# - results and plotting cells hide their input; code lines at most ``MAX_CODE_LINE`` characters.

from flagcore.plotting import MIN_FONT_PT  # noqa: E402

PAGES = sorted((ROOT / "book").rglob("*.md"))
MAX_CODE_LINE = 90
MAX_FIG_WIDTH_IN = 6.5  # the text column is about 665 px (6.9 in) at 1280 px; the page check measures the rest
UNPUBLISHED = re.compile(
    r"\bspec\b|checks_\w+\.py|seed copy|\bextraction\b|lightning\.md|flag_and_collapse|offline\.md|shared/(spec|papers)"
    r"|\bour (working )?notes\b",
    re.IGNORECASE,
)
FENCE = re.compile(r"^\s*(`{3,}|:{3,})")


# --- the rules, as functions of text, so that each can be tested on a doctored example -----------------


def display_math_problems(text: str) -> list[str]:
    """``$$`` blocks that are not on lines of their own between blank lines (they render as garbage)."""
    lines = text.splitlines()
    problems, inside, in_code = [], False, False
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("```{code-cell}") or (in_code and stripped.startswith("```")):
            in_code = not in_code if stripped.startswith("```{code-cell}") or stripped == "```" else in_code
            continue
        if in_code or "$$" not in line:
            continue
        count = line.count("$$")
        if not (stripped.startswith("$$") and (count == 1 or stripped.endswith("$$")) or inside and stripped.endswith("$$")):
            problems.append(f"line {i + 1}: $$ inside a line of text: {stripped[:60]}")
            continue
        opens = not inside
        closes = count == 2 or inside
        before, after = (lines[i - 1].strip() if i else ""), (lines[i + 1].strip() if i + 1 < len(lines) else "")
        if opens and before and not FENCE.match(before) and not before.startswith(":"):
            problems.append(f"line {i + 1}: no blank line before the $$ block")
        if closes and after and not FENCE.match(after):
            problems.append(f"line {i + 1}: no blank line after the $$ block")
        inside = not closes
    return problems


def unpublished_references(text: str) -> list[str]:
    return [f"line {text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}" for m in UNPUBLISHED.finditer(text)]


def _numbered_boxes(texts: dict[str, str]) -> tuple[set[str], set[str]]:
    """Labels of prf boxes with and without numbers."""
    numbered, unnumbered = set(), set()
    for text in texts.values():
        for match in re.finditer(r"```\{prf:\w+\}[^\n]*\n((?::[^\n]*\n)+)", text):
            options = match.group(1)
            label = re.search(r":label:\s*(\S+)", options)
            if label:
                (unnumbered if ":nonumber:" in options else numbered).add(label.group(1))
    return numbered, unnumbered


def numberless_references(texts: dict[str, str]) -> list[str]:
    """``{prf:ref}`label``` (no text of its own) pointing at an un-numbered box: it renders "(Corollary )"."""
    _, unnumbered = _numbered_boxes(texts)
    problems = []
    for name, text in texts.items():
        for match in re.finditer(r"\{prf:ref\}`([^`<]+)`", text):
            if match.group(1).strip() in unnumbered:
                problems.append(f"{name}: {match.group(0)} points at a :nonumber: box")
    return problems


def _call_problems(source: str) -> list[str]:
    """Figure widths, panels per row and font sizes in a code cell (literal arguments only)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        kwargs = {k.arg: k.value for k in node.keywords if k.arg}
        for key in ("fontsize", "labelsize", "size"):
            value = kwargs.get(key)
            if isinstance(value, ast.Constant) and isinstance(value.value, (int, float)) and value.value < MIN_FONT_PT:
                problems.append(f"{name}({key}={value.value}): text below {MIN_FONT_PT} pt")
            if isinstance(value, ast.Constant) and value.value in ("xx-small", "x-small", "small", "smaller"):
                problems.append(f"{name}({key}={value.value!r}): text below the style's sizes")
        figsize = kwargs.get("figsize")
        if isinstance(figsize, ast.Tuple) and isinstance(figsize.elts[0], ast.Constant):
            if float(figsize.elts[0].value) > MAX_FIG_WIDTH_IN:
                problems.append(f"{name}(figsize={ast.unparse(figsize)}): wider than {MAX_FIG_WIDTH_IN} in")
        if name == "subplots":
            args = list(node.args) + [None, None]
            ncols = kwargs.get("ncols", args[1])
            shared = any(k in kwargs for k in ("sharex", "sharey"))
            if isinstance(ncols, ast.Constant) and isinstance(ncols.value, int) and ncols.value > 2 and not shared:
                problems.append(f"subplots with {ncols.value} panels per row that share no axis")
    return problems


def cell_problems(cell) -> list[str]:
    """A notebook code cell's presentation problems."""
    if cell.cell_type != "code":
        return []
    source, meta = cell.source, cell.metadata
    tags = meta.get("tags", [])
    problems = [f"code line of {len(line)} characters (> {MAX_CODE_LINE})" for line in source.splitlines() if len(line) > MAX_CODE_LINE]
    hidden = "hide-input" in tags or "remove-input" in tags or "remove-cell" in tags
    shows_figure = "plt.show()" in source or re.search(r"^(fig|figure)\s*$", source.strip().splitlines()[-1] if source.strip() else "")
    if shows_figure:
        figure = (meta.get("mystnb") or {}).get("figure") or {}
        if not (str(figure.get("caption", "")).strip() and str(figure.get("name", "")).strip()):
            problems.append("a figure cell without mystnb.figure caption and name")
        if source.count("plt.show()") > 1:
            problems.append("more than one figure in a cell (each needs its own caption)")
    if (shows_figure or "report.results(" in source) and not hidden:
        problems.append("a figure or results cell whose input is not hidden")
    return problems + _call_problems(source)


# --- the sources ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", NOTEBOOKS + PAGES, ids=_ids(NOTEBOOKS + PAGES))
def test_display_math_stands_alone(path):
    assert display_math_problems(path.read_text()) == []


@pytest.mark.parametrize("path", NOTEBOOKS + PAGES, ids=_ids(NOTEBOOKS + PAGES))
def test_no_reference_to_unpublished_material(path):
    assert unpublished_references(path.read_text()) == []


def test_every_reference_shows_a_number_or_a_title():
    texts = {str(p.relative_to(ROOT)): p.read_text() for p in NOTEBOOKS + PAGES}
    assert numberless_references(texts) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_figure_and_results_cells_are_presentable(path):
    notebook = jupytext.read(path)
    problems = [f"cell {i}: {p}" for i, cell in enumerate(notebook.cells) for p in cell_problems(cell)]
    assert problems == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_each_notebook_links_its_provenance_in_the_appendix(path):
    """What a notebook took from outside the paper's text is stated in the appendix, and the page says where."""
    text = path.read_text()
    labels = re.findall(r"\{ref\}`(?:[^`<]*<)?(prov-[\w-]+)>?`", text)
    docs = re.findall(r"\{doc\}`(?:[^`<]*<)?(/?book/appendix/[\w-]+|[./]*appendix/[\w-]+)>?`", text)
    assert labels or docs, "no link to the appendix 'Formulas and provenance'"
    defined = set()
    for page in (ROOT / "book" / "appendix").glob("*.md"):
        defined |= set(re.findall(r"^\((prov-[\w-]+)\)=$", page.read_text(), flags=re.MULTILINE))
    assert set(labels) <= defined, sorted(set(labels) - defined)


def test_figure_names_are_unique():
    names = []
    for path in NOTEBOOKS:
        for cell in jupytext.read(path).cells:
            figure = (cell.metadata.get("mystnb") or {}).get("figure") or {}
            if figure.get("name"):
                names.append(figure["name"])
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


# --- negative controls: each rule catches its defect ---------------------------------------------------


def test_display_math_rule_catches_a_glued_block():
    assert display_math_problems("Text\n\n$$x$$\n\nmore") == []
    assert display_math_problems("```{prf:theorem}\n:label: t\n\n$$\nx\n$$\n```") == []
    assert display_math_problems("Then\n$$x=1$$\nmore") == ["line 2: no blank line before the $$ block", "line 2: no blank line after the $$ block"]
    assert display_math_problems("Then\n\n$$\nx\n$$\nmore")[0].startswith("line 5: no blank line after")
    assert "inside a line" in display_math_problems("we have $$x$$ here")[0]
    assert display_math_problems("```{code-cell} ipython3\ns = '$$'\n```") == []


def test_unpublished_rule():
    assert unpublished_references("see spec A.15 and checks_flag.py") == ["line 1: 'spec'", "line 1: 'checks_flag.py'"]
    assert unpublished_references("the spectral gap; a specific case; inspect") == []
    assert unpublished_references("lost in extraction") and unpublished_references("the seed copy")


def test_numberless_reference_rule():
    boxes = "```{prf:corollary} C\n:label: cor-a\n:nonumber:\n\nx\n```\n```{prf:theorem} T\n:label: thm-b\n\ny\n```\n"
    assert numberless_references({"a": boxes + "{prf:ref}`thm-b`"}) == []
    assert numberless_references({"a": boxes + "{prf:ref}`the corollary <cor-a>`"}) == []
    assert numberless_references({"a": boxes, "b": "as in {prf:ref}`cor-a`"}) == ["b: {prf:ref}`cor-a` points at a :nonumber: box"]


def test_cell_rule_catches_each_defect():
    from nbformat.v4 import new_code_cell

    good = new_code_cell("fig, ax = plt.subplots(1, 2, figsize=(6.5, 3))\nax[0].plot(x)\nplt.show()")
    good.metadata = {"tags": ["hide-input"], "mystnb": {"figure": {"caption": "What it shows.", "name": "fig-a"}}}
    assert cell_problems(good) == []
    bare = new_code_cell(good.source)
    assert {"a figure cell without mystnb.figure caption and name", "a figure or results cell whose input is not hidden"} <= set(cell_problems(bare))
    for source, expected in [
        ("fig, ax = plt.subplots(1, 4, figsize=(7, 3))\nplt.show()", "4 panels per row"),
        ("fig, ax = plt.subplots(1, 2, figsize=(12, 3))\nplt.show()", "wider than"),
        ("ax.tick_params(labelsize=6)\nplt.show()", "below"),
        ("ax.set_title('t', fontsize='small')\nplt.show()", "below"),
        ("x = 1  # " + "y" * 100, "characters"),
        ("plt.show()\nplt.show()", "more than one figure"),
    ]:
        cell = new_code_cell(source)
        cell.metadata = good.metadata
        assert any(expected in p for p in cell_problems(cell)), (source, cell_problems(cell))
    shared = new_code_cell("fig, ax = plt.subplots(1, 4, sharey=True)\nplt.show()")
    shared.metadata = good.metadata
    assert cell_problems(shared) == []
    results = new_code_cell("report.results(*rows)")
    assert cell_problems(results) == ["a figure or results cell whose input is not hidden"]
