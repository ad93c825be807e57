"""Tiny configurations of the transformers families flagcore reads (d = 64, 4 query heads, 2 key/value
heads where the family has grouped-query attention, 2 layers): each builds a randomly initialised model
in well under a second, from the family's own config class (nothing downloaded, no weights committed).

``FAMILIES``: name -> (model_type, config keyword arguments, expected layout, its stacks).
"""

from __future__ import annotations

import torch

D, H, KV, L, V = 64, 4, 2, 2, 96
_DEC = dict(
    vocab_size=V, hidden_size=D, num_attention_heads=H, num_key_value_heads=KV, num_hidden_layers=L,
    intermediate_size=96, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
_ENC = dict(
    vocab_size=V, hidden_size=D, num_attention_heads=H, num_hidden_layers=L, intermediate_size=96,
    max_position_embeddings=64, pad_token_id=0,
)
_VISION = dict(hidden_size=D, num_attention_heads=H, num_hidden_layers=L, intermediate_size=96, image_size=8, patch_size=4)
_MOE = dict(num_experts_per_tok=1, moe_intermediate_size=32)
_LATENT = dict(  # latent attention: every query head has its own key and value head
    _DEC, num_key_value_heads=H, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=2, first_k_dense_replace=1, **_MOE,
)
_SEQ2SEQ = dict(
    vocab_size=V, d_model=D, encoder_attention_heads=H, decoder_attention_heads=H, encoder_layers=L,
    decoder_layers=L, encoder_ffn_dim=96, decoder_ffn_dim=96, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    decoder_start_token_id=1,
)
_ONE = ("self",)

FAMILIES: dict[str, tuple[str, dict, str, tuple[str, ...]]] = {
    "bert": ("bert", _ENC, "bert", _ONE),
    "roberta": ("roberta", _ENC, "bert", _ONE),
    "xlm-roberta": ("xlm-roberta", _ENC, "bert", _ONE),
    "camembert": ("camembert", _ENC, "bert", _ONE),
    "electra": ("electra", dict(_ENC, embedding_size=D), "bert", _ONE),
    "gpt2": ("gpt2", dict(vocab_size=V, n_embd=D, n_head=H, n_layer=L, n_positions=64), "gpt2", _ONE),
    "gpt_neox": ("gpt_neox", _ENC, "gpt_neox", _ONE),
    "opt": ("opt", dict(_ENC, ffn_dim=96, word_embed_proj_dim=D), "opt", _ONE),
    **{t: (t, _DEC, "llama", _ONE) for t in (
        "llama", "mistral", "qwen2", "olmo", "olmo2", "smollm3", "starcoder2", "granite", "stablelm", "cohere",
    )},
    **{t: (t, dict(_DEC, head_dim=16), "llama", _ONE) for t in ("qwen3", "gemma", "gemma2", "gemma3_text", "gpt_oss")},
    "mixtral": ("mixtral", dict(_DEC, num_local_experts=2, num_experts_per_tok=1), "llama", _ONE),
    "qwen2_moe": ("qwen2_moe", dict(_DEC, num_experts=2, shared_expert_intermediate_size=32, **_MOE), "llama", _ONE),
    "qwen3_moe": ("qwen3_moe", dict(_DEC, num_experts=2, **_MOE), "llama", _ONE),
    "phi": ("phi", _ENC, "llama", _ONE),
    "phi3": ("phi3", _DEC, "phi3", _ONE),
    "gptj": ("gptj", dict(vocab_size=V, n_embd=D, n_head=H, n_layer=L, n_positions=64, rotary_dim=8), "gptj", _ONE),
    "gpt_neo": (
        "gpt_neo",
        dict(vocab_size=V, hidden_size=D, num_heads=H, num_layers=L, attention_types=[[["global", "local"], 1]],
             max_position_embeddings=64),
        "gpt_neo", _ONE,
    ),
    "distilbert": (
        "distilbert", dict(vocab_size=V, dim=D, n_heads=H, n_layers=L, hidden_dim=96, max_position_embeddings=64),
        "distilbert", _ONE,
    ),
    "deberta-v2": ("deberta-v2", _ENC, "deberta-v2", _ONE),
    "vit": ("vit", _VISION, "vit", _ONE),
    "bloom": ("bloom", dict(vocab_size=V, hidden_size=D, n_head=H, n_layer=L), "bloom", _ONE),
    "falcon": (  # Falcon 40B/180B style: grouped key/value heads
        "falcon",
        dict(vocab_size=V, hidden_size=D, num_attention_heads=H, num_kv_heads=KV, num_hidden_layers=L,
             new_decoder_architecture=True),
        "falcon", _ONE,
    ),
    "falcon-mqa": (  # Falcon 7B style: one key/value head
        "falcon", dict(vocab_size=V, hidden_size=D, num_attention_heads=H, num_hidden_layers=L, multi_query=True),
        "falcon", _ONE,
    ),
    "gpt_bigcode": (
        "gpt_bigcode", dict(vocab_size=V, n_embd=D, n_head=H, n_layer=L, n_positions=64, multi_query=True),
        "gpt_bigcode", _ONE,
    ),
    "codegen": (
        "codegen", dict(vocab_size=V, n_embd=D, n_head=H, n_layer=L, n_positions=64, rotary_dim=8, n_ctx=64),
        "codegen", _ONE,
    ),
    "mpt": ("mpt", dict(vocab_size=V, d_model=D, n_heads=H, n_layers=L, max_seq_len=64), "mpt", _ONE),
    "modernbert": ("modernbert", dict(_ENC, global_attn_every_n_layers=1), "modernbert", _ONE),
    "t5": (
        "t5", dict(vocab_size=V, d_model=D, d_kv=16, num_heads=H, num_layers=L, d_ff=96),
        "t5", ("encoder", "decoder", "cross"),
    ),
    "bart": ("bart", dict(_SEQ2SEQ, max_position_embeddings=64), "bart", ("encoder", "decoder", "cross")),
    "whisper": (
        "whisper", dict(_SEQ2SEQ, num_mel_bins=8, max_source_positions=8, max_target_positions=16),
        "bart", ("encoder", "decoder", "cross"),
    ),
    "clip": (
        "clip", dict(text_config=dict(_ENC), vision_config=dict(_VISION), projection_dim=16),
        "clip", ("text", "vision"),
    ),
    "gemma3": (
        "gemma3", dict(text_config=dict(_DEC, head_dim=16), vision_config=dict(_VISION), mm_tokens_per_image=4),
        "gemma3", ("text", "vision"),
    ),
    "albert": ("albert", dict(_ENC, embedding_size=32), "albert", _ONE),
    "jamba": (  # hybrid: attention in layers 1 and 3, Mamba blocks elsewhere
        "jamba",
        dict(_DEC, num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
             expert_layer_offset=1, num_experts=2, mamba_d_state=4, mamba_expand=2, use_mamba_kernels=False),
        "jamba", _ONE,
    ),
    "deepseek_v2": ("deepseek_v2", _LATENT, "deepseek", _ONE),
    "deepseek_v3": ("deepseek_v3", dict(_LATENT, n_group=1, topk_group=1), "deepseek", _ONE),
}

#: Families whose attention does not go through transformers' attention interface in transformers 5 (it is
#: written out inside the module): the forward-pass check uses its functional form (roles "qk" and "vo").
NOT_THROUGH_INTERFACE = {"gpt_neo", "deberta-v2", "bloom", "mpt"}


def build(family: str, seed: int = 0):
    """The tiny randomly initialised model of a family, in float32, in eval mode."""
    import transformers

    model_type, kwargs, _, _ = FAMILIES[family]
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    return transformers.AutoModel.from_config(config).eval()
