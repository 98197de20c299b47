"""Evaluation: metrics against numbers worked out by hand, generation on a tiny offline model,
scorers, the orchestration and its outputs."""

from __future__ import annotations

import argparse
import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import make_model  # the shared tiny Llama (tokenizer: <pad> 0, <s> 1, </s> 2)

from avgalign.cli.parsers import add_evaluate_parser
from avgalign.data import DataError
from avgalign.errors import UsageError
from avgalign.evaluation import (
    GenerationSettings,
    PromptSet,
    ScoredCompletion,
    count_completion_tokens,
    encode_prompts,
    evaluate_policy,
    generate_completions,
    kl_estimate,
    length_controlled_win_rate,
    length_summary,
    load_scorer,
    mean_ci,
    per_prompt_means,
    read_prompts,
    summarize_evaluation,
    win_rate,
    write_eval_outputs,
)

PAD, BOS, EOS = 0, 1, 2
FIRST_WORD = 4  # ids below are special tokens


def tiny_lm(tokenizer, seed: int = 0, eos_probability: float | None = None):
    """The shared tiny Llama. With eos_probability, its LM head is replaced by a constant one:
    every step draws EOS with that probability and the words uniformly, so completions end at
    known rates."""
    model = make_model(len(tokenizer), seed)
    if eos_probability is not None:
        vocab_size = len(tokenizer)
        head = torch.nn.Linear(model.config.hidden_size, vocab_size, bias=True)
        torch.nn.init.zeros_(head.weight)
        bias = torch.full((vocab_size,), -1e4)
        bias[FIRST_WORD:] = math.log((1 - eos_probability) / (vocab_size - FIRST_WORD))
        bias[EOS] = math.log(eos_probability)
        head.bias.data = bias
        model.lm_head = head
    return model.eval()


# --- metrics --------------------------------------------------------------------------------


def test_mean_ci_known_answer():
    mean, lo, hi = mean_ci([1, 2, 3, 4, 5])
    # s = sqrt(2.5), se = s / sqrt(5) = 0.70711, z(0.975) = 1.959964
    assert mean == pytest.approx(3.0)
    assert lo == pytest.approx(3.0 - 1.959964 * 0.707107, abs=1e-5)
    assert hi == pytest.approx(3.0 + 1.959964 * 0.707107, abs=1e-5)
    assert tuple(mean_ci([7.0])) == (7.0, 7.0, 7.0)
    _, lo90, hi90 = mean_ci([1, 2, 3, 4, 5], confidence=0.9)  # z(0.95) = 1.644854
    assert hi90 - lo90 == pytest.approx(2 * 1.644854 * 0.707107, abs=1e-5)
    with pytest.raises(ValueError, match="empty"):
        mean_ci([])


def test_win_rate_counts_ties_as_half():
    wr = win_rate([3, 1, 2, 2], [1, 2, 2, 0])  # win, loss, tie, win
    assert wr.rate == pytest.approx(2.5 / 4)
    assert wr.n == 4
    assert 0.0 <= wr.lo <= wr.rate <= wr.hi <= 1.0
    all_wins = win_rate([1, 1, 1], [0, 0, 0])
    assert (all_wins.rate, all_wins.lo, all_wins.hi) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="2 policy scores but 3"):
        win_rate([1, 2], [1, 2, 3])


def test_win_rate_bootstrap_interval_matches_binomial_width():
    rng = np.random.default_rng(0)
    n = 1000
    outcomes = rng.random(n) < 0.7
    wr = win_rate(outcomes.astype(float), np.full(n, 0.5), seed=1)
    half_width = 1.959964 * math.sqrt(wr.rate * (1 - wr.rate) / n)
    assert (wr.hi - wr.lo) / 2 == pytest.approx(half_width, rel=0.15)
    assert win_rate(outcomes, np.full(n, 0.5), seed=1) == wr  # reproducible for a seed


def _random_lengths(rng, n):
    # policy answers longer on average, so a length-loving judge makes the raw win rate ~0.8
    return rng.integers(30, 130, n), rng.integers(10, 90, n)


def test_lc_win_rate_removes_a_pure_length_preference():
    rng = np.random.default_rng(0)
    lp, lr = _random_lengths(rng, 400)
    # the judge only prefers the longer answer (equal lengths tie)
    policy_scores, reference_scores = np.sign(lp - lr).astype(float), np.zeros(400)
    raw = win_rate(policy_scores, reference_scores)
    lc = length_controlled_win_rate(policy_scores, reference_scores, lp, lr)
    assert raw.rate > 0.75
    assert abs(lc.rate - 0.5) < 0.1
    assert lc.lo < 0.5 < lc.hi
    assert lc.n == 400


def test_lc_win_rate_keeps_a_length_independent_advantage():
    rng = np.random.default_rng(1)
    lp, lr = _random_lengths(rng, 400)
    wins = (rng.random(400) < 0.85).astype(float)
    raw = win_rate(wins, np.full(400, 0.5))
    lc = length_controlled_win_rate(wins, np.full(400, 0.5), lp, lr)
    assert lc.rate > 0.75
    assert abs(lc.rate - raw.rate) < 0.05


def test_lc_win_rate_equal_lengths_is_the_raw_rate():
    rng = np.random.default_rng(2)
    lengths = rng.integers(5, 50, 300)
    wins = (rng.random(300) < 0.8).astype(float)
    lc = length_controlled_win_rate(wins, np.full(300, 0.5), lengths, lengths)
    # only the small L2 shrinkage separates the intercept from logit(raw rate)
    assert lc.rate == pytest.approx(wins.mean(), abs=0.01)


def test_lc_win_rate_degenerate_inputs_stay_finite():
    lp, lr = np.arange(10, 30), np.arange(20, 0, -1)
    ties = length_controlled_win_rate(np.ones(20), np.ones(20), lp, lr, n_boot=50)
    assert (ties.rate, ties.lo, ties.hi) == (0.5, 0.5, 0.5)
    separated = length_controlled_win_rate(np.sign(lp - lr), np.zeros(20), lp, lr, n_boot=50)
    assert all(math.isfinite(v) for v in (separated.rate, separated.lo, separated.hi))
    all_wins = length_controlled_win_rate(np.ones(20), np.zeros(20), lp, lr, n_boot=50)
    assert 0.9 < all_wins.rate < 1.0
    single = length_controlled_win_rate([1.0], [0.0], [5], [5], n_boot=50)
    assert 0.5 < single.rate < 1.0


def test_kl_estimate_matches_exact_categorical_kl():
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.2, 0.3, 0.5])
    exact = float(np.sum(p * np.log(p / q)))  # 0.5 ln 2.5 + 0.2 ln 0.4 = 0.274887
    assert exact == pytest.approx(0.274887, abs=1e-6)
    samples = np.random.default_rng(0).choice(3, size=20000, p=p)
    mean, lo, hi = kl_estimate(np.log(p)[samples], np.log(q)[samples])
    assert lo < exact < hi
    assert mean == pytest.approx(exact, abs=0.02)


def test_length_summary_known_answer():
    s = length_summary([1, 2, 3, 4, 10])
    assert s == pytest.approx(
        {"mean": 4.0, "median": 3.0, "p90": 7.6, "min": 1.0, "max": 10.0, "std": math.sqrt(12.5)}
    )
    assert length_summary([4])["std"] == 0.0


# --- generation -----------------------------------------------------------------------------


def test_count_completion_tokens_stops_at_first_eos():
    eos = {EOS}
    assert count_completion_tokens([5, 6, EOS, EOS, EOS], eos) == (3, True)  # pad == eos
    assert count_completion_tokens([5, 6, EOS, PAD, PAD], eos) == (3, True)
    assert count_completion_tokens([EOS, PAD], eos) == (1, True)
    assert count_completion_tokens([5, 6, 7], eos) == (3, False)
    assert count_completion_tokens([5, 9, 6], {9, EOS}) == (2, True)


def test_encode_prompts_applies_chat_template_only_when_asked_or_auto(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)  # the session fixture must not get a template
    w1, w2, w0 = tokenizer.convert_tokens_to_ids(["w1", "w2", "w0"])
    assert encode_prompts(tokenizer, ["w1 w2"]) == [[w1, w2]]
    assert encode_prompts(tokenizer, [[1, 5]]) == [[1, 5]]
    with pytest.raises(ValueError, match="no chat template"):
        encode_prompts(tokenizer, ["w1"], use_chat_template=True)
    tokenizer.chat_template = (
        "{% for m in messages %}<s> {{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %} w0{% endif %}"
    )
    assert encode_prompts(tokenizer, ["w1 w2"]) == [[BOS, w1, w2, w0]]
    assert encode_prompts(tokenizer, ["w1 w2"], use_chat_template=False) == [[w1, w2]]


def test_generation_is_deterministic_and_counts_tokens_to_eos(tokenizer):
    model = tiny_lm(tokenizer, eos_probability=0.3)
    prompts = ["w1 w2 w3", "w4", "w5 w6"]
    kwargs = {"num_samples": 4, "max_new_tokens": 6, "batch_size": 5, "seed": 3, "progress": False}
    first = generate_completions(model, tokenizer, prompts, **kwargs)
    torch.rand(100)  # whatever ran in between must not matter
    second = generate_completions(model, tokenizer, prompts, **kwargs)
    assert [c.token_ids for c in first] == [c.token_ids for c in second]
    assert [(c.prompt_index, c.sample_index) for c in first] == [
        (i, k) for i in range(3) for k in range(4)
    ]
    other_seed = generate_completions(model, tokenizer, prompts, **{**kwargs, "seed": 4})
    assert [c.token_ids for c in other_seed] != [c.token_ids for c in first]

    finished = [c for c in first if c.finished]
    assert 0 < len(finished) < len(first)  # P(no EOS in 6 steps) = 0.7^6 = 0.12
    for c in first:
        assert c.num_tokens == len(c.token_ids) >= 1
        assert EOS not in c.token_ids[:-1]  # nothing after the first EOS, padding excluded
        assert (c.token_ids[-1] == EOS) == c.finished
        assert c.finished or c.num_tokens == 6
        words = tokenizer.convert_ids_to_tokens(c.token_ids[: -1 if c.finished else None])
        assert c.text == " ".join(words)  # special tokens skipped
        assert c.prompt == prompts[c.prompt_index]


def test_generation_leaves_the_callers_random_state_alone(tokenizer):
    """Regression: generate_completions reseeded the global generator (torch.manual_seed)."""
    model = tiny_lm(tokenizer, eos_probability=0.3)
    kwargs = {"num_samples": 2, "max_new_tokens": 4, "batch_size": 3, "seed": 5, "progress": False}
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = generate_completions(model, tokenizer, ["w1", "w2 w3"], **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)  # a different caller state gives the same completions
    second = generate_completions(model, tokenizer, ["w1", "w2 w3"], **kwargs)
    assert [c.token_ids for c in first] == [c.token_ids for c in second]


def test_generation_pads_with_eos_without_a_pad_token_and_greedy_repeats(tokenizer):
    model = tiny_lm(tokenizer, seed=1).train()
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = None
    out = generate_completions(
        model,
        tokenizer,
        [[1, 5, 6], [7]],
        num_samples=2,
        max_new_tokens=5,
        do_sample=False,
        progress=False,
    )
    assert out[0].token_ids == out[1].token_ids  # greedy: samples of a prompt agree
    assert out[0].prompt_ids == [1, 5, 6]
    assert model.training  # evaluation leaves the mode as it found it

    class NoSpecialTokens:
        pad_token_id = eos_token_id = None

    with pytest.raises(ValueError, match="neither a pad token nor an EOS"):
        generate_completions(model, NoSpecialTokens(), ["w1"], progress=False)


# --- scoring, orchestration, outputs --------------------------------------------------------


@pytest.fixture
def scorer_module(tmp_path, monkeypatch):
    (tmp_path / "toy_scorers.py").write_text(
        "def n_words(prompts, completions):\n    return [len(c.split()) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "toy_scorers"


def test_load_scorer_from_module_function(scorer_module):
    scorer = load_scorer(f"{scorer_module}:n_words")
    assert scorer(["a", "b"], ["w1 w2", ""]) == [2.0, 0.0]
    with pytest.raises(ValueError, match="has no function 'nope'"):
        load_scorer(f"{scorer_module}:nope")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        load_scorer("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="does not exist"):
        load_scorer("./no/such/reward_model")


def test_evaluate_policy_end_to_end_and_outputs(tmp_path, tokenizer, scorer_module):
    policy, reference = tiny_lm(tokenizer, eos_probability=0.2), tiny_lm(tokenizer, seed=1)
    settings = GenerationSettings(num_samples=2, max_new_tokens=8, batch_size=4)
    result = evaluate_policy(
        policy,
        reference,
        tokenizer,
        ["w1 w2", "w3", "w4 w5 w6"],
        load_scorer(f"{scorer_module}:n_words"),
        settings=settings,
        n_boot=100,
        progress=False,
    )
    assert (result.num_prompts, result.num_samples) == (3, 2)
    assert result.policy_length["mean"] < result.reference_length["mean"]  # EOS-heavy policy
    assert 0.0 <= result.win_rate.rate <= 1.0 and result.lc_win_rate.n == 6
    assert result.kl is not None and math.isfinite(result.kl.mean)

    paths = write_eval_outputs(result, result.completions, tmp_path / "eval")
    rows = [json.loads(line) for line in paths["completions"].read_text().splitlines()]
    assert len(rows) == 12 and {r["model"] for r in rows} == {"policy", "reference"}
    assert set(rows[0]) >= {"prompt", "completion", "tokens", "score", "model"}
    summary = json.loads(paths["summary"].read_text())
    assert summary["win_rate"]["n"] == 6 and set(summary["kl"]) == {"mean", "lo", "hi"}
    assert summary["settings"]["max_new_tokens"] == 8 and "completions" not in summary
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"


def test_lora_reference_via_disabled_adapters_has_zero_kl(tokenizer):
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(tiny_lm(tokenizer), LoraConfig(r=2, target_modules=["q_proj"]))
    result = evaluate_policy(
        policy,
        policy,
        tokenizer,
        ["w1", "w2"],
        lambda p, c: [0.0] * len(c),
        settings=GenerationSettings(max_new_tokens=4),
        reference_context=policy.disable_adapter,
        n_boot=50,
        progress=False,
    )
    # fresh LoRA adapters are zero (B = 0): policy and reference are the same distribution
    assert result.kl.mean == pytest.approx(0.0, abs=1e-5)
    assert result.win_rate.rate == 0.5  # constant scores: all ties


def test_policy_and_reference_samples_are_independent(tokenizer, scorer_module):
    """Regression: the reference was sampled with the policy's seed, so a policy equal to its
    reference produced identical samples (every pair a tie) instead of independent ones."""
    model = tiny_lm(tokenizer, eos_probability=0.1)
    result = evaluate_policy(
        model, model, tokenizer, ["w1", "w2", "w3", "w4"],
        load_scorer(f"{scorer_module}:n_words"),
        settings=GenerationSettings(num_samples=4, max_new_tokens=12, batch_size=8),
        n_boot=50, progress=False,
    )
    texts = {m: [c.text for c in result.completions if c.model == m]
             for m in ("policy", "reference")}
    assert texts["policy"] != texts["reference"]
    assert 0.0 < result.win_rate.rate < 1.0


def test_summarize_evaluation_without_reference_or_logps():
    samples = [
        ScoredCompletion("policy", i, 0, f"p{i}", "x", num_tokens=i + 1, finished=True, score=i)
        for i in range(4)
    ]
    result = summarize_evaluation(samples)
    assert result.win_rate is None and result.kl is None
    assert result.policy_length["mean"] == 2.5 and result.policy_score.mean == 1.5


def test_read_prompts_formats_and_errors(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\nsecond\nthird\n")
    assert read_prompts(str(txt), limit=2) == PromptSet(["first prompt", "second"], None)
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert read_prompts(str(jsonl)) == PromptSet(["a", "b"], None)
    pairs = tmp_path / "pairs.jsonl"  # a preference dataset: its prompts, each once
    rows = [("q1", "a", "b"), ("q2", "c", "d"), ("q1", "e", "f")]
    pairs.write_text(
        "".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows)
    )
    assert read_prompts(str(pairs)) == PromptSet(["q1", "q2"], "raw")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(DataError, match=f"^{empty}: no prompts$"):
        read_prompts(str(empty))
    with pytest.raises(DataError, match=f"^{tmp_path}/missing.txt: no such file$"):
        read_prompts(str(tmp_path / "missing.txt"))
    jsonl.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match=f"^{jsonl}:2: not valid JSON"):
        read_prompts(str(jsonl))
    jsonl.write_text('{"prompt": "a"}\n["b"]\n')
    with pytest.raises(DataError, match=f"^{jsonl}:2: no string 'prompt' field$"):
        read_prompts(str(jsonl))


def test_evaluate_cli(tmp_path, tiny_model_dir, scorer_module, capsys):
    (tmp_path / "prompts.txt").write_text("w1 w2\nw3\n")
    parser = argparse.ArgumentParser()
    add_evaluate_parser(parser.add_subparsers(dest="command"))
    common = ["--prompts", str(tmp_path / "prompts.txt"), "--scorer", f"{scorer_module}:n_words"]
    common += ["--max-new-tokens", "4", "--out", str(tmp_path / "out")]

    args = parser.parse_args(["evaluate", "--policy", str(tiny_model_dir), *common])
    result = args.func(args)
    assert result.num_prompts == 2 and (tmp_path / "out" / "summary.json").is_file()
    printed = capsys.readouterr().out.splitlines()
    (line,) = [x for x in printed if x.startswith("evaluate: ")]  # one line, not the JSON
    assert line.startswith("evaluate: 2 prompts x 1 samples, score ") and ", length " in line
    assert not any(x.strip().startswith("{") for x in printed)

    args = parser.parse_args(["evaluate", "--policy", str(tmp_path / "missing"), *common])
    with pytest.raises(UsageError, match="does not exist"):
        args.func(args)


def test_per_prompt_means_by_hand():
    """Completions given out of order: means per prompt, KL terms in the order given, wins
    against the reference sample of the same (prompt, sample)."""
    def sc(model, p, k, score, n):
        return ScoredCompletion(model, p, k, f"p{p}", "x", n, True, score)

    policy = [sc("policy", 1, 1, 0.0, 4), sc("policy", 0, 0, 1.0, 2), sc("policy", 1, 0, 0.5, 6),
              sc("policy", 0, 1, 0.0, 3)]
    reference = [sc("reference", p, k, 0.5, 1) for p in (0, 1) for k in (0, 1)]
    out = per_prompt_means(policy, reference, kl_terms=[4.0, 1.0, 2.0, 3.0])
    assert out["score"] == pytest.approx([0.5, 0.25])  # prompt 0: (1 + 0) / 2; 1: (0.5 + 0) / 2
    assert out["length"] == pytest.approx([2.5, 5.0])
    assert out["kl"] == pytest.approx([2.0, 3.0])  # prompt 0: (1 + 3) / 2; prompt 1: (4 + 2) / 2
    assert out["win"] == pytest.approx([0.5, 0.25])  # wins 1, 0; tie 0.5, loss 0
    assert set(per_prompt_means(policy)) == {"score", "length"}
