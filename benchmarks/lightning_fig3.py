"""Figure 3 of Henry, Marchetti & Kohn (2025): our estimator vs the public code's approach, in one run.

    python benchmarks/lightning_fig3.py [--deltas 3 4 ... 10] [--samples 250] [--trials 1] [--json out.json]

The sweep: softmax self-attention, l = 2 layers, t = 3 tokens, a_1 = a_2 = 2, d_0 = d_1 = d_2 = delta,
N = 250 Gaussian inputs; the expected dimension is Eq. (16), delta^2 + 8 delta - 8 (spec lightning.md §7.4).

* **ours**: ``flagcore.neuromanifold.estimate_dimension`` — float64, forward-mode Jacobian (jvp vmapped
  over parameter directions), fan-in-scaled weights, row-normalised Jacobian, rtol = 1e-11, gap reported.
* **public-code approach** (re-implemented from the description in spec §9.1, not copied): a
  ``torch.nn.Module`` per layer holding Q, K (a x d) and V (d x d) as float32 ``nn.Parameter``s initialised
  with std 1; float32 inputs ``(N, t, d)`` with std 1; scores ``s[n, j, i] = <Q x_i, K x_j>`` softmax-ed over
  the key axis; then a Python loop over all ``N t d`` output coordinates, each with ``zero_grad`` and
  ``backward(retain_graph=True)``, the parameter gradients concatenated into one Jacobian row; rank by
  ``torch.linalg.matrix_rank`` with its default tolerance; max over ``--trials`` random draws.

Both run on the same machine in the same process, one after the other, with the same thread count
(``--threads``, default 1: both workloads are made of small operations, and on a loaded 2-core machine
intra-op threading slows them down);
the ratio of their wall times is the number to report (absolute times on a shared machine are noisy).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from _timing import write_json  # noqa: E402  (sibling module; scripts run from benchmarks/)
from torch import nn

from flagcore.neuromanifold import estimate_dimension, expected_dimension


class PublicStyleLayer(nn.Module):
    """One softmax attention layer the way the public code builds it (square V, std-1 float32 init)."""

    def __init__(self, d: int, a: int) -> None:
        super().__init__()
        self.Q = nn.Parameter(torch.randn(1, 1, a, d))
        self.K = nn.Parameter(torch.randn(1, 1, a, d))
        self.V = nn.Parameter(torch.randn(1, 1, d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, t, d), tokens as rows
        xe = x.unsqueeze(-1)  # (N, t, d, 1)
        q = (self.Q @ xe).squeeze(-1)  # (N, t, a)
        k = (self.K @ xe).squeeze(-1)
        v = (self.V @ xe).squeeze(-1)  # (N, t, d)
        scores = k @ q.transpose(1, 2)  # (N, j, i) = <Q x_i, K x_j>
        weights = torch.softmax(scores, dim=1)  # over the key axis j
        return weights.transpose(1, 2) @ v  # token i: sum_j w[j, i] V x_j


def public_style_rank(delta: int, samples: int, tokens: int = 3, layers: int = 2, a: int = 2) -> int:
    model = nn.Sequential(*[PublicStyleLayer(delta, a) for _ in range(layers)])
    x = torch.randn(samples, tokens, delta)
    y = model(x).reshape(-1)
    params = list(model.parameters())
    rows = []
    for j in range(y.numel()):
        model.zero_grad()
        y[j].backward(retain_graph=True)
        rows.append(torch.cat([p.grad.reshape(-1).clone() for p in params]))
    J = torch.stack(rows)
    return int(torch.linalg.matrix_rank(J))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deltas", type=int, nargs="+", default=list(range(3, 11)))
    parser.add_argument("--samples", type=int, default=250)
    parser.add_argument("--trials", type=int, default=1, help="random draws per delta for the public-style rank (max kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both sides (default 1: small ops, shared CI cores)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    print(f"machine: {machine}")
    print(f"Figure 3 sweep: softmax, l = 2, t = 3, a = 2, delta = {args.deltas}, N = {args.samples}")

    expected = {delta: expected_dimension((delta,) * 3, (2, 2), normalized=True) for delta in args.deltas}
    estimate_dimension((3, 3, 3), (2, 2), normalized=True, samples=10)  # warm-up (loads forward-mode machinery)

    ours, gaps = {}, {}
    start = time.perf_counter()
    for delta in args.deltas:
        est = estimate_dimension((delta,) * 3, (2, 2), normalized=True, samples=args.samples, seed=args.seed)
        ours[delta], gaps[delta] = est.rank, est.gap
    ours_s = time.perf_counter() - start

    torch.manual_seed(args.seed)
    public, public_times = {}, {}
    start = time.perf_counter()
    for delta in args.deltas:
        t0 = time.perf_counter()
        public[delta] = max(public_style_rank(delta, args.samples) for _ in range(args.trials))
        public_times[delta] = time.perf_counter() - t0
        print(f"  public-style delta = {delta:>2}: rank {public[delta]:>4} (expected {expected[delta]}), {public_times[delta]:.1f} s", flush=True)
    public_s = time.perf_counter() - start

    print(f"\n{'delta':>5} {'Eq. (16)':>9} {'ours':>5} {'gap':>9} {'public-style':>13}")
    for delta in args.deltas:
        print(f"{delta:>5} {expected[delta]:>9} {ours[delta]:>5} {gaps[delta]:>9.1e} {public[delta]:>13}")
    ours_ok = [delta for delta in args.deltas if ours[delta] == expected[delta]]
    public_ok = [delta for delta in args.deltas if public[delta] == expected[delta]]
    print(f"\nours:         {ours_s:8.2f} s, correct at delta = {ours_ok}")
    print(f"public-style: {public_s:8.2f} s ({args.trials} trial(s) per delta), correct at delta = {public_ok}")
    print(f"speed-up: {public_s / ours_s:.0f}x")
    results = {
        "machine": machine,
        "deltas": args.deltas,
        "samples": args.samples,
        "trials": args.trials,
        "expected": expected,
        "ours": ours,
        "ours_gap": gaps,
        "public_style": public,
        "ours_s": ours_s,
        "public_style_s": public_s,
        "public_style_s_per_delta": public_times,
        "speedup_x": public_s / ours_s,
    }
    write_json(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
