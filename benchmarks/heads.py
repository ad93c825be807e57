"""Head-overlap benchmarks, as ratios measured in one run (issue 5).

    python benchmarks/heads.py [--repeat 15] [--model minilm] [--no-loop] [--no-memory] [--json out.json]

Results go to ``_build/bench/heads.json`` unless ``--json`` names another file.

1. profile vs floor: a cold call of ``overlap_profile(model)`` (open the model's source, stream each layer's query
   weights from safetensors,
   upcast, orthonormalise every head by Cholesky QR, one Gram product) against the floor: reading the
   same query tensors once from the same safetensors files plus one Gram product per layer in the same
   precision (no orthonormalisation, which an exact R needs; ours forms only the Gram's block upper triangle, so
   large layers beat it). Target ratio <= 1.3 (issue 15).
   Timing: best of ``--repeat`` rounds, the two interleaved, CPU caches evicted before every timed call
   (:func:`interleaved_cold_best_of`); nothing is cached between calls of ``overlap_profile`` (the
   source is re-opened each time; the floor's key -> file map is built once, outside its timing). The
   earlier back-to-back protocol is also recorded (``warm_back_to_back``); it favours the floor.
   The orthonormalisation costs about 2/H of a Gram product, so the ratio falls with the head count
   H: MiniLM (H=12, d=384), SmolLM2 (H=9) and, when the memory case runs, 4 layers of the
   Llama-3.2-1B-shaped checkpoint (H=32).
2. batched vs naive: ``head_overlap`` on one layer against a Python loop over the H(H-1) ordered
   pairs calling ``frobenius_overlap`` (GPT-2 and Llama-3.2-1B shapes).
3. peak memory of the streamed path on a Llama-3.2-1B-shaped random bf16 checkpoint (2 safetensors
   shards, ~2.5 GB, written to a temporary directory under /tmp and deleted afterwards), measured in
   a fresh subprocess from /proc/self/status: the true peak (VmHWM) and, after each layer, anonymous
   (RssAnon) vs file-backed (RssFile) resident memory, against the size of one layer's query weight
   (fp32) and of one layer's attention weights. ``--memory-quick`` (the quick tier) writes 4 layers and
   a 32k vocabulary instead (~0.6 GB), so every build of the book has the per-layer trace.
   See :func:`streamed_peak_memory` for why
   ``ru_maxrss`` (the source of an earlier "1.6 GB" figure) is the wrong measure here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _timing import best_of, write_json  # noqa: E402  (sibling module; scripts run from benchmarks/)

from flagcore import frobenius_overlap
from flagcore.heads import head_overlap, overlap_profile
from flagcore.weights import open_source



def profile_vs_floor(model: str, repeat: int, layers: list[int] | None = None) -> dict:
    from safetensors import safe_open

    src = open_source(model)
    layers = src.layers if layers is None else layers
    keys = [src.key(layer, src.spelling.sources("q")[0]) for layer in layers]
    path = Path(src.name) if Path(src.name).is_dir() else None
    files = {}
    if path is None:  # an alias: find its directory through the source's own files
        from flagcore.weights import ALIASES, gguf_to_safetensors

        where = ALIASES[model][0]()
        path = gguf_to_safetensors(where) if where.suffix == ".gguf" else where
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                files[key] = file

    def floor():
        out = []
        for key in keys:
            with safe_open(files[key], framework="pt") as handle:
                W = handle.get_tensor(key).float()
            out.append(((W.T @ W) if W.shape[0] >= W.shape[1] else (W @ W.T)).square().sum())
        return out

    timed = interleaved_cold_best_of({"ours": lambda: overlap_profile(model, layers), "floor": floor}, repeat)
    ours, low = timed["ours"], timed["floor"]
    # the earlier protocol, for comparison: all runs of one, then all of the other, caches left warm
    warm_ours, warm_low = best_of(lambda: overlap_profile(model, layers), repeat), best_of(floor, repeat)
    return {"profile_s": ours, "floor_s": low, "ratio_x": ours / low, "layers": len(keys),
            "warm_back_to_back": {"profile_s": warm_ours, "floor_s": warm_low, "ratio_x": warm_ours / warm_low}}


_FLUSH = None


def _evict_cpu_caches(nbytes: int = 96 * 2**20) -> None:
    """Write a buffer three times the size of this machine's last-level cache (32 MiB here), so the next
    call starts with cold CPU caches (the OS page cache of the safetensors files stays warm)."""
    global _FLUSH
    if _FLUSH is None or _FLUSH.numel() * 4 < nbytes:
        _FLUSH = torch.empty(nbytes // 4, dtype=torch.float32)
    _FLUSH.fill_(1.0)


def interleaved_cold_best_of(fns: dict, repeat: int) -> dict:
    """Best wall time of each function over ``repeat`` rounds, measured fairly.

    One untimed warm-up call of each; then each round calls every function once, in turn, each after
    evicting the CPU caches. So every timed call is a cold call (inputs re-read from the safetensors
    files, whose pages are in the OS page cache, through cold CPU caches), and all functions see the
    same machine state and the same background load. Timing one function back to back instead
    (:func:`best_of`) flatters whichever has the smaller working set: the floor's query weights
    (3.5 MB for MiniLM) stay in the 32 MiB L3 cache between its runs.
    """
    best = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeat):
        for name, fn in fns.items():
            _evict_cpu_caches()
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def batched_vs_loop(H: int, d: int, d_k: int, repeat: int) -> dict:
    g = torch.Generator().manual_seed(0)
    W = 0.02 * torch.randn(H, d, d_k, generator=g)
    batched = best_of(lambda: head_overlap(W), repeat)

    def loop():
        total = sum(frobenius_overlap(W[i], W[j]) for i in range(H) for j in range(H) if i != j)
        return total / (H * (H - 1) * d_k)

    start = time.perf_counter()  # one timed pass: the loop is slow enough that warm-up noise is negligible
    looped = loop()
    naive = time.perf_counter() - start
    assert abs(float(looped) - float(head_overlap(W))) < 1e-4
    return {"batched_s": batched, "loop_s": naive, "speedup_x": naive / batched}


LLAMA_1B = dict(d=2048, H=32, H_kv=8, d_k=64, layers=16, ffn=8192, vocab=128256)


#: The quick tier's checkpoint: the same layer shapes, 4 layers and a 32k vocabulary (about 0.6 GB, not 2.5 GB).
QUICK_LAYERS, QUICK_VOCAB = 4, 32000


def write_llama_1b(root: Path, layers: int | None = None, vocab: int | None = None) -> tuple[int, int]:
    """Random Llama-3.2-1B-shaped bf16 checkpoint in two shards; returns (bytes on disk, attention bytes of one layer).

    ``layers`` / ``vocab``: fewer layers or a smaller vocabulary (the quick tier) with the same layer shapes."""
    c = LLAMA_1B
    d, H, H_kv, dk = c["d"], c["H"], c["H_kv"], c["d_k"]
    n_layers, n_vocab = layers or c["layers"], vocab or c["vocab"]
    g = torch.Generator().manual_seed(0)
    (root / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": d, "num_attention_heads": H, "num_key_value_heads": H_kv,
        "num_hidden_layers": n_layers, "intermediate_size": c["ffn"], "vocab_size": n_vocab,
    }))
    from safetensors.torch import save_file

    index, total, one_layer = {}, 0, 0
    half = (n_layers + 1) // 2
    shards = [list(range(0, half)), list(range(half, n_layers))]
    for s, layers in enumerate(shards):
        tensors = {}
        if s == 0:
            tensors["model.embed_tokens.weight"] = torch.zeros(n_vocab, d, dtype=torch.bfloat16)
        for i in layers:
            p = f"model.layers.{i}."
            for name, shape in [("q_proj", (H * dk, d)), ("k_proj", (H_kv * dk, d)), ("v_proj", (H_kv * dk, d)), ("o_proj", (d, H * dk))]:
                tensors[p + f"self_attn.{name}.weight"] = (0.02 * torch.randn(*shape, generator=g)).bfloat16()
            for name, shape in [("gate_proj", (c["ffn"], d)), ("up_proj", (c["ffn"], d)), ("down_proj", (d, c["ffn"]))]:
                tensors[p + f"mlp.{name}.weight"] = torch.zeros(*shape, dtype=torch.bfloat16)
            tensors[p + "input_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
        fname = f"model-{s + 1:05d}-of-00002.safetensors"
        save_file(tensors, str(root / fname))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        index.update({k: fname for k in tensors})
        one_layer = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(f"model.layers.{layers[0]}.self_attn"))
        del tensors
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    return total, one_layer


_CHILD = """
import json, resource, sys, torch
from flagcore.heads import overlap_profile
from flagcore.weights import open_source

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}  # KiB

src = open_source(sys.argv[1])
torch.zeros(1) @ torch.zeros(1, 1)
before = status()
peak = dict(before)

trace = []  # after each layer: its index and the resident set (KiB)

def sampled(it):
    for layer, W in it:
        now = status()
        for k in peak:
            peak[k] = max(peak[k], now[k])
        trace.append(dict(layer=layer, **now))
        yield layer, W

p = overlap_profile(src, progress=sampled)
after = status()
for k in peak:
    peak[k] = max(peak[k], after[k])
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; inherits the parent's high-water mark (see above)
print(json.dumps({"before": before, "peak": peak, "ru_maxrss": maxrss, "R": p.R, "d_k": p.d_k,
                  "baseline": p.baseline.mean, "trace": trace}))
"""


def streamed_peak_memory(root: Path, total: int, layer_attn: int, written: float) -> dict:
    """Run the streamed profile in a fresh interpreter and read its memory from /proc/self/status.

    VmHWM is the kernel's true peak resident set of the child (every transient allocation counted);
    RssAnon / RssFile split the resident set into anonymous memory (tensors) and file-backed pages
    (the safetensors mmap, shared libraries), sampled after each layer. ``ru_maxrss`` is printed for
    comparison only: for a process started by fork/vfork + exec, Linux folds the parent's high-water
    mark at the time of the exec into the child's ``ru_maxrss`` (``setmax_mm_hiwater_rss`` in exec),
    so a child launched by a parent that had just built the 1.5 GB first shard reports ~1.6 GB there
    although it never held more than a few hundred MB. That was the "unexplained ~1.6 GB peak".
    """
    run = subprocess.run([sys.executable, "-c", _CHILD, str(root)], capture_output=True, text=True, check=True)
    out = json.loads(run.stdout)
    c = LLAMA_1B
    q_fp32 = c["H"] * c["d_k"] * c["d"] * 4
    kib = 1024
    hwm_growth = (out["peak"]["VmHWM"] - out["before"]["VmRSS"]) * kib
    anon_growth = (out["peak"]["RssAnon"] - out["before"]["RssAnon"]) * kib
    file_growth = (out["peak"]["RssFile"] - out["before"]["RssFile"]) * kib
    parent = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {
        "checkpoint_bytes": total, "write_s": written,
        "child_rss_before_bytes": out["before"]["VmRSS"] * kib,
        "peak_growth_bytes": hwm_growth, "anon_growth_sampled_bytes": anon_growth, "file_mapped_growth_sampled_bytes": file_growth,
        "child_ru_maxrss_bytes": out["ru_maxrss"] * kib, "child_vmhwm_bytes": out["peak"]["VmHWM"] * kib,
        "parent_vmhwm_bytes": int(parent["VmHWM"].split()[0]) * kib,
        "one_layer_query_fp32_bytes": q_fp32, "one_layer_attention_bf16_bytes": layer_attn,
        "peak_over_one_layer_query_x": hwm_growth / q_fp32, "peak_over_checkpoint": hwm_growth / total,
        "mean_R": sum(out["R"]) / len(out["R"]), "baseline": out["baseline"],
        # per layer, growth over the resident set before the profile (bytes): the figure on the performance page
        "trace": [{"layer": t["layer"],
                   **{f"{k}_growth_bytes": (t[k] - out["before"][k]) * kib for k in ("VmHWM", "RssAnon", "RssFile")}}
                  for t in out["trace"]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=15,
                        help="timed runs per case after one warm-up; the minimum is reported (default 15: on a shared "
                             "2-core machine the best of 3 still varied by ~20%%)")
    parser.add_argument("--model", action="append", help="models for the profile-vs-floor case (default: minilm, smollm2)")
    parser.add_argument("--no-loop", action="store_true", help="skip the (slow) naive pair-loop case")
    parser.add_argument("--no-memory", action="store_true", help="skip the 2.5 GB synthetic Llama-3.2-1B-shaped checkpoint")
    parser.add_argument("--memory-quick", action="store_true",
                        help=f"the memory case on {QUICK_LAYERS} layers and a {QUICK_VOCAB} vocabulary (about 0.6 GB)")
    parser.add_argument("--json", default=str(Path(__file__).resolve().parents[1] / "_build" / "bench" / "heads.json"),
                        help="write the results here (default: _build/bench/heads.json; '' to skip)")
    args = parser.parse_args()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    print(f"machine: {machine}")
    results: dict = {"machine": machine, "cases": {}}
    mib = 2**20

    def show_profile(name, row):
        print(f"profile {name:<22} {row['layers']:>3} layers: {row['profile_s'] * 1e3:8.1f} ms vs floor {row['floor_s'] * 1e3:8.1f} ms "
              f"-> ratio {row['ratio_x']:.2f}x (target <= 1.3x; cold, interleaved); back to back, warm: "
              f"{row['warm_back_to_back']['ratio_x']:.2f}x")

    for model in [] if args.model == ["none"] else args.model or ["minilm", "smollm2"]:
        row = profile_vs_floor(model, args.repeat)
        results["cases"][f"profile {model}"] = row
        show_profile(model, row)
    for H, d, dk in [(12, 768, 64), (32, 2048, 64)] if not args.no_loop else []:
        row = batched_vs_loop(H, d, dk, args.repeat)
        results["cases"][f"head_overlap H={H} d={d} d_k={dk}"] = row
        print(f"head_overlap H={H:>2} d={d:>4} d_k={dk}: batched {row['batched_s'] * 1e3:7.1f} ms, pair loop {row['loop_s'] * 1e3:8.1f} ms -> {row['speedup_x']:.1f}x")
    if not args.no_memory:
        root = Path(tempfile.mkdtemp(prefix="flagcore-llama1b-", dir="/tmp"))
        try:
            start = time.perf_counter()
            quick = (QUICK_LAYERS, QUICK_VOCAB) if args.memory_quick else (None, None)
            total, layer_attn = write_llama_1b(root, *quick)
            written = time.perf_counter() - start
            row = streamed_peak_memory(root, total, layer_attn, written)
            shape = f", {QUICK_LAYERS} layers, {QUICK_VOCAB} vocabulary" if args.memory_quick else ""
            results["cases"][f"streamed peak memory, Llama-3.2-1B-shaped{shape}"] = row
            print(f"streamed Llama-3.2-1B-shaped checkpoint ({row['checkpoint_bytes'] / mib:.0f} MiB bf16, written in {row['write_s']:.0f} s), in a fresh process "
                  f"({row['child_rss_before_bytes'] / mib:.0f} MiB resident before): true peak (VmHWM) +{row['peak_growth_bytes'] / mib:.0f} MiB "
                  f"= {row['peak_over_one_layer_query_x']:.1f}x one layer's fp32 query ({row['one_layer_query_fp32_bytes'] / mib:.0f} MiB), "
                  f"{100 * row['peak_over_checkpoint']:.1f}% of the checkpoint; sampled after each layer: anonymous (RssAnon) "
                  f"+{row['anon_growth_sampled_bytes'] / mib:.0f} MiB, file-backed (RssFile) +{row['file_mapped_growth_sampled_bytes'] / mib:.0f} MiB")
            print(f"  ru_maxrss of that child: {row['child_ru_maxrss_bytes'] / mib:.0f} MiB vs its own VmHWM {row['child_vmhwm_bytes'] / mib:.0f} MiB "
                  f"(the parent's high-water mark, {row['parent_vmhwm_bytes'] / mib:.0f} MiB from writing the checkpoint, leaks into the child's "
                  f"ru_maxrss at exec); mean R {row['mean_R']:.4f} vs d_k/d {row['baseline']:.4f}")
            row = profile_vs_floor(str(root), max(1, args.repeat // 3), layers=[0, 1, 2, 3])
            results["cases"]["profile Llama-3.2-1B-shaped (bf16, layers 0-3)"] = row
            show_profile("llama-1b-shaped (4 lay.)", row)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_json(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
