"""Figure 3 of Henry, Marchetti & Kohn (2025): our estimator vs the public code's approach, in one run.

    python benchmarks/lightning_fig3.py [--deltas 3 4 ... 10] [--samples 250] [--trials 1] [--threads 1]
                                        [--json _build/bench/lightning_fig3.json]

The sweep (the same configs for both): softmax self-attention, l = 2 layers, t = 3 tokens, a_1 = a_2 = 2,
d_0 = d_1 = d_2 = delta; the expected dimension is Eq. (16), delta^2 + 8 delta - 8 (spec lightning.md §7.4).

* **public-code approach** (re-implemented from the description in spec §9.1, not copied), at the paper's
  N = 250 inputs (``--samples``): a ``torch.nn.Module`` per layer holding Q, K (a x d) and V (d x d) as float32
  ``nn.Parameter``s initialised with std 1; float32 inputs ``(N, t, d)`` with std 1; scores
  ``s[n, j, i] = <Q x_i, K x_j>`` softmax-ed over the key axis; then a Python loop over all ``N t d`` output
  coordinates, each with ``zero_grad`` and ``backward(retain_graph=True)``, the parameter gradients
  concatenated into one Jacobian row; rank by ``torch.linalg.matrix_rank`` with its default tolerance;
  max over ``--trials`` random draws.
* **ours** (the headline): ``flagcore.neuromanifold.estimate_dimension`` with its default, adaptive number
  of inputs. **It uses fewer inputs than N = 250**: it starts with enough inputs for twice as many Jacobian
  rows as parameters (plus one eighth held out) and doubles them until the rank is *certified*: a spectral
  gap sigma_r / sigma_{r+1} >= 1e3 at the cut (reported) AND the same rank without the last eighth of the
  inputs (saturation: for generic inputs the rank grows with every added input until it reaches the
  dimension, so an unchanged rank means the inputs already see the whole tangent space; too few inputs
  are reported as not certified, never as a low rank). float64 throughout, fan-in-scaled weights, inputs
  scaled so that the logits are O(1), forward-mode Jacobian with the attention layers' tangents written in
  closed form (checked against generic ``torch.func`` forward mode in tests/test_neuromanifold.py),
  row-normalised, QR then SVD, rtol = 1e-11.
* **ours at N = 250** (secondary line): the same estimator with the paper's number of inputs, so that a
  reader also sees the ratio at equal rows.

Not used, measured: ranking the Gram matrix J^T J (eigvalsh) instead of the SVD squares the condition
number; at delta = 10 its noise floor is ~1e-8 relative instead of ~5e-16, so the default rtol = 1e-11
counts noise (rank 225 instead of 172) and the gap shrinks from ~7e11 to ~3e4. With adaptive N the
Jacobian has only about 2.4 P rows, so QR + SVD of a P x P factor is cheap anyway.

Both sides run in the same process with the same thread count (``--threads``, default 1: both workloads
are made of small operations, and on a loaded 2-core machine intra-op threading slows them down). Ours is
timed before AND after the public-code run (the machine is shared; its load drifts), and the reported
speed-up uses the slower of the two. The ratio of wall times is the number to report; absolute times on a
shared machine are noisy.
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


def _ours(deltas: list[int], samples: int | None, seed: int) -> tuple[dict, float]:
    out = {}
    start = time.perf_counter()
    for delta in deltas:
        out[delta] = estimate_dimension((delta,) * 3, (2, 2), normalized=True, samples=samples, seed=seed)
    return out, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deltas", type=int, nargs="+", default=list(range(3, 11)))
    parser.add_argument(
        "--samples", type=int, default=250, help="N for the public-code approach (and ours' equal-rows line)"
    )
    parser.add_argument("--trials", type=int, default=1, help="random draws per delta for the public-style rank (max kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both sides (default 1: small ops, shared CI cores)")
    parser.add_argument("--json", help="also write the results here (e.g. _build/bench/lightning_fig3.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    print(f"machine: {machine}")
    print(f"Figure 3 sweep: softmax, l = 2, t = 3, a = 2, delta = {args.deltas}; public-code approach at N = {args.samples}")

    expected = {delta: expected_dimension((delta,) * 3, (2, 2), normalized=True) for delta in args.deltas}
    estimate_dimension((3, 3, 3), (2, 2), normalized=True)  # warm-up
    ours, ours_s_before = _ours(args.deltas, None, args.seed)
    ours_n, ours_n_s = _ours(args.deltas, args.samples, args.seed)

    torch.manual_seed(args.seed)
    public, public_times = {}, {}
    start = time.perf_counter()
    for delta in args.deltas:
        t0 = time.perf_counter()
        public[delta] = max(public_style_rank(delta, args.samples) for _ in range(args.trials))
        public_times[delta] = time.perf_counter() - t0
        print(f"  public-style delta = {delta:>2}: rank {public[delta]:>4} (expected {expected[delta]}), {public_times[delta]:.1f} s", flush=True)
    public_s = time.perf_counter() - start
    ours_after, ours_s_after = _ours(args.deltas, None, args.seed)
    assert all(ours_after[d].rank == ours[d].rank for d in args.deltas)  # same seed, same draws
    ours_s = max(ours_s_before, ours_s_after)

    print(
        f"\n{'delta':>5} {'Eq. (16)':>9} | {'ours':>5} {'N':>4} {'rows':>5} {'P':>4} {'gap':>8} {'rank w/o holdout':>17}"
        f" {'certified':>9} | {'ours N=' + str(args.samples):>10} {'gap':>8} | {'public-style':>12}"
    )
    for delta in args.deltas:
        e, f = ours[delta], ours_n[delta]
        print(f"{delta:>5} {expected[delta]:>9} | {e.rank:>5} {e.samples:>4} {e.n_outputs:>5} {e.n_params:>4} {e.gap:>8.1e}"
              f" {str(e.holdout_rank) + ' (-' + str(e.holdout) + ')':>17} {str(e.certified):>9}"
              f" | {f.rank:>10} {f.gap:>8.1e} | {public[delta]:>12}")
    ours_ok = [delta for delta in args.deltas if ours[delta].rank == expected[delta] and ours[delta].certified]
    ours_n_ok = [delta for delta in args.deltas if ours_n[delta].rank == expected[delta]]
    public_ok = [delta for delta in args.deltas if public[delta] == expected[delta]]
    print(
        f"\nours (adaptive N): {ours_s:8.3f} s (before / after the public run: {ours_s_before:.3f} / {ours_s_after:.3f} s),"
        f" correct and certified at delta = {ours_ok}"
    )
    print(f"ours (N = {args.samples}):    {ours_n_s:8.3f} s, correct at delta = {ours_n_ok}")
    print(
        f"public-style:      {public_s:8.2f} s (N = {args.samples}, {args.trials} trial(s) per delta),"
        f" correct at delta = {public_ok}"
    )
    print(f"speed-up (ours adaptive vs public-style, same configs): {public_s / ours_s:.0f}x")
    print(f"speed-up at equal rows (ours N = {args.samples} vs public-style): {public_s / ours_n_s:.0f}x")
    results = {
        "machine": machine,
        "deltas": args.deltas,
        "samples_public": args.samples,
        "trials": args.trials,
        "threads": args.threads,
        "expected": expected,
        "ours": {d: ours[d].rank for d in args.deltas},
        "ours_gap": {d: ours[d].gap for d in args.deltas},
        "ours_samples": {d: ours[d].samples for d in args.deltas},
        "ours_rows": {d: ours[d].n_outputs for d in args.deltas},
        "ours_params": {d: ours[d].n_params for d in args.deltas},
        "ours_holdout": {d: ours[d].holdout for d in args.deltas},
        "ours_holdout_rank": {d: ours[d].holdout_rank for d in args.deltas},
        "ours_certified": {d: ours[d].certified for d in args.deltas},
        "ours_correct_deltas": ours_ok,
        "ours_fixed_n": {d: ours_n[d].rank for d in args.deltas},
        "ours_fixed_n_gap": {d: ours_n[d].gap for d in args.deltas},
        "ours_fixed_n_correct_deltas": ours_n_ok,
        "public_style": public,
        "public_style_correct_deltas": public_ok,
        "ours_s": ours_s,
        "ours_s_before_public": ours_s_before,
        "ours_s_after_public": ours_s_after,
        "ours_fixed_n_s": ours_n_s,
        "public_style_s": public_s,
        "public_style_s_per_delta": public_times,
        "speedup_x": public_s / ours_s,
        "speedup_equal_rows_x": public_s / ours_n_s,
    }
    if args.json and os.path.dirname(args.json):
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
    write_json(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
