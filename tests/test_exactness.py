"""A run trains what the model computes, in the precision asked for, from its own seeds, into its
own folder, or stops with one line that says why: the first-batch self-check, the reference
under the policy's autocast, fp16 loss scaling, runs independent of their neighbours, output
folders that are never mixed up, and data too small to train on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model, synthetic_records
from helpers import read_metrics, tiny_config
from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM

import avgalign.train as train_module
from avgalign.checkpoint import remove_paths
from avgalign.config import ConfigError, load_config
from avgalign.data import PreferenceExample, tokenize_pairs
from avgalign.logprobs import AttentionSpec, causal_mask_function
from avgalign.models import load_model
from avgalign.train import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pairs(tokenizer):
    examples = [
        PreferenceExample(r["prompt"], r["chosen"], r["rejected"], f"x:{i}")
        for i, r in enumerate(synthetic_records(24))
    ]
    return tokenize_pairs(examples, tokenizer, max_length=64)[0]


def quick(tmp_path, tiny_model_dir, synthetic_file, name="run", **overrides):
    return tiny_config(
        tmp_path,
        tiny_model_dir,
        synthetic_file,
        **{"train.output_dir": str(tmp_path / name), "train.max_steps": 2, **overrides},
    )


# ---------------------------------------------------------------------------------- self-check


def test_self_check_runs_by_default_and_is_reported(tmp_path, tiny_model_dir, synthetic_file):
    result = train(quick(tmp_path, tiny_model_dir, synthetic_file))
    assert result.self_check is not None and result.self_check.relative_error < 1e-5
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["self_check"]["layout"] == "shared_prompt"
    assert summary["self_check"]["seconds"] < 5


class ScaledHeadLlama(LlamaForCausalLM):
    """An architecture whose forward post-processes the logits in a way the trainer does not know
    (as custom code loaded with trust_remote_code may)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out


def test_self_check_refuses_a_forward_pass_it_does_not_reproduce(
    tmp_path, tokenizer, pairs, tiny_model_dir
):
    base = make_model(len(tokenizer))
    model = ScaledHeadLlama(base.config)
    model.load_state_dict(base.state_dict())
    cfg = quick(tmp_path, tiny_model_dir, "unused.jsonl")
    with pytest.raises(ConfigError, match="so does train.layout=concat.*not reproduced"):
        train(cfg, model=model, tokenizer=tokenizer, train_pairs=pairs, eval_pairs=[])
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before the first step
    cfg.train.self_check = False  # the way out, at the user's risk
    train(cfg, model=model, tokenizer=tokenizer, train_pairs=pairs, eval_pairs=[])


def test_self_check_names_the_layout_that_works(
    tmp_path, tokenizer, pairs, tiny_model_dir, monkeypatch
):
    """A shared-prompt mask that drops the sliding window (the bug this check exists for) on a
    Mistral whose window is shorter than the pairs: the run stops and points to concat."""
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=3,
    )
    model = MistralForCausalLM(config)
    monkeypatch.setattr(AttentionSpec, "rule", lambda self, kind, longest: causal_mask_function)
    cfg = quick(tmp_path, tiny_model_dir, "unused.jsonl")
    with pytest.raises(ConfigError, match="train.layout=concat matches it: set that"):
        train(cfg, model=model, tokenizer=tokenizer, train_pairs=pairs, eval_pairs=[])
    cfg.train.layout = "concat"
    cfg.train.overwrite = True
    result = train(cfg, model=model, tokenizer=tokenizer, train_pairs=pairs, eval_pairs=[])
    assert result.layout == "concat" and result.self_check.relative_error < 1e-5


# ----------------------------------------------------------------------------------- precision


def test_bf16_reference_matches_the_policy_at_step_one(tmp_path, tiny_model_dir, synthetic_file):
    """The reference is computed under the policy's autocast, and the precision is part of the
    cache key: at step 1 (before any update) every log-ratio is 0 up to rounding."""
    cache = tmp_path / "cache"
    fp32 = quick(tmp_path, tiny_model_dir, synthetic_file, "fp32", **{"train.max_steps": 1})
    assert train(fp32).reference_from_cache is False
    bf16 = quick(
        tmp_path,
        tiny_model_dir,
        synthetic_file,
        "bf16",
        **{"train.max_steps": 1, "train.mixed_precision": "bf16"},
    )
    assert bf16.train.reference_cache_dir == str(cache)
    result = train(bf16)
    assert result.reference_from_cache is False  # not the float32 values
    row = read_metrics(tmp_path / "bf16", "train")[0]
    assert abs(row["reward_margin"]) < 1e-6  # 7.8e-5 with a float32 reference
    assert row["reward_accuracy"] == 0.0  # 0.75 with a float32 reference
    assert json.loads((tmp_path / "bf16" / "summary.json").read_text())["mixed_precision"] == "bf16"


def test_fp16_overflow_skips_the_step_and_lowers_the_scale(
    tmp_path, tiny_model_dir, synthetic_file, monkeypatch
):
    """A loss scale too large for float16 gradients: as in PyTorch AMP, the scaler skips those
    steps and halves the scale each time (counted and logged), then training goes on."""
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device: real(device, init_scale=2.0**24))
    cfg = quick(
        tmp_path,
        tiny_model_dir,
        synthetic_file,
        **{"train.max_steps": 8, "train.mixed_precision": "fp16", "train.save_every": 4},
    )
    result = train(cfg)
    skipped = read_metrics(tmp_path / "run", "skipped")
    trained = read_metrics(tmp_path / "run", "train")
    assert result.overflow_steps == len(skipped) >= 1 and result.skipped_steps == 0
    scales = [row["loss_scale"] for row in skipped]
    assert scales == [2.0**23 / 2**i for i in range(len(skipped))]
    assert len(trained) == 8 - len(skipped)
    # the skipped steps changed nothing: the first trained step is still at the initial weights
    assert trained[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert trained[-1]["loss"] < trained[0]["loss"]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-8" / "state.json").read_text())
    assert state["overflow_steps"] == result.overflow_steps


def test_fp16_skip_nonfinite_keeps_the_scaler_consistent(
    tmp_path, tiny_model_dir, synthetic_file, monkeypatch
):
    """A non-finite loss under fp16 with train.skip_nonfinite: the step is skipped and the next
    ones run (the scaler's unscale is closed, not left open for the next step to trip on)."""
    real_loss = train_module.preference_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, metrics = real_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in (3, 4):  # both micro-batches of step 2
            loss, metrics["loss"] = loss * float("nan"), metrics["loss"] * float("nan")
        return loss, metrics

    monkeypatch.setattr(train_module, "preference_loss", poisoned)
    cfg = quick(
        tmp_path,
        tiny_model_dir,
        synthetic_file,
        **{
            "train.max_steps": 4,
            "train.mixed_precision": "fp16",
            "train.skip_nonfinite": True,
        },
    )
    result = train(cfg)
    assert result.skipped_steps == 1
    assert [r["step"] for r in read_metrics(tmp_path / "run", "train")] == [1, 3, 4]


# ------------------------------------------------------------------------------- independence


def lora_config(tmp_path, tiny_model_dir, synthetic_file, name, **overrides):
    return quick(
        tmp_path,
        tiny_model_dir,
        synthetic_file,
        name,
        **{
            "model.lora.r": 4,
            "train.learning_rate": 1e-2,
            "train.max_steps": 3,
            "train.save_model": False,
            **overrides,
        },
    )


def test_a_lora_run_does_not_depend_on_what_ran_before(tmp_path, tiny_model_dir, synthetic_file):
    """A sweep cell alone, after another cell and after other random draws, its model loaded
    by the caller as the HH recipe does: identical numbers, and the caller's RNG state is as it
    was. LoRA adapters start from train.seed alone."""

    def cell(name, draws, **overrides):
        torch.rand(draws)  # whatever ran before in this process
        cfg = lora_config(tmp_path, tiny_model_dir, synthetic_file, name, **overrides)
        model = load_model(cfg.model, seed=cfg.train.seed)
        state = torch.get_rng_state()
        train(cfg, model=model)
        assert torch.equal(torch.get_rng_state(), state)
        keys = ("loss", "reward_margin", "grad_norm")
        return [[r[k] for k in keys] for r in read_metrics(tmp_path / name, "train")]

    alone = cell("alone", 5)
    cell("neighbour", 7, **{"loss.aggregation": "mean", "loss.beta": 1.0})
    assert cell("in_sweep", 1000) == alone
    # sum and mean at the same seed start from the same adapters
    adapters = []
    for draws, aggregation in ((17, "sum"), (3, "mean")):
        torch.rand(draws)
        cfg = lora_config(
            tmp_path, tiny_model_dir, synthetic_file, "x", **{"loss.aggregation": aggregation}
        )
        model = load_model(cfg.model, seed=cfg.train.seed)
        adapters.append({k: v for k, v in model.state_dict().items() if "lora_A" in k})
    assert adapters[0] and all(torch.equal(v, adapters[1][k]) for k, v in adapters[0].items())


# ----------------------------------------------------------------------------- output folders


def test_a_fresh_run_into_a_used_folder_is_refused(tmp_path, tiny_model_dir, synthetic_file):
    cfg = quick(tmp_path, tiny_model_dir, synthetic_file)
    train(cfg)
    with pytest.raises(ConfigError, match="already holds a run .*--resume.*--overwrite"):
        train(cfg)
    cfg.train.overwrite = True
    train(cfg)
    steps = [r["step"] for r in read_metrics(tmp_path / "run", "train")]
    assert steps == [1, 2]  # replaced, not appended to


def test_resume_checks_the_config(tmp_path, tiny_model_dir, synthetic_file):
    cfg = quick(tmp_path, tiny_model_dir, synthetic_file, **{"train.save_every": 1})
    train(cfg)
    cfg.train.resume = True
    cfg.loss.beta = 0.5
    cfg.loss.aggregation = "mean"
    with pytest.raises(ConfigError, match=r"loss.aggregation: 'sum' -> 'mean'; loss.beta: 0.1"):
        train(cfg)
    cfg.loss.beta, cfg.loss.aggregation = 0.1, "sum"
    cfg.train.max_steps = 3  # meant to change: continue for one more step
    result = train(cfg)
    assert result.steps == 3
    assert [r["step"] for r in read_metrics(tmp_path / "run", "train")] == [1, 2, 3]


def test_resume_without_a_checkpoint_starts_over(tmp_path, tiny_model_dir, synthetic_file):
    """A run stopped before its first checkpoint: --resume restarts it from step 0 in place of
    what it left (its config matches), not appending to its metrics."""
    cfg = quick(tmp_path, tiny_model_dir, synthetic_file)
    train(cfg)
    run = tmp_path / "run"
    for written in ("checkpoints", "model", "summary.json"):  # as if killed before step 1 saved
        remove_paths([run / written])
    cfg.train.resume = True
    train(cfg)
    assert [r["step"] for r in read_metrics(run, "train")] == [1, 2]
    cfg.loss.beta = 0.3  # another run's folder: refused, naming what differs
    with pytest.raises(ConfigError, match=r"another config \(loss.beta: 0.1 -> 0.3\)"):
        train(cfg)


def test_an_output_path_that_is_a_file_is_one_line(tmp_path, tiny_model_dir, synthetic_file):
    target = tmp_path / "file"
    target.write_text("")
    cfg = quick(tmp_path, tiny_model_dir, synthetic_file, **{"train.output_dir": str(target)})
    with pytest.raises(ConfigError, match="is a file; give a folder path"):
        train(cfg)


# -------------------------------------------------------------------------- errors, not traces


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "AVGALIGN_CACHE": str(cwd / "cache")}
    return subprocess.run(
        [sys.executable, "-m", "avgalign", "train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(
    "records, expected",
    [
        (0, "no usable training pairs"),
        (5, "4 training pairs after holding out 1 for evaluation, fewer than train.batch_size=8"),
    ],
)
def test_too_little_data_is_one_line(tmp_path, tiny_model_dir, records, expected):
    data = tmp_path / "pairs.jsonl"
    rows = synthetic_records(6)[:records] if records else [{"prompt": "a", "chosen": "b"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"model: {{name: {tiny_model_dir}}}\n"
        f"data: {{train: {data}, on_error: skip, eval_fraction: 0.2}}\n"
        "train: {progress: false}\n"
    )
    done = cli(str(cfg), "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {data}: ") and expected in last


def test_a_used_output_folder_is_one_line_through_the_cli(tmp_path, tiny_model_dir, synthetic_file):
    cfg = load_config(
        None,
        [
            f"model.name={tiny_model_dir}",
            f"data.train={synthetic_file}",
            "train.max_steps=1",
            "train.progress=false",
        ],
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(cfg.to_dict()))  # JSON is YAML
    first = cli(str(path), "--output-dir", "out", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = cli(str(path), "--output-dir", "out", cwd=tmp_path)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "already holds a run" in again.stderr.strip().splitlines()[-1]
    replaced = cli(str(path), "--output-dir", "out", "--overwrite", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr


def test_first_use_of_smollm2_by_two_processes_at_once(tmp_path):
    """accelerate launch on a fresh machine: both processes convert-or-wait, neither crashes."""
    pytest.importorskip("gguf")
    code = "from avgalign.models import smollm2_path; print(smollm2_path())"
    env = {**os.environ, "AVGALIGN_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-500:] for _, err in outputs]
    folder = Path(outputs[0][0].strip())
    assert outputs[1][0].strip() == str(folder) and (folder / "model.safetensors").is_file()
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".smollm2-")] == []
