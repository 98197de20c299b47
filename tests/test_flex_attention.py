"""The shared-prompt layout under flex attention: the mask goes to the model as a BlockMask.

- The BlockMask, read element-wise as the kernel reads it (full tiles: all allowed; partial
  tiles: the mask_mod; other tiles: skipped), is exactly the dense additive mask's pattern, for
  causal and sliding-window rules, with padding, at several tile sizes.
- Models loaded with attn_implementation="flex_attention" (Llama; Mistral with a window several
  times shorter than the sequences; Qwen2 and Gemma-2, which mix sliding and full layers, passed
  a BlockMask per kind; Gemma-2 soft-caps its attention logits) give the completion log-probs of
  the dense-mask path and of the model's forward pass on each lone sequence, and the same
  gradients.

PyTorch's flex attention has no backward pass on CPU. There the gradient tests run the model's
flex attention through a dense reference of the kernel (`reference_flex_attention`, which reads
the BlockMask as above and applies transformers' score_mod): they check the BlockMask and
everything around it, not the kernel. On CUDA they run the real kernel.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
import transformers.integrations.flex_attention as hf_flex
from helpers.families import WINDOW, _llama_like, expected_logps, random_pairs
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

from avgalign.logprobs import (
    FLEX_ATTENTION,
    AttentionSpec,
    CompletionLogProbs,
    check_against_model,
    flex_attention_problem,
    pack_pairs,
    shared_prompt_block_mask,
    shared_prompt_mask,
    use_flex_attention,
)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# families whose log-probs run torch's compiled flex kernel on CPU too (one mask, and a full and
# a sliding one): compiling it takes 10-20 s per mask on 2 cores, so the others' log-probs run on
# the reference kernel there
CPU_KERNEL = {"llama", "qwen2"}


def _config(cls, **kw):
    # head_dim 16, the least torch's CUDA flex kernel takes
    return _llama_like(cls, **{"hidden_size": 64, **kw})


CONFIGS = {
    "llama": lambda: _config(tf.LlamaConfig),
    "mistral": lambda: _config(tf.MistralConfig, sliding_window=WINDOW),
    "qwen2": lambda: _config(  # layers: full, sliding, sliding
        tf.Qwen2Config, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
    ),
    "gemma2": lambda: _config(  # layers: sliding, full, sliding
        tf.Gemma2Config,
        head_dim=16,
        sliding_window=WINDOW,
        final_logit_softcapping=5.0,
        attn_logit_softcapping=10.0,
    ),
}


def twins(name: str):
    """The same random weights, loaded with flex attention and with eager attention (the dense
    additive mask; eager rather than sdpa, which cannot soft-cap Gemma-2's attention)."""
    models = []
    for implementation in (FLEX_ATTENTION, "eager"):
        torch.manual_seed(0)
        config = CONFIGS[name]()  # a config each: from_config records the implementation in it
        lm = tf.AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
        models.append(lm.to(DEVICE).eval())
    return models


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request):
    torch._dynamo.reset()  # each family compiles its own flex kernels
    return request.param, *twins(request.param)


@pytest.fixture(autouse=True)
def fused_kernels_only(monkeypatch):
    """On CUDA, a flex attention that ran out of recompilations would quietly run unfused
    (dense): allow enough (a model compiles per mask, per length class, for eval and training),
    and make running out an error."""
    if CUDA:
        monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 64)
        monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)


def read_block_mask(block_mask) -> torch.Tensor:
    """[B, H, Lq, Lk] booleans: the BlockMask as the kernel applies it."""
    q_len, kv_len = block_mask.seq_lengths
    q_block, kv_block = block_mask.BLOCK_SIZE
    rows, heads, n_q, n_kv = block_mask.kv_indices.shape
    dense = torch.zeros(
        rows, heads, n_q * q_block, n_kv * kv_block, dtype=torch.bool, device=DEVICE
    )
    for b in range(rows):
        for h in range(heads):
            for i in range(n_q):
                queries = torch.arange(i * q_block, (i + 1) * q_block, device=DEVICE)[:, None]
                full = block_mask.full_kv_indices[b, h, i, : block_mask.full_kv_num_blocks[b, h, i]]
                for j in full.tolist():
                    dense[b, h, queries, j * kv_block : (j + 1) * kv_block] = True
                partial = block_mask.kv_indices[b, h, i, : block_mask.kv_num_blocks[b, h, i]]
                for j in partial.tolist():
                    keys = torch.arange(j * kv_block, (j + 1) * kv_block, device=DEVICE)[None]
                    index = torch.tensor(b, device=DEVICE), torch.tensor(h, device=DEVICE)
                    dense[b, h, queries, keys] = block_mask.mask_mod(*index, queries, keys)
    return dense[:, :, :q_len, :kv_len]


def reference_flex_attention(
    query, key, value, score_mod=None, block_mask=None, enable_gqa=False, scale=None, **_
):
    """Dense, differentiable stand-in for torch's flex_attention kernel, for transformers'
    `compile_friendly_flex_attention` (on CPU transformers asks for no log-sum-exp)."""
    if enable_gqa:
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    scores = query @ key.transpose(-1, -2) * scale
    b, h, q, kv = (torch.arange(n, device=query.device) for n in scores.shape)
    scores = score_mod(scores, b[:, None, None, None], h[:, None, None], q[:, None], kv)
    scores = scores.masked_fill(~read_block_mask(block_mask), float("-inf"))
    return torch.softmax(scores, dim=-1) @ value


@pytest.mark.parametrize("block_size", [4, 16, 128])
@pytest.mark.parametrize("window", [None, 1, 3, WINDOW, 100])
@pytest.mark.parametrize("seed, n", [(0, 3), (1, 1)])
def test_the_block_mask_is_the_dense_mask(block_size, window, seed, n):
    prompts, chosen, rejected = random_pairs(seed, n)
    batch = pack_pairs(prompts, chosen, rejected, 0).to(DEVICE)
    rule = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    block_mask = shared_prompt_block_mask(batch, rule, block_size=block_size)
    rows, length = batch.input_ids.shape
    assert block_mask.shape == (rows, 1, length, length)
    dense = shared_prompt_mask(batch, rule, torch.float32) == 0
    assert torch.equal(read_block_mask(block_mask), dense)
    if block_size == 4:  # skipped tiles: the chosen/rejected blocks at least, and the future
        tiles = block_mask.kv_indices.shape[-1] ** 2
        stored = block_mask.kv_num_blocks + block_mask.full_kv_num_blocks
        assert int(stored.sum(dim=-1).max()) < 0.75 * tiles


def test_flex_models_use_the_block_mask(family):
    name, flex, dense = family
    spec = CompletionLogProbs(flex).attention
    assert spec.block_mask and spec.shared_prompt_problem is None
    assert spec == AttentionSpec.of(dense, implementation=FLEX_ATTENTION)
    assert not CompletionLogProbs(dense).attention.block_mask
    assert CompletionLogProbs(flex).layout_for("shared_prompt") == "shared_prompt"


def test_flex_log_probs_match_the_dense_mask_and_lone_sequences(family):
    name, flex, dense = family
    prompts, chosen, rejected = random_pairs()
    batch = pack_pairs(prompts, chosen, rejected, 0, "shared_prompt").to(DEVICE)
    with torch.no_grad():
        with pytest.MonkeyPatch.context() as patch:
            if not (CUDA or name in CPU_KERNEL):
                patch.setattr(hf_flex, "compile_friendly_flex_attention", reference_flex_attention)
            ours, counts = CompletionLogProbs(flex, chunk_size=0)(batch)
        theirs, _ = CompletionLogProbs(dense, chunk_size=0)(batch)
        lone = expected_logps(dense, prompts, chosen, rejected)
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=1e-5, atol=0)
    torch.testing.assert_close(ours.double(), lone, rtol=1e-5, atol=0)
    assert counts.tolist() == [len(c) for c in chosen] + [len(r) for r in rejected]
    if not CUDA and name in CPU_KERNEL:  # the CPU gradient tests' reference gives the same
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(hf_flex, "compile_friendly_flex_attention", reference_flex_attention)
            with torch.no_grad():
                reference, _ = CompletionLogProbs(flex, chunk_size=0)(batch)
        torch.testing.assert_close(reference, ours, rtol=1e-5, atol=0)


@pytest.mark.skipif(
    not CUDA,
    reason="CPU: torch 2.13's inductor fails to compile flex attention (C++ error) for the "
    "model's own masks once it has compiled it for a shared-prompt BlockMask in the process",
)
def test_flex_lone_sequences_and_self_check_on_cuda(family):
    """The model's own flex masks (lone sequences, the concat layout) and the trainer's
    self-check, which mixes them with the shared-prompt BlockMask in one process."""
    name, flex, dense = family
    prompts, chosen, rejected = random_pairs()
    with torch.no_grad():
        expected = expected_logps(dense, prompts, chosen, rejected)
        torch.testing.assert_close(
            expected_logps(flex, prompts, chosen, rejected), expected, rtol=1e-5, atol=0
        )
        concat = pack_pairs(prompts, chosen, rejected, 0, "concat").to(DEVICE)
        sums, _ = CompletionLogProbs(flex, chunk_size=0)(concat)
    torch.testing.assert_close(sums.double(), expected, rtol=1e-5, atol=0)
    pairs = list(zip(prompts, chosen, rejected))
    check = check_against_model(CompletionLogProbs(flex), pairs, pad_id=0, layout="shared_prompt")
    assert check.relative_error < 1e-5


def test_flex_gradients_match_the_dense_mask_and_lone_sequences(family, monkeypatch):
    """With grad, in training mode (no dropout in these configs), checkpointed LM-head chunks:
    values and every parameter's gradient against the dense-mask path and autograd through the
    model's forward pass on each lone sequence. CPU: the reference kernel (see the module)."""
    name, flex, dense = family
    if not CUDA:
        monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", reference_flex_attention)
    prompts, chosen, rejected = random_pairs(1, n=2)
    batch = pack_pairs(prompts, chosen, rejected, 0, "shared_prompt").to(DEVICE)
    weights = torch.linspace(0.5, 1.5, 2 * len(prompts), dtype=torch.float64, device=DEVICE)

    def grads(lm, value):
        lm.zero_grad()
        value.backward()
        return torch.cat([p.grad.flatten() for p in lm.parameters() if p.grad is not None])

    flex.train()
    dense.train()
    try:
        sums, _ = CompletionLogProbs(flex, chunk_size=5)(batch)
        ours = grads(flex, (sums.double() * weights).sum())
        dense_sums, _ = CompletionLogProbs(dense, chunk_size=5)(batch)
        via_dense = grads(dense, (dense_sums.double() * weights).sum())
        lone = expected_logps(dense, prompts, chosen, rejected)
        via_lone = grads(dense, (lone * weights).sum())
    finally:
        flex.eval()
        dense.eval()
    torch.testing.assert_close(sums.detach().double(), lone.detach(), rtol=1e-5, atol=0)
    for theirs in (via_dense, via_lone):
        scale = theirs.abs().max()
        assert float((ours.double() - theirs.double()).abs().max() / scale) < 1e-4


def test_where_flex_attention_is_offered():
    torch.manual_seed(0)
    lm = tf.AutoModelForCausalLM.from_config(_config(tf.LlamaConfig), attn_implementation="sdpa")
    assert "CUDA only" in flex_attention_problem(lm, "cpu")
    assert not use_flex_attention(lm, "cpu")
    assert lm.config._attn_implementation == "sdpa"
    assert flex_attention_problem(lm, "cuda") is None
    assert use_flex_attention(lm, "cuda")  # switches the config; nothing runs here
    assert lm.config._attn_implementation == FLEX_ATTENTION
    assert CompletionLogProbs(lm).attention.block_mask

    small_heads = _config(tf.LlamaConfig, hidden_size=32)  # head_dim 8
    lm = tf.AutoModelForCausalLM.from_config(small_heads, attn_implementation="sdpa")
    assert "head dimension (8)" in flex_attention_problem(lm, "cuda")
    assert not use_flex_attention(lm, "cuda")

    dropout = _config(tf.LlamaConfig, attention_dropout=0.1)
    lm = tf.AutoModelForCausalLM.from_config(dropout, attn_implementation="sdpa")
    assert "dropout" in flex_attention_problem(lm, "cuda")
    assert not use_flex_attention(lm, "cuda")

    chunked = _config(  # what the block mask cannot express stays as it was: concat
        tf.Llama4TextConfig,
        num_hidden_layers=4,
        intermediate_size_mlp=64,
        head_dim=16,
        num_local_experts=2,
        attention_chunk_size=WINDOW,
    )
    lm = tf.AutoModelForCausalLM.from_config(chunked, attn_implementation="sdpa")
    assert flex_attention_problem(lm, "cuda") == "its layers include chunked_attention"
    assert not use_flex_attention(lm, "cuda")
    lm.set_attn_implementation(FLEX_ATTENTION)  # loaded with flex attention anyway
    assert CompletionLogProbs(lm).layout_for("shared_prompt") == "concat"
