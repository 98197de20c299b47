"""Reliability: exact resume after SIGKILL, safe checkpoint writes, stop signals, numerical
guards, the bad-input corpus, safe loading, and 2-process training against 1 process."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ENV, assert_same_weights, cli, metric_rows, run_until, write_config
from safetensors.torch import load_file

import avgalign.checkpoint as checkpoint_module
import avgalign.train as train_module
from avgalign.checkpoint import list_checkpoints, load_checkpoint
from avgalign.config import ModelConfig, load_config
from avgalign.data import DataError, load_preferences, tokenize_pairs
from avgalign.models import load_model
from avgalign.train import train

REPO = Path(__file__).resolve().parents[1]
BAD = Path(__file__).parent / "data" / "bad"


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir, synthetic_file):
    cfg = write_config(tmp_path, tiny_model_dir, synthetic_file)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(
        cli(str(cfg), "--output-dir", str(whole)), env=ENV, check=True, capture_output=True
    )

    proc = run_until(
        cli(str(cfg), "--output-dir", str(killed)),
        killed / "metrics.jsonl",
        step=11,
        sig=signal.SIGKILL,
    )
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "model").exists()
    steps = [int(p.name.split("-")[1]) for p in list_checkpoints(killed)]
    assert steps and max(steps) < 30

    done = subprocess.run(
        cli(str(cfg), "--output-dir", str(killed), "--resume"),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert f"resumed from {killed / 'checkpoints'}" in done.stdout
    # bitwise: same data order (a function of seed and step), same optimizer, scheduler and RNG
    assert_same_weights(whole / "model", killed / "model")
    assert metric_rows(whole) == metric_rows(killed)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, tiny_model_dir, synthetic_file):
    cfg = write_config(tmp_path, tiny_model_dir, synthetic_file, save_every=0, max_steps=200)
    out = tmp_path / "run"
    proc = run_until(
        cli(str(cfg), "--output-dir", str(out)), out / "metrics.jsonl", step=5, sig=signal.SIGTERM
    )
    assert proc.returncode == 130, proc.stderr_text
    assert "stopped by SIGTERM" in proc.stderr_text and "--resume" in proc.stderr_text
    (ckpt,) = list_checkpoints(out)
    step = json.loads((ckpt / "state.json").read_text())["step"]
    assert 5 <= step < 200
    assert len(metric_rows(out)) == step


def test_failed_checkpoint_write_keeps_the_previous_one(
    tmp_path, tiny_model_dir, synthetic_file, monkeypatch
):
    cfg = load_config(
        write_config(tmp_path, tiny_model_dir, synthetic_file, max_steps=6),
        [f"train.output_dir={tmp_path / 'run'}"],
    )
    real_save = checkpoint_module.torch.save
    calls = {"n": 0}

    def failing_save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies half-way, as in a crash or full disk
            Path(path).write_bytes(b"partial")
            raise OSError("simulated failure while saving")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated failure"):
        train(cfg)
    (ckpt,) = list_checkpoints(tmp_path / "run")
    assert ckpt.name == "step-3"
    model = load_model(ModelConfig(name=str(tiny_model_dir)))
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    assert load_checkpoint(ckpt, model, optimizer, scheduler)["step"] == 3

    # and a resumed run completes from it
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    cfg.train.resume = True
    assert train(cfg).steps == 6


def test_nonfinite_loss_stops_or_skips(tmp_path, tiny_model_dir, synthetic_file, monkeypatch):
    real_loss = train_module.preference_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, metrics = real_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 9:  # micro-batch 9 = step 5 (two micro-batches per step)
            loss = loss * float("nan")
        return loss, metrics

    monkeypatch.setattr(train_module, "preference_loss", poisoned)
    cfg = load_config(
        write_config(tmp_path, tiny_model_dir, synthetic_file, max_steps=8, save_every=2),
        [f"train.output_dir={tmp_path / 'a'}"],
    )
    with pytest.raises(FloatingPointError, match="step 5"):
        train(cfg)
    assert [p.name for p in list_checkpoints(tmp_path / "a")] == ["step-2", "step-4"]

    calls["n"] = 0
    cfg.train.output_dir = str(tmp_path / "b")
    cfg.train.skip_nonfinite = True
    train(cfg)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["skipped_steps"] == 1
    assert all(
        torch.isfinite(v).all()
        for v in load_file(str(tmp_path / "b" / "model" / "model.safetensors")).values()
    )


EXPECTED_ERRORS = {
    "not_json.jsonl": "not_json.jsonl:2: not valid JSON",
    "missing_field.jsonl": "missing_field.jsonl:2: field 'rejected' is missing",
    "wrong_type.jsonl": "wrong_type.jsonl:2: field 'chosen' must be a string",
    "empty_completion.jsonl": "empty_completion.jsonl:2: field 'chosen' is an empty completion",
    "invalid_utf8.jsonl": "invalid_utf8.jsonl:2: invalid UTF-8",
    "not_an_object.jsonl": "not_an_object.jsonl:2: record must be a JSON object",
    "no_assistant_turn.jsonl": "no_assistant_turn.jsonl:2: fields 'chosen' and 'rejected'",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_ERRORS))
def test_bad_input_corpus_errors_and_skips(name, tokenizer):
    with pytest.raises(DataError) as info:
        load_preferences(str(BAD / name), tokenizer=tokenizer)
    message = str(info.value)
    assert EXPECTED_ERRORS[name] in message and "\n" not in message
    report = load_preferences(str(BAD / name), tokenizer=tokenizer, on_error="skip")
    assert len(report.examples) == 1 and len(report.skipped) == 1
    assert report.skipped[0][0].endswith(f"{name}:2")


def test_bad_input_that_loads_is_reported(tokenizer):
    report = load_preferences(str(BAD / "identical.jsonl"), tokenizer=tokenizer)
    assert len(report.examples) == 2 and "identical" in report.warnings[0]
    for name, field in [
        ("long_prompt.jsonl", "prompt_truncated"),
        ("huge_record.jsonl", "chosen_truncated"),
    ]:
        report = load_preferences(str(BAD / name), tokenizer=tokenizer)
        pairs, truncation = tokenize_pairs(report.examples, tokenizer, max_length=64)
        assert getattr(truncation, field) == 1
        assert all(len(p.prompt_ids) + len(p.chosen_ids) <= 64 for p in pairs)


def test_bad_input_end_to_end_through_the_cli(tmp_path, tiny_model_dir):
    data = tmp_path / "mixed.jsonl"
    good = [(BAD / "identical.jsonl").read_text().splitlines()[0]] * 6
    data.write_text(
        "\n".join(
            good
            + [
                (BAD / n).read_text().splitlines()[1]
                for n in ("missing_field.jsonl", "wrong_type.jsonl")
            ]
        )
        + "\n"
    )
    cfg = write_config(tmp_path, tiny_model_dir, data, max_steps=1, save_every=0)
    out = tmp_path / "run"
    failed = subprocess.run(
        cli(str(cfg), "--output-dir", str(out)), env=ENV, capture_output=True, text=True
    )
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr.strip() == f"error: {data}:7: field 'rejected' is missing"
    ok = subprocess.run(
        cli(str(cfg), "--output-dir", str(out), "--set", "data.on_error=skip"),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"][str(data)]["skipped"] == [
        f"{data}:7: field 'rejected' is missing",
        f"{data}:8: field 'chosen' must be a string, got int",
    ]


def test_pickle_weights_are_refused_unless_allowed(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_model_dir / "config.json", pickled)
    torch.save(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict(),
        pickled / "pytorch_model.bin",
    )
    assert (pickled / "pytorch_model.bin").is_file()
    assert not (pickled / "model.safetensors").exists()
    with pytest.raises(OSError, match="allow_pickle"):
        load_model(ModelConfig(name=str(pickled)))
    assert load_model(ModelConfig(name=str(pickled), allow_pickle=True)).num_parameters() > 0


@pytest.mark.skipif(
    shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None,
    reason="accelerate launcher not installed",
)
def test_two_processes_match_one(tmp_path, tiny_model_dir, synthetic_file):
    cfg = write_config(
        tmp_path,
        tiny_model_dir,
        synthetic_file,
        batch_size=8,
        micro_batch_size=4,
        max_steps=6,
        save_every=0,
        warmup_ratio=0.0,
    )
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        cli(str(cfg), "--output-dir", str(one)), env=ENV, check=True, capture_output=True
    )
    launcher = Path(sys.executable).parent / "accelerate"
    result = subprocess.run(
        [
            str(launcher),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "avgalign",
            "train",
            str(cfg),
            "--output-dir",
            str(two),
        ],
        env={**ENV, "ACCELERATE_USE_CPU": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("done:") == 1  # only the main process reports
    a, b = metric_rows(one), metric_rows(two)
    assert len(a) == len(b) == 6
    for ra, rb in zip(a, b):
        # same global batch, split over processes: equal up to float summation order
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6)
        assert rb["reward_margin"] == pytest.approx(ra["reward_margin"], rel=1e-4, abs=1e-6)
        assert rb["learning_rate"] == ra["learning_rate"]


def test_killed_sweep_resumes_without_rerunning_or_duplicating(tmp_path):
    out, cache = tmp_path / "demo", tmp_path / "cache"
    cmd = [sys.executable, "-m", "avgalign", "demo", "--quick", "--out", str(out),
           "--cache-dir", str(cache), "--betas", "0.1", "0.3", "1", "--length-biases", "0.3"]
    results = out / "length-bias-0.3" / "results.jsonl"
    proc = run_until(cmd, results, step=3, sig=signal.SIGKILL, timeout=300)
    assert proc.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
    before = [json.loads(line)["key"] for line in results.read_text().splitlines()
              if line.endswith("}")]
    assert 3 <= len(before) < 7  # the baseline + 6 runs

    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    keys = [json.loads(line)["key"] for line in results.read_text().splitlines()
            if line.endswith("}")]
    assert len(keys) == len(set(keys)) == 7  # every run once, none twice
    assert keys[: len(before)] == before  # finished rows kept as they were
    assert f"({7 - len(before)} runs done now" in done.stdout
