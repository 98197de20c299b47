"""The run's metric record: metrics.jsonl (one JSON object per line, flushed at once, so a crash
loses at most the line being written), always, by the main process; and the same numbers in the
experiment trackers of `train.report_to` (TensorBoard, Weights & Biases, MLflow), through
Accelerate's trackers, as <split>/<field> at the record's step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import TRACKERS, ConfigError, TrainConfig, flatten, report_to  # noqa: F401
from .data import write_text_atomic

if TYPE_CHECKING:
    from accelerate import Accelerator


PROJECT = "avgalign"  # the W&B project, MLflow experiment and TensorBoard run of every run


def require_trackers(names: list[str]) -> None:
    """ConfigError, saying which pip extra installs it, for a tracker whose package is missing."""
    # Accelerate's own tests: a tracker it finds missing, it drops with a warning only
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    installed = {
        "tensorboard": is_tensorboard_available,
        "wandb": is_wandb_available,
        "mlflow": is_mlflow_available,
    }
    for name in names:
        if not installed[name]():
            raise ConfigError(
                f"train.report_to: {name} is asked for but its package is not installed; "
                f'pip install "avgalign[{name}]"'
            )


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict as the flat `section.key -> value` the trackers store: lists and mappings
    inside become their text (TensorBoard's hparams take only scalars and strings)."""
    return {
        key: value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
        for key, value in flatten(config).items()
    }


def start_trackers(accelerator: Accelerator, config: dict[str, Any], run_name: str) -> None:
    """Start the Accelerator's trackers (main process only): project `PROJECT`, the run named
    `run_name`, the flattened config as its hyper-parameters."""
    accelerator.init_trackers(
        PROJECT,
        config=hyperparameters(config),
        init_kwargs={"wandb": {"name": run_name}, "mlflow": {"run_name": run_name}},
    )


def finish_trackers(accelerator: Accelerator) -> None:
    """What Accelerator.end_training() does for the trackers, without what it does next,
    destroying the process group: a process started by `accelerate launch` may train again
    (a sweep) or still communicate after train() returns."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after checkpoint `step` (and a half-written last line), so a
    resumed run's metrics.jsonl reads as if it had never stopped."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))


def mean_metrics(per_pair: dict[str, list[float]]) -> dict[str, float]:
    return {k: float(sum(v) / len(v)) for k, v in per_pair.items() if v}


def tracker_values(record: dict[str, Any]) -> dict[str, float]:
    """A metrics record's numbers as the trackers get them: <split>/<field>, without the step."""
    prefix = record.get("split", "train")
    return {
        f"{prefix}/{k}": v
        for k, v in record.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
    }


class MetricsLog:
    """Appends records to `path`; with an `accelerator` whose trackers were started, the numbers
    of each record also go to them (Accelerator.log) at the record's step, and closing the log
    finishes them."""

    def __init__(self, path: Path, accelerator: Accelerator | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a")
        self.accelerator = accelerator

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log(tracker_values(record), step=record["step"])

    def close(self) -> None:
        self.file.close()
        if self.accelerator is not None:
            finish_trackers(self.accelerator)

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
