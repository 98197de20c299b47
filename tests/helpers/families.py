"""The family matrix: tiny random models of every architecture the project claims, and the
reference the tests compare against (each sequence alone through the model's own forward)."""


from __future__ import annotations

import torch
import transformers as tf

VOCAB = 97


WINDOW = 7


def _llama_like(cls, **kw):
    return cls(
        **{
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            **kw,
        }
    )


# name -> tiny config; every model is float32 with transformers' default attention implementation.
# The shared-prompt layout is exact for these:
FAMILIES = {
    "llama": lambda: _llama_like(tf.LlamaConfig),
    "mistral": lambda: _llama_like(tf.MistralConfig, sliding_window=WINDOW),
    "mixtral": lambda: _llama_like(
        tf.MixtralConfig, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2
    ),
    "qwen2": lambda: _llama_like(
        tf.Qwen2Config, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
    ),
    "qwen3": lambda: _llama_like(
        tf.Qwen3Config,
        head_dim=8,
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=1,
    ),
    "gemma": lambda: _llama_like(tf.GemmaConfig, head_dim=8),
    "gemma2": lambda: _llama_like(
        tf.Gemma2Config,
        head_dim=8,
        sliding_window=WINDOW,
        final_logit_softcapping=5.0,
        attn_logit_softcapping=10.0,
    ),
    "gemma3_text": lambda: _llama_like(
        tf.Gemma3TextConfig,
        head_dim=8,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        final_logit_softcapping=5.0,
    ),
    "phi3": lambda: _llama_like(tf.Phi3Config, sliding_window=WINDOW, pad_token_id=0),
    "granite": lambda: _llama_like(
        tf.GraniteConfig,
        logits_scaling=4.0,
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_multiplier=0.3,
    ),
    "cohere": lambda: _llama_like(tf.CohereConfig, logit_scale=0.25),
    "cohere2": lambda: _llama_like(
        tf.Cohere2Config, num_hidden_layers=4, sliding_window=WINDOW, logit_scale=0.25
    ),
    "starcoder2": lambda: _llama_like(tf.Starcoder2Config, sliding_window=WINDOW),
    "gpt_oss": lambda: _llama_like(
        tf.GptOssConfig,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=WINDOW,
    ),
    "falcon": lambda: tf.FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4
    ),
    "gpt2": lambda: tf.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=256
    ),
    "gpt_neox": lambda: tf.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=256,
    ),
    "opt": lambda: tf.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=32,
        pad_token_id=0,
    ),
    "olmo2": lambda: _llama_like(tf.Olmo2Config),
    "stablelm": lambda: _llama_like(tf.StableLmConfig),
}


# ... and these it cannot express: they fall back to concat, which is exact for them.
FALLBACK_FAMILIES = {
    "llama4_text": lambda: _llama_like(  # chunked attention
        tf.Llama4TextConfig,
        num_hidden_layers=4,
        intermediate_size_mlp=64,
        head_dim=8,
        num_local_experts=2,
        attention_chunk_size=WINDOW,
    ),
    "qwen3_next": lambda: _llama_like(  # linear attention layers
        tf.Qwen3NextConfig,
        num_hidden_layers=4,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
    ),
    "falcon_h1": lambda: _llama_like(  # attention + Mamba-2 layers, lm_head_multiplier
        tf.FalconH1Config,
        mamba_d_ssm=32,
        mamba_n_heads=4,
        mamba_d_head=8,
        mamba_n_groups=1,
        mamba_d_state=8,
        lm_head_multiplier=0.5,
    ),
    "bloom": lambda: tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=3, n_head=4),  # ALiBi
    "falcon_alibi": lambda: tf.FalconConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        alibi=True,
        new_decoder_architecture=False,
    ),
    "mpt": lambda: tf.MptConfig(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4),  # ALiBi
}


SLIDING = {
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
    "cohere2",
    "starcoder2",
    "gpt_oss",
}


def build(config, seed: int = 0):
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def layouts(name: str) -> list[str]:
    return ["shared_prompt", "concat"] if name in FAMILIES else ["concat"]


def random_pairs(seed: int = 0, n: int = 3):
    g = torch.Generator().manual_seed(seed)

    def seq(lo, hi):
        length = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(3, VOCAB, (length,), generator=g).tolist()

    return (
        [seq(3, 13) for _ in range(n)],
        [seq(8, 30) for _ in range(n)],
        [seq(8, 30) for _ in range(n)],
    )


def model_forward_logp(lm, prompt, completion):
    """What the layouts must reproduce: lm(prompt + completion).logits, one lone sequence."""
    device = lm.device
    logits = lm(torch.tensor([prompt + completion], device=device)).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    index = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1, device=device)
    return logp[index, torch.tensor(completion, device=device)].sum()


def expected_logps(lm, prompts, chosen, rejected):
    return torch.stack(
        [model_forward_logp(lm, p, c) for p, c in zip(prompts, chosen)]
        + [model_forward_logp(lm, p, r) for p, r in zip(prompts, rejected)]
    )
