"""Micro-batches cut by a token budget (train.max_tokens_per_micro_batch): the plan, and the
same losses and weights as one batch per step."""

from __future__ import annotations

import pytest
import torch
from helpers import read_metrics, tiny_config

from avgalign.batching import activation_checkpointing, micro_batches
from avgalign.data import TokenizedPair
from avgalign.launching import _accelerator
from avgalign.reference import budget_batches, packed_tokens
from avgalign.train import Trainer, train


def pair(prompt: int, chosen: int, rejected: int) -> TokenizedPair:
    return TokenizedPair([1] * prompt, [2] * chosen, [3] * rejected)


def test_packed_tokens_counts_rows_times_padded_length():
    pairs = [pair(3, 2, 4), pair(5, 1, 1)]
    assert packed_tokens(pairs, "shared_prompt") == 2 * 9  # rows: 9 and 7 tokens
    assert packed_tokens(pairs, "concat") == 4 * 7  # rows: 5, 7, 6, 6 tokens


def test_plan_respects_the_budget_and_gives_every_process_as_many_micro_batches():
    lengths = [(4, 20, 20), (4, 2, 2), (4, 3, 3), (4, 2, 1), (4, 30, 30), (4, 1, 1), (4, 2, 2),
               (4, 2, 2)]
    pairs = [pair(*n) for n in lengths]
    shares = [[0, 2, 4, 6], [1, 3, 5, 7]]
    plans = micro_batches(shares, pairs, "shared_prompt", max_pairs=4, max_tokens=50)
    for share, plan in zip(shares, plans):
        assert sorted(i for mb in plan for i in mb) == sorted(share)  # each pair once
        for mb in plan:  # within budget, unless one pair alone is over it
            assert len(mb) == 1 or packed_tokens([pairs[i] for i in mb], "shared_prompt") <= 50
    # process 0 needs 3 micro-batches (44, 64 tokens alone; 10 + 8 together); process 1 fits in
    # one, and is split to match
    assert [len(p) for p in plans] == [3, 3]
    # without a token budget: micro_batch_size pairs, in order, as before
    assert micro_batches(shares, pairs, "shared_prompt", 2) == [[[0, 2], [4, 6]], [[1, 3], [5, 7]]]


def test_token_budget_gives_the_loss_and_gradients_of_one_batch(
    tmp_path, tiny_model_dir, synthetic_file
):
    """One global batch of 8 mixed-length pairs, as one forward pass and as micro-batches of at
    most 40 packed tokens: the same per-pair metrics and the same gradient of every parameter."""
    cfg = tiny_config(tmp_path, tiny_model_dir, synthetic_file,
                      **{"train.micro_batch_size": 8, "data.eval_fraction": 0.0,
                         "train.group_by_length": False})
    trainer = Trainer(cfg, _accelerator("no"), "no")
    batch = trainer.global_batch(0)
    results = []
    for budget in (0, 40):
        trainer.tc.max_tokens_per_micro_batch = budget
        metrics, real, padded = trainer.accumulate(batch)
        grads = {n: p.grad.clone() for n, p in trainer.policy.named_parameters()}
        trainer.optimizer.zero_grad(set_to_none=True)
        results.append((metrics, real, padded, grads))
    (m1, real1, padded1, g1), (m2, real2, padded2, g2) = results
    assert real1 == real2 and padded2 < padded1  # the budget cut the batch: less padding
    n_micro = len(micro_batches([batch], trainer.train_pairs, trainer.layout, 8, 40)[0])
    assert n_micro > 1
    # per pair, in another order: compared sorted; the accuracy flips on margins of 0 +- 1e-9
    for k in set(m1) - {"reward_accuracy"}:
        torch.testing.assert_close(m2[k].sort().values, m1[k].sort().values, rtol=1e-5,
                                   atol=1e-6, msg=k)
    for name, grad in g1.items():
        torch.testing.assert_close(g2[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_token_budget_run_matches_one_batch_per_step(tmp_path, tiny_model_dir, synthetic_file):
    common = {"train.micro_batch_size": 8, "train.max_steps": 3, "data.eval_fraction": 0.0,
              "train.group_by_length": False}  # batches of mixed lengths: padding to cut
    runs = {}
    for name, budget in (("whole", 0), ("budget", 40)):
        cfg = tiny_config(tmp_path, tiny_model_dir, synthetic_file, **common,
                          **{"train.output_dir": str(tmp_path / name),
                             "train.max_tokens_per_micro_batch": budget})
        train(cfg)
        runs[name] = read_metrics(tmp_path / name, "train")
    for a, b in zip(runs["whole"], runs["budget"]):
        assert b["padding_fraction"] < a["padding_fraction"]
        for key in ("loss", "reward_margin", "grad_norm", "logp_sum_chosen"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_activation_checkpointing_turns_on_only_where_the_budget_cannot_bound_a_pair():
    pairs = [pair(4, 20, 20), pair(4, 2, 2), pair(10, 30, 25)]  # 44, 8 and 65 tokens alone
    assert activation_checkpointing("auto", pairs, "shared_prompt", 4096) == (False, None)
    assert activation_checkpointing("auto", pairs, "shared_prompt", 0) == (False, None)
    on, note = activation_checkpointing("auto", pairs, "shared_prompt", 50)
    assert on and "1 of 3 pairs alone pack to more than" in note and "(up to 65)" in note
    on, note = activation_checkpointing("auto", pairs, "concat", 50)  # 2 x 24 = 48, 2 x 40 = 80
    assert on and "1 of 3 pairs" in note and "(up to 80)" in note
    assert activation_checkpointing(False, pairs, "shared_prompt", 50) == (False, None)
    assert activation_checkpointing(True, pairs, "shared_prompt", 4096) == (True, None)


def test_checkpointed_run_under_a_tight_budget_matches_the_plain_run(
    tmp_path, tiny_model_dir, synthetic_file, capsys
):
    """A budget smaller than the longest pairs: auto checkpoints activations (recomputing each
    layer in the backward pass, split attention included), and trains as without."""
    runs = {}
    for name, checkpointing in (("auto", "auto"), ("off", "false")):
        cfg = tiny_config(tmp_path, tiny_model_dir, synthetic_file, **{
            "train.max_steps": 2, "train.max_tokens_per_micro_batch": 12,
            "train.gradient_checkpointing": checkpointing,
            "train.output_dir": str(tmp_path / name)})
        train(cfg)
        runs[name] = read_metrics(tmp_path / name, "train")
    printed = capsys.readouterr().out
    assert printed.count("activation checkpointing: on") == 1
    assert "attention: split" in printed
    for a, b in zip(runs["auto"], runs["off"], strict=True):
        for key in ("loss", "grad_norm", "logp_sum_chosen"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def test_reference_batches_cap_their_padding():
    """The reference pass: one long pair must not pad several short ones to its length."""
    pairs = [pair(1, n, n) for n in (50, 48, 10, 9, 8, 2)]  # 101, 97, 21, 19, 17 and 5 tokens
    order = list(range(6))
    assert budget_batches(order, pairs, "shared_prompt", 8, 0) == [order]  # as before: runs of 8
    # [101, 97]: 2% padding; + 21 would be 28%; [21, 19, 17]: 9.5%; + 5 would be 26%
    assert budget_batches(order, pairs, "shared_prompt", 8, 0, max_padding=0.1) == [
        [0, 1], [2, 3, 4], [5]]
    assert budget_batches(order, pairs, "shared_prompt", 2, 0, max_padding=0.1) == [
        [0, 1], [2, 3], [4], [5]]
