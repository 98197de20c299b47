"""The run's metric record: metrics.jsonl (one JSON object per line, flushed at once, so a crash
loses at most the line being written), mirrored to TensorBoard when asked. Written by the main
process only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .data import write_text_atomic


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


class MetricsLog:
    """Appends records to `path`; with `tensorboard_dir`, numeric fields also become scalars named
    <split>/<field> at the record's step."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a")
        self.tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            prefix = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
