"""Command-line interface: ``python -m flagcore info`` (more subcommands arrive with the paper modules)."""

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flagcore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions and the device flagcore would use")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
