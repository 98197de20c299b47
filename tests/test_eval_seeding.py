"""Library functions seed their own random streams and leave the caller's global generator alone.

Regression: generate_completions, the toy world's build_model and train_reward_model called
torch.manual_seed, which reseeded the caller's global generator as a side effect.
"""

from __future__ import annotations

import pytest
import torch
from conftest import WORDS

from avgalign.seeding import seeded


def test_seeded_draws_what_manual_seed_draws_and_restores_the_state():
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    with seeded(11):
        inside = torch.rand(4)
    assert torch.equal(inside, expected)
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(RuntimeError), seeded(11):
        torch.rand(1)
        raise RuntimeError("the state is restored on the way out of an error too")
    assert torch.equal(torch.get_rng_state(), state)


def test_toy_build_model_is_seeded_without_reseeding_the_caller():
    from avgalign.toy.sft import ModelSize, build_model
    from avgalign.toy.world import build_tokenizer

    tokenizer, size = build_tokenizer(), ModelSize(hidden_size=16, intermediate_size=32)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = build_model(tokenizer, size, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(10)  # the caller's draws in between do not change the model
    second = build_model(tokenizer, size, seed=3)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


def test_reward_model_training_is_seeded_without_reseeding_the_caller(tiny_model_dir):
    from avgalign.reward_model import train_reward_model

    pairs = [(f"{w} is", f"good {w}", f"bad {w}") for w in WORDS[11:31]]
    kwargs = {"epochs": 1, "lr": 1e-2, "batch_size": 8, "max_length": 8, "seed": 2}
    kwargs |= {"device": "cpu", "progress": False}
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = train_reward_model(str(tiny_model_dir), None, pairs[:14], pairs[14:], **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(10)
    second = train_reward_model(str(tiny_model_dir), None, pairs[:14], pairs[14:], **kwargs)
    assert first.train_loss == second.train_loss
