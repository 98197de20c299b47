"""The toy world (oracle, annotator, tokenizer, cached build) and the quick demo end to end."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from avgalign.cli.handlers import config_from_args
from avgalign.cli.parsers import add_demo_parser
from avgalign.errors import UsageError
from avgalign.models import fingerprint_model
from avgalign.study import VOLATILE_FIELDS
from avgalign.toy.build import build_world
from avgalign.toy.demo import quick_config, run_demo
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

TASK = Task("fruit", 3, "fr04")  # "list 3 fruit except fr04 :"

# ----------------------------------------------------------------------------------- oracle


def test_oracle_has_an_interior_optimum_at_n():
    items = ["fr01", "fr02", "fr03", "fr05", "fr06", "fr07"]
    scores = [oracle_score(TASK, items[:k]) for k in range(len(items) + 1)]
    # 0..3 hits, then one error per extra item: (hits - errors) / n
    assert scores == pytest.approx([0, 1 / 3, 2 / 3, 1, 2 / 3, 1 / 3, 0])
    assert max(range(len(scores)), key=scores.__getitem__) == TASK.n
    # a milder penalty keeps the optimum at n
    mild = [oracle_score(TASK, items[:k], error_penalty=0.5) for k in range(len(items) + 1)]
    assert mild == pytest.approx([0, 1 / 3, 2 / 3, 1, 5 / 6, 2 / 3, 1 / 2])


@pytest.mark.parametrize("words,hits,errors", [
    (["fr01", "fr04", "fr02"], 2, 1),  # the excluded item
    (["fr01", "fr01", "fr02"], 2, 1),  # a repeat
    (["fr01", "an01", "fr02"], 2, 1),  # another topic
    (["um", "fr01", "fr02", "fr03"], 3, 1),  # a filler
    ([], 0, 0),
])
def test_oracle_counts_errors(words, hits, errors):
    assert oracle_counts(TASK, words) == (hits, errors)


def test_prompt_round_trip():
    assert TASK.prompt == "list 3 fruit except fr04 :"
    assert parse_prompt("<bos> " + TASK.prompt) == TASK
    for bad in ("list 3 fruit :", "list 3 car except fr04 :", "list 3 fruit except an01 :"):
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
    assert min(lengths) >= 1 and len(lengths) >= 4
    assert sample_demo(TASK, DemoNoise(), random.Random(3)) == demos[3]


def test_length_is_a_real_axis_of_the_demonstrations():
    """Over the default n range (2..40), demonstration lengths spread over an order of magnitude:
    mean >= 15, sd >= half the mean, from a few words to 60 and more."""
    rng = random.Random(0)
    tasks = all_tasks(2, 40)
    lengths = [len(sample_demo(rng.choice(tasks), DemoNoise(), rng)) + 1 for _ in range(4000)]
    mean = sum(lengths) / len(lengths)
    sd = (sum((x - mean) ** 2 for x in lengths) / len(lengths)) ** 0.5
    assert mean >= 15 and sd >= mean / 2
    assert min(lengths) <= 3 and max(lengths) >= 60
    # the spread is a share of n: long answers miss the ideal length by more words
    short = [len(sample_demo(Task("fruit", 4, "fr04"), DemoNoise(), rng)) for _ in range(500)]
    long = [len(sample_demo(Task("fruit", 36, "fr04"), DemoNoise(), rng)) for _ in range(500)]
    assert max(long) - min(long) > 3 * (max(short) - min(short))


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
    completion = tok.convert_tokens_to_ids(["fr01", "fr02", EOS])
    assert tok.decode(completion, skip_special_tokens=True) == "fr01 fr02"
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
    assert again.train_rows == world.train_rows
    assert world.stats["train_pairs"] == len(world.train_rows) > 0
    assert world.stats["sft_sample_length"]["std"] > 0.5  # the SFT policy's lengths vary
    policy = AutoModelForCausalLM.from_pretrained(world.model_dir)
    fresh = build_world(quick.world, tmp_path, progress=False)  # same config, built again
    assert not fresh.from_cache
    assert fresh.train_rows == world.train_rows
    sft_log = [json.loads(x) for x in (fresh.path / "sft.metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sft_log] == list(range(1, quick.world.sft.steps + 1))
    assert fingerprint_model(fresh.load_policy()) == fingerprint_model(policy)
    other = build_world(dataclasses.replace(quick.world, seed=1), tmp_path, progress=False)
    assert other.path != fresh.path and other.train_rows != fresh.train_rows


def test_annotators_label_the_same_pairs_with_the_same_coin_flips(quick):
    """Length bias is the only difference between two labellings: every pair is the same two
    completions, and a pair labelled differently goes to the longer completion under bias."""
    world = build_world(quick.world, quick.cache_dir, progress=False)
    fair = world.preferences(AnnotatorConfig(temperature=0.2, length_bias=0.0))
    biased = world.preferences(AnnotatorConfig(temperature=0.2, length_bias=2.0))
    assert world.preferences(fair.annotator).train_pairs == fair.train_pairs  # deterministic
    flipped = 0
    for f, b in zip(fair.train_pairs, biased.train_pairs, strict=True):
        assert {tuple(f.chosen_ids), tuple(f.rejected_ids)} == {
            tuple(b.chosen_ids), tuple(b.rejected_ids)}
        if f.chosen_ids != b.chosen_ids:
            flipped += 1
            assert len(b.chosen_ids) > len(b.rejected_ids)  # the same coin, a longer favourite
    assert flipped > 0
    assert biased.stats["chosen_longer_share"] > fair.stats["chosen_longer_share"] + 0.2
    assert fair.stats["unbiased_longer_share"] == pytest.approx(
        biased.stats["unbiased_longer_share"])


def test_quick_demo_end_to_end_is_deterministic_and_resumable(quick, tmp_path):
    threads = torch.get_num_threads()
    cfg = dataclasses.replace(quick, seeds=(0, 1), length_biases=(0.0, 1.0),
                              out=str(tmp_path / "a"))
    first = run_demo(cfg)
    for name in ("report", "numbers", "length_plot", "kl_plot"):
        assert first.files[name].is_file() and first.files[name].stat().st_size > 0
    assert list(first.settings) == ["length-bias-0", "length-bias-1"]
    for setting in first.settings.values():
        assert len(setting.rows) == 4 and setting.baseline is not None  # 2 curves x 2 seeds
        assert sorted(r["seed"] for r in setting.rows) == [0, 0, 1, 1]
        for row in setting.rows:
            for field in ("loss", "aggregation", "beta", "length_mean", "score", "score_lo",
                          "win_rate", "win_lo", "kl", "train_seconds"):
                assert row[field] is not None, field
            assert len(row["per_prompt"]["score"]) == quick.eval.num_prompts
        # runs of different seeds draw different evaluation samples
        by_seed = {r["seed"]: r for r in setting.rows if r["aggregation"] == "sum"}
        assert by_seed[0]["per_prompt"] != by_seed[1]["per_prompt"]
    report = first.files["report"].read_text()
    assert "dpo/mean vs sum, same beta_sum" in report and "## Length bias as the cause" in report
    numbers = json.loads(first.files["numbers"].read_text())
    assert numbers["seeds"] == [0, 1]

    second = run_demo(dataclasses.replace(cfg, out=str(tmp_path / "b")))
    assert second.world.from_cache
    strip = lambda row: {k: v for k, v in row.items() if k not in VOLATILE_FIELDS}  # noqa: E731
    for name, setting in first.settings.items():
        assert [strip(r) for r in second.settings[name].rows] == [strip(r) for r in setting.rows]
    assert second.report == first.report  # fixed seeds: the same tables and findings
    assert all(r["reference_from_cache"] for r in second.settings["length-bias-0"].rows)

    resumed = run_demo(cfg)
    assert resumed.ran == [] and resumed.report == first.report
    assert torch.get_num_threads() == threads  # the demo's single thread was given back


def test_cli_flags_reach_the_config():
    parser = argparse.ArgumentParser()
    add_demo_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "demo", "--quick", "--out", "o", "--losses", "ipo", "--aggregations", "sum", "power",
        "--betas", "0.2", "0.5", "--alphas", "0.25", "--seed", "3", "--num-prompts", "5",
        "--samples-per-prompt", "3", "--no-cache", "--seeds", "4", "5", "--length-biases", "0",
    ])
    cfg = config_from_args(args)
    assert (cfg.seeds, cfg.length_biases) == ((4, 5), (0.0,))
    assert (cfg.out, cfg.losses, cfg.aggregations) == ("o", ("ipo",), ("sum", "power"))
    assert (cfg.betas, cfg.alphas, cfg.world.seed) == ((0.2, 0.5), (0.25,), 3)
    assert (cfg.eval.num_prompts, cfg.eval.samples_per_prompt, cfg.rebuild) == (5, 3, True)
    assert cfg.world == dataclasses.replace(quick_config().world, seed=3)
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--losses", "nope"])
    full = config_from_args(parser.parse_args(["demo", "--full"]))
    assert (full.out, full.seeds, full.length_biases) == ("runs/demo-full", (0, 1, 2), (0.0, 0.3))
    assert full.aggregations == ("sum", "mean", "power") and len(full.betas) == 5
    with pytest.raises(UsageError, match="exclude each other"):
        config_from_args(parser.parse_args(["demo", "--full", "--quick"]))
