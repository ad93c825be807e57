"""Benchmarks for flagcore, reported as ratios measured in one run (absolute times here are noisy).

    python benchmarks/run.py [--repeat 5] [--json out.json]

Each case times a batched flagcore call against the same work done one item at a time (a Python
loop over flagcore, and over scipy.linalg.subspace_angles), on the same inputs, in one process.
The ratio loop/batched is the number to watch; the machine is printed with it.
"""

from __future__ import annotations

import argparse
import os
import platform

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    results = {"machine": machine, "cases": {}}
    print(f"machine: {machine}")
    for n, d, k in [(256, 16, 4), (256, 64, 8), (64, 768, 64)]:
        name = f"principal_angles n={n} d={d} k={k}"
        results["cases"][name] = principal_angles_case(n, d, k, args.repeat)
    for H, d, k in [(12, 768, 64), (32, 2048, 64)]:
        name = f"overlap_matrix H={H} d={d} k={k}"
        results["cases"][name] = overlap_matrix_case(H, d, k, args.repeat)
    for name, row in results["cases"].items():
        ratios = ", ".join(f"{key[:-2]} {value:.1f}x" for key, value in row.items() if key.endswith("_x"))
        print(f"{name:<40} batched {row['batched_s'] * 1e3:8.2f} ms | speed-up vs {ratios}")
    write_json(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
