"""Tiny random configs of every decoder-only family `parts` is tested on (tests/test_families.py).

Each is the smallest config of its family that keeps the family's features on: post-norms, soft-caps,
multipliers, experts (4, 2 chosen), parallel blocks, biases. Set apart from the tests so the README
table script (scripts/family_table.py) reads the same list.
"""

from __future__ import annotations

from typing import Any

# family -> (transformers config class name, example models, config keywords)
COMMON: dict[str, Any] = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0)
KV = dict(num_key_value_heads=2)
MOE = dict(num_experts=4, num_experts_per_tok=2)
LOCAL_MOE = dict(num_local_experts=4, num_experts_per_tok=2)
GRANITE = dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=2.0)

FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "Llama 2/3, SmolLM2", {**COMMON, **KV}),
    "mistral": ("MistralConfig", "Mistral 7B", {**COMMON, **KV}),
    "mixtral": ("MixtralConfig", "Mixtral 8x7B", {**COMMON, **KV, **LOCAL_MOE}),
    "qwen2": ("Qwen2Config", "Qwen 2 / 2.5", {**COMMON, **KV}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen1.5-MoE, Qwen2-MoE", {**COMMON, **KV, **MOE, "moe_intermediate_size": 24,
                                                               "shared_expert_intermediate_size": 40}),
    "qwen3": ("Qwen3Config", "Qwen 3", {**COMMON, **KV, "head_dim": 8}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen 3 MoE", {**COMMON, **KV, **MOE, "head_dim": 8, "moe_intermediate_size": 24}),
    "gemma": ("GemmaConfig", "Gemma 1", {**COMMON, **KV, "head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma 2", {**COMMON, **KV, "head_dim": 8, "query_pre_attn_scalar": 8,
                                           "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0,
                                           "sliding_window": 4}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma 3 (text)", {**COMMON, **KV, "head_dim": 8, "query_pre_attn_scalar": 8,
                                                           "sliding_window": 4}),
    "phi": ("PhiConfig", "Phi-1.5, Phi-2", dict(COMMON)),
    "phi3": ("Phi3Config", "Phi-3, Phi-4", {**COMMON, **KV}),
    "olmo": ("OlmoConfig", "OLMo", {**COMMON, **KV}),
    "olmo2": ("Olmo2Config", "OLMo 2", {**COMMON, **KV}),
    "olmoe": ("OlmoeConfig", "OLMoE", {**COMMON, **KV, **MOE}),
    "gpt2": ("GPT2Config", "GPT-2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, tie_word_embeddings=False)),
    "gptj": ("GPTJConfig", "GPT-J", dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, rotary_dim=4,
                                        tie_word_embeddings=False)),
    "gpt_neox": ("GPTNeoXConfig", "Pythia, GPT-NeoX", dict(COMMON)),
    "gpt_neo": ("GPTNeoConfig", "GPT-Neo", dict(hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=128,
                                               attention_types=[[["global", "local"], 1]], window_size=4,
                                               tie_word_embeddings=False)),
    "gpt_bigcode": ("GPTBigCodeConfig", "StarCoder, SantaCoder", dict(n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                                                       tie_word_embeddings=False)),
    "codegen": ("CodeGenConfig", "CodeGen", dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, n_ctx=128,
                                                 rotary_dim=4, tie_word_embeddings=False)),
    "opt": ("OPTConfig", "OPT (125m, 1.3b and up)", dict(hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                                         num_attention_heads=4, max_position_embeddings=128,
                                                         word_embed_proj_dim=32, pad_token_id=0)),
    "opt_postnorm": ("OPTConfig", "OPT-350m", dict(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                                                  max_position_embeddings=128, word_embed_proj_dim=16,
                                                  do_layer_norm_before=False, pad_token_id=0)),
    "bloom": ("BloomConfig", "BLOOM", dict(hidden_size=32, n_layer=2, n_head=4)),
    "falcon": ("FalconConfig", "Falcon 7B", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 new_decoder_architecture=False)),
    "falcon_new": ("FalconConfig", "Falcon 40B/180B", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                           num_kv_heads=2, new_decoder_architecture=True)),
    "stablelm": ("StableLmConfig", "StableLM 2", {**COMMON, **KV}),
    "starcoder2": ("Starcoder2Config", "StarCoder2", {**COMMON, **KV}),
    "granite": ("GraniteConfig", "Granite 3", {**COMMON, **KV, **GRANITE}),
    "granitemoe": ("GraniteMoeConfig", "Granite 3 MoE", {**COMMON, **KV, **LOCAL_MOE, **GRANITE}),
    "cohere": ("CohereConfig", "Command R", {**COMMON, **KV, "logit_scale": 0.5}),
    "smollm3": ("SmolLM3Config", "SmolLM3", {**COMMON, **KV}),
    "gpt_oss": ("GptOssConfig", "gpt-oss", {**COMMON, **KV, **LOCAL_MOE, "head_dim": 8, "sliding_window": 4,
                                            "layer_types": ["sliding_attention", "full_attention"]}),
    "deepseek_v3": ("DeepseekV3Config", "DeepSeek-V3, Kimi K2", {
        **COMMON, **KV, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 24,
        "first_k_dense_replace": 1, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4,
        "v_head_dim": 8, "n_group": 1, "topk_group": 1}),
    "cohere2": ("Cohere2Config", "Command R7B, Command A", {**COMMON, **KV, "logit_scale": 0.5, "sliding_window": 4}),
    "olmo3": ("Olmo3Config", "OLMo 3", {**COMMON, **KV, "sliding_window": 4}),
    "exaone4": ("Exaone4Config", "EXAONE 4", {**COMMON, **KV, "sliding_window": 4}),
    "glm4": ("Glm4Config", "GLM-4", {**COMMON, **KV, "head_dim": 8}),
    "ministral": ("MinistralConfig", "Ministral", {**COMMON, **KV, "head_dim": 8}),
    "nemotron": ("NemotronConfig", "Nemotron", {**COMMON, **KV}),
    "seed_oss": ("SeedOssConfig", "Seed-OSS", {**COMMON, **KV}),
    "arcee": ("ArceeConfig", "AFM (Arcee)", {**COMMON, **KV}),
    "phimoe": ("PhimoeConfig", "Phi-3.5-MoE", {**COMMON, **KV, **LOCAL_MOE}),
    "mpt": ("MptConfig", "MPT", dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=128)),
}


def make_config(family: str, vocab_size: int) -> Any:
    import transformers

    class_name, _, keywords = FAMILIES[family]
    # Wider weights than the defaults: logits of order 1, so a dropped term shows well above 1e-4.
    return getattr(transformers, class_name)(vocab_size=vocab_size, initializer_range=0.1, **keywords)
