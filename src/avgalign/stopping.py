"""Stopping a run cleanly: SIGINT / SIGTERM become a request to stop after the current step, and
in a multi-process run the processes agree on it, so that a signal reaching any one of them
makes all of them save the same step and exit."""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch


class TrainingInterrupted(RuntimeError):
    """Raised after a stop signal, once a checkpoint has been saved."""


class StopSignals:
    """Turns SIGINT / SIGTERM into a request to stop after the current step (and checkpoint).

    A second signal while stopping falls back to the default behaviour (immediate exit)."""

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, accelerator) -> str | None:
        """What stops the run, decided the same way on every process: a collective call, made by
        all processes once per step. Names the signal and, in a multi-process run, the
        process that received it."""
        if accelerator.num_processes == 1:
            return self.requested
        names = list(signal.Signals.__members__)
        code = names.index(self.requested) + 1 if self.requested else 0
        codes = torch.zeros(accelerator.num_processes, dtype=torch.long, device=accelerator.device)
        codes[accelerator.process_index] = code
        codes = accelerator.reduce(codes, "sum").tolist()
        signalled = [(rank, c) for rank, c in enumerate(codes) if c]
        if not signalled:
            return None
        rank, c = signalled[0]
        return f"{names[c - 1]} (received by process {rank})"
