"""Completion log-likelihoods against a naive per-token loop over full-sequence forwards."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from avgalign.logprobs import CompletionLogProbs, pack_pairs, sequence_logps

VOCAB = 61


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def random_pairs(seed, n=4):
    g = torch.Generator().manual_seed(seed)

    def seq(lo, hi):
        return torch.randint(
            3, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g
        ).tolist()

    return (
        [seq(1, 12) for _ in range(n)],
        [seq(1, 9) for _ in range(n)],
        [seq(1, 9) for _ in range(n)],
    )


def naive_logp(lm, prompt, completion):
    """log pi(completion | prompt): one unpadded forward, then a Python loop over tokens."""
    logits = lm(torch.tensor([prompt + completion])).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    return sum(logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(completion))


@pytest.mark.parametrize("layout", ["shared_prompt", "concat"])
@pytest.mark.parametrize("chunk_size", [0, 3])
def test_matches_naive_loop(lm, layout, chunk_size):
    prompts, chosen, rejected = random_pairs(1)
    with torch.no_grad():
        sums, counts = CompletionLogProbs(lm, chunk_size)(
            pack_pairs(prompts, chosen, rejected, 0, layout)
        )
        expected = [naive_logp(lm, p, c) for p, c in zip(prompts, chosen)]
        expected += [naive_logp(lm, p, r) for p, r in zip(prompts, rejected)]
    torch.testing.assert_close(sums.double(), torch.stack(expected), rtol=1e-5, atol=1e-5)
    assert counts.tolist() == [len(c) for c in chosen] + [len(r) for r in rejected]


def test_gradients_match_naive(lm):
    prompts, chosen, rejected = random_pairs(2, n=3)
    params = [p for p in lm.parameters()]

    def grads(loss):
        lm.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in params]

    sums, _ = CompletionLogProbs(lm, chunk_size=4)(pack_pairs(prompts, chosen, rejected, 0))
    ours = grads(sums.sum())
    naive = sum(
        naive_logp(lm, p, c) + naive_logp(lm, p, r) for p, c, r in zip(prompts, chosen, rejected)
    )
    ref = grads(naive)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-6)


def test_padding_does_not_change_results(lm):
    prompts, chosen, rejected = random_pairs(3, n=3)
    with torch.no_grad():
        scorer = CompletionLogProbs(lm)
        together, _ = scorer(pack_pairs(prompts, chosen, rejected, 0))
        alone = [
            scorer(pack_pairs([p], [c], [r], 0))[0] for p, c, r in zip(prompts, chosen, rejected)
        ]
    torch.testing.assert_close(
        together[:3], torch.cat([a[:1] for a in alone]), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        together[3:], torch.cat([a[1:] for a in alone]), rtol=1e-5, atol=1e-5
    )


def test_shared_prompt_processes_fewer_tokens():
    prompts, chosen, rejected = [[1] * 10], [[2] * 3], [[3] * 4]
    shared = pack_pairs(prompts, chosen, rejected, 0, "shared_prompt")
    concat = pack_pairs(prompts, chosen, rejected, 0, "concat")
    assert shared.num_real_tokens == 17
    assert concat.num_real_tokens == 27


def test_sequence_logps_and_peft_reference(lm):
    from peft import LoraConfig, get_peft_model

    prompts, chosen, _ = random_pairs(4, n=5)
    base_sums, counts = sequence_logps(lm, prompts, chosen, batch_size=2)
    with torch.no_grad():
        expected = torch.stack([naive_logp(lm, p, c) for p, c in zip(prompts, chosen)])
    torch.testing.assert_close(base_sums.double(), expected, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == [len(c) for c in chosen]

    copy = LlamaForCausalLM(lm.config).eval()
    copy.load_state_dict(lm.state_dict())
    peft = get_peft_model(
        copy, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    adapted, _ = sequence_logps(peft, prompts, chosen)
    with peft.disable_adapter():
        disabled, _ = sequence_logps(peft, prompts, chosen)
    torch.testing.assert_close(disabled, base_sums, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted, base_sums)


def test_empty_inputs_are_refused():
    with pytest.raises(ValueError, match="at least one token"):
        pack_pairs([[1, 2]], [[]], [[3]], 0)
    with pytest.raises(ValueError, match="prompt token"):
        pack_pairs([[]], [[1]], [[3]], 0)


def test_chunk_bounds_put_the_remainder_first():
    from avgalign.logprobs import chunk_bounds

    assert chunk_bounds(10, 4) == [(0, 2), (2, 6), (6, 10)]
    assert chunk_bounds(8, 4) == [(0, 4), (4, 8)]
    assert chunk_bounds(3, 4) == [(0, 3)]
    assert chunk_bounds(5, 0) == [(0, 5)]


@pytest.mark.parametrize("chunk_size, head_calls", [(1000, 1), (4, None)])
def test_only_checkpointed_chunks_are_recomputed(lm, chunk_size, head_calls):
    """Under autograd every chunk but the last is recomputed in the backward pass: a batch that
    fits in one chunk runs the LM head once; gradients are the same either way."""
    prompts, chosen, rejected = random_pairs(5, n=3)
    batch = pack_pairs(prompts, chosen, rejected, 0)
    chunks = -(-batch.target_ids.numel() // chunk_size)
    calls = []
    hook = lm.lm_head.register_forward_hook(lambda *_: calls.append(1))
    try:
        lm.zero_grad()
        CompletionLogProbs(lm, chunk_size)(batch)[0].sum().backward()
    finally:
        hook.remove()
    grad = lm.lm_head.weight.grad.clone()
    assert len(calls) == (head_calls or 2 * chunks - 1)
    lm.zero_grad()
    CompletionLogProbs(lm, 0)(batch)[0].sum().backward()
    torch.testing.assert_close(grad, lm.lm_head.weight.grad, rtol=1e-5, atol=1e-7)


def test_picked_log_softmax_gradient_matches_autograd():
    from avgalign.logprobs import _PickedLogSoftmax

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, VOCAB, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, VOCAB, (7,), generator=g)
    upstream = torch.randn(7, generator=g, dtype=torch.float64)
    a = logits.clone().requires_grad_(True)
    expected = torch.log_softmax(a, -1).gather(-1, targets[:, None]).squeeze(-1)
    (expected * upstream).sum().backward()
    b = logits.clone().requires_grad_(True)
    got = _PickedLogSoftmax.apply(b * 1, targets)  # a non-leaf, as the LM head's output is
    torch.testing.assert_close(got, expected.detach())
    (got * upstream).sum().backward(retain_graph=True)
    torch.testing.assert_close(b.grad, a.grad)
    with pytest.raises(RuntimeError, match="one backward pass"):
        (got * upstream).sum().backward()
