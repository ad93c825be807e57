"""Every built-in layout against the model's own forward pass (flagcore.layout_check), on tiny random
models of each family (tests/families.py), with negative controls; directory and loaded-model paths agree."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

from families import FAMILIES, NOT_THROUGH_INTERFACE, build  # noqa: E402

from flagcore.layout_check import verify_layout  # noqa: E402
from flagcore.layouts import SPLITS, Layout, layout_from_dict, split_fused_rows, split_interleaved  # noqa: E402
from flagcore.weights import LAYOUTS, layer_heads, open_source  # noqa: E402

transformers.logging.set_verbosity_error()
VERIFIABLE = sorted(FAMILIES)


def _stack_inputs(model, family, stack):
    """Inputs that reach a stack the automatic ones do not: Gemma 3's vision tower needs images in the text."""
    if (family, stack) != ("gemma3", "vision"):
        return None
    cfg = model.config
    n_images = math.ceil(2 * (cfg.vision_config.hidden_size + 1) / 4)  # 4 patches per image
    ids = torch.full((n_images, cfg.mm_tokens_per_image), cfg.image_token_id)
    pixels = torch.randn(n_images, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "pixel_values": pixels, "use_cache": False}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param, build(request.param)


def test_family_reads_through_its_layout_and_the_forward_pass_confirms_it(family):
    name, model = family
    _, _, layout_name, stacks = FAMILIES[name]
    for stack in stacks:
        src = open_source(model, stack=stack)
        assert (src.layout.name, src.stack) == (layout_name, stack)
        assert src.stacks == list(stacks)
        check = verify_layout(model, src, inputs=_stack_inputs(model, name, stack))
        assert check.status == "verified", [r for r in check.rows if r.status != "verified"]
        functional = name in NOT_THROUGH_INTERFACE  # the per-head q.k and v-o maps from the softmax
        assert {r.role for r in check.rows} == ({"qk", "vo"} if functional else {"q", "k", "v", "o"})
        assert {r.layer for r in check.rows} == set(src.layers[:1] if src.shared else src.layers)
        assert check.margin > 10 and check.n_tokens >= 2 * (src.dims.d + 1)


def _rolled(layout: Layout) -> Layout:
    """Negative control: the same tensors with the query heads and output heads rotated by one."""

    def wrap(split):
        def rolled(t, dims):
            out = split(t, dims)
            return {r: (W.roll(1, dims=0) if r in ("q", "o") else W) for r, W in out.items()}

        return rolled

    return dataclasses.replace(layout, stacks=tuple(dataclasses.replace(s, split=wrap(s.split)) for s in layout.stacks))


_WRONG_FUSION = {split_interleaved: split_fused_rows, split_fused_rows: split_interleaved}


def _wrong_fusion(layout: Layout) -> Layout | None:
    """Negative control for fused layouts: the fused matrix cut in the other common order."""
    if not any(s.split in _WRONG_FUSION for s in layout.stacks):
        return None
    stacks = tuple(dataclasses.replace(s, split=_WRONG_FUSION.get(s.split, s.split)) for s in layout.stacks)
    return dataclasses.replace(layout, stacks=stacks)


@pytest.mark.parametrize("name", VERIFIABLE)
def test_a_mis_cut_layout_fails_the_same_check(name):
    model = build(name)
    _, _, layout_name, stacks = FAMILIES[name]
    layout = LAYOUTS[model.config.model_type]
    controls = [_rolled(layout)] + ([_wrong_fusion(layout)] if _wrong_fusion(layout) else [])
    for control in controls:
        for stack in stacks:
            try:
                check = verify_layout(model, layout=control, stack=stack, inputs=_stack_inputs(model, name, stack))
            except ValueError:  # a cut whose shapes do not even fit is caught before the check
                continue
            assert check.status == "failed", (control, stack)
            assert check.sin_max > 0.1


def test_gpt_neox_cut_as_stacked_qkv_fails():
    """The issue's example: NeoX's fused matrix read as [q; k; v] instead of per-head [q_h; k_h; v_h]
    moves R by less than the Haar noise, but the forward-pass check sees it at once."""
    model = build("gpt_neox")
    wrong = Layout("neox-stacked", (), "layers.{layer}.attention.", {"qkv": "query_key_value.weight", "o": "dense.weight"}, split_fused_rows)
    check = verify_layout(model, layout=wrong)
    assert check.status == "failed" and min(r.sin_max for r in check.rows if r.role == "q") > 0.5
    assert verify_layout(model).status == "verified"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_directory_and_loaded_model_give_identical_heads(name, tmp_path):
    model = build(name)
    model.save_pretrained(tmp_path)
    for stack in FAMILIES[name][3]:
        loaded, saved = open_source(model, stack=stack), open_source(tmp_path, stack=stack)
        assert (loaded.layout.name, loaded.layers, loaded.dims) == (saved.layout.name, saved.layers, saved.dims)
        for layer in loaded.layers:
            a, b = layer_heads(loaded, layer), layer_heads(saved, layer)
            for role in a:
                assert torch.equal(a[role], b[role]), (stack, layer, role)


def test_a_layout_check_on_degenerate_heads_is_not_run():
    """One head as wide as the residual stream: every subspace is R^d, so nothing can be told apart."""
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, num_attention_heads=1, num_key_value_heads=1, num_hidden_layers=1,
        intermediate_size=16, head_dim=16,
    )
    check = verify_layout(transformers.LlamaModel(config))
    assert check.status == "not run" and "every head spans" in check.rows[0].reason


def test_jamba_attention_sits_in_some_layers_only():
    model = build("jamba")
    src = open_source(model)
    assert src.layers == [1, 3] and src.dims.n_layers == 4
    assert verify_layout(model).status == "verified"


def test_albert_shares_one_layer_across_depth():
    model = build("albert")
    src = open_source(model)
    assert src.shared and src.layers == [0, 1]
    assert src.key(0, "q") == src.key(1, "q")


def test_latent_heads_are_low_rank_and_read_as_the_model_applies_them():
    """DeepSeek: each query head reads from a subspace of the row space of q_a (rank q_lora_rank = 32)."""
    model = build("deepseek_v3")
    heads = layer_heads(open_source(model), 0)
    assert heads["q"].shape == (4, 64, 24) and heads["k"].shape == (4, 64, 24) and heads["v"].shape == (4, 64, 16)
    all_q = heads["q"].transpose(0, 1).reshape(64, -1)
    assert int(torch.linalg.matrix_rank(all_q)) == 32


def test_auto_detection_of_an_unknown_model_type(tmp_path):
    """A renamed model_type with Llama's keys is recognised from its keys and shapes; with keys nothing
    fits, the error lists the attention keys found and the closest layout."""
    model = build("llama")
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "model_type": "my_llama_variant"}))
    src = open_source(tmp_path / "m")
    assert src.layout.name == "llama" and "auto-detected" in src.layout_how
    reference = open_source(model)
    assert torch.equal(layer_heads(src, 1)["q"], layer_heads(reference, 1)["q"])
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    renamed = {k.replace("q_proj", "query_projection"): v for k, v in state.items()}
    save_file(renamed, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        open_source(tmp_path / "m")
    msg = str(err.value)
    assert "query_projection" in msg and "closest built-in layout is 'llama'" in msg and "register_layout" in msg


def test_layout_from_json_matches_the_built_in_one():
    spec = json.loads(json.dumps({
        "name": "neox-from-json", "model_types": [], "layer": "layers.{layer}.attention.",
        "tensors": {"qkv": "query_key_value.weight", "o": "dense.weight"}, "split": "interleaved",
    }))
    layout = layout_from_dict(spec)
    model = build("gpt_neox")
    assert verify_layout(model, layout=layout).status == "verified"
    with pytest.raises(ValueError, match="unknown split"):
        layout_from_dict({**spec, "split": "diagonal"})
    assert set(SPLITS) >= {"linear", "fused_rows", "interleaved", "grouped", "codegen", "conv1d", "latent"}


def test_forty_families_at_least():
    assert len(VERIFIABLE) >= 40


CLI_SECONDS: dict[str, float] = {}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_cli_reads_every_stack_of_every_family(name, tmp_path, capsys):
    """`python -m flagcore heads DIR --stack S --roles q k v o --json` on the saved tiny model: the rows
    equal the library's overlaps of the loaded model (float64), for every stack; CSV has the same rows."""
    from flagcore.cli import main
    from flagcore.heads import head_overlap

    model = build(name)
    model.save_pretrained(tmp_path)
    for stack in FAMILIES[name][3]:
        start = time.perf_counter()
        assert main(["heads", str(tmp_path), "--stack", stack, "--roles", "q", "k", "v", "o", "--json", "--float64"]) == 0
        CLI_SECONDS[f"{name}/{stack}"] = time.perf_counter() - start
        out = json.loads(capsys.readouterr().out)
        assert (out["layout"], out["stack"]) == (FAMILIES[name][2], stack)
        src = open_source(model, stack=stack)
        for row in out["rows"]:
            W = layer_heads(src, row["layer"], (row["role"],), dtype=torch.float64)[row["role"]]
            if W.shape[0] < 2:
                assert row["R"] is None and row["status"].startswith("not run")
            else:
                assert row["R"] == pytest.approx(float(head_overlap(W)), abs=1e-12)
        assert main(["heads", str(tmp_path), "--stack", stack, "--format", "csv"]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 1 + len(src.layers)


def test_per_layer_head_counts(tmp_path):
    """Sizes that vary with depth (OpenELM-style lists in the config): each layer is cut with its own H, H_kv."""
    from safetensors.torch import save_file

    from flagcore.layouts import Stack
    from flagcore.weights import register_layout

    g = torch.Generator().manual_seed(0)
    d, d_head, counts = 32, 8, [(2, 1), (4, 2)]
    tensors = {}
    for layer, (H, H_kv) in enumerate(counts):
        for role, n in (("q", H), ("k", H_kv), ("v", H_kv)):
            tensors[f"blocks.{layer}.attn.w{role}.weight"] = torch.randn(n * d_head, d, generator=g)
        tensors[f"blocks.{layer}.attn.wo.weight"] = torch.randn(d, H * d_head, generator=g)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config = {"model_type": "varying_heads", "model_dim": d, "num_query_heads": [2, 4], "num_kv_heads": [1, 2], "num_transformer_layers": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    register_layout(Layout("varying", ("varying_heads",), stacks=(Stack("self", "blocks.{layer}.attn.", {r: f"w{r}.weight" for r in "qkvo"}),)))
    try:
        src = open_source(tmp_path)
        for layer, (H, H_kv) in enumerate(counts):
            heads = layer_heads(src, layer)
            assert heads["q"].shape == (H, d, d_head) and heads["k"].shape == (H_kv, d, d_head)
            assert torch.equal(heads["q"][1], tensors[f"blocks.{layer}.attn.wq.weight"][d_head : 2 * d_head].T)
    finally:
        LAYOUTS.pop("varying_heads")
    with pytest.raises(ValueError, match="per-layer head counts for 2 layers, config says 3"):
        Stack("self", "b.{layer}.", {"q": "q"}).dims({**config, "num_transformer_layers": 3})


def test_a_sharded_checkpoint_is_fetched_only_where_it_is_read(tmp_path):
    """The Hub reader's path (an index, then each shard on first read): reading layer 0's query heads of
    a model saved in many shards fetches the shards holding them, not the others."""
    import flagcore.weights as weights
    from flagcore.checkpoints import LocalFileRanges

    model = build("llama")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) > 4
    fetched = []

    def fetch(filename):
        fetched.append(filename)
        return LocalFileRanges(tmp_path / filename)

    config = json.loads((tmp_path / "config.json").read_text())
    src = weights._safetensors_source("sharded", config, fetch, [], index)
    assert fetched == []  # opening reads the index only
    heads = layer_heads(src, 0, ("q",))
    assert set(fetched) == {index[src.key(0, "q")]} and len(set(fetched)) < len(shards)
    assert torch.equal(heads["q"], layer_heads(open_source(model), 0, ("q",))["q"])


@pytest.mark.parametrize("name", ["gpt2", "bert", "opt", "bart"])
def test_the_functional_check_agrees_where_both_apply(name):
    """Families without rotary embeddings, run with eager attention: the functional check (softmax logits
    and the output projection) verifies the same layouts as the interface probe; with rotary embeddings
    (Llama) the logits of two tokens depend on their positions, so it fails: the reason it is used only
    when the probe is never reached."""
    model = build(name)
    model.set_attn_implementation("eager")
    assert verify_layout(model, method="functional").status == "verified"
    assert verify_layout(model, method="interface").status == "verified"
    assert verify_layout(model, layout=_rolled(LAYOUTS[model.config.model_type]), method="functional").status == "failed"
    llama = build("llama")
    llama.set_attn_implementation("eager")
    assert verify_layout(llama, method="functional").status == "failed"
    with pytest.raises(ValueError, match="method must be"):
        verify_layout(model, method="guess")


def test_cli_uses_the_factorisation_null_for_latent_heads(tmp_path, capsys):
    """DeepSeek's tiny query heads sit far above d_k/d = 0.375 by construction (rank-32 space in R^64):
    against the null of their factorisation a random model is unremarkable (|z| < 5)."""
    from flagcore.cli import main

    build("deepseek_v3").save_pretrained(tmp_path)
    assert main(["heads", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["null"].startswith("layout Monte Carlo")
    for row in out["rows"]:
        assert row["baseline"] > 0.375 + 0.3 and abs(row["z"]) < 5


def test_cli_verify_and_layouts(tmp_path, capsys):
    """`python -m flagcore verify DIR` loads the model and checks its layout (exit 0); a JSON layout file that
    cuts the fused matrix in the wrong order fails (exit 1); `layouts --json` lists every built-in model type."""
    from flagcore.cli import main

    build("gpt_neox").save_pretrained(tmp_path / "m")
    assert main(["verify", str(tmp_path / "m"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "verified" and out["layout"] == "gpt_neox" and len(out["rows"]) == 8
    wrong = {"name": "neox-stacked", "model_types": [], "layer": "layers.{layer}.attention.",
             "tensors": {"qkv": "query_key_value.weight", "o": "dense.weight"}, "split": "fused_rows"}
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    assert main(["verify", str(tmp_path / "m"), "--layout", str(tmp_path / "wrong.json")]) == 1
    assert "failed" in capsys.readouterr().out
    assert main(["heads", str(tmp_path / "m"), "--layout", str(tmp_path / "wrong.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layout"] == "neox-stacked"
    assert main(["layouts", "--json"]) == 0
    types = {t for row in json.loads(capsys.readouterr().out) for t in row["model_types"]}
    assert {FAMILIES[name][0] for name in FAMILIES} <= types
