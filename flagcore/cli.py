"""Command-line interface: ``python -m flagcore info`` and ``python -m flagcore heads SOURCE``."""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from . import __version__, default_device


def _info(args: argparse.Namespace) -> int:
    info = {
        "flagcore": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(default_device()),
        "cuda_devices": torch.cuda.device_count(),
    }
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:>13}: {value}")
    return 0


def _parse_layers(values: list[str] | None) -> list[int] | None:
    """``--layers 0 3 5-7`` -> [0, 3, 5, 6, 7] (ranges inclusive)."""
    if not values:
        return None
    layers: list[int] = []
    for value in values:
        for part in value.split(","):
            if not part:
                continue
            lo, sep, hi = part.partition("-")
            try:
                layers.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
            except ValueError:
                raise ValueError(f"--layers takes integers and ranges like 0 3 5-7, got {part!r}") from None
    return layers


def _heads(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .heads import overlap_profile
    from .weights import open_source

    try:
        source = open_source(args.source)
        layers = _parse_layers(args.layers)
        bad = [layer for layer in layers or [] if layer not in source.layers]
        if bad:
            raise ValueError(f"layers {bad} out of range: {source.name} has layers 0..{len(source.layers) - 1}")
        total = len(layers) if layers is not None else len(source.layers)
        progress = lambda it: tqdm(it, total=total, desc="layers", unit="layer", file=sys.stderr, leave=False)  # noqa: E731
        profile = overlap_profile(source, layers, dtype=torch.float64 if args.float64 else torch.float32, progress=progress)
    except (ValueError, TypeError) as exc:
        print(f"python -m flagcore heads: error: {exc}", file=sys.stderr)
        return 2
    result = profile.to_dict()
    if args.json:
        print(json.dumps(result))
        return 0
    b = profile.baseline
    print(f"model {result['model']}: d={profile.d}, H={profile.H} query heads ({profile.H_kv} key/value), d_k={profile.d_k}")
    print(f"Haar baseline E[R] = d_k/d = {b.mean:.4f}, sd {b.sd:.2e} (independent random heads)")
    print(f"{'layer':>5} {'R':>8} {'baseline':>9} {'excess':>8} {'z':>8}")
    for row in result["layers"]:
        print(f"{row['layer']:>5} {row['R']:>8.4f} {b.mean:>9.4f} {row['excess']:>8.4f} {row['z']:>8.1f}")
    print(f"{'mean':>5} {profile.mean:>8.4f} {b.mean:>9.4f} {profile.mean - b.mean:>8.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flagcore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions and the device flagcore would use")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_info)
    heads = sub.add_parser(
        "heads",
        help="head-subspace overlap R per layer (flag paper Eq. 12) against the Haar baseline",
        description="Query-head overlap R per layer, the Haar baseline d_k/d, the excess and a z-score. "
        "SOURCE: an offline alias (minilm, smollm2), a model directory, a .gguf file, or a Hugging Face Hub id.",
    )
    heads.add_argument("source", metavar="SOURCE")
    heads.add_argument("--json", action="store_true", help="machine-readable output")
    heads.add_argument("--layers", nargs="+", metavar="L", help="layers to read, e.g. 0 3 5-7 (default: all)")
    heads.add_argument("--float64", action="store_true", help="compute in float64 (default float32)")
    heads.set_defaults(func=_heads)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
