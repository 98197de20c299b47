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
from helpers.families import (
    FALLBACK_FAMILIES,
    FAMILIES,
    SLIDING,
    WINDOW,
    build,
    expected_logps,
    layouts,
    random_pairs,
)

from avgalign.logprobs import AttentionSpec, CompletionLogProbs, pack_pairs


@pytest.fixture(scope="module", params=sorted(FAMILIES) + sorted(FALLBACK_FAMILIES))
def family(request):
    name = request.param
    return name, build({**FAMILIES, **FALLBACK_FAMILIES}[name]())


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
