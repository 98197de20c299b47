"""Parity: with every speed technique on, log-probabilities and losses equal the naive ones.

The small form of the benchmark's parity check (benchmarks/bench_dpo.py, which also compares with
TRL). A policy perturbed away from its reference; this project's summed completion log-probs
(shared-prompt rows with the 4D mask, length-grouped padded batches, the LM head in checkpointed
chunks under autograd, the reference through the precompute path) must equal one unpadded
full-sequence forward per completion to within 1e-4 relative in float32, and the DPO (sum) and
IPO (mean) losses computed from them must equal the losses computed from the naive values.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model  # the shared tiny Llama

from avgalign.batching import batch_order
from avgalign.data import load_preferences, tokenize_pairs
from avgalign.logprobs import CompletionLogProbs, pack_pairs
from avgalign.losses import LossParams, preference_loss
from avgalign.reference import compute_reference_logps, pair_length

RTOL = 1e-4
BETA = 0.1


@pytest.fixture(scope="module")
def setup(tokenizer, synthetic_file):
    report = load_preferences(str(synthetic_file))
    pairs, _ = tokenize_pairs(report.examples[:12], tokenizer, max_length=64)
    reference = make_model(len(tokenizer)).eval().requires_grad_(False)
    policy = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5 * p.std())
    return pairs, policy, reference


def naive_logps(lm, pairs) -> torch.Tensor:
    """[chosen..., rejected...] from one unpadded forward per completion, summed in float64."""
    values = []
    for side in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            completion = getattr(p, side)
            with torch.no_grad():
                logits = lm(torch.tensor([p.prompt_ids + completion])).logits[0].double()
            logp = torch.log_softmax(logits[len(p.prompt_ids) - 1 : -1], dim=-1)
            values.append(logp.gather(-1, torch.tensor(completion)[:, None]).sum())
    return torch.stack(values)


def ours_policy_logps(policy, pairs, pad_id) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and counts as the training step computes them, in training mode."""
    n = len(pairs)
    scorer = CompletionLogProbs(policy.train().requires_grad_(True), chunk_size=5)
    sums, counts, padded = torch.zeros(2 * n), torch.zeros(2 * n, dtype=torch.long), 0
    for idx in batch_order([pair_length(p) for p in pairs], 4, 0, 0, group_by_length=True):
        chosen = [pairs[i] for i in idx]
        batch = pack_pairs(
            [p.prompt_ids for p in chosen],
            [p.chosen_ids for p in chosen],
            [p.rejected_ids for p in chosen],
            pad_id,
            "shared_prompt",
        )
        s, c = scorer(batch)
        assert s.requires_grad  # the autograd path, with checkpointed head chunks
        assert batch.target_ids.numel() > scorer.chunk_size  # several chunks
        padded += batch.input_ids.numel() - batch.num_real_tokens
        where = torch.tensor(idx + [n + i for i in idx])
        sums[where], counts[where] = s.detach(), c
    policy.eval().requires_grad_(False)
    assert padded > 0, "the batches should carry padding"
    return sums, counts


def test_logps_and_losses_match_naive(setup, tokenizer):
    pairs, policy, reference = setup
    n = len(pairs)
    pad_id = tokenizer.pad_token_id
    policy_sums, counts = ours_policy_logps(policy, pairs, pad_id)
    ref = compute_reference_logps(
        CompletionLogProbs(reference, chunk_size=5),
        pairs,
        pad_id=pad_id,
        layout="shared_prompt",
        batch_size=3,
        device=torch.device("cpu"),
        progress=False,
    )
    reference_sums = torch.cat([ref.chosen, ref.rejected])
    naive_policy, naive_reference = naive_logps(policy, pairs), naive_logps(reference, pairs)

    # the check is not vacuous: policy and reference differ, in both directions
    assert (naive_policy - naive_reference).abs().mean() > 0.1
    torch.testing.assert_close(policy_sums.double(), naive_policy, rtol=RTOL, atol=0)
    torch.testing.assert_close(reference_sums.double(), naive_reference, rtol=RTOL, atol=0)
    lengths = [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
    assert counts.tolist() == lengths
    assert torch.equal(torch.cat([ref.chosen_lengths, ref.rejected_lengths]), counts)

    # losses from our values through avgalign.losses == the formulas on the naive values
    pc, pr, rc, rr = naive_policy[:n], naive_policy[n:], naive_reference[:n], naive_reference[n:]
    lc, lr = counts[:n].double(), counts[n:].double()
    expected = {
        ("dpo", "sum"): -F.logsigmoid(BETA * ((pc - rc) - (pr - rr))),
        ("ipo", "mean"): ((pc - rc) / lc - (pr - rr) / lr - 1 / (2 * BETA)) ** 2,
    }
    for (loss, aggregation), want in expected.items():
        mean, metrics = preference_loss(
            loss,
            policy_sums[:n],
            policy_sums[n:],
            reference_sums[:n],
            reference_sums[n:],
            counts[:n],
            counts[n:],
            LossParams(beta=BETA),
            aggregation,
        )
        torch.testing.assert_close(metrics["loss"].double(), want, rtol=RTOL, atol=1e-6)
        torch.testing.assert_close(mean.double(), want.mean(), rtol=RTOL, atol=1e-6)
