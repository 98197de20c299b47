"""End-to-end training on a tiny model built from a config."""

from __future__ import annotations

import pytest
import torch
from helpers import read_metrics, tiny_config
from transformers import AutoModelForCausalLM

from avgalign.batching import batch_order
from avgalign.config import ConfigError, load_config
from avgalign.data import TokenizedPair
from avgalign.train import train


@pytest.mark.parametrize("aggregation,beta", [("sum", 0.1), ("mean", 1.0)])
def test_training_lowers_loss_and_raises_margin(
    tmp_path, tiny_model_dir, synthetic_file, aggregation, beta
):
    cfg = tiny_config(
        tmp_path,
        tiny_model_dir,
        synthetic_file,
        **{"loss.aggregation": aggregation, "loss.beta": beta, "train.eval_every": 6},
    )
    result = train(cfg)
    train_rows = read_metrics(tmp_path / "run", "train")
    eval_rows = read_metrics(tmp_path / "run", "eval")
    assert len(train_rows) == 12
    first, last = train_rows[0], train_rows[-1]
    assert last["loss"] < first["loss"]
    assert last["reward_margin"] > first["reward_margin"]
    # held-out pairs too: the policy learned "good" over "bad"
    assert eval_rows[-1]["reward_accuracy"] > 0.8
    assert eval_rows[-1]["loss"] < eval_rows[0]["loss"] or eval_rows[0]["step"] == 12
    assert result.model_dir is not None
    reloaded = AutoModelForCausalLM.from_pretrained(result.model_dir)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    w = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(reloaded.state_dict()[w], initial.state_dict()[w])


def test_reference_cache_is_reused(tmp_path, tiny_model_dir, synthetic_file, capsys):
    for beta in (0.1, 0.2):
        cfg = tiny_config(
            tmp_path,
            tiny_model_dir,
            synthetic_file,
            **{
                "loss.beta": beta,
                "train.max_steps": 1,
                "train.output_dir": str(tmp_path / f"b{beta}"),
            },
        )
        result = train(cfg)
        assert result.reference_from_cache == (beta == 0.2)
    out = capsys.readouterr().out
    assert out.count("reference log-probs: computed once") == 1
    assert out.count("reference log-probs: loaded from cache") == 1


def test_on_the_fly_reference_matches_precomputed(tmp_path, tiny_model_dir, synthetic_file):
    losses = []
    for precompute in (True, False):
        cfg = tiny_config(
            tmp_path,
            tiny_model_dir,
            synthetic_file,
            **{
                "train.precompute_reference": precompute,
                "train.max_steps": 3,
                "train.output_dir": str(tmp_path / f"p{precompute}"),
                "train.save_model": False,
            },
        )
        train(cfg)
        losses.append([r["loss"] for r in read_metrics(tmp_path / f"p{precompute}", "train")])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_lora_and_reference_free_loss(tmp_path, tiny_model_dir, synthetic_file):
    cfg = tiny_config(
        tmp_path,
        tiny_model_dir,
        synthetic_file,
        **{
            "model.lora.r": 4,
            "loss.name": "simpo",
            "loss.aggregation": "mean",
            "loss.beta": 2.0,
            "train.max_steps": 4,
        },
    )
    result = train(cfg)
    assert (result.output_dir / "adapter").is_dir()
    AutoModelForCausalLM.from_pretrained(result.model_dir)


def test_batch_order_is_deterministic_and_grouped():
    lengths = [
        int(x) for x in torch.randint(1, 100, (200,), generator=torch.Generator().manual_seed(0))
    ]
    a = batch_order(lengths, 8, epoch=0, seed=1, group_by_length=True)
    assert a == batch_order(lengths, 8, epoch=0, seed=1, group_by_length=True)
    assert a != batch_order(lengths, 8, epoch=1, seed=1, group_by_length=True)
    assert len(a) == 25 and sorted(i for b in a for i in b) == list(range(200))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a) / len(a)
    random_spread = (
        sum(
            max(lengths[i] for i in b) - min(lengths[i] for i in b)
            for b in batch_order(lengths, 8, epoch=0, seed=1, group_by_length=False)
        )
        / 25
    )
    assert spread < random_spread / 3


@pytest.mark.parametrize(("key", "equivalent"), [
    ("train.per_device_train_batch_size=4", "here train.micro_batch_size"),
    ("train.gradient_accumulation_steps=2", "set train.batch_size"),
    ("train.num_train_epochs=3", "here train.epochs"),
    ("train.max_length=1024", "here data.max_length"),
    ("train.bf16=true", "train.mixed_precision: bf16"),
])
def test_a_trl_key_gets_its_equivalent_named(key, equivalent):
    with pytest.raises(ConfigError) as info:
        load_config(None, [key])
    message = str(info.value)
    name = key.split("=")[0]
    assert message.startswith(f"unknown key {name}: TRL's DPOConfig.{name.split('.')[1]}")
    assert equivalent in message and "known keys" not in message


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="loss.beta must be > 0"):
        load_config(None, ["loss.beta=0"])
    with pytest.raises(ConfigError, match="loss.alpha must be in"):
        load_config(None, ["loss.alpha=1.5"])
    with pytest.raises(ConfigError, match="unknown key loss.betta"):
        load_config(None, ["loss.betta=1"])
    with pytest.raises(ConfigError, match="train.batch_size: expected int"):
        load_config(None, ["train.batch_size=many"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  aggregation: median\n")
    with pytest.raises(ConfigError, match="loss.aggregation"):
        load_config(bad)


def test_too_few_pairs_is_a_clear_error(tmp_path, tiny_model_dir, synthetic_file, tokenizer):
    cfg = tiny_config(tmp_path, tiny_model_dir, synthetic_file)
    pairs = [TokenizedPair([1, 5], [6, 2], [7, 2])]
    with pytest.raises(ValueError, match="fewer than train.batch_size"):
        train(cfg, tokenizer=tokenizer, train_pairs=pairs)


def test_yaml_exponent_floats_are_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 1e-6\nloss:\n  beta: 5e-2\n")
    cfg = load_config(path)
    assert cfg.train.learning_rate == 1e-6 and cfg.loss.beta == 0.05
