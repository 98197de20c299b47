"""The toy world (oracle, annotator, tokenizer, cached build) and the quick demo end to end."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from avgalign.models import fingerprint_model
from avgalign.study import VOLATILE_FIELDS
from avgalign.toy.build import build_world
from avgalign.toy.demo import add_demo_parser, config_from_args, quick_config, run_demo
from avgalign.toy.world import (
    EOS,
    AnnotatorConfig,
    DemoNoise,
    Task,
    all_tasks,
    build_tokenizer,
    length_bias_report,
    oracle_counts,
    oracle_score,
    parse_prompt,
    preference_probability,
    prefers_first,
    sample_demo,
    split_tasks,
)

TASK = Task("fruit", 3, "fig")  # "list 3 fruit except fig :"

# ----------------------------------------------------------------------------------- oracle


def test_oracle_has_an_interior_optimum_at_n():
    items = ["apple", "pear", "plum", "kiwi", "lime", "grape"]
    scores = [oracle_score(TASK, items[:k]) for k in range(len(items) + 1)]
    # 0..3 hits, then one error per extra item: (hits - errors) / n
    assert scores == pytest.approx([0, 1 / 3, 2 / 3, 1, 2 / 3, 1 / 3, 0])
    assert max(range(len(scores)), key=scores.__getitem__) == TASK.n
    # a milder penalty keeps the optimum at n
    mild = [oracle_score(TASK, items[:k], error_penalty=0.5) for k in range(len(items) + 1)]
    assert mild == pytest.approx([0, 1 / 3, 2 / 3, 1, 5 / 6, 2 / 3, 1 / 2])


@pytest.mark.parametrize("words,hits,errors", [
    (["apple", "fig", "pear"], 2, 1),  # the excluded item
    (["apple", "apple", "pear"], 2, 1),  # a repeat
    (["apple", "cat", "pear"], 2, 1),  # another topic
    (["um", "apple", "pear", "plum"], 3, 1),  # a filler
    ([], 0, 0),
])
def test_oracle_counts_errors(words, hits, errors):
    assert oracle_counts(TASK, words) == (hits, errors)


def test_prompt_round_trip():
    assert TASK.prompt == "list 3 fruit except fig :"
    assert parse_prompt("<bos> " + TASK.prompt) == TASK
    for bad in ("list 3 fruit :", "list 3 car except fig :", "list 3 fruit except cat :"):
        with pytest.raises(ValueError):
            parse_prompt(bad)


def test_task_split_is_seeded_and_disjoint():
    tasks = all_tasks(2, 5)
    train, test = split_tasks(tasks, 0.25, seed=0)
    assert set(train).isdisjoint(test) and len(train) + len(test) == len(tasks)
    assert split_tasks(tasks, 0.25, seed=0) == (train, test)
    assert split_tasks(tasks, 0.25, seed=1) != (train, test)


def test_demonstrations_have_varied_lengths_and_are_seeded():
    demos = [sample_demo(TASK, DemoNoise(), random.Random(i)) for i in range(200)]
    lengths = {len(d) for d in demos}
    assert min(lengths) >= 1 and len(lengths) >= 5
    assert sample_demo(TASK, DemoNoise(), random.Random(3)) == demos[3]


# -------------------------------------------------------------------------------- annotator


def test_preference_probability_by_hand():
    cfg = AnnotatorConfig(temperature=0.2, length_bias=0.5)
    # logit = (0.6 - 0.4) / 0.2 + 0.5 * (3 - 4) = 0.5
    assert preference_probability(0.6, 0.4, 3, 4, cfg) == pytest.approx(1 / (1 + 2.718281828**-0.5))
    assert preference_probability(0.5, 0.5, 5, 5, cfg) == 0.5


@pytest.mark.parametrize("bias,lo,hi", [(0.5, 0.75, 0.9), (0.0, 0.45, 0.55)])
def test_annotator_length_bias_on_equal_rewards(bias, lo, hi):
    cfg = AnnotatorConfig(temperature=0.2, length_bias=bias)
    rng = random.Random(0)
    lengths = [(4, 7) if i % 2 else (7, 4) for i in range(4000)]
    chosen_longer = 0
    for a, b in lengths:
        first = prefers_first(0.5, 0.5, a, b, cfg, rng)
        chosen_longer += (a if first else b) > (b if first else a)
    assert lo < chosen_longer / len(lengths) < hi  # sigmoid(1.5) = 0.82 with bias 0.5


def test_length_bias_report_by_hand():
    cfg = AnnotatorConfig(temperature=0.2, length_bias=0.5)
    report = length_bias_report([5, 3, 4, 6], [3, 5, 4, 2], [1.0, 0.5, 0.5, 0.2],
                                [0.5, 0.5, 0.0, 0.4], cfg)
    assert (report.pairs, report.unequal) == (4, 3)
    assert report.chosen_longer_share == pytest.approx(2 / 3)
    assert report.oracle_agreement == pytest.approx(2 / 3)  # pairs 1 and 3 agree, pair 4 not
    # unbiased: sigmoid(2.5), sigmoid(0), sigmoid(-1) for the longer of each unequal pair
    sig = lambda z: 1 / (1 + 2.718281828459045**-z)  # noqa: E731
    assert report.unbiased_longer_share == pytest.approx((sig(2.5) + 0.5 + sig(-1)) / 3)


# -------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_and_reloads(tmp_path):
    tok = build_tokenizer()
    ids = tok(TASK.prompt)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 1 + len(TASK.prompt.split())
    assert tok.decode(ids, skip_special_tokens=True) == TASK.prompt
    completion = tok.convert_tokens_to_ids(["apple", "pear", EOS])
    assert tok.decode(completion, skip_special_tokens=True) == "apple pear"
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(TASK.prompt)["input_ids"] == ids
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert again.convert_ids_to_tokens(again("zebra")["input_ids"])[1] == tok.unk_token


# ------------------------------------------------------------------------- world and demo


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    cfg = quick_config()
    cfg.cache_dir = str(tmp_path_factory.mktemp("cache"))
    cfg.progress = False
    return cfg


def test_world_is_cached_and_deterministic(quick, tmp_path):
    world = build_world(quick.world, quick.cache_dir, progress=False)
    again = build_world(quick.world, quick.cache_dir, progress=False)
    assert again.from_cache and again.path == world.path
    assert again.train_pairs == world.train_pairs
    stats = world.stats["train_pairs"]
    assert stats["pairs"] == len(world.train_pairs) > 0
    assert 0.0 <= stats["chosen_longer_share"] <= 1.0
    assert world.stats["sft_sample_length"]["std"] > 0.5  # the SFT policy's lengths vary
    policy = AutoModelForCausalLM.from_pretrained(world.model_dir)
    fresh = build_world(quick.world, tmp_path, progress=False)  # same config, built again
    assert not fresh.from_cache
    assert fresh.train_pairs == world.train_pairs
    sft_log = [json.loads(x) for x in (fresh.path / "sft.metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sft_log] == list(range(1, quick.world.sft.steps + 1))
    assert fingerprint_model(fresh.load_policy()) == fingerprint_model(policy)
    other = build_world(dataclasses.replace(quick.world, seed=1), tmp_path, progress=False)
    assert other.path != fresh.path and other.train_pairs != fresh.train_pairs


def test_quick_demo_end_to_end_is_deterministic_and_resumable(quick, tmp_path):
    threads = torch.get_num_threads()
    first_cfg = dataclasses.replace(quick, out=str(tmp_path / "a"))
    first = run_demo(first_cfg)
    for name in ("results", "table", "plot", "report"):
        assert first.files[name].is_file() and first.files[name].stat().st_size > 0
    assert len(first.rows) == 2 and first.baseline is not None
    for row in first.rows:
        for field in ("loss", "aggregation", "beta", "length_mean", "score", "score_lo",
                      "win_rate", "win_lo", "kl", "train_seconds"):
            assert row[field] is not None, field
    report = first.files["report"].read_text()
    assert "Verdict:" in report and "dpo/mean/beta_sum=0.1" in report

    second = run_demo(dataclasses.replace(quick, out=str(tmp_path / "b")))
    assert second.world.from_cache
    strip = lambda row: {k: v for k, v in row.items() if k not in VOLATILE_FIELDS}  # noqa: E731
    assert [strip(r) for r in second.rows] == [strip(r) for r in first.rows]
    assert strip(second.baseline) == strip(first.baseline)
    assert all(r["reference_from_cache"] for r in second.rows)  # reference log-probs reused

    resumed = run_demo(first_cfg)
    assert resumed.ran == [] and resumed.rows == first.rows
    assert torch.get_num_threads() == threads  # the demo's single thread was given back


def test_cli_flags_reach_the_config():
    parser = argparse.ArgumentParser()
    add_demo_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "demo", "--quick", "--out", "o", "--losses", "ipo", "--aggregations", "sum", "power",
        "--betas", "0.2", "0.5", "--alphas", "0.25", "--seed", "3", "--num-prompts", "5",
        "--samples-per-prompt", "3", "--no-cache",
    ])
    cfg = config_from_args(args)
    assert (cfg.out, cfg.losses, cfg.aggregations) == ("o", ("ipo",), ("sum", "power"))
    assert (cfg.betas, cfg.alphas, cfg.world.seed) == ((0.2, 0.5), (0.25,), 3)
    assert (cfg.eval.num_prompts, cfg.eval.samples_per_prompt, cfg.rebuild) == (5, 3, True)
    assert cfg.world == dataclasses.replace(quick_config().world, seed=3)
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--losses", "nope"])
