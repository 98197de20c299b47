"""Experiment trackers (train.report_to) through Accelerate: each test trains a few steps on a
tiny model and reads a logged metric back from the tracker's own offline store, where it must
equal the value in metrics.jsonl (the always-on record)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from helpers import tiny_config

from avgalign.config import ConfigError, load_config
from avgalign.tracking import MetricsLog, report_to, tracker_values, truncate_metrics
from avgalign.train import train


def tiny_run(tmp_path, model_dir, data_file, **overrides):
    """Three steps of the tiny model; its metrics.jsonl rows by (split, step)."""
    cfg = tiny_config(tmp_path, model_dir, data_file, **{
        "train.micro_batch_size": 8, "train.max_steps": 3, "train.save_model": False,
        "train.self_check": False, **overrides})
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    return {(r["split"], r["step"]): r for r in rows}


# ---- the config key


def names(value, tensorboard=False):
    cfg = load_config(None, [f"train.report_to={value}", f"train.tensorboard={tensorboard}"])
    return report_to(cfg.train)


def test_report_to_takes_a_name_a_list_or_none():
    assert names("none") == []
    assert names("''") == []
    assert names("WandB") == ["wandb"]
    assert names("[tensorboard, mlflow, tensorboard]") == ["tensorboard", "mlflow"]
    assert names("[]") == []
    # the deprecated key still turns TensorBoard on
    assert names("none", tensorboard=True) == ["tensorboard"]
    assert names("[wandb]", tensorboard=True) == ["wandb", "tensorboard"]


def test_unknown_tracker_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"train\.report_to: unknown tracker 'comet'"):
        names("comet")
    with pytest.raises(ConfigError, match=r"train\.report_to\[1\]: unknown tracker 'tb'"):
        names("[wandb, tb]")
    with pytest.raises(ConfigError, match=r"train\.report_to\[0\]: 'none' in a list"):
        names("[none, wandb]")
    with pytest.raises(ConfigError, match="train.report_to: expected str"):
        names("3")


def test_missing_tracker_package_names_the_pip_extra(tmp_path, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    cfg = load_config(
        None,
        [
            "model.name=/no/such/model",  # raised before the model or the data is read
            f"train.output_dir={tmp_path / 'run'}",
            "train.report_to=[tensorboard, wandb]",
        ],
    )
    extra = r'wandb .*not installed; pip install "avgalign\[wandb\]"'
    with pytest.raises(ConfigError, match=extra):
        train(cfg)
    assert not (tmp_path / "run").exists()


# ---- the record and what goes to the trackers


def test_tracker_values_prefix_the_split_and_drop_step_and_text():
    record = {"split": "eval", "step": 4, "loss": 0.5, "reason": "x", "pairs": 3}
    assert tracker_values(record) == {"eval/loss": 0.5, "eval/pairs": 3}


class FakeAccelerator:
    """What MetricsLog uses of an Accelerator whose trackers were started."""

    def __init__(self):
        self.logged, self.finished = [], 0
        self.trackers = [self]

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished += 1


def test_metrics_log_writes_the_record_then_the_trackers_and_finishes_them(tmp_path):
    acc = FakeAccelerator()
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path, acc) as log:
        log.write({"split": "train", "step": 1, "loss": 0.7})
        log.write({"split": "train", "step": 2, "loss": 0.6})
    assert [json.loads(line)["loss"] for line in path.open()] == [0.7, 0.6]
    assert acc.logged == [(1, {"train/loss": 0.7}), (2, {"train/loss": 0.6})]
    assert acc.finished == 1 and acc.trackers == []
    # resume: lines after the checkpoint and a half-written one go, the rest stays
    path.write_text(path.read_text() + '{"split": "train", "st')
    truncate_metrics(path, 1)
    assert [json.loads(line)["step"] for line in path.open()] == [1]


# ---- each tracker, read back from its store


@pytest.mark.parametrize("setting", ["train.report_to=tensorboard", "train.tensorboard=true"])
def test_tensorboard_event_files_hold_the_logged_loss(
    tmp_path, tiny_model_dir, synthetic_file, setting, capsys
):
    pytest.importorskip("tensorboard", reason="tensorboard not installed: avgalign[tensorboard]")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    key, value = setting.split("=")
    rows = tiny_run(tmp_path, tiny_model_dir, synthetic_file, **{key: value})
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "avgalign")).Reload()
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(losses) == [1, 2, 3]
    assert losses[3] == pytest.approx(rows[("train", 3)]["loss"], rel=1e-6)
    held_out = {e.step: e.value for e in events.Scalars("eval/reward_accuracy")}
    assert held_out[3] == pytest.approx(rows[("eval", 3)]["reward_accuracy"], rel=1e-6)
    deprecated = "train.tensorboard is deprecated" in capsys.readouterr().out
    assert deprecated == (key == "train.tensorboard")


def test_mlflow_local_store_holds_the_logged_loss(
    tmp_path, tiny_model_dir, synthetic_file, monkeypatch
):
    pytest.importorskip("mlflow", reason="mlflow not installed: avgalign[mlflow]")
    from mlflow import MlflowClient

    # a file store: MLflow keeps it in maintenance only (hence the opt-in), but its default,
    # sqlite, spends ~10 s creating its tables
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.chdir(tmp_path)  # whatever MLflow puts in the working directory
    rows = tiny_run(tmp_path, tiny_model_dir, synthetic_file, **{"train.report_to": "mlflow"})
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("avgalign").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["loss.name"] == "dpo"
    losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert sorted(losses) == [1, 2, 3]
    assert losses[2] == pytest.approx(rows[("train", 2)]["loss"], rel=1e-12)


def wandb_records(run_file: Path):
    """The records of an offline W&B run's transaction log (run-<id>.wandb): a LevelDB-style log
    of 32 KiB blocks after a 7-byte header; each chunk is crc32 (4 bytes), length (2), type (1:
    whole record, 2/3/4: first/middle/last piece); each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    block, pos, pieces = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pieces += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record
            pieces = b""


def test_wandb_offline_run_holds_the_logged_loss(
    tmp_path, tiny_model_dir, synthetic_file, monkeypatch
):
    pytest.importorskip("wandb", reason="wandb not installed: avgalign[wandb]")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    rows = tiny_run(tmp_path, tiny_model_dir, synthetic_file, **{"train.report_to": "wandb"})
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = list(wandb_records(run_file))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name) == ("avgalign", "run")
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = r.history.item
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in items}
            history[row["_step"]] = row
    assert sorted(history) == [1, 2, 3]
    assert history[3]["train/loss"] == pytest.approx(rows[("train", 3)]["loss"], rel=1e-12)
    assert history[3]["eval/loss"] == pytest.approx(rows[("eval", 3)]["loss"], rel=1e-12)
