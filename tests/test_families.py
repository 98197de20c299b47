"""The family matrix: for tiny random models of every decoder family we claim, both layouts give the
completion log-probs (and their gradients) of the model's own forward pass on each lone sequence.

Sliding-window families get a window (7) several times shorter than the test sequences (up to ~40
tokens), so a lost window shows; Gemma-2, Gemma-3, Cohere-2 and GPT-OSS mix sliding and full
layers; Gemma soft-caps its logits, Granite, Cohere and Falcon-H1 scale them. A family whose
attention the shared-prompt mask cannot express (chunked, linear or Mamba layers, ALiBi) falls
back to the concat layout, which is exact for it, and refuses a shared batch.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from avgalign.logprobs import AttentionSpec, CompletionLogProbs, pack_pairs

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


@pytest.fixture(scope="module", params=sorted(FAMILIES) + sorted(FALLBACK_FAMILIES))
def family(request):
    name = request.param
    return name, build({**FAMILIES, **FALLBACK_FAMILIES}[name]())


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


@pytest.mark.parametrize("seed, n", [(0, 3), (1, 2)])
def test_the_sequences_outrun_the_windows(seed, n):
    prompts, chosen, rejected = random_pairs(seed, n)
    longest = max(len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected))
    assert longest >= 4 * WINDOW


def test_log_probs_match_the_model_forward(family):
    name, lm = family
    scorer = CompletionLogProbs(lm, chunk_size=0)
    prompts, chosen, rejected = random_pairs()
    expected_layouts = layouts(name)
    assert scorer.layout_for("shared_prompt") == expected_layouts[0]
    with torch.no_grad():
        expected = expected_logps(lm, prompts, chosen, rejected)
        for layout in expected_layouts:
            sums, counts = scorer(pack_pairs(prompts, chosen, rejected, 0, layout))
            torch.testing.assert_close(sums.double(), expected, rtol=1e-5, atol=0)
            assert counts.tolist() == [len(c) for c in chosen] + [len(r) for r in rejected]
        if name in FALLBACK_FAMILIES:  # asked for anyway, a shared batch is refused, not wrong
            with pytest.raises(ValueError, match="cannot be exact for"):
                scorer(pack_pairs(prompts, chosen, rejected, 0, "shared_prompt"))


@pytest.mark.parametrize("layout", ["shared_prompt", "concat"])
def test_gradients_match_the_model_forward(family, layout):
    """With grad: checkpointed LM-head chunks (chunk_size 5), values and every parameter's
    gradient against autograd through the model's own forward pass."""
    name, lm = family
    if layout not in layouts(name):
        pytest.skip(f"{name} falls back to concat")
    prompts, chosen, rejected = random_pairs(1, n=2)
    weights = torch.linspace(0.5, 1.5, 2 * len(prompts), dtype=torch.float64)
    params = [p for p in lm.parameters() if p.requires_grad]

    def grads(value):
        lm.zero_grad()
        value.backward()
        return torch.cat([p.grad.flatten() for p in params if p.grad is not None])

    sums, _ = CompletionLogProbs(lm, chunk_size=5)(pack_pairs(prompts, chosen, rejected, 0, layout))
    ours = grads((sums.double() * weights).sum())
    expected = expected_logps(lm, prompts, chosen, rejected)
    torch.testing.assert_close(sums.detach().double(), expected.detach(), rtol=1e-5, atol=0)
    theirs = grads((expected * weights).sum())
    scale = theirs.abs().max()
    assert float((ours.double() - theirs.double()).abs().max() / scale) < 1e-4


def test_sliding_window_families_need_the_window():
    """The matrix can fail: a mask without the window (the old rule) is far from these models."""
    for name in sorted(SLIDING):
        spec = AttentionSpec.of(build(FAMILIES[name]()))
        assert spec.sliding_window == WINDOW and "sliding_attention" in spec.layer_types, name
    lm = build(FAMILIES["mistral"]())
    scorer = CompletionLogProbs(lm, chunk_size=0)
    scorer.attention = AttentionSpec(("full_attention",) * 3, None, None)  # window dropped
    prompts, chosen, rejected = random_pairs()
    with torch.no_grad():
        sums, _ = scorer(pack_pairs(prompts, chosen, rejected, 0, "shared_prompt"))
        expected = expected_logps(lm, prompts, chosen, rejected)
    assert float(((sums.double() - expected).abs() / expected.abs()).max()) > 1e-3


def test_a_window_wider_than_the_batch_needs_one_mask():
    spec = AttentionSpec.of(build(FAMILIES["gemma2"]()))
    assert spec.rule("sliding_attention", WINDOW) is spec.rule("full_attention", WINDOW)
    assert spec.rule("sliding_attention", WINDOW + 1) is not spec.rule("full_attention", 1)


def test_why_the_fallback_families_fall_back():
    problems = {
        name: CompletionLogProbs(build(FALLBACK_FAMILIES[name]())).attention.shared_prompt_problem
        for name in FALLBACK_FAMILIES
    }
    assert problems == {
        "llama4_text": "its layers include chunked_attention",
        "qwen3_next": "its layers include linear_attention",
        "falcon_h1": "its layers include hybrid",
        "bloom": "its decoder takes no position_ids",
        "falcon_alibi": "its ALiBi biases are built from a 2D mask",
        "mpt": "its decoder takes no position_ids",
    }


def test_attention_without_additive_masks_falls_back():
    """Flash attention takes no custom mask: the shared-prompt layout is not offered."""

    class Config:
        sliding_window = None
        num_hidden_layers = 2
        _attn_implementation = "flash_attention_2"

    class Fake(torch.nn.Module):
        config = Config()

        def get_decoder(self):
            return self

    assert "flash_attention_2" in AttentionSpec.of(Fake()).shared_prompt_problem
