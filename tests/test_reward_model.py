"""Bradley-Terry reward model: the loss by hand, training on a task with a known rule, and the
round trip through load_scorer."""

from __future__ import annotations

import argparse
import json
import math
import random

import pytest
import torch
from conftest import WORDS  # the shared tiny tokenizer's words
from transformers import AutoConfig, LlamaForSequenceClassification

from avgalign.cli.parsers import add_reward_model_parser
from avgalign.data import DataError
from avgalign.errors import UsageError
from avgalign.evaluation import load_scorer
from avgalign.reward_model import (
    as_pair_texts,
    bradley_terry_loss,
    split_by_prompt,
    train_reward_model,
)

MARKER = "good"  # the token every preferred completion contains
PLAIN = [w for w in WORDS if w != MARKER]


def marker_pairs(n: int, seed: int) -> list[tuple[str, str, str]]:
    """Chosen = random words with the marker at a random place; rejected = random words."""
    rng = random.Random(seed)

    def words(k: int) -> list[str]:
        return [rng.choice(PLAIN) for _ in range(k)]

    pairs = []
    for _ in range(n):
        chosen = words(rng.randint(3, 7))
        chosen.insert(rng.randint(0, len(chosen)), MARKER)
        pairs.append((" ".join(words(3)), " ".join(chosen), " ".join(words(rng.randint(4, 8)))))
    return pairs


def test_bradley_terry_loss_known_answer():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    # -(log s(1) + log s(0)) / 2 = (0.313262 + 0.693147) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(0.503204, abs=1e-6)


def test_split_by_prompt_keeps_each_prompt_on_one_side():
    pairs = [(f"p{i % 10}", "a", "b") for i in range(40)]
    train, held_out = split_by_prompt(pairs, 0.2, seed=0)
    assert len({p for p, _, _ in held_out}) == 2 and len(train) + len(held_out) == 40
    assert not {p for p, _, _ in train} & {p for p, _, _ in held_out}


def test_as_pair_texts_reads_preference_examples():
    class Example:
        prompt, chosen, rejected, location = "p", "c", "r", "file:1"

    assert as_pair_texts([Example(), ("p2", "c2", "r2")]) == [("p", "c", "r"), ("p2", "c2", "r2")]


def test_reward_model_learns_marker_and_loads_as_scorer(tmp_path, tiny_model_dir):
    out = tmp_path / "rm"
    result = train_reward_model(
        str(tiny_model_dir),
        None,
        marker_pairs(256, seed=0),
        marker_pairs(100, seed=1),
        epochs=3,
        lr=3e-3,
        batch_size=16,
        max_length=32,
        seed=0,
        out_dir=out,
        progress=False,
    )
    assert result.accuracy > 0.8
    assert result.lo <= result.accuracy <= result.hi and result.n_eval == 100
    assert result.train_loss[-1] < result.train_loss[0]
    assert json.loads((out / "reward_model.json").read_text())["n_train"] == 256
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == list(range(1, 3 * 16 + 1))  # 256 / 16 per epoch
    first_epoch = [r["loss"] for r in steps if r["epoch"] == 0]
    assert sum(first_epoch) * 16 / 256 == pytest.approx(result.train_loss[0], rel=1e-5)

    scorer = load_scorer(str(out))
    scores = scorer(["w5 w6 w7", "w5 w6 w7"], [f"w8 {MARKER} w9", "w8 w10 w9"])
    assert all(math.isfinite(s) for s in scores) and scores[0] > scores[1]


def test_load_scorer_rejects_a_multi_label_model(tmp_path, tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=3)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm3")
    with pytest.raises(ValueError, match="single scalar head, got num_labels=3"):
        load_scorer(str(tmp_path / "rm3"))


def test_reward_model_cli_reports_a_missing_model(tmp_path):
    parser = argparse.ArgumentParser()
    add_reward_model_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["reward-model", "--model", str(tmp_path / "missing"), "--data", "x.jsonl", "--out", "o"]
    )
    with pytest.raises(UsageError, match="does not exist"):
        args.func(args)


def test_reward_model_cli_skips_malformed_records_when_asked(tmp_path, tiny_model_dir, capsys):
    records = [{"prompt": f"w{i % 7}", "chosen": f"w8 {MARKER}", "rejected": "w8 w9"}
               for i in range(20)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records[:10]) + "\n{not json\n"
                    + "\n".join(json.dumps(r) for r in records[10:]) + "\n")
    parser = argparse.ArgumentParser()
    add_reward_model_parser(parser.add_subparsers(dest="command"))
    common = ["reward-model", "--model", str(tiny_model_dir), "--data", str(data), "--out",
              str(tmp_path / "rm"), "--max-length", "16", "--eval-fraction", "0.3"]
    with pytest.raises(DataError, match="pairs.jsonl:11"):
        parser.parse_args(common).func(parser.parse_args(common))
    args = parser.parse_args([*common, "--on-error", "skip"])
    result = args.func(args)
    assert "1 malformed records skipped" in capsys.readouterr().out
    assert result.n_train + result.n_eval == 20
