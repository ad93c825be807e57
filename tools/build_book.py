"""Execute every notebook with papermill and build the HTML book from the executed copies.

    python tools/build_book.py [--jobs 2] [-p NAME VALUE ...] [--only PATTERN] [--no-build]

Steps (all under _build/, nothing in the working tree is modified):

1. **stage**: copy the book's sources (_config.yml, _toc.yml, book/, and MathJax as an extra path) to
   _build/src and convert each
   notebook's MyST source ``notebooks/**/X.md`` (the source of truth) to ``_build/src/notebooks/**/X.ipynb``.
   Only the ``.ipynb`` half of each pair is staged, so Sphinx reads exactly one, the executed one.
2. **execute**: run each staged notebook in place with papermill (cwd = its folder, default
   parameters = the CI scale, ``-p`` overrides for every notebook), ``--jobs`` at a time, each kernel
   limited to ``2 // jobs`` torch threads so that parallel notebooks do not oversubscribe the cores.
   Per-notebook wall time is printed and written to _build/execution-report.json and to the book's
   execution-status page. Any failing notebook fails the run, with its error printed.
3. **results**: collect every notebook's results cell (``flagcore.report.results``) into the book's
   results dashboard, _build/src/book/results.md and _build/results.json (tools/results.py). An executed
   notebook that reports nothing fails the run.
4. **build**: ``jupyter-book build . -W -n --keep-going`` inside _build/src, HTML to _build/html.

The Colab launch button of each page points at the repository's output-free ``.ipynb``
twin, because the staged tree mirrors the repository's layout.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import fnmatch
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jupytext
import nbformat
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import performance_page  # noqa: E402  (tools/performance_page.py)
import results as results_dashboard  # noqa: E402  (tools/results.py)
from toc import toc_files  # noqa: E402  (tools/toc.py)

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "_build"
STAGE = BUILD / "src"
TABLE_MARKER = "<!-- execution-table -->"
# MathJax is served from the book itself (npm package, installed by `make book`), so equations
# render with no network: staged as an extra path (html/mathjax/), see mathjax_path in _config.yml.
MATHJAX = BUILD / "npm" / "node_modules" / "mathjax" / "es5"


def toc_notebooks(root: Path = ROOT) -> list[Path]:
    """Notebook sources (``.md``) listed in _toc.yml, in book order."""
    return [root / f"{f}.md" for f in toc_files(root / "_toc.yml") if f.startswith("notebooks/")]


def all_notebook_sources(root: Path = ROOT) -> list[Path]:
    """Every notebook source under notebooks/ (files starting with ``_`` are templates)."""
    return sorted(p for p in (root / "notebooks").rglob("*.md") if not p.name.startswith("_") and ".ipynb_checkpoints" not in p.parts)


def stage() -> list[Path]:
    if STAGE.exists():
        shutil.rmtree(STAGE)
    STAGE.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(ROOT / name, STAGE / name)
    shutil.copytree(ROOT / "book", STAGE / "book", ignore=shutil.ignore_patterns(".*", "_build"))
    if not (MATHJAX / "tex-mml-chtml.js").exists():
        raise SystemExit(f"MathJax not found at {MATHJAX.relative_to(ROOT)}: `make book` installs it (npm install mathjax@3)")
    # Not under _static: Jupyter Book would add every .js file there to every page.
    shutil.copytree(MATHJAX, STAGE / "_mathjax" / "mathjax")
    staged = []
    for source in toc_notebooks():
        if not source.exists():
            raise SystemExit(f"_toc.yml lists {source.relative_to(ROOT)} but the file does not exist")
        target = STAGE / source.relative_to(ROOT).with_suffix(".ipynb")
        target.parent.mkdir(parents=True, exist_ok=True)
        notebook = jupytext.read(source)
        notebook.metadata.get("jupytext", {}).pop("formats", None)  # the staged copy is not paired
        nbformat.write(notebook, target)
        # Files a notebook reads next to itself (data, images) travel with it.
        for sibling in source.parent.iterdir():
            if sibling.is_file() and sibling.suffix not in (".md", ".ipynb") and not sibling.name.startswith("."):
                shutil.copy2(sibling, target.parent / sibling.name)
        staged.append(target)
    return staged


def _kernel_env(jobs: int) -> dict[str, str]:
    env = dict(os.environ)
    threads = str(max(1, (os.cpu_count() or 2) // jobs))
    env.update(
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"),
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error",
        PYDEVD_DISABLE_FILE_VALIDATION="1",
    )
    return env


def error_output(notebook_path: Path) -> tuple[int, object, dict] | None:
    """(cell index, cell, output) of the first error output of an executed notebook, or None.
    Raises whatever nbformat raises when the file is unreadable (e.g. the kernel died mid-write)."""
    nb = nbformat.read(notebook_path, as_version=4)
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return index, cell, output
    return None


def _first_error(notebook_path: Path) -> str:
    try:
        found = error_output(notebook_path)
    except Exception as exc:  # the output may be unreadable if the kernel died
        return f"(could not read the executed notebook: {exc})"
    if found is None:
        return "(no error cell found; see the log above)"
    index, cell, output = found
    source = "\n".join("    " + line for line in cell.source.splitlines()[-8:])
    trace = "\n".join(output.get("traceback", [])[-6:])
    return f"cell {index} ending with:\n{source}\n{output['ename']}: {output['evalue']}\n{trace}"


#: A kernel that never started (jupyter_client picks free ports, then the kernel binds them: two kernels
#: started at once can race for the same port) is retried; a notebook that ran and failed never is.
KERNEL_START_FAILURES = ("Address already in use", "Kernel didn't respond", "Kernel died before replying to kernel_info")
KERNEL_START_TRIES = 3


def execute_one(path: Path, parameters: dict[str, object], jobs: int) -> dict[str, object]:
    log = path.with_suffix(".log")
    cmd = [sys.executable, "-m", "papermill", str(path), str(path), "-k", "python3", "--cwd", str(path.parent), "--no-progress-bar"]
    for name, value in parameters.items():
        cmd += ["-p", name, str(value)]
    start = time.perf_counter()
    source = path.read_bytes()
    for attempt in range(1, KERNEL_START_TRIES + 1):
        with log.open("w") as handle:
            result = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=_kernel_env(jobs), check=False)
        text = log.read_text(errors="replace")
        started = "Executing notebook with kernel" in text and not any(m in text for m in KERNEL_START_FAILURES)
        if result.returncode == 0 or started or attempt == KERNEL_START_TRIES:
            break
        print(f"  retry   {path.relative_to(STAGE).with_suffix('')}: its kernel did not start (attempt {attempt})", flush=True)
        path.write_bytes(source)  # papermill may have written a partial output over the input
    seconds = time.perf_counter() - start
    record: dict[str, object] = {
        "notebook": str(path.relative_to(STAGE).with_suffix("")),
        "seconds": round(seconds, 1),
        "status": "ok" if result.returncode == 0 else "failed",
        "parameters": parameters,
    }
    if result.returncode != 0:
        record["error"] = _first_error(path) + "\n--- papermill log (tail) ---\n" + "\n".join(log.read_text().splitlines()[-15:])
    return record


def execute(notebooks: list[Path], parameters: dict[str, object], jobs: int) -> list[dict[str, object]]:
    print(f"executing {len(notebooks)} notebooks with papermill, {jobs} at a time", flush=True)
    start = time.perf_counter()
    records = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(execute_one, nb, parameters, jobs): nb for nb in notebooks}
        for future in concurrent.futures.as_completed(futures):
            record = future.result()
            records.append(record)
            print(f"  {record['status']:>6}  {record['seconds']:7.1f} s  {record['notebook']}", flush=True)
    order = {str(nb.relative_to(STAGE).with_suffix("")): i for i, nb in enumerate(notebooks)}
    records.sort(key=lambda r: order[r["notebook"]])
    total = time.perf_counter() - start
    print(f"notebooks: {sum(r['status'] == 'ok' for r in records)}/{len(records)} ok, wall {total:.1f} s", flush=True)
    write_report(records, f"{jobs} notebooks at a time", total)
    return records


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_report(records: list[dict[str, object]], how: str, wall_seconds: float, where: str | None = None) -> None:
    """The execution report (_build/execution-report.json) and the book's execution-status page."""
    report = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": where or machine(),
        "how": how,
        "wall_seconds": round(wall_seconds, 1),
        "notebooks": records,
    }
    (BUILD / "execution-report.json").write_text(json.dumps(report, indent=2))
    write_status_page(report)


#: When each notebook last passed at paper scale (``fast = False``): written by ``make paper-scale``
#: (tools/ray_runner.py book --record), committed, shown on the execution-status page.
PAPER_SCALE_RECORD = ROOT / "book" / "paper-scale-runs.json"


def paper_scale_runs(path: Path = PAPER_SCALE_RECORD) -> dict[str, dict]:
    return json.loads(path.read_text()) if path.exists() else {}


def paper_scale_lines(runs: dict[str, dict], notebooks: list[str]) -> list[str]:
    """The execution page's paper-scale table: one line per notebook, its last pass or why there is none."""
    lines = [
        "",
        "## Last pass at paper scale",
        "",
        "Each notebook's `fast = False` run: when it last passed (all its assertions held), on what, "
        "and the command that reproduces it. Those marked *needs a GPU* declare it in their front "
        "matter; they have not yet run at paper scale.",
        "",
        "| notebook | last passed | time (s) | machine | command |",
        "|---|---|---|---|---|",
    ]
    for name in notebooks:
        run = runs.get(name)
        if run:
            lines.append(f"| {{doc}}`/{name}` | {run['date']} | {run['seconds']} | {run['machine']} | "
                         f"`{run['command']}` |")
        else:
            lines.append(f"| {{doc}}`/{name}` | {'needs a GPU' if gpu_notebook(name) else 'not yet'} | | | |")
    return lines


def gpu_notebook(name: str) -> bool:
    """Whether a notebook declares a GPU for its paper scale (front matter ``flagcore: resources: num_gpus``)."""
    notebook = jupytext.read(ROOT / f"{name}.md")
    return bool(((notebook.metadata.get("flagcore") or {}).get("resources") or {}).get("num_gpus"))


def write_status_page(report: dict[str, object]) -> None:
    page = STAGE / "book" / "execution.md"
    lines = [
        f"Built {report['date']} on {report['machine']}; {report['how']}, "
        f"{report['wall_seconds']} s wall in all.",
        "",
        "| notebook | status | time (s) | parameters |",
        "|---|---|---|---|",
    ]
    for record in report["notebooks"]:
        params = ", ".join(f"`{k}={v}`" for k, v in record["parameters"].items()) or "defaults (CI scale)"
        lines.append(f"| {{doc}}`/{record['notebook']}` | {record['status']} | {record['seconds']} | {params} |")
    names = [str(p.relative_to(ROOT).with_suffix("")) for p in toc_notebooks()]
    lines += paper_scale_lines(paper_scale_runs(), names)
    text = page.read_text()
    if TABLE_MARKER not in text:
        raise SystemExit(f"{page.relative_to(STAGE)} lost its marker {TABLE_MARKER!r}")
    page.write_text(text.replace(TABLE_MARKER, "\n".join(lines)))


def build() -> None:
    cmd = ["jupyter-book", "build", ".", "-W", "-n", "--keep-going", "--path-output", str(BUILD.parent)]
    print("building the book:", " ".join(cmd), flush=True)
    start = time.perf_counter()
    jb = Path(sys.executable).with_name("jupyter-book")
    subprocess.run([str(jb)] + cmd[1:], cwd=STAGE, check=True)
    print(f"book built in {time.perf_counter() - start:.1f} s: {BUILD / 'html' / 'index.html'}", flush=True)


def _parse_value(text: str) -> object:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2, help="notebooks executed at a time (default 2)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"), help="papermill parameter for every notebook")
    parser.add_argument("--only", help="execute only notebooks whose path matches this glob (the others are built unexecuted)")
    parser.add_argument("--no-build", action="store_true", help="execute only; skip jupyter-book")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")

    missing = sorted(set(all_notebook_sources()) - set(toc_notebooks()))
    if missing:
        raise SystemExit("notebooks missing from _toc.yml: " + ", ".join(str(p.relative_to(ROOT)) for p in missing))
    notebooks = stage()
    if args.only:
        notebooks = [nb for nb in notebooks if fnmatch.fnmatch(str(nb.relative_to(STAGE)), args.only)]
    parameters = {name: _parse_value(value) for name, value in args.parameter}
    records = execute(notebooks, parameters, args.jobs)
    return finish(records, no_build=args.no_build)


def finish(records: list[dict[str, object]], no_build: bool = False) -> int:
    """After execution: report failures, else the results dashboard, the performance page and the book."""
    failed = [r for r in records if r["status"] != "ok"]
    for record in failed:
        print(f"\n=== FAILED: {record['notebook']} ===\n{record['error']}", file=sys.stderr)
    if failed:
        print(f"\n{len(failed)} notebook(s) failed; the book was not built.", file=sys.stderr)
        return 1
    if results_dashboard.main(["--stage", str(STAGE), "--build", str(BUILD)]) != 0:
        print("the results dashboard could not be built; the book was not built.", file=sys.stderr)
        return 1
    # the performance page, from benchmark JSON under _build/bench when `make bench` has been run
    performance_page.main(["--stage", str(STAGE), "--bench", str(BUILD / "bench")])
    # the E.1 scale study, from the committed book/scale-study/study.json (tools/scale_study.py run);
    # imported here: scale_study builds on this module
    import scale_study

    scale_study.fill_page(STAGE)
    if not no_build:
        build()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
