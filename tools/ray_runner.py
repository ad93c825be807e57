"""Past one machine: notebooks, parameter grids and weight diagnostics as Ray tasks.

    python tools/ray_runner.py book [--address ADDR] [-p NAME VALUE ...] [--only GLOB] [--cpu-only] [--no-build]
    python tools/ray_runner.py grid NOTEBOOK --grid NAME=V1,V2,... [--grid ...] [-p NAME VALUE ...] [--out DIR]
    python tools/ray_runner.py weights SOURCE[@REVISION] [...] [--all-revisions [--every K]] [--roles q k] [--out DIR]

Ray (``pip install 'flagcore[dist]'``) is the engine: a local Ray instance when ``--address`` is not given
(``--num-cpus`` of this machine), else the cluster at ADDR (``auto``, ``HOST:6379`` or ``ray://HOST:10001``),
where every node needs this repository's environment (the same ``.venv`` or a ``runtime_env``). No notebook
needs Ray: each task runs the notebook with papermill, or ``python -m flagcore heads``, exactly as one
machine would.

* ``book``: every notebook of the book (or those matching ``--only``) is one task with the resources its
  front matter declares (``flagcore: resources: {num_cpus: 2, num_gpus: 1}``; default one CPU), run with the
  ``-p`` parameters (``-p fast False`` is the paper scale); the executed notebooks go back into the staged
  book, which is then built as ``tools/build_book.py`` builds it.
* ``grid``: one notebook at every point of the grid (the product of the ``--grid`` lists), each point a
  task; the result rows of all points are merged, one row per result and per setting of the non-seed
  parameters, each number its mean ± sd over the seeds (``_build/grid/<notebook>/merged.json`` and
  ``.md``).
* ``weights``: the head-overlap profile of each model or checkpoint (``python -m flagcore heads``) as a
  task; one row per source, layer and role in ``heads.csv``, and a figure ``heads.png``. A training run's
  checkpoints: ``SOURCE@REVISION`` each, or ``--all-revisions`` (every branch of a Hub repository, e.g.
  Pythia's 154, or every revision sub-directory of a run directory, read by byte range); then
  ``revisions.csv`` (commit, digest of the tensors read, bytes read against the checkpoint's size) and
  ``revisions.png``, and a revision whose tensors are byte-identical to an earlier one's is flagged
  (``duplicate_of``) in both files and in the figure, not counted as a new measurement.

All three show a progress bar, retry a failed task (``--retries``, default 1) without losing the others,
report what still failed, and keep every finished task in a content-keyed cache (``_build/ray-cache``):
the key hashes the notebook's source, its parameters and the library's source (for ``weights``: the
source's files, or the commit a Hub revision points to now), so a rerun does only what is missing or
changed.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import hashlib
import itertools
import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import jupytext
import nbformat
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_book  # noqa: E402  (tools/build_book.py)
import results as results_dashboard  # noqa: E402  (tools/results.py)

ROOT = Path(__file__).resolve().parents[1]
CACHE = build_book.BUILD / "ray-cache"
DEFAULT_RESOURCES = {"num_cpus": 1}
RESOURCE_NAMES = {"num_cpus", "num_gpus", "memory"}


class RunnerError(RuntimeError):
    """A problem with the request (address, resources, parameters), reported before any task runs."""


# ---------------------------------------------------------------------------------------------- Ray


def import_ray():
    try:
        import ray
    except ImportError:
        raise RunnerError("Ray is not installed: pip install 'flagcore[dist]' (or pip install ray)") from None
    return ray


def connect(address: str | None, num_cpus: int | None = None):
    """Start a local Ray instance (address None) or join the cluster at ``address``; returns the module."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address not in (None, "auto", "local"):
        probe(address)
    env = {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"), "PYTHONPATH": str(ROOT / "tools")}}
    try:
        if address is None:
            # "local": a new instance even when RAY_ADDRESS is set in the environment
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     runtime_env=env)
        else:
            ray.init(address=address, log_to_driver=False, runtime_env=env)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
        raise RunnerError(f"could not connect to {where}: {exc}") from None
    return ray


def probe(address: str, timeout: float = 5.0) -> None:
    """Fail fast on an address where nothing listens: ``ray.init`` would keep retrying for many minutes."""
    host_port = address.removeprefix("ray://")
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit():
        raise RunnerError(f"a Ray address is auto, HOST:PORT or ray://HOST:PORT; got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise RunnerError(f"no Ray cluster answers at {address}: {exc} (start one with `ray start --head`)") from None


def check_resources(ray, jobs: list[Job]) -> None:
    """Refuse, before submitting, a task that no node of the cluster could ever run (Ray would wait forever)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for job in jobs:
        need = {("CPU" if k == "num_cpus" else "GPU" if k == "num_gpus" else k): v for k, v in job.resources.items()}
        if not any(all(node.get(name, 0) >= amount for name, amount in need.items()) for node in nodes):
            have = ", ".join(f"{{CPU: {n.get('CPU', 0):g}, GPU: {n.get('GPU', 0):g}}}" for n in nodes)
            hint = " (pass --cpu-only to run GPU notebooks on CPUs)" if "GPU" in need else ""
            raise RunnerError(f"{job.label} needs {job.resources}, but no node has that: nodes {have}{hint}")


# ------------------------------------------------------------------------------------------- tasks


@dataclass
class Job:
    """One task: what it runs (``payload``, passed to ``function``), its cache key and Ray resources."""

    label: str
    key: str
    payload: dict
    resources: dict = field(default_factory=lambda: dict(DEFAULT_RESOURCES))


#: Errors recorded in a notebook's output when its kernel, not its code, failed.
KERNEL_DEATHS = {"DeadKernelError", "CellTimeoutError"}


def _die_with_parent() -> None:
    """In the child, before exec: be killed when the Ray worker that started us dies (Linux). Ray's memory
    monitor kills workers; without this their papermill (and its kernel, which exits when papermill does)
    went on computing as orphans, holding memory and cores."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: nothing to do
        pass


def run_with_timeout(cmd: list[str], env: dict, timeout: float | None) -> subprocess.CompletedProcess:
    """Run ``cmd``; past ``timeout`` seconds kill its whole process group (papermill and its kernel) and
    return code -1, so that no orphaned kernel keeps computing."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True, preexec_fn=_die_with_parent) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return subprocess.CompletedProcess(cmd, -1, "", f"timed out after {timeout:g} s")
    return subprocess.CompletedProcess(cmd, process.returncode, out, err)


def execute_notebook(payload: dict) -> dict:
    """Run one notebook with papermill in a scratch folder; returns its record and the executed notebook.

    Runs on any node: the notebook and the files it reads travel in the payload, the executed notebook comes
    back as text. A failed notebook is a record with status ``failed`` (not an exception): the grid goes on.
    """
    threads = str(max(1, int(payload.get("threads", 1))))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, HF_HUB_DISABLE_PROGRESS_BARS="1",
               TRANSFORMERS_VERBOSITY="error", PYDEVD_DISABLE_FILE_VALIDATION="1")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flagcore-nb-") as folder:
        folder = Path(folder)
        for name, data in payload.get("siblings", {}).items():
            (folder / name).write_bytes(data)
        path = folder / "notebook.ipynb"
        path.write_text(payload["notebook"])
        cmd = [sys.executable, "-m", "papermill", str(path), str(path), "-k", "python3", "--cwd", str(folder),
               "--no-progress-bar", "-y", yaml.safe_dump(payload["parameters"])]
        done = run_with_timeout(cmd, env, payload.get("timeout"))
        record = {"notebook": payload["name"], "parameters": payload["parameters"],
                  "seconds": round(time.perf_counter() - start, 1),
                  "status": "ok" if done.returncode == 0 else "failed", "node": os.uname().nodename,
                  "machine": f"{build_book.machine()}, {threads} thread(s)"}
        executed = path.read_text() if path.exists() else ""
        if done.returncode != 0:
            error, raised = "", False
            try:
                found = build_book.error_output(path)
                if found:
                    error = f"{found[2]['ename']}: {found[2]['evalue']}"
                    raised = found[2]["ename"] not in KERNEL_DEATHS
            except Exception:  # the kernel may have died mid-write
                pass
            record["error"] = error or "\n".join((done.stderr or done.stdout).splitlines()[-10:])
            # A notebook that raised would raise again, and a timeout would time out again: retried are
            # only failures of the machinery (a kernel that died or never started, a lost worker).
            record["retry"] = not raised and done.returncode != -1
    return {"record": record, "notebook": executed}


def heads_profile(payload: dict) -> dict:
    """``python -m flagcore heads SOURCE --format json`` for one source; its rows, or the error it printed."""
    cmd = [sys.executable, "-m", "flagcore", "heads", payload["source"], "--format", "json",
           "--roles", *payload["roles"]]
    if payload.get("revision"):
        cmd += ["--revision", payload["revision"]]
    start = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(payload.get("threads", 1)), HF_HUB_DISABLE_PROGRESS_BARS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    record = {"source": payload["source"], "seconds": round(time.perf_counter() - start, 1),
              "status": "ok" if done.returncode == 0 else "failed", "node": os.uname().nodename}
    if done.returncode != 0:
        record["error"] = "\n".join(done.stderr.strip().splitlines()[-3:])
        record["retry"] = done.returncode != 2  # 2: the CLI refused the source; asking again changes nothing
        return {"record": record}
    return {"record": record, "profile": json.loads(done.stdout)}


TASKS = {"notebook": execute_notebook, "heads": heads_profile}


def run_jobs(ray, kind: str, jobs: list[Job], *, retries: int = 1, cache: Path = CACHE,
             progress: bool = True) -> tuple[dict[str, dict], list[dict]]:
    """Run every job not already in the cache as a Ray task; returns (results by key, failed records).

    A task that fails (its record says so, or Ray reports the worker lost) is resubmitted up to ``retries``
    times; the others keep running, and each finished result is cached as soon as it arrives.
    """
    from tqdm import tqdm

    folder = cache / kind
    folder.mkdir(parents=True, exist_ok=True)
    results, pending, failed = {}, {}, []
    for job in jobs:
        hit = folder / f"{job.key}.json"
        if hit.exists():
            results[job.key] = json.loads(hit.read_text())
    todo = [job for job in jobs if job.key not in results]
    check_resources(ray, todo)
    remote = ray.remote(TASKS[kind])
    attempts = {job.key: 0 for job in todo}

    def submit(job: Job):
        attempts[job.key] += 1
        pending[remote.options(**job.resources, max_retries=0).remote(job.payload)] = job

    for job in todo:
        submit(job)
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=kind, unit="task", file=sys.stderr,
               disable=not progress)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(ready[0])
        try:
            out = ray.get(ready[0])
        except Exception as exc:  # a lost worker or node: Ray's own error, not the notebook's
            out = {"record": {"label": job.label, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}}
        record = out["record"]
        if record["status"] == "ok":
            (folder / f"{job.key}.json").write_text(json.dumps(out))
            results[job.key] = out
            bar.update(1)
        elif attempts[job.key] <= retries and record.get("retry", True):
            bar.write(f"retry {job.label} (attempt {attempts[job.key] + 1}): {record.get('error', '')[:200]}")
            submit(job)
        else:
            failed.append({**record, "label": job.label, "attempts": attempts[job.key]})
            bar.write(f"failed {job.label}: {record.get('error', '')[:300]}")
            bar.update(1)
    bar.close()
    return results, failed


# -------------------------------------------------------------------------------- cache keys, inputs


def library_fingerprint(root: Path = ROOT) -> str:
    """SHA-256 over the library's source and data: any change to flagcore invalidates cached results."""
    digest = hashlib.sha256()
    for path in sorted((root / "flagcore").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def content_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def notebook_payload(source: Path, parameters: dict, threads: int) -> tuple[dict, dict]:
    """(payload, declared resources) of a notebook source ``notebooks/**/X.md``; unknown parameters refused."""
    notebook = jupytext.read(source)
    notebook.metadata.get("jupytext", {}).pop("formats", None)
    known = results_dashboard.default_parameters(notebook)
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        raise RunnerError(f"{source.relative_to(ROOT)} has no parameter {', '.join(unknown)}; "
                          f"its parameters are {', '.join(known)}")
    declared = dict((notebook.metadata.get("flagcore") or {}).get("resources") or DEFAULT_RESOURCES)
    bad = set(declared) - RESOURCE_NAMES
    if bad:
        raise RunnerError(f"{source.relative_to(ROOT)} declares unknown resources {sorted(bad)}")
    siblings = {p.name: p.read_bytes() for p in source.parent.iterdir()
                if p.is_file() and p.suffix not in (".md", ".ipynb") and not p.name.startswith(".")}
    name = str(source.relative_to(ROOT).with_suffix(""))
    payload = {"name": name, "notebook": nbformat.writes(notebook), "parameters": parameters,
               "siblings": siblings, "threads": int(declared.get("num_cpus", threads))}
    return payload, declared


def notebook_job(source: Path, parameters: dict, fingerprint: str, cpu_only: bool = False, threads: int = 1,
                 timeout: float | None = None) -> Job:
    payload, declared = notebook_payload(source, parameters, threads)
    payload["timeout"] = timeout
    resources = {k: v for k, v in declared.items() if not (cpu_only and k == "num_gpus")}
    params = ", ".join(f"{k}={v}" for k, v in parameters.items())
    key = content_key("notebook", source.read_text(), sorted(payload["siblings"].items()), parameters, fingerprint)
    return Job(label=f"{payload['name']}" + (f" [{params}]" if params else ""), key=key, payload=payload,
               resources=resources)


# ------------------------------------------------------------------------------------ grid results


NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?", re.I)


def grid_points(axes: dict[str, list]) -> list[dict]:
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names))]


def _mean_sd(tokens: list[str]) -> str:
    """One number's column over the seeds: the token itself when every seed printed the same."""
    if len(set(tokens)) == 1:
        return tokens[0]
    values = [float(t) for t in tokens]
    return f"{statistics.fmean(values):.4g} ± {statistics.stdev(values):.2g}"


def merge_rows(points: list[tuple[dict, list[dict]]], seed_names: tuple[str, ...] = ("seed",)) -> list[dict]:
    """Merge the result rows of grid points: one row per result and per setting of the non-seed parameters.

    Each point is (parameters, rows). Rows of the same result (paper, ref, claim) whose ``ours`` texts agree
    once their numbers are blanked are merged number by number into "mean ± sd" over the seeds; texts that
    do not line up are listed per seed. The statuses are counted ("agrees 3, differs 2").
    """
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for parameters, rows in points:
        setting = tuple(sorted((k, json.dumps(v)) for k, v in parameters.items() if k not in seed_names))
        for row in rows:
            groups.setdefault((setting, row["paper"], row["ref"], row["claim"]), []).append((parameters, row))
    merged = []
    for (setting, paper, ref, claim), members in groups.items():
        texts = [row["ours"] for _, row in members]
        shapes = {NUMBER.sub("#", t) for t in texts}
        numbers = [NUMBER.findall(t) for t in texts]
        if len(shapes) == 1 and numbers[0]:
            pieces = NUMBER.split(texts[0])
            columns = list(zip(*numbers))
            ours = "".join(p + (_mean_sd(list(c)) if i < len(columns) else "") for i, (p, c) in
                           enumerate(itertools.zip_longest(pieces, columns, fillvalue=())))
        else:
            ours = "; ".join(f"{', '.join(f'{k}={p[k]}' for k in seed_names if k in p)}: {t}"
                             for (p, _), t in zip(members, texts))
        statuses = [row["status"] for _, row in members]
        merged.append({
            "setting": {k: json.loads(v) for k, v in setting},
            "seeds": [{k: p[k] for k in seed_names if k in p} for p, _ in members],
            "paper": paper, "ref": ref, "claim": claim,
            "status": ", ".join(f"{s} {statuses.count(s)}" for s in dict.fromkeys(statuses)),
            "ours": ours, "theirs": members[0][1].get("theirs", ""), "n": len(members),
        })
    return merged


def merged_markdown(merged: list[dict], title: str) -> str:
    lines = [f"# {title}", "", "| setting | result | claim | status | ours (mean ± sd over seeds) | paper's | n |",
             "|---|---|---|---|---|---|---|"]
    for row in merged:
        setting = ", ".join(f"{k}={v}" for k, v in row["setting"].items()) or "defaults"
        cells = [setting, row["ref"], row["claim"], row["status"], row["ours"], row["theirs"], str(row["n"])]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def rows_of(executed: str, name: str) -> list[dict]:
    """The result rows of an executed notebook (text), as the dashboard reads them."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "nb.ipynb"
        path.write_text(executed)
        return results_dashboard.read_notebook(path, name)["rows"]


# ---------------------------------------------------------------------------------------- commands


def _parse_value(text: str) -> object:
    return build_book._parse_value(text)


def _parse_axis(text: str) -> tuple[str, list]:
    name, sep, values = text.partition("=")
    if not sep or not name.strip() or not values.strip():
        raise RunnerError(f"--grid takes NAME=V1,V2,...; got {text!r}")
    return name.strip(), [_parse_value(v) for v in values.split(",")]


def _report_failures(failed: list[dict]) -> None:
    for record in failed:
        print(f"FAILED after {record['attempts']} attempt(s): {record['label']}\n  {record.get('error', '')}",
              file=sys.stderr)


def cmd_book(args: argparse.Namespace) -> int:
    parameters = {name: _parse_value(value) for name, value in args.parameter}
    if args.record and parameters.get("fast") is not False:
        raise RunnerError("--record writes the paper-scale record: it needs -p fast False")
    staged = build_book.stage()
    sources = {str(p.relative_to(build_book.STAGE).with_suffix("")): p for p in staged}
    chosen = [name for name in sources if not args.only or fnmatch.fnmatch(name + ".ipynb", args.only)]
    chosen = [name for name in chosen if not any(fnmatch.fnmatch(name + ".ipynb", pattern) for pattern in args.skip)]
    if args.skip_gpu:
        chosen = [name for name in chosen if not build_book.gpu_notebook(name)]
    fingerprint = library_fingerprint()
    jobs = [notebook_job(ROOT / f"{name}.md", parameters, fingerprint, cpu_only=args.cpu_only, timeout=args.timeout)
            for name in chosen]
    ray = connect(args.address, args.num_cpus)
    start = time.perf_counter()
    results, failed = run_jobs(ray, "notebook", jobs, retries=args.retries, cache=args.cache, progress=not args.quiet)
    records = []
    for name, job in zip(chosen, jobs):
        if job.key in results:
            sources[name].write_text(results[job.key]["notebook"])
            records.append(results[job.key]["record"])
    records += [{"notebook": r["label"], "status": "failed", "seconds": r.get("seconds", 0),
                 "parameters": parameters, "error": r.get("error", "")} for r in failed]
    where = "Ray cluster at " + args.address if args.address else f"local Ray, {build_book.machine()}"
    if args.record:
        record_paper_scale([r for r in records if r["status"] == "ok"], parameters)
    build_book.write_report(records, "one Ray task per notebook", time.perf_counter() - start, where=where)
    _report_failures(failed)
    return build_book.finish(records, no_build=args.no_build or bool(failed))


def record_paper_scale(passed: list[dict], parameters: dict, path: Path | None = None) -> None:
    """Add each notebook that passed at paper scale to the committed record (book/paper-scale-runs.json)."""
    path = path or build_book.PAPER_SCALE_RECORD
    runs = build_book.paper_scale_runs(path)
    date = time.strftime("%Y-%m-%d", time.gmtime())
    extra = " ".join(f"-p {k} {v}" for k, v in parameters.items())
    for record in passed:
        runs[record["notebook"]] = {
            "date": date,
            "seconds": record["seconds"],
            "machine": record.get("machine", build_book.machine()),
            "command": f"python tools/ray_runner.py book {extra} --only {record['notebook']}.ipynb",
        }
    path.write_text(json.dumps(dict(sorted(runs.items())), indent=1) + "\n")


def cmd_grid(args: argparse.Namespace) -> int:
    source = Path(args.notebook)
    source = (source if source.suffix == ".md" else source.with_suffix(".md")).resolve()
    if not source.exists():
        raise RunnerError(f"no notebook source {source}")
    axes = dict(_parse_axis(a) for a in args.grid)
    fixed = {name: _parse_value(value) for name, value in args.parameter}
    points = [{**fixed, **point} for point in grid_points(axes)]
    fingerprint = library_fingerprint()
    jobs = [notebook_job(source, point, fingerprint, cpu_only=args.cpu_only, timeout=args.timeout) for point in points]
    ray = connect(args.address, args.num_cpus)
    start = time.perf_counter()
    results, failed = run_jobs(ray, "notebook", jobs, retries=args.retries, cache=args.cache, progress=not args.quiet)
    name = str(source.relative_to(ROOT).with_suffix(""))
    done = [(point, rows_of(results[job.key]["notebook"], name)) for point, job in zip(points, jobs) if job.key in results]
    merged = merge_rows(done, seed_names=tuple(args.seed_name))
    out = Path(args.out or build_book.BUILD / "grid" / source.stem)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"notebook": name, "axes": axes, "fixed": fixed, "points": len(points), "ok": len(done),
               "failed": failed, "wall_seconds": round(time.perf_counter() - start, 1),
               "records": [results[j.key]["record"] for j in jobs if j.key in results], "merged": merged}
    (out / "merged.json").write_text(json.dumps(summary, indent=2))
    (out / "merged.md").write_text(merged_markdown(merged, f"{name} over {', '.join(axes)}"))
    print(f"{len(done)}/{len(points)} points ok in {summary['wall_seconds']} s; merged rows in {out}/merged.md")
    _report_failures(failed)
    return 1 if failed else 0


def expand_sources(sources: list[str], all_revisions: bool, every: int) -> list[tuple[str, str | None]]:
    """``(source, revision)`` pairs: ``SOURCE@REV`` as given; with ``all_revisions`` every other SOURCE becomes
    its revisions in training order (:func:`flagcore.weights.list_revisions`: a Hub repository's branches or
    a run directory's sub-directories), every ``every``-th step revision and always the last and ``main``."""
    from flagcore.checkpoints import revision_step
    from flagcore.errors import NetworkRequired
    from flagcore.weights import list_revisions

    pairs = []
    for source in sources:
        source_id, at, revision = source.partition("@")
        if at or not all_revisions:
            pairs.append((source_id, revision or None))
            continue
        try:
            revisions = list_revisions(source_id)
        except (ValueError, NetworkRequired) as exc:
            raise RunnerError(f"--all-revisions {source_id}: {exc}") from None
        numbered = [r for r in revisions if revision_step(r) is not None]
        keep = set(numbered[::every]) | set(numbered[-1:]) | {r for r in revisions if revision_step(r) is None}
        pairs += [(source_id, r) for r in revisions if r in keep]
    return pairs


def source_fingerprint(source: str, revision: str | None, commits: dict | None = None) -> str:
    """What the cache key needs beyond the name, so that changed weights are never served from the cache: for
    a local directory (a model, or a run's revision), the names, sizes and modification times of its files;
    for a Hub repository, the commit its revision points to now (``commits``: :func:`hub_commits`; a branch
    that moved gets a new key), or the revision itself when that is a commit."""
    path = Path(source).expanduser()
    if not path.is_dir():
        ref = revision or "main"
        return (commits or {}).get(ref) or (ref if re.fullmatch(r"[0-9a-f]{40}", ref) else "")
    folder = path / revision if revision else path
    if not folder.is_dir():
        return ""
    return content_key(*[(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.iterdir()) if f.is_file()])


def hub_commits(source: str) -> dict[str, str]:
    """``{branch or tag: commit}`` of a Hub repository now (:func:`flagcore.weights.revision_commits`); empty
    for a local source or an alias, or when the Hub cannot be asked (tasks are then keyed by revision name,
    and a task that needs the Hub reports it)."""
    from flagcore.errors import NetworkRequired
    from flagcore.weights import ALIASES, revision_commits

    if source in ALIASES or Path(source).expanduser().exists():
        return {}
    try:
        return revision_commits(source)
    except (ValueError, NetworkRequired):  # unreachable, unknown or private: the task itself says which
        return {}


def cmd_weights(args: argparse.Namespace) -> int:
    if args.every < 1:
        raise RunnerError("--every must be >= 1")
    fingerprint = library_fingerprint()
    jobs, commits = [], {}
    for source_id, revision in expand_sources(args.sources, args.all_revisions, args.every):
        payload = {"source": source_id, "revision": revision, "roles": args.roles, "threads": 1}
        label = source_id + (f"@{revision}" if revision else "")
        if source_id not in commits:
            commits[source_id] = hub_commits(source_id)
        key = content_key("heads", payload, fingerprint, source_fingerprint(source_id, revision, commits[source_id]))
        jobs.append(Job(label=label, key=key, payload=payload))
    ray = connect(args.address, args.num_cpus)
    start = time.perf_counter()
    results, failed = run_jobs(ray, "heads", jobs, retries=args.retries, cache=args.cache, progress=not args.quiet)
    rows, revisions = merge_profiles([(job, results.get(job.key)) for job in jobs])
    out = Path(args.out or build_book.BUILD / "weights")
    out.mkdir(parents=True, exist_ok=True)
    write_rows_csv(rows, out / "heads.csv")
    if rows:
        plot_profiles(rows, out / "heads.png")
    copies = [r for r in revisions if r["duplicate_of"]]
    if any(r["revision"] for r in revisions):
        write_rows_csv(revisions, out / "revisions.csv", REVISION_COLUMNS)
        if rows:
            plot_revisions(rows, out / "revisions.png")
    print(f"{len(jobs) - len(failed)}/{len(jobs)} sources ok in {time.perf_counter() - start:.1f} s; "
          f"{len(rows)} rows in {out / 'heads.csv'}"
          + (f"; byte-identical to an earlier revision: {', '.join(r['label'] + ' = ' + r['duplicate_of'] for r in copies)}"
             if copies else ""))
    _report_failures(failed)
    return 1 if failed else 0


def merge_profiles(done: list[tuple[Job, dict | None]]) -> tuple[list[dict], list[dict]]:
    """The rows of every finished source, and one record per source with its revision, digest and bytes read.

    Integrity: within each source id, in the order given (training order for ``--all-revisions``), a revision
    whose digest of the tensors read equals an earlier one's is marked ``duplicate_of`` that revision, in its
    record and in each of its rows, so that no table or figure counts it as a new measurement."""
    from flagcore.checkpoints import revision_step

    rows, records, first_of = [], [], {}
    for job, result in done:
        if result is None:
            continue
        profile = result["profile"]
        revision = job.payload.get("revision")
        digest = profile.get("digest")
        first = first_of.setdefault((job.payload["source"], digest), revision or job.label)
        duplicate_of = first if digest and first != (revision or job.label) else None
        read = profile.get("read") or {}
        step = revision_step(revision) if revision else None
        records.append({"label": job.label, "source": job.payload["source"], "revision": revision, "step": step,
                        "commit": profile.get("commit"), "digest": digest, "duplicate_of": duplicate_of,
                        "bytes_read": read.get("bytes_read"), "checkpoint_bytes": read.get("checkpoint_bytes")})
        for row in profile["rows"]:
            rows.append({"source": job.label, "model": profile["model"], "revision": revision, "step": step,
                         "duplicate_of": duplicate_of, **row})
    return rows, records


COLUMNS = ["source", "model", "revision", "step", "duplicate_of", "layer", "role", "heads", "d_k", "R", "baseline",
           "baseline_sd", "excess", "z", "status"]
REVISION_COLUMNS = ["label", "source", "revision", "step", "commit", "digest", "duplicate_of", "bytes_read",
                    "checkpoint_bytes"]


def write_rows_csv(rows: list[dict], path: Path, columns: list[str] = COLUMNS) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def plot_profiles(rows: list[dict], path: Path) -> None:
    """Excess overlap R - d_k/d by layer, one line per source and role."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for (source, role) in dict.fromkeys((r["source"], r["role"]) for r in rows):
        points = [(r["layer"], r["excess"]) for r in rows if r["source"] == source and r["role"] == role
                  and r["excess"] is not None and math.isfinite(r["excess"])]
        if points:
            ax.plot(*zip(*points), marker="o", ms=3, label=f"{source} ({role})")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("layer")
    ax.set_ylabel(r"excess overlap $R - d_k/d$")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_revisions(rows: list[dict], path: Path) -> None:
    """Excess overlap over training, one panel per role, one line per source and layer; revisions whose tensors
    are byte-identical to an earlier revision are hollow circles at the step they copy, never on a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = list(dict.fromkeys(r["role"] for r in rows))
    fig, axes = plt.subplots(1, len(roles), figsize=(3.4 * len(roles), 3.4), sharey=True, squeeze=False)
    for role, ax in zip(roles, axes[0]):
        mine = [r for r in rows if r["role"] == role and r["excess"] is not None and math.isfinite(r["excess"])]
        for (source, layer) in dict.fromkeys((r["source"].partition("@")[0], r["layer"]) for r in mine):
            points = [r for r in mine if r["source"].partition("@")[0] == source and r["layer"] == layer]
            data = sorted((r["step"], r["excess"]) for r in points if r["duplicate_of"] is None and r["step"] is not None)
            if not data:
                continue
            (line,) = ax.plot(*zip(*data), marker="o", ms=2, lw=1, label=f"{source} L{layer}")
            steps = {r["revision"]: r["step"] for r in points}
            for r in points:
                if r["duplicate_of"] is not None and steps.get(r["duplicate_of"]) is not None:
                    ax.plot(steps[r["duplicate_of"]], r["excess"], "o", mfc="none", mec=line.get_color(), ms=7)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(left=-0.3)  # steps are >= 0: no negative decades
        ax.set_xlabel("training step")
        ax.set_title(f"role {role} (hollow: byte-identical copy, not data)", fontsize=9)
    axes[0][0].set_ylabel(r"excess overlap $R - d_k/d$")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", help="Ray cluster address (auto, HOST:6379, ray://HOST:10001); default: local")
    common.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    common.add_argument("--retries", type=int, default=1, help="resubmissions of a failed task (default 1)")
    common.add_argument("--quiet", action="store_true", help="no progress bar")
    common.add_argument("--cache", type=Path, default=CACHE, help=f"results cache (default {CACHE.relative_to(ROOT)})")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (("book", "every notebook as a task, then build the book"),
                           ("grid", "one notebook over a parameter grid, rows merged over seeds")):
        p = sub.add_parser(name, parents=[common], help=helptext)
        p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
        p.add_argument("--cpu-only", action="store_true", help="drop declared GPU requests (run them on CPUs)")
        p.add_argument("--timeout", type=float, help="seconds a notebook may run; then it fails, not retried")
    book, grid = sub.choices["book"], sub.choices["grid"]
    book.add_argument("--only", help="only notebooks whose path (notebooks/part/name.ipynb) matches this glob")
    book.add_argument("--no-build", action="store_true", help="execute only; skip jupyter-book")
    book.add_argument("--skip", action="append", default=[], metavar="GLOB", help="leave out notebooks matching this")
    book.add_argument("--skip-gpu", action="store_true", help="leave out the notebooks that declare a GPU")
    book.add_argument("--record", action="store_true",
                      help="with -p fast False: record each pass in book/paper-scale-runs.json (commit it)")
    book.set_defaults(func=cmd_book)
    grid.add_argument("notebook", help="notebook source, e.g. notebooks/flag/alignment-levels.md")
    grid.add_argument("--grid", action="append", required=True, metavar="NAME=V1,V2", help="one axis of the grid")
    grid.add_argument("--seed-name", action="append", default=None, help="parameters averaged over (default seed)")
    grid.add_argument("--out", help="output folder (default _build/grid/<notebook>)")
    grid.set_defaults(func=cmd_grid)
    weights = sub.add_parser("weights", parents=[common], help="head-overlap profiles of many models/checkpoints")
    weights.add_argument("sources", nargs="+", metavar="SOURCE[@REVISION]")
    weights.add_argument("--roles", nargs="+", default=["q"], choices=["q", "k", "v", "o"])
    weights.add_argument("--all-revisions", action="store_true",
                         help="every SOURCE without @REVISION: each of its revisions (Hub branches, or the "
                         "sub-directories of a run directory) as a task, in training order; byte-identical "
                         "revisions are flagged")
    weights.add_argument("--every", type=int, default=1, metavar="K",
                         help="with --all-revisions: every K-th step revision, and always the last and main")
    weights.add_argument("--out", help="output folder (default _build/weights)")
    weights.set_defaults(func=cmd_weights)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "seed_name", "unset") is None:
        args.seed_name = ["seed"]
    if args.retries < 0:
        print("ray_runner: error: --retries must be >= 0", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except RunnerError as exc:
        print(f"ray_runner: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
