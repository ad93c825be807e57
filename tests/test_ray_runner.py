"""tools/ray_runner.py on a real local Ray cluster (2 CPUs): a notebook grid, a model sweep, failures.

The oracle for every distributed result is the same work done one by one without Ray: papermill on each
grid point, ``python -m flagcore heads`` on each model.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jupytext
import nbformat
import papermill
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import ray_runner  # noqa: E402
import results as results_dashboard  # noqa: E402

ray = pytest.importorskip("ray")

NOTEBOOK = ROOT / "notebooks" / "lightning" / "definitions.md"  # a few seconds at CI scale; rows vary by seed
WALL = {}  # wall times, printed at the end (the closing note of issue 15 quotes them)


@pytest.fixture(scope="module")
def cluster():
    start = time.perf_counter()
    module = ray_runner.connect(None, num_cpus=2)
    WALL["start a local Ray instance"] = time.perf_counter() - start
    yield module
    module.shutdown()
    print("\nRay test wall times: " + "; ".join(f"{k} {v:.1f} s" for k, v in WALL.items()))


def run_alone(source: Path, parameters: dict, folder: Path) -> list[dict]:
    """One grid point without Ray: papermill on the notebook, rows read as the dashboard reads them."""
    notebook = jupytext.read(source)
    notebook.metadata.get("jupytext", {}).pop("formats", None)
    name = "-".join(f"{k}{v}" for k, v in parameters.items())
    path = folder / f"{name}.ipynb"
    nbformat.write(notebook, path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "papermill", str(path), str(path), "-k", "python3", "--cwd", str(folder),
                    "--no-progress-bar", *[a for k, v in parameters.items() for a in ("-p", k, str(v))]],
                   check=True, capture_output=True, env=env)
    return results_dashboard.read_notebook(path, "point")["rows"]


@pytest.mark.slow
def test_grid_merges_as_the_points_run_one_by_one_and_a_failed_point_is_retried_alone(cluster, tmp_path):
    fingerprint = ray_runner.library_fingerprint()
    points = [{"seed": 0}, {"seed": 1}, {"seed": 2}]
    jobs = [ray_runner.notebook_job(NOTEBOOK, p, fingerprint) for p in points]
    broken = ray_runner.notebook_job(NOTEBOOK, {"seed": 0, "dtype": "float8"}, fingerprint)  # getattr raises
    start = time.perf_counter()
    results, failed = ray_runner.run_jobs(cluster, "notebook", jobs + [broken], retries=1, cache=tmp_path / "cache",
                                          progress=False)
    WALL["grid: 3 points + 1 failing"] = time.perf_counter() - start
    # the notebook itself raised: it would raise again, so it is reported after one attempt, not retried
    assert [f["label"] for f in failed] == [broken.label] and failed[0]["attempts"] == 1
    assert "float8" in failed[0]["error"]
    assert set(results) == {j.key for j in jobs}, "the failing point must not cost the others"

    name = str(NOTEBOOK.relative_to(ROOT).with_suffix(""))
    by_ray = [(p, ray_runner.rows_of(results[j.key]["notebook"], name)) for p, j in zip(points, jobs)]
    start = time.perf_counter()
    alone = [(p, run_alone(NOTEBOOK, p, tmp_path)) for p in points]
    WALL["the same 3 points one by one (papermill)"] = time.perf_counter() - start
    assert by_ray == alone, "each point's rows must be those of running it alone"
    merged = ray_runner.merge_rows(by_ray)
    assert merged == ray_runner.merge_rows(alone)
    assert all(row["n"] == 3 for row in merged)
    # the seeds differ, so at least one number is a spread, and it is the sample sd of the three values
    spread = [row for row in merged if "±" in row["ours"]]
    assert spread, "the seeds moved no number: the grid tested nothing"

    # a rerun does only what is missing: the three points come from the cache, untouched
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "notebook").glob("*.json")}
    again, failed_again = ray_runner.run_jobs(cluster, "notebook", jobs, retries=0, cache=tmp_path / "cache",
                                              progress=False)
    assert not failed_again and again == results
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "notebook").glob("*.json")}


def test_a_kernel_that_dies_is_retried_and_the_retry_succeeds(cluster, tmp_path):
    """A failure of the machinery (here the kernel exits on its first run) is retried; the second run passes."""
    marker = tmp_path / "died-once"
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(f"marker = {str(marker)!r}", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("import os, pathlib\np = pathlib.Path(marker)\nif not p.exists():\n"
                                  "    p.write_text('1')\n    os._exit(1)\nprint('second run')"),
    ])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    payload = {"name": "dies-once", "notebook": nbformat.writes(notebook), "parameters": {"marker": str(marker)},
               "siblings": {}, "threads": 1}
    job = ray_runner.Job(label="dies-once", key="dies-once", payload=payload)
    results, failed = ray_runner.run_jobs(cluster, "notebook", [job], retries=1, cache=tmp_path / "cache",
                                          progress=False)
    assert not failed and marker.exists()
    assert "second run" in results["dies-once"]["notebook"]
    # negative control: with no retries the same failure is reported
    marker.unlink()
    job.key = "dies-once-again"
    results, failed = ray_runner.run_jobs(cluster, "notebook", [job], retries=0, cache=tmp_path / "cache",
                                          progress=False)
    assert not results and failed[0]["attempts"] == 1


@pytest.mark.slow
def test_weight_sweep_rows_equal_the_cli_run_per_model(cluster, tmp_path):
    sources = ["minilm", "smollm2"]
    start = time.perf_counter()
    code = ray_runner.main(["weights", *sources, "--roles", "q", "k", "--quiet", "--out", str(tmp_path),
                            "--cache", str(tmp_path / "cache")])
    WALL["weights: 2 models"] = time.perf_counter() - start
    assert code == 0
    with (tmp_path / "heads.csv").open() as handle:
        table = list(csv.DictReader(handle))
    for source in sources:
        alone = json.loads(subprocess.run([sys.executable, "-m", "flagcore", "heads", source, "--format", "json",
                                           "--roles", "q", "k"], check=True, capture_output=True, text=True).stdout)
        mine = [r for r in table if r["source"] == source]
        assert len(mine) == len(alone["rows"]) == alone["n_layers"] * 2
        for ours, theirs in zip(mine, alone["rows"]):
            assert (int(ours["layer"]), ours["role"]) == (theirs["layer"], theirs["role"])
            assert float(ours["R"]) == pytest.approx(theirs["R"], rel=1e-6)
    assert (tmp_path / "heads.png").stat().st_size > 10_000


def test_revision_sweep_equals_the_library_and_flags_copies(cluster, tmp_path):
    """A run trained and saved as revisions (Pythia's format, main a copy of the last step), swept with
    --all-revisions, one task per revision: the rows equal flagcore.heads.revision_profile's run on one
    machine, main is flagged as the copy it is, and the revisions table records the bytes read."""
    from flagcore.heads import revision_profile
    from flagcore.textlm import char_corpus, corpus_text, train_revisions

    run = tmp_path / "run"
    train_revisions(run, char_corpus(corpus_text()[:20_000]), save_at=[0, 2, 4], d=32, n_layers=2, n_heads=4,
                    seq=16, batch=4)
    start = time.perf_counter()
    code = ray_runner.main(["weights", str(run), "--all-revisions", "--roles", "q", "o", "--quiet", "--out",
                            str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    WALL["weights: 4 revisions"] = time.perf_counter() - start
    assert code == 0
    with (tmp_path / "out" / "heads.csv").open() as handle:
        table = list(csv.DictReader(handle))
    with (tmp_path / "out" / "revisions.csv").open() as handle:
        revisions = list(csv.DictReader(handle))
    alone = revision_profile(run, roles=("q", "o"))
    assert [r["revision"] for r in revisions] == [r["revision"] for r in alone.revisions] == ["step0", "step2", "step4", "main"]
    assert {r["revision"]: r["duplicate_of"] for r in revisions if r["duplicate_of"]} == alone.duplicates() == {"main": "step4"}
    assert [r["digest"] for r in revisions] == [r["digest"] for r in alone.revisions]
    assert all(0 < int(r["bytes_read"]) <= int(r["checkpoint_bytes"]) for r in revisions)
    assert len(table) == len(alone.rows) == 4 * 2 * 2
    for ours, theirs in zip(table, alone.rows):
        assert (ours["revision"], int(ours["layer"]), ours["role"]) == (theirs["revision"], theirs["layer"], theirs["role"])
        assert float(ours["R"]) == pytest.approx(theirs["R"], rel=1e-6)
        assert (ours["duplicate_of"] or None) == theirs["duplicate_of"]
    assert (tmp_path / "out" / "revisions.png").stat().st_size > 10_000
    # retrained in place: the cache must not serve the old results
    for child in run.iterdir():
        for f in child.iterdir():
            f.unlink()
        child.rmdir()
    train_revisions(run, char_corpus(corpus_text()[:20_000]), save_at=[0, 2, 4], d=32, n_layers=2, n_heads=4,
                    seq=16, batch=4, seed=1)
    assert ray_runner.main(["weights", str(run), "--all-revisions", "--roles", "q", "o", "--quiet", "--out",
                            str(tmp_path / "out2"), "--cache", str(tmp_path / "cache")]) == 0
    with (tmp_path / "out2" / "revisions.csv").open() as handle:
        assert [r["digest"] for r in csv.DictReader(handle)] == [r["digest"] for r in revision_profile(run, roles=("q", "o")).revisions]


def test_unknown_source_fails_that_source_only(cluster, tmp_path):
    code = ray_runner.main(["weights", "minilm", str(tmp_path / "no-such-model"), "--quiet",
                            "--out", str(tmp_path), "--cache", str(tmp_path / "cache")])
    assert code == 1
    with (tmp_path / "heads.csv").open() as handle:
        assert {r["source"] for r in csv.DictReader(handle)} == {"minilm"}


def test_a_task_no_node_can_run_is_refused_before_it_waits_forever(cluster):
    job = ray_runner.Job(label="gpu notebook", key="k", payload={}, resources={"num_cpus": 1, "num_gpus": 1})
    with pytest.raises(ray_runner.RunnerError, match="no node has that.*--cpu-only"):
        ray_runner.check_resources(cluster, [job])
    ray_runner.check_resources(cluster, [ray_runner.Job(label="cpu", key="k", payload={})])  # fits: no error


def test_unknown_parameter_is_refused_with_the_known_ones():
    with pytest.raises(ray_runner.RunnerError, match="no parameter widht.*fast, device, seed"):
        ray_runner.notebook_job(NOTEBOOK, {"widht": 3}, "x")


def test_bad_address_fails_fast_with_a_clear_error():
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "ray_runner.py"), "grid", str(NOTEBOOK),
                           "--grid", "seed=0", "--address", "127.0.0.1:9"], capture_output=True, text=True)
    assert done.returncode == 2 and "no Ray cluster answers at 127.0.0.1:9" in done.stderr
    assert time.perf_counter() - start < 60
    with pytest.raises(ray_runner.RunnerError, match="HOST:PORT"):
        ray_runner.probe("not-an-address")


def test_merge_rows_gives_mean_and_sample_sd_per_number_and_counts_statuses():
    def row(ours, status="agrees"):
        return {"paper": "flag", "ref": "T", "claim": "c", "status": status, "ours": ours, "theirs": "1.5"}

    points = [({"seed": 0, "width": 8}, [row("R = 0.25 at layer 3")]),
              ({"seed": 1, "width": 8}, [row("R = 0.35 at layer 3", "differs")]),
              ({"seed": 2, "width": 8}, [row("R = 0.30 at layer 3")]),
              ({"seed": 0, "width": 16}, [row("R = 0.5 at layer 3")])]
    merged = ray_runner.merge_rows(points)
    assert [m["setting"] for m in merged] == [{"width": 8}, {"width": 16}]
    sd = statistics.stdev([0.25, 0.35, 0.30])
    assert merged[0]["ours"] == f"R = 0.3 ± {sd:.2g} at layer 3"  # the constant "3" stays as printed
    assert merged[0]["status"] == "agrees 2, differs 1" and merged[0]["n"] == 3
    assert merged[1]["ours"] == "R = 0.5 at layer 3"
    # negative control: texts that do not line up are listed per seed, never averaged
    odd = ray_runner.merge_rows([({"seed": 0}, [row("R = 0.2")]), ({"seed": 1}, [row("R = 0.2, 0.4")])])
    assert odd[0]["ours"] == "seed=0: R = 0.2; seed=1: R = 0.2, 0.4"


def test_paper_scale_record_and_its_table(tmp_path):
    import build_book

    path = tmp_path / "runs.json"
    ray_runner.record_paper_scale([{"notebook": "notebooks/lightning/definitions", "seconds": 12.5,
                                    "machine": "x86_64, 2 cores"}], {"fast": False}, path)
    runs = build_book.paper_scale_runs(path)
    assert runs["notebooks/lightning/definitions"]["command"] == (
        "python tools/ray_runner.py book -p fast False --only notebooks/lightning/definitions.ipynb")
    lines = build_book.paper_scale_lines(runs, ["notebooks/lightning/definitions", "notebooks/flag/activation-sweep",
                                                "notebooks/lightning/deep-dimension"])
    table = "\n".join(lines)
    assert "| {doc}`/notebooks/lightning/definitions` | 20" in table and "| 12.5 |" in table
    assert "| {doc}`/notebooks/flag/activation-sweep` | needs a GPU |" in table  # declared in its front matter
    assert "| {doc}`/notebooks/lightning/deep-dimension` | not yet |" in table
    # --record only makes sense at fast = False: refused before anything is staged or run
    assert ray_runner.main(["book", "--record", "--no-build", "--only", "nothing"]) == 2


def test_a_killed_worker_takes_its_notebook_kernel_with_it(cluster, tmp_path):
    """Ray kills workers (memory monitor, cancel); the papermill process and the kernel under it must not live
    on as orphans that hold memory and cores."""
    pid_file = tmp_path / "kernel.pid"
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(f"pid_file = {str(pid_file)!r}", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "import os, pathlib, time\n"
            "papermill = os.getppid()\n"
            "worker = int(open(f'/proc/{papermill}/stat').read().rsplit(')', 1)[1].split()[1])\n"
            "pathlib.Path(pid_file).write_text(f'{os.getpid()} {worker}')\n"
            "time.sleep(120)"),
    ])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    payload = {"name": "sleeps", "notebook": nbformat.writes(notebook), "parameters": {"pid_file": str(pid_file)},
               "siblings": {}, "threads": 1}
    ref = cluster.remote(ray_runner.execute_notebook).options(max_retries=0).remote(payload)
    deadline = time.time() + 180
    while not pid_file.exists() and time.time() < deadline:
        ready, _ = cluster.wait([ref], timeout=0.5)
        if ready:
            pytest.fail(f"the task ended before its kernel started: {cluster.get(ref)['record']}")
    kernel, worker = map(int, pid_file.read_text().split())
    os.kill(worker, signal.SIGKILL)  # as Ray's memory monitor kills a worker
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            os.kill(kernel, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        os.kill(kernel, 9)
        pytest.fail("the kernel outlived its Ray worker by 20 s")
