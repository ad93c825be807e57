"""Shared by the benchmark scripts: best-of-N wall time and the optional JSON dump."""

from __future__ import annotations

import json
import time


def best_of(fn, repeat: int) -> float:
    """Minimum wall time of ``fn()`` over ``repeat`` runs after one warm-up run (which also warms caches)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def write_json(results: dict, path: str | None) -> None:
    """Write ``results`` to ``path`` when one was given (``--json``)."""
    if path:
        with open(path, "w") as handle:
            json.dump(results, handle, indent=2)
