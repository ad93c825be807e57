"""Head-overlap benchmarks, as ratios measured in one run (issue 5).

    python benchmarks/heads.py [--repeat 3] [--model minilm] [--no-memory] [--json out.json]

1. profile vs floor: ``overlap_profile(model)`` (stream each layer's query weights from safetensors,
   upcast, orthonormalise every head, one Gram product) against the floor: reading the same query
   tensors once from the same safetensors files plus one Gram product per layer (no orthonormalisation:
   the least work any exact method must do). Target ratio <= 1.5.
2. batched vs naive: ``head_overlap`` on one layer against a Python loop over the H(H-1) ordered
   pairs calling ``frobenius_overlap`` (GPT-2 and Llama-3.2-1B shapes).
3. peak memory of the streamed path on a Llama-3.2-1B-shaped random bf16 checkpoint (2 safetensors
   shards, ~2.5 GB, written to a temporary directory under /tmp and deleted afterwards), measured in
   a fresh subprocess as the growth of its peak RSS, against the size of one layer's query weight
   (fp32) and of one layer's attention weights.
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



def profile_vs_floor(model: str, repeat: int) -> dict:
    from safetensors import safe_open

    src = open_source(model)
    keys = [src.key(layer, "qkv" if "qkv" in src.layout.tensors else "q") for layer in src.layers]
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

    ours = best_of(lambda: overlap_profile(model), repeat)
    low = best_of(floor, repeat)
    return {"profile_s": ours, "floor_s": low, "ratio_x": ours / low, "layers": len(keys)}


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


def write_llama_1b(root: Path) -> tuple[int, int]:
    """Random Llama-3.2-1B-shaped bf16 checkpoint in two shards; returns (bytes on disk, attention bytes of one layer)."""
    c = LLAMA_1B
    d, H, H_kv, dk = c["d"], c["H"], c["H_kv"], c["d_k"]
    g = torch.Generator().manual_seed(0)
    (root / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": d, "num_attention_heads": H, "num_key_value_heads": H_kv,
        "num_hidden_layers": c["layers"], "intermediate_size": c["ffn"], "vocab_size": c["vocab"],
    }))
    from safetensors.torch import save_file

    index, total, one_layer = {}, 0, 0
    shards = [list(range(0, 8)), list(range(8, 16))]
    for s, layers in enumerate(shards):
        tensors = {}
        if s == 0:
            tensors["model.embed_tokens.weight"] = torch.zeros(c["vocab"], d, dtype=torch.bfloat16)
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
import json, os, resource, sys, torch
from flagcore.heads import overlap_profile
from flagcore.weights import open_source

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) for k in ("RssAnon", "RssFile")}  # KiB

src = open_source(sys.argv[1])
torch.zeros(1) @ torch.zeros(1, 1)
before = status()
peak = dict(before)

def sampled(it):
    for item in it:
        now = status()
        for k in peak:
            peak[k] = max(peak[k], now[k])
        yield item

p = overlap_profile(src, progress=sampled)
print(json.dumps({"before": before, "peak": peak, "R": p.R, "d_k": p.d_k, "baseline": p.baseline.mean}))
"""


def streamed_peak_memory() -> dict:
    root = Path(tempfile.mkdtemp(prefix="flagcore-llama1b-", dir="/tmp"))
    try:
        start = time.perf_counter()
        total, layer_attn = write_llama_1b(root)
        written = time.perf_counter() - start
        run = subprocess.run([sys.executable, "-c", _CHILD, str(root)], capture_output=True, text=True, check=True)
        out = json.loads(run.stdout)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    c = LLAMA_1B
    q_fp32 = c["H"] * c["d_k"] * c["d"] * 4
    growth = (out["peak"]["RssAnon"] - out["before"]["RssAnon"]) * 1024
    file_growth = (out["peak"]["RssFile"] - out["before"]["RssFile"]) * 1024
    return {
        "checkpoint_bytes": total, "write_s": written, "peak_growth_bytes": growth, "file_mapped_growth_bytes": file_growth,
        "one_layer_query_fp32_bytes": q_fp32, "one_layer_attention_bf16_bytes": layer_attn,
        "peak_over_one_layer_query_x": growth / q_fp32, "peak_over_checkpoint": growth / total,
        "mean_R": sum(out["R"]) / len(out["R"]), "baseline": out["baseline"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--model", action="append", help="models for the profile-vs-floor case (default: minilm, smollm2)")
    parser.add_argument("--no-loop", action="store_true", help="skip the (slow) naive pair-loop case")
    parser.add_argument("--no-memory", action="store_true", help="skip the 2.5 GB synthetic checkpoint")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    print(f"machine: {machine}")
    results: dict = {"machine": machine, "cases": {}}
    for model in [] if args.model == ["none"] else args.model or ["minilm", "smollm2"]:
        row = profile_vs_floor(model, args.repeat)
        results["cases"][f"profile {model}"] = row
        print(f"profile {model:<10} {row['layers']:>3} layers: {row['profile_s'] * 1e3:8.1f} ms vs floor {row['floor_s'] * 1e3:8.1f} ms -> ratio {row['ratio_x']:.2f}x (target <= 1.5x)")
    for H, d, dk in [(12, 768, 64), (32, 2048, 64)] if not args.no_loop else []:
        row = batched_vs_loop(H, d, dk, args.repeat)
        results["cases"][f"head_overlap H={H} d={d} d_k={dk}"] = row
        print(f"head_overlap H={H:>2} d={d:>4} d_k={dk}: batched {row['batched_s'] * 1e3:7.1f} ms, pair loop {row['loop_s'] * 1e3:8.1f} ms -> {row['speedup_x']:.1f}x")
    if not args.no_memory:
        row = streamed_peak_memory()
        results["cases"]["streamed peak memory, Llama-3.2-1B-shaped"] = row
        mib = 2**20
        print(f"streamed Llama-3.2-1B-shaped checkpoint ({row['checkpoint_bytes'] / mib:.0f} MiB bf16, written in {row['write_s']:.0f} s): "
              f"peak anonymous RSS growth {row['peak_growth_bytes'] / mib:.1f} MiB (mapped file pages +{row['file_mapped_growth_bytes'] / mib:.0f} MiB) = {row['peak_over_one_layer_query_x']:.1f}x one layer's fp32 query "
              f"({row['one_layer_query_fp32_bytes'] / mib:.0f} MiB; one layer's bf16 attention {row['one_layer_attention_bf16_bytes'] / mib:.0f} MiB), "
              f"{100 * row['peak_over_checkpoint']:.1f}% of the checkpoint; mean R {row['mean_R']:.4f} vs d_k/d {row['baseline']:.4f}")
    write_json(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
