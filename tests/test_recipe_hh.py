"""The HH recipe: the split is disjoint by prompt and deterministic; the whole recipe runs on a tiny
model and HH-like records, and a re-run reuses the reward model and every finished run."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import yaml
from conftest import WORDS, make_tokenizer  # the shared tiny tokenizer and its words

from avgalign.config import ConfigError
from avgalign.data import PreferenceExample
from avgalign.recipes.hh import (
    hh_messages,
    load_recipe_config,
    render_chat,
    run_recipe,
    split_by_prompt,
)

REPO = Path(__file__).resolve().parents[1]


def hh_records(n: int, seed: int = 0) -> list[dict]:
    """HH-style dialogues: the shared prefix up to the last Assistant turn is the prompt; the
    chosen answer says 'good', the rejected one 'bad'. Every fifth prompt appears twice."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        if i % 5 == 4:
            prompt = records[-1]["chosen"].rsplit("\n\nAssistant:", 1)[0]
        else:
            prompt = "\n\nHuman: " + " ".join(rng.choices(WORDS[2:], k=rng.randint(2, 6)))
        answer = lambda: " ".join(rng.choices(WORDS[11:], k=rng.randint(1, 4)))  # noqa: E731
        records.append({
            "chosen": f"{prompt}\n\nAssistant: good {answer()}",
            "rejected": f"{prompt}\n\nAssistant: bad {answer()}",
        })
    return records


def example(prompt: str, i: int) -> PreferenceExample:
    return PreferenceExample(prompt, f"c{i}", f"r{i}", f"f:{i}")


def test_split_is_disjoint_by_prompt_and_deterministic():
    examples = [example(f"p{i % 40}", i) for i in range(100)]  # 40 prompts, up to 3 pairs each
    sizes = {"a": 10, "b": 25, "c": 30}
    parts = split_by_prompt(examples, sizes, seed=3)
    assert {k: len(v) for k, v in parts.items()} == sizes
    prompts = {k: {e.prompt for e in v} for k, v in parts.items()}
    assert not prompts["a"] & prompts["b"] and not prompts["a"] & prompts["c"]
    assert not prompts["b"] & prompts["c"]
    assert split_by_prompt(examples, sizes, seed=3) == parts
    assert split_by_prompt(examples, sizes, seed=4) != parts
    with pytest.raises(ValueError, match="not enough"):
        split_by_prompt(examples, {"a": 90, "b": 20}, seed=3)


def test_hh_prompt_to_chat_messages():
    prompt = "\n\nHuman: hi there\n\nAssistant: hello.\n\nHuman: how?\n\nAssistant:"
    assert hh_messages(prompt) == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello."},
        {"role": "user", "content": "how?"},
    ]
    for bad in ("hi\n\nAssistant:", "\n\nHuman: hi", "\n\nAssistant:"):
        with pytest.raises(ValueError):
            hh_messages(bad)


def test_render_chat_uses_the_template_and_strips_completions():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}|{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    pair = PreferenceExample("\n\nHuman: why\n\nAssistant:", " good", " bad w1", "f:1")
    rendered = render_chat(pair, tokenizer)
    assert rendered == PreferenceExample("<user>why|<assistant>", "good", "bad w1", "f:1")


def test_shipped_configs_load():
    for name in ("cpu-small", "full"):
        cfg = load_recipe_config(REPO / "configs" / "hh-smollm2" / f"{name}.yaml")
        assert cfg.policy.model.name == "smollm2-135m"
        assert set(cfg.sweep.aggregations) == {"sum", "mean"}


def test_config_rejects_unknown_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {rm_pair: 3}\n")
    with pytest.raises(ConfigError, match="data.rm_pair"):
        load_recipe_config(path)


def test_recipe_end_to_end_and_resumable(tmp_path, tiny_model_dir):
    data = tmp_path / "hh.jsonl.gz"
    with gzip.open(data, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in hh_records(60))
    config = {
        "work_dir": str(tmp_path / "work"),
        "threads": 1,
        "data": {"path": str(data), "chat_template": False, "max_length": 24, "rm_pairs": 12,
                 "rm_eval_pairs": 8, "policy_pairs": 8, "policy_eval_pairs": 4, "eval_prompts": 4},
        "reward_model": {"epochs": 1, "learning_rate": 1e-3, "batch_size": 4,
                         "trainable_layers": 1},
        "policy": {
            "model": {"name": str(tiny_model_dir),
                      "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
            "data": {"max_length": 24},
            "train": {"batch_size": 4, "micro_batch_size": 4, "max_steps": 2,
                      "learning_rate": 1e-2, "mixed_precision": "no", "progress": False},
        },
        "sweep": {"losses": ["dpo"], "aggregations": ["sum", "mean"], "betas": [0.1]},
        "eval": {"samples_per_prompt": 2, "max_new_tokens": 4, "batch_size": 8, "n_boot": 50},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_recipe_config(path)
    out = tmp_path / "out"

    first = run_recipe(cfg, out, command="test")
    assert first.ran == ["sft", "dpo/sum/beta_sum=0.1", "dpo/mean/beta_sum=0.1"]
    assert not first.reward_model["from_cache"]
    assert 0.0 <= first.reward_model["lo"] <= first.reward_model["accuracy"] <= 1.0
    split = json.loads((out / "split.json").read_text())
    locations = [loc for part in split["locations"].values() for loc in part]
    assert len(locations) == len(set(locations))  # no record in two parts
    records = {f"{data}:{i + 1}": r for i, r in enumerate(hh_records(60))}
    prompts = {
        name: {records[loc]["chosen"].rsplit("\n\nAssistant:", 1)[0] for loc in part}
        for name, part in split["locations"].items()
    }
    names = list(prompts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not prompts[a] & prompts[b], (a, b)
    mean, summed = first.rows[1], first.rows[0]
    assert mean["beta"] == pytest.approx(summed["beta"] * json.loads(
        (out / "run.json").read_text())["mean_completion_length"])
    for name in ("results.md", "score_vs_length.png", "report.md", "reward_model.json"):
        assert (out / name).is_file()
    (invocation,) = json.loads((out / "run.json").read_text())["invocations"]
    assert invocation["command"] == "test"
    assert set(invocation["stages_seconds"]) >= {"reward_model", "sweep"}
    assert (out / "runs" / "dpo_mean_beta_sum=0.1" / "completions.jsonl").is_file()
    assert not list(out.rglob("*.safetensors"))  # weights stay in work_dir

    second = run_recipe(cfg, out, command="test")
    assert second.ran == [] and second.reward_model["from_cache"]
    assert second.table == first.table
    invocations = json.loads((out / "run.json").read_text())["invocations"]
    assert invocations[0] == invocation and invocations[1]["runs_done_now"] == []
