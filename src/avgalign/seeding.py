"""Seeded randomness that leaves the caller's random streams alone.

Library code that needs reproducible random numbers (sampling, a new head's initialisation) seeds
its own stream inside `seeded`; torch.manual_seed alone would also reseed the caller's global
generators, silently changing whatever the caller draws next.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the block with torch's CPU generator, and the CUDA generator of `device` when it is a
    CUDA device, seeded to `seed`; on exit those generators are back in the state they were in.

    Inside the block the numbers drawn are those after torch.manual_seed(seed) on the same
    devices; generators of other CUDA devices are neither seeded nor touched. Another accelerator
    (e.g. "mps") is seeded by torch.manual_seed, as before, but its generator is not restored.
    """
    device = torch.device("cpu" if device is None else device)
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        if device.type in ("cpu", "cuda"):
            torch.random.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield
