"""The E.1 scale study: Table E.4, the E.1.5 Level-3 verdicts and the ViT gc values against scale.

    python tools/scale_study.py run [--address ADDR] [--num-cpus N] [--timeout S]   # the grids, on Ray
    python tools/scale_study.py page --stage DIR                                    # fill the book's page

``run`` executes two one-factor-at-a-time designs through tools/ray_runner.py (each point a Ray task,
cached by content): ``trained-mlp-commutator`` from its CI point (10 epochs, width 64, 500 images per
class) along training length, width and data size; ``activation-sweep`` along training length, over
three seeds. It reads the numbers each point's results rows carry (``extra`` fields of
``flagcore.report.result``) and writes ``book/scale-study/study.json`` with the run's date, machine,
command and per-point wall times. Commit that file: ``make book`` renders it (tables and figures) into
``book/scale-study.md``; nothing on that page is typed by hand.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_book  # noqa: E402
import ray_runner  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STUDY_JSON = Path("book") / "scale-study" / "study.json"
PAGE = Path("book") / "scale-study.md"
MARKER = "<!-- scale-study -->"

#: (study, notebook, the CI point, the axes varied one at a time from it, seeds)
DESIGNS = {
    "table-e4": {
        "notebook": "notebooks/flag/trained-mlp-commutator.md",
        "base": {"epochs": 10, "width": 64, "per_class_train": 500},
        "axes": {"epochs": [20, 40], "width": [128, 256], "per_class_train": [1000, 2000]},
        "seeds": [0],  # the notebook trains 3-4 seeds per architecture itself: its sd is the seed spread
    },
    "e15": {
        "notebook": "notebooks/flag/activation-sweep.md",
        "base": {"epochs": 4},
        "axes": {"epochs": [8, 16]},
        "seeds": [0, 1, 2],
    },
}
PAPER = {"table-e4": {"mean": 1.461, "sd": 0.075}, "e15": {"degenerate": "18/18", "vit_gc": "SiLU, Mish accepted"}}


def design_points(design: dict, levels: int | None = None) -> list[dict]:
    """The CI point, then each axis value (the first ``levels`` of each axis) with the others at the CI
    point; each at every seed."""
    settings = [dict(design["base"])]
    for name, values in design["axes"].items():
        settings += [{**design["base"], name: value} for value in values[:levels]]
    return [{**setting, "seed": seed} for setting in settings for seed in design["seeds"]]


def extras(rows: list[dict]) -> dict[str, dict]:
    return {row["ref"]: row.get("extra") or {} for row in rows}


def point_values(study: str, rows: list[dict]) -> dict:
    found = extras(rows)
    if study == "table-e4":
        e4, depth = found["Table E.4 (ReLU-50 orth)"], found["§7.1 depth claim"]
        return {"mean": e4["mean"], "sd": e4["sd"], "seeds": e4["seeds"], "accuracy": e4["accuracy"],
                "relu10_mean": depth["relu10_mean"], "relu10_sd": depth["relu10_sd"]}
    l3, gc = found["E.1.5 (Level 3, CNN / Mixer)"], found["E.1.6 (ViT gc)"]
    return {"degenerate_cnn": l3["degenerate_cnn"], "degenerate_mixer": l3["degenerate_mixer"],
            "runs_per_arch": l3["runs_per_arch"], "nc1_min": l3["nc1_min"], "delta_gc": gc["delta_gc"]}


def run(args: argparse.Namespace) -> int:
    fingerprint = ray_runner.library_fingerprint()
    jobs = []
    for study, design in DESIGNS.items():
        for point in design_points(design, args.levels):
            # on CPUs by design: the study asks how far a 2-core machine moves the numbers
            job = ray_runner.notebook_job(ROOT / design["notebook"], point, fingerprint, cpu_only=True,
                                          timeout=args.timeout)
            jobs.append((study, point, job))
    ray = ray_runner.connect(args.address, args.num_cpus)
    start = time.perf_counter()
    results, failed = ray_runner.run_jobs(ray, "notebook", [j for *_, j in jobs], retries=args.retries,
                                          cache=args.cache)
    points = []
    for study, point, job in jobs:
        if job.key not in results:
            continue
        out = results[job.key]
        rows = ray_runner.rows_of(out["notebook"], DESIGNS[study]["notebook"])
        points.append({"study": study, "parameters": point, "seconds": out["record"]["seconds"],
                       "values": point_values(study, rows)})
    where = (f"Ray cluster at {args.address}, driver on " if args.address else "local Ray on ") + build_book.machine()
    study = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "machine": where,
        "command": "python tools/scale_study.py run" + (f" --levels {args.levels}" if args.levels else "")
        + (f" --address {args.address}" if args.address else ""),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "designs": DESIGNS,
        "points": points,
        "failed": [{"label": f["label"], "error": f.get("error", "")[:300]} for f in failed],
    }
    if args.note:
        study["note"] = args.note
    path = ROOT / STUDY_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(study, indent=1) + "\n")
    print(f"{len(points)}/{len(jobs)} points in {study['wall_seconds']} s -> {path.relative_to(ROOT)}")
    for f in failed:
        print(f"FAILED {f['label']}: {f.get('error', '')[:300]}", file=sys.stderr)
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------ the page


def _setting(point: dict, design: dict) -> str:
    changed = [f"{k} = {v}" for k, v in point["parameters"].items() if k != "seed" and design["base"].get(k) != v]
    return ", ".join(changed) or "CI point"


def _axis(point: dict, design: dict) -> tuple[str, object]:
    for name, value in point["parameters"].items():
        if name != "seed" and design["base"].get(name) != value:
            return name, value
    return "", None


def e4_rows(study: dict) -> list[list[str]]:
    design = study["designs"]["table-e4"]
    rows = []
    for point in (p for p in study["points"] if p["study"] == "table-e4"):
        v = point["values"]
        rows.append([_setting(point, design), f"{v['mean']:.3f} ± {v['sd']:.3f} ({v['seeds']} seeds)",
                     f"{v['relu10_mean']:.3f} ± {v['relu10_sd']:.3f}", f"{v['accuracy']:.3f}",
                     f"{point['seconds']:.0f}"])
    return rows


def e15_groups(study: dict) -> dict[str, list[dict]]:
    design = study["designs"]["e15"]
    groups: dict[str, list[dict]] = {}
    for point in (p for p in study["points"] if p["study"] == "e15"):
        groups.setdefault(_setting(point, design), []).append(point)
    return groups


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def e15_rows(study: dict) -> list[list[str]]:
    rows = []
    for setting, points in e15_groups(study).items():
        runs = sum(p["values"]["runs_per_arch"] for p in points)
        cnn = sum(p["values"]["degenerate_cnn"] for p in points)
        mixer = sum(p["values"]["degenerate_mixer"] for p in points)
        gcs = {name: [p["values"]["delta_gc"][name] for p in points] for name in points[0]["values"]["delta_gc"]}
        rows.append([setting, f"{cnn}/{runs}", f"{mixer}/{runs}",
                     _mean_sd([p["values"]["nc1_min"] for p in points]),
                     "; ".join(f"{name} {_mean_sd(v)}" for name, v in gcs.items()), str(len(points))])
    return rows


def e4_trend(study: dict) -> list[str]:
    """For each axis: does the ReLU-50 (orth) mean move toward the paper's, away, or not beyond the spread?"""
    design = study["designs"]["table-e4"]
    points = [p for p in study["points"] if p["study"] == "table-e4"]
    base = next((p for p in points if not _axis(p, design)[0]), None)
    if base is None:
        return []
    target, lines = PAPER["table-e4"]["mean"], []
    for name in design["axes"]:
        along = sorted((p for p in points if _axis(p, design)[0] == name), key=lambda p: _axis(p, design)[1])
        if not along:
            continue
        last = along[-1]
        b, e = base["values"], last["values"]
        spread = max(b["sd"], e["sd"])
        moved = abs(e["mean"] - target) - abs(b["mean"] - target)
        verdict = ("toward the paper's" if moved < -spread else "away from the paper's" if moved > spread
                   else "no change beyond the seed spread")
        label = {"per_class_train": "training images per class"}.get(name, name)
        lines.append(f"{label} {design['base'][name]} → {_axis(last, design)[1]}: "
                     f"{b['mean']:.3f} → {e['mean']:.3f} (sd ≤ {spread:.3f}): {verdict}")
    return lines


def depth_claim(study: dict) -> list[str]:
    """§7.1's depth claim at each Table E.4 setting: is ReLU-50 (orth)'s commutator larger than ReLU-10's, and
    more stable (a smaller coefficient of variation over seeds)? The notebook's own test
    (:func:`flagcore.alignment.depth_comparison`), per point."""
    from flagcore.alignment import depth_comparison

    design = study["designs"]["table-e4"]
    lines = []
    for point in (p for p in study["points"] if p["study"] == "table-e4"):
        v = point["values"]
        depth = depth_comparison((v["mean"], v["sd"]), (v["relu10_mean"], v["relu10_sd"]))
        lines.append(f"{_setting(point, design)}: ReLU-50 (orth) {v['mean']:.3f} ± {v['sd']:.3f} vs ReLU-10 "
                     f"{v['relu10_mean']:.3f} ± {v['relu10_sd']:.3f}: {'larger' if depth['larger'] else 'smaller'}"
                     f", {'more' if depth['more_stable'] else 'less'} stable (coefficient of variation "
                     f"{depth['cv_deep']:.2f} vs {depth['cv_shallow']:.2f})")
    return lines


#: The paper's ViT verdicts (E.1.6) that are a clear accept or reject (LeakyReLU, "partial", is left out),
#: and the notebook's default threshold tau_gc on delta_gc.
PAPER_VIT_VERDICTS = {"SiLU": True, "Mish": True, "ReLU": False, "GELU": False, "Softplus": False}
TAU_GC = 0.3


def e15_trend(study: dict) -> list[str]:
    """Per setting: Level-3 Degenerate counts (the paper: all) and how many of the paper's clear ViT verdicts
    the seed-mean delta_gc reproduces at the notebook's tau_gc."""
    lines = []
    for setting, points in e15_groups(study).items():
        runs = sum(p["values"]["runs_per_arch"] for p in points)
        degenerate = sum(p["values"]["degenerate_cnn"] + p["values"]["degenerate_mixer"] for p in points)
        means = {name: statistics.fmean(p["values"]["delta_gc"][name] for p in points) for name in PAPER_VIT_VERDICTS
                 if name in points[0]["values"]["delta_gc"]}
        match = sum((means[name] <= TAU_GC) == accept for name, accept in PAPER_VIT_VERDICTS.items() if name in means)
        lines.append(f"{setting}: Level 3 Degenerate in {degenerate} of {2 * runs} CNN and Mixer runs (the "
                     f"paper: all); ViT verdicts at τ_gc = {TAU_GC} match the paper's in {match} of {len(means)}")
    return lines


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def figure(study: dict, path: Path) -> None:
    """Table E.4's ReLU-50 (orth) commutator (mean ± sd over seeds) along each axis, the paper's band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flagcore.plotting import use_book_style

    use_book_style()  # the book's sizes: 6.5 in wide, no text below 9 pt (the page check measures it)
    design = study["designs"]["table-e4"]
    points = [p for p in study["points"] if p["study"] == "table-e4"]
    base = next((p for p in points if not _axis(p, design)[0]), None)
    axes = list(design["axes"])
    fig, panels = plt.subplots(1, len(axes), figsize=(6.5, 3.4), sharey=True)
    paper = PAPER["table-e4"]
    for ax, name in zip(panels, axes):
        series = ([(design["base"][name], base)] if base else []) + [
            (_axis(p, design)[1], p) for p in points if _axis(p, design)[0] == name]
        series.sort(key=lambda item: item[0])
        xs = [x for x, _ in series]
        ax.errorbar(xs, [p["values"]["mean"] for _, p in series], yerr=[p["values"]["sd"] for _, p in series],
                    marker="o", capsize=3, label="ours, ReLU-50 (orth)")
        ax.errorbar(xs, [p["values"]["relu10_mean"] for _, p in series],
                    yerr=[p["values"]["relu10_sd"] for _, p in series], marker="s", capsize=3, ls="--",
                    label="ours, ReLU-10")
        ax.axhspan(paper["mean"] - paper["sd"], paper["mean"] + paper["sd"], color="grey", alpha=0.3,
                   label="paper, ReLU-50 (mean ± sd)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel({"per_class_train": "training images per class"}.get(name, name))
    panels[0].set_ylabel(r"$\|[P_V, D^2]\|_F$")
    fig.legend(*panels[0].get_legend_handles_labels(), loc="outside upper center", ncols=3)
    fig.savefig(path)
    plt.close(fig)


def render(study: dict, figure_name: str) -> str:
    e4 = markdown_table(["setting", "ReLU-50 (orth), mean ± sd", "ReLU-10, mean ± sd", "ReLU-50 accuracy", "time (s)"],
                        e4_rows(study))
    e15 = markdown_table(["setting", "Level 3 Degenerate, CNN", "Level 3 Degenerate, Mixer", "min NC1, mean ± sd",
                          "ViT $\\delta_{gc}$ by activation, mean ± sd over seeds", "seeds"], e15_rows(study))
    trend = "\n".join(f"* {line}" for line in e4_trend(study)) or "* (no axis finished)"
    e15_lines = "\n".join(f"* {line}" for line in e15_trend(study))
    depth = "\n".join(f"* {line}" for line in depth_claim(study))
    failed = "".join(f"\n* not finished: {f['label']} ({f['error'][:120]})" for f in study["failed"])
    note = f" {study['note']}" if study.get("note") else ""
    return f"""Run {study['date']} on {study['machine']}, {study['wall_seconds']:.0f} s wall in all, by
`{study['command']}` (the data are in `book/scale-study/study.json`).{note}{failed}

```{{list-table}}
:header-rows: 0
* - **Paper's Table E.4, ReLU-50 (orth)**
  - {PAPER['table-e4']['mean']} ± {PAPER['table-e4']['sd']} (column A, 15 seeds, CIFAR-10)
* - **Paper's E.1.5 Level 3**
  - Degenerate in all {PAPER['e15']['degenerate']} rows
```

## Table E.4 along training length, width and data size

Ours on MNIST (the notebook's data set, not the paper's CIFAR-10); each row varies one setting from the
CI point (10 epochs, width 64, 500 training images per class).

{e4}

```{{figure}} {figure_name}
:name: fig-scale-study-e4

Table E.4's commutator $\\|[P_V,D^2]\\|_F$ of MLP-ReLU-50 (orth) (circles) and MLP-ReLU-10 (squares,
dashed), mean ± sd over the notebook's seeds, as one setting grows from the CI point (left: epochs;
middle: width; right: training images per class). Grey band: the paper's ReLU-50 value, mean ± sd.
```

Along each axis, from the CI point to the largest setting run (the paper's value is {PAPER['table-e4']['mean']}):

{trend}

The paper's depth claim (§7.1: the deeper model's obstruction is larger and more stable), tested as the
notebook tests it, at each setting:

{depth}

## E.1.5 Level-3 verdicts and the ViT gc values along training length

Ours on Fashion-MNIST (the notebook's data set, not the paper's CIFAR-10), three seeds per setting.

{e15}

{e15_lines}
"""


def fill_page(stage: Path) -> bool:
    """Fill the staged page from the staged study JSON (and draw its figure); False when there is none."""
    page, data = stage / PAGE, stage / STUDY_JSON
    if not page.exists():
        return False
    text = page.read_text()
    if MARKER not in text:
        raise SystemExit(f"{PAGE} lost its marker {MARKER!r}")
    if not data.exists():
        body = "```{note}\nThe scale study has not been run: `python tools/scale_study.py run`.\n```\n"
    else:
        study = json.loads(data.read_text())
        figure(study, page.parent / "scale-study" / "table-e4.png")
        body = render(study, "scale-study/table-e4.png")
    page.write_text(text.replace(MARKER, body))
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run")
    go.add_argument("--address")
    go.add_argument("--num-cpus", type=int)
    go.add_argument("--timeout", type=float, default=1800, help="seconds per point (default 1800)")
    go.add_argument("--levels", type=int, help="only the first N larger values of each axis (default: all)")
    go.add_argument("--retries", type=int, default=1)
    go.add_argument("--cache", type=Path, default=ray_runner.CACHE)
    go.add_argument("--note", help="a fact about the run that its numbers need (shown on the page), e.g. other load")
    page = sub.add_parser("page")
    page.add_argument("--stage", type=Path, default=build_book.STAGE)
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return run(args)
        return 0 if fill_page(args.stage) else 1
    except ray_runner.RunnerError as exc:
        print(f"scale_study: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
