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
