"""Command-line interface: ``python -m flagcore info``, ``heads SOURCE``, ``layouts`` and ``verify SOURCE``."""

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


def _load_layout(value: str | None):
    """``--layout``: a built-in layout or model_type name, or a JSON layout file."""
    if value is None:
        return None
    from pathlib import Path

    from .layouts import layout_from_dict

    path = Path(value).expanduser()
    if path.suffix == ".json" or path.is_file():
        try:
            return layout_from_dict(json.loads(path.read_text()))
        except OSError as exc:
            raise ValueError(f"--layout {value}: {exc}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"--layout {value}: not valid JSON ({exc})") from None
    return value


def _heads(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .checkpoints import RangeRequestError, TensorDigest
    from .errors import NetworkRequired
    from .heads import LATENT_NULL_DRAWS, profile_rows
    from .weights import open_source

    fmt = "json" if args.json else args.format
    try:
        source = open_source(args.source, layout=_load_layout(args.layout), stack=args.stack, revision=args.revision)
        layers = _parse_layers(args.layers)
        bad = [layer for layer in layers or [] if layer not in source.layers]
        if bad:
            raise ValueError(f"layers {bad} out of range: {source.name} has layers 0..{len(source.layers) - 1}")
        total = len(layers) if layers is not None else len(source.layers)
        progress = lambda it: tqdm(it, total=total, desc="layers", unit="layer", file=sys.stderr, leave=False)  # noqa: E731
        dtype = torch.float64 if args.float64 else torch.float32
        digest = TensorDigest()  # of every tensor read: byte-identical revisions share it
        source.on_read = digest.add
        rows = profile_rows(source, layers, args.roles, dtype=dtype, progress=progress)
    except (ValueError, TypeError, NetworkRequired, RangeRequestError) as exc:
        print(f"python -m flagcore heads: error: {exc}", file=sys.stderr)
        return 2
    info = source.describe()
    info["digest"] = digest.hexdigest()
    if source.checkpoint is not None:
        info["read"] = source.checkpoint.stats()
    info["null"] = "haar" if not source.spelling.latent else f"layout Monte Carlo, {LATENT_NULL_DRAWS} draws"
    if source.spelling.latent:
        info["note"] = (f"latent attention: the heads live in a low-rank space, so d_k/d is not their random null; "
                        f"the baseline is Monte Carlo over random weights of the layer's shapes ({LATENT_NULL_DRAWS} draws)")
    if fmt == "json":
        print(json.dumps({**info, "roles": list(args.roles), "rows": rows}))
        return 0
    if fmt == "csv":
        import csv

        columns = ["model", "layout", "stack", "layer", "role", "heads", "d_k", "R", "baseline", "baseline_sd", "excess", "z", "status"]
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({"model": info["model"], "layout": info["layout"], "stack": info["stack"], **row})
        return 0
    print(f"model {info['model']}: layout {info['layout']!r} ({info['layout_how']}), stack {info['stack']!r} "
          f"of {info['stacks']}; d={info['d']}, H={info['n_heads']} query heads ({info['n_kv_heads']} key/value)"
          + (", one layer shared by all depths" if info["shared"] else ""))
    if "note" in info:
        print("note: " + info["note"])
    print(f"{'layer':>5} {'role':>4} {'heads':>5} {'R':>8} {'null':>8} {'excess':>8} {'z':>8}")
    for row in rows:
        if row["R"] is None:
            print(f"{row['layer']:>5} {row['role']:>4} {row['heads']:>5}  {row['status']}")
        else:
            print(f"{row['layer']:>5} {row['role']:>4} {row['heads']:>5} {row['R']:>8.4f} {row['baseline']:>8.4f} "
                  f"{row['excess']:>8.4f} {row['z']:>8.1f}")
    if "read" in info:
        read = info["read"]
        print(f"read {read['bytes_read']:,} of the checkpoint's {read['checkpoint_bytes']:,} bytes "
              f"({read['requests']} reads, {read['files_opened']} of {read['files']} files); "
              f"tensors read: sha256 {info['digest'][:16]}")
    return 0


def _layouts(args: argparse.Namespace) -> int:
    from .weights import LAYOUTS

    rows = []
    for layout in {id(lay): lay for lay in LAYOUTS.values()}.values():
        types = sorted(t for t, lay in LAYOUTS.items() if lay is layout)
        for row in layout.describe():
            rows.append({**row, "model_types": types})
    if args.json:
        print(json.dumps(rows))
        return 0
    for row in rows:
        print(f"{row['layout']:>11} {row['stack']:>8}{'*' if row['default'] else ' '} {row['split']:>11}  "
              f"{row['layer']}{{{', '.join(row['tensors'].values())}}}  [{', '.join(row['model_types'])}]")
    print("* the default stack")
    return 0


def _verify(args: argparse.Namespace) -> int:
    try:
        import transformers
    except ImportError:  # pragma: no cover
        print("python -m flagcore verify: error: needs transformers", file=sys.stderr)
        return 2
    from .layout_check import verify_layout

    try:
        from pathlib import Path

        local_run = args.revision is not None and Path(args.source).is_dir()  # a run directory: one sub-directory per revision
        where = Path(args.source) / args.revision if local_run else args.source
        model = transformers.AutoModel.from_pretrained(where, revision=None if local_run else args.revision)
        check = verify_layout(model, layout=_load_layout(args.layout), stack=args.stack, layers=_parse_layers(args.layers))
    except (ValueError, TypeError, OSError) as exc:
        print(f"python -m flagcore verify: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(check.to_dict()))
    else:
        print(f"{check.model}: layout {check.layout!r}, stack {check.stack!r}: {check.status} "
              f"(largest sin angle {check.sin_max:.1e}, {check.n_tokens} random tokens)")
        for row in check.rows:
            if row.status != "verified":
                print(f"  layer {row.layer} {row.role}: {row.status} {row.reason}")
    return 0 if check.status == "verified" else 1


def _model_options(parser: argparse.ArgumentParser) -> None:
    """The options that say which weights of a model to read (``heads`` and ``verify``)."""
    parser.add_argument("--layers", nargs="+", metavar="L", help="layers to read, e.g. 0 3 5-7 (default: all)")
    parser.add_argument("--layout", metavar="NAME|FILE.json",
                        help="a built-in layout (python -m flagcore layouts) or a JSON layout file, "
                        "instead of the one the config's model_type selects")
    parser.add_argument("--stack", metavar="NAME", help="attention stack: encoder, decoder, cross, text, vision, ... "
                        "(default: the layout's default, marked * by python -m flagcore layouts)")
    parser.add_argument("--revision", metavar="REV",
                        help="branch, tag or commit of a Hub model, or a revision sub-directory of a local run directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flagcore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions and the device flagcore would use")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_info)
    heads = sub.add_parser(
        "heads",
        help="head-subspace overlap R per layer and role (flag paper Eq. 12) against the Haar baseline",
        description="Head overlap R per layer for each role, the Haar baseline d_k/d (for latent attention the "
        "Monte-Carlo null of its factorisation), the excess and a z-score. "
        "SOURCE: an offline alias (minilm, smollm2), a model directory, a .gguf file, or a Hugging Face Hub id.",
    )
    heads.add_argument("source", metavar="SOURCE")
    heads.add_argument("--roles", nargs="+", default=["q"], choices=["q", "k", "v", "o"],
                       help="head roles: query, key, value, output (default: q, what the paper measures)")
    _model_options(heads)
    heads.add_argument("--format", choices=["table", "json", "csv"], default="table", help="output format")
    heads.add_argument("--json", action="store_true", help="same as --format json")
    heads.add_argument("--float64", action="store_true", help="compute in float64 (default float32)")
    heads.set_defaults(func=_heads)
    layouts = sub.add_parser("layouts", help="the built-in layouts, their stacks and model types")
    layouts.add_argument("--json", action="store_true", help="machine-readable output")
    layouts.set_defaults(func=_layouts)
    verify = sub.add_parser(
        "verify",
        help="check a layout against the model's own forward pass (loads the model with transformers)",
        description="Exit status 0 when every checked head's query, key, value and output subspace matches "
        "the model's forward pass, 1 when one does not or nothing could be checked, 2 on an error.",
    )
    verify.add_argument("source", metavar="SOURCE", help="a model directory or Hub id transformers can load")
    _model_options(verify)
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.set_defaults(func=_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
