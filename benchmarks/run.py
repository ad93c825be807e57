"""Benchmarks for flagcore, reported as ratios measured in one run (absolute times here are noisy).

    python benchmarks/run.py [--repeat 5] [--json out.json]       # this file's cases only
    python benchmarks/run.py --all [--quick] [--out _build/bench]  # every benchmark, one command (`make bench`)

Each case here times a batched flagcore call against the same work done one item at a time (a Python
loop over flagcore, and over scipy.linalg.subspace_angles), on the same inputs, in one process.
The ratio loop/batched is the number to watch; the machine is printed with it.

``--all`` runs this file's cases, then benchmarks/heads.py and benchmarks/lightning_fig3.py, one after the
other on the same machine, and writes their JSON to ``--out``: ``run.json`` (with the machine: CPU model,
cores, torch version and threads, Python, date, commit), ``heads.json``, ``lightning_fig3.json``. The book's
performance page (tools/performance_page.py) is generated from these files. ``--quick`` shrinks every
benchmark (fewer repeats, no 2.5 GB checkpoint, a shorter Figure-3 sweep) and says so in the JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from _timing import best_of, write_json  # noqa: E402  (sibling module; scripts run from benchmarks/)

from flagcore import frobenius_overlap, haar_frames, principal_angles



def principal_angles_case(n: int, d: int, k: int, repeat: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    A, B = haar_frames(d, k, n, g), haar_frames(d, k, n, g)
    batched = best_of(lambda: principal_angles(A, B), repeat)
    looped = best_of(lambda: [principal_angles(A[i], B[i]) for i in range(n)], repeat)
    A_np, B_np = A.numpy(), B.numpy()
    scipy_loop = best_of(lambda: [scipy.linalg.subspace_angles(A_np[i], B_np[i]) for i in range(n)], repeat)
    # Same answers, or the timing means nothing.
    ours = principal_angles(A, B).numpy()
    ref = np.sort(np.stack([scipy.linalg.subspace_angles(A_np[i], B_np[i]) for i in range(n)]), axis=-1)
    assert np.abs(ours - ref).max() < 1e-10
    return {"batched_s": batched, "loop_over_flagcore_x": looped / batched, "loop_over_scipy_x": scipy_loop / batched}


def overlap_matrix_case(H: int, d: int, k: int, repeat: int) -> dict[str, float]:
    """All H*H pairwise overlaps of H head subspaces: one broadcast call vs a double loop."""
    g = torch.Generator().manual_seed(1)
    Q = haar_frames(d, k, H, g)
    batched = best_of(lambda: frobenius_overlap(Q[:, None], Q[None, :]), repeat)
    looped = best_of(lambda: [[frobenius_overlap(Q[i], Q[j]) for j in range(H)] for i in range(H)], repeat)
    return {"batched_s": batched, "loop_over_flagcore_x": looped / batched}


BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
#: The other benchmarks run by --all: (script, its JSON name, arguments, arguments in --quick mode).
OTHERS = [
    ("heads.py", "heads.json", [], ["--repeat", "1", "--memory-quick", "--model", "minilm"]),
    ("lightning_fig3.py", "lightning_fig3.json", [], ["--deltas", "3", "4", "5", "6"]),
]


def machine_info() -> dict:
    """The machine the numbers were measured on: CPU model, cores, torch, Python, date and commit."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "os": platform.platform(terse=True),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit or None,
    }


def own_cases(repeat: int) -> dict:
    results = {}
    for n, d, k in [(256, 16, 4), (256, 64, 8), (64, 768, 64)]:
        results[f"principal_angles n={n} d={d} k={k}"] = principal_angles_case(n, d, k, repeat)
    for H, d, k in [(12, 768, 64), (32, 2048, 64)]:
        results[f"overlap_matrix H={H} d={d} d_k={k}"] = overlap_matrix_case(H, d, k, repeat)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--all", action="store_true", help="also run heads.py and lightning_fig3.py; JSON to --out")
    parser.add_argument("--quick", action="store_true", help="with --all: reduced sizes (minutes, not tens of minutes)")
    parser.add_argument("--out", default=str(ROOT / "_build" / "bench"), help="with --all: folder for the JSON files")
    args = parser.parse_args()
    info = machine_info()
    machine = f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads)"
    repeat = min(args.repeat, 2) if args.quick else args.repeat
    results = {"machine": machine, "machine_info": info, "quick": bool(args.quick), "cases": {}, "seconds": {}}
    print(f"machine: {machine}")
    start = time.perf_counter()
    results["cases"] = own_cases(repeat)
    results["seconds"]["run.py"] = round(time.perf_counter() - start, 1)
    for name, row in results["cases"].items():
        ratios = ", ".join(f"{key[:-2]} {value:.1f}x" for key, value in row.items() if key.endswith("_x"))
        print(f"{name:<40} batched {row['batched_s'] * 1e3:8.2f} ms | speed-up vs {ratios}")
    json_path = args.json
    if args.all:
        out = Path(args.out).resolve()  # absolute: the other benchmarks run with cwd = benchmarks/
        out.mkdir(parents=True, exist_ok=True)
        for stale in ("run.json", *(name for _, name, _, _ in OTHERS)):
            (out / stale).unlink(missing_ok=True)  # one run: never mix files from different runs
        failed = []
        for script, name, extra, quick in OTHERS:
            cmd = [sys.executable, str(BENCH / script), *(quick if args.quick else extra), "--json", str(out / name)]
            print(f"\n$ {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            code = subprocess.run(cmd, cwd=BENCH, check=False).returncode
            results["seconds"][script] = round(time.perf_counter() - t0, 1)
            if code != 0:
                failed.append(script)
        results["failed"] = failed
        json_path = json_path or str(out / "run.json")
        write_json(results, json_path)
        print(f"\nbenchmarks written to {out} ({sum(results['seconds'].values()):.0f} s); failed: {failed or 'none'}")
        return 1 if failed else 0
    write_json(results, json_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
