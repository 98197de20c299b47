"""Training checkpoints: written to a temporary folder and renamed into place, so a crash while
saving never damages the last complete checkpoint. Nothing here unpickles arbitrary objects:
weights are safetensors, optimizer and scheduler states load with torch.load(weights_only=True).

Layout: <output_dir>/checkpoints/step-<N>/{weights.safetensors, optimizer.pt, state.json}
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary folders of interrupted saves are ignored."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained (all of them, or only the LoRA adapters). Tied weights appear
    once, as named_parameters() lists each Parameter once."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    output_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` ones."""
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.cpu() for k, v in trainable_state(model).items()}
    save_file(weights, str(tmp / "weights.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        tmp / "optimizer.pt",
    )
    (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore what save_checkpoint wrote; returns state.json (with 'step')."""
    weights = load_file(str(path / "weights.safetensors"))
    expected = set(trainable_state(model))
    if set(weights) != expected:
        missing = sorted(expected - set(weights))[:3]
        raise ValueError(f"checkpoint {path} does not match the model (missing e.g. {missing})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    state = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return json.loads((path / "state.json").read_text())
