"""What several test modules share: tiny training configs, running `avgalign train` in a
subprocess, reading metrics, comparing weights, a free port. Test modules import from here,
never from each other."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from avgalign.config import load_config


def tiny_config(tmp_path, model_dir, data_file, **overrides):
    sets = {
        "model.name": str(model_dir),
        "data.train": str(data_file),
        "data.max_length": 64,
        "data.eval_fraction": 0.25,
        "train.output_dir": str(tmp_path / "run"),
        "train.batch_size": 8,
        "train.micro_batch_size": 4,
        "train.max_steps": 12,
        "train.learning_rate": 3e-3,
        "train.warmup_ratio": 0.0,
        "train.scheduler": "constant",
        "train.progress": False,
        "train.reference_cache_dir": str(tmp_path / "cache"),
        **overrides,
    }
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


def read_metrics(run_dir, split):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


TIMING = {"seconds", "pairs_per_s", "tokens_per_s"}


def write_config(tmp_path, model_dir, data_file, **train_keys) -> Path:
    keys = {
        "batch_size": 4,
        "micro_batch_size": 2,
        "max_steps": 30,
        "learning_rate": 1.0e-3,
        "progress": False,
        "reference_cache_dir": str(tmp_path / "cache"),
        "save_every": 3,
        "warmup_ratio": 0.1,
        **train_keys,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(
        json.dumps(
            {
                "model": {"name": str(model_dir)},
                "data": {"train": str(data_file), "max_length": 64, "eval_fraction": 0.0},
                "train": keys,
            }
        )
    )  # JSON is YAML
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "avgalign", "train", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def metric_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def run_until(cmd: list[str], metrics: Path, step: int, sig: int, timeout: float = 120):
    """Start `cmd`, wait until metrics.jsonl shows `step`, then send `sig`; returns the process."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.is_file():
            lines = metrics.read_text().splitlines()
            if len(lines) >= step:
                proc.send_signal(sig)
                break
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    proc.stdout_text, proc.stderr_text = proc.communicate(timeout=timeout)
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
