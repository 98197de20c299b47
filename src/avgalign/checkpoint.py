"""Training checkpoints: written to a temporary folder and renamed into place, so a crash while
saving never damages the last complete checkpoint. Nothing here unpickles arbitrary objects:
weights are safetensors, optimizer and scheduler states load with torch.load(weights_only=True).

Layout: <output_dir>/checkpoints/step-<N>/{weights.safetensors, optimizer.pt, state.json}

The weights and optimizer state are full (unsharded) state dicts keyed by parameter name, taken
with PyTorch's distributed state-dict API: the same files whether the run was one process, DDP,
or FSDP (1 or 2), so a checkpoint resumes on any number of processes and any wrapping.
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
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from .config import ConfigError, config_changes, flatten, read_yaml
from .data import PROMPT_RENDERING_FILE

_NAME = re.compile(r"^step-(\d+)$")
# What a run writes into its output folder. A folder holding one of the first five holds a run
# that made progress; config.yaml and the others alone are left by a run stopped during set-up.
RUN_FILES = ("metrics.jsonl", "checkpoints", "summary.json", "model", "adapter")
HELDOUT_FILE = "heldout.jsonl"  # the held-out pairs as text, for `avgalign evaluate --prompts`
SETUP_FILES = ("config.yaml", "tensorboard", PROMPT_RENDERING_FILE, HELDOUT_FILE)


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary folders of interrupted saves are ignored."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


class RunFinished(Exception):
    """`--resume` on a run that has finished: nothing to train and nothing is changed."""


# the keys that, changed on a finished run, ask for more training rather than a replay
MORE_STEPS = frozenset({"train.max_steps", "train.epochs"})


def check_output_dir(
    output_dir: Path, config: dict[str, Any], *, resume: bool, overwrite: bool
) -> tuple[Path | None, list[Path], str | None]:
    """Decide, before a run starts, what to do with its output folder; writes nothing.

    Returns (checkpoint to resume from or None, files of an earlier run to delete first, a note
    to print or None). A fresh run into a folder that holds a run is refused (ConfigError) unless
    `overwrite`. `resume`:
    - on a finished run (summary.json written) with the same train.max_steps and train.epochs,
      raises RunFinished: nothing is trained or written; with more steps it continues from the
      newest checkpoint (refused when there is none: it would retrain from step 0);
    - otherwise takes the newest complete checkpoint, refused when it was saved with a config
      that differs from `config` outside config.RESUMABLE_CHANGES (the message names the keys);
    - with no checkpoint, starts from step 0 and says so, replacing what an unfinished attempt
      with the same config left.
    Pure, so that every process of a multi-process run reaches the same decision before any
    deletes.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir: {out} is a file; give a folder path")
    found = list_checkpoints(out) if resume else []
    if found:
        state = json.loads((found[-1] / "state.json").read_text())
        _check_same_run(found[-1], state.get("config") or _saved_config(out), config)
    if resume and (out / "summary.json").is_file():
        saved = _saved_config(out)
        _check_same_run(out, saved, config)
        _check_finished(out, saved, config, found)
    if found:
        return found[-1], [], None
    existing = [out / name for name in RUN_FILES if (out / name).exists()]
    leftovers = [out / name for name in SETUP_FILES if (out / name).exists()]
    fresh = f"no checkpoint in {checkpoint_dir(out)}: starting at step 0" if resume else None
    if not existing:
        return None, leftovers, fresh
    saved = _saved_config(out)
    same_run = resume and saved is not None and not config_changes(saved, config)
    if not (overwrite or same_run):
        how = "" if resume else "resume it with train.resume=true (--resume), "
        raise ConfigError(
            f"train.output_dir: {out} already holds a run "
            f"({', '.join(p.name for p in existing)}); {how}replace it with "
            "train.overwrite=true (--overwrite), or choose another folder"
        )
    if same_run and not overwrite:
        written = ", ".join(p.name for p in existing)
        fresh += f" (replacing what the unfinished attempt wrote: {written})"
    return None, existing + leftovers, fresh


def _check_same_run(source: Path, saved: dict[str, Any] | None, config: dict[str, Any]) -> None:
    """Refuse to resume from `source` (a checkpoint, a finished run) saved with another config,
    outside config.RESUMABLE_CHANGES; the message names the keys."""
    changes = config_changes(saved, config) if saved is not None else []
    if changes:
        raise ConfigError(
            f"cannot resume from {source}: it was saved with another config "
            f"({'; '.join(changes)}); resume with the same values, or start a fresh run "
            "with train.overwrite=true (--overwrite)"
        )


def _check_finished(
    out: Path, saved: dict[str, Any] | None, config: dict[str, Any], found: list[Path]
) -> None:
    """Called for `resume` on a folder whose run wrote summary.json (it finished), with the
    config it saved."""
    saved, now = flatten(saved or {}), flatten(config)
    steps = json.loads((out / "summary.json").read_text()).get("steps")
    if all(saved.get(key) == now.get(key) for key in MORE_STEPS):
        raise RunFinished(
            f"{out} holds a finished run ({steps} steps): nothing to resume, nothing changed. "
            "Raise train.max_steps or train.epochs to train it further, or retrain it with "
            "train.overwrite=true (--overwrite)"
        )
    if not found:
        raise ConfigError(
            f"{out} holds a finished run ({steps} steps) with no checkpoint to continue from; "
            "retrain it with train.overwrite=true (--overwrite), or train into another folder"
        )


def remove_paths(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _saved_config(output_dir: Path) -> dict[str, Any] | None:
    path = Path(output_dir) / "config.yaml"
    return read_yaml(path) if path.is_file() else None


def _trainable_names(model: torch.nn.Module) -> list[str]:
    """The parameters being trained (all of them, or only the LoRA adapters). Tied weights appear
    once, as named_parameters() lists each Parameter once."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def full_training_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, prefix: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trainable weights, optimizer state), gathered in full on the CPU of the main process;
    other processes get empty dicts. A collective call under DDP/FSDP: every process makes it.
    `model` is the prepared (wrapped) module; weight names drop `prefix`."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights, optim = get_state_dict(model, optimizer, options=options)
    if not weights:
        return {}, {}
    names = _trainable_names(_unwrapped(model))
    weights = {n.removeprefix(prefix): weights[n].contiguous() for n in names}
    return weights, optim


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP; FSDP keeps the module and its names


def save_checkpoint(
    output_dir: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler: Any,
    extra: dict[str, Any],
    keep: int,
    scaler: Any = None,
) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` ones (main process
    only; `weights` and `optimizer_state` from full_training_state). `scaler`: the fp16 loss
    scaler, if any, whose scale resumes where it was."""
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights, str(tmp / "weights.safetensors"))
    torch.save(
        {
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "scaler": scaler.state_dict() if scaler is not None else None,
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
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any = None,
    prefix: str = "",
) -> dict[str, Any]:
    """Restore what save_checkpoint wrote into the prepared `model` (every process reads the
    files and keeps its own shard); returns state.json (with 'step')."""
    weights = load_file(str(path / "weights.safetensors"))
    names = _trainable_names(_unwrapped(model))
    expected = {n.removeprefix(prefix) for n in names}
    if set(weights) != expected:
        missing = sorted(expected - set(weights))[:3]
        raise ValueError(f"checkpoint {path} does not match the model (missing e.g. {missing})")
    state = torch.load(path / "optimizer.pt", weights_only=True)
    optim = state["optimizer"]
    options = StateDictOptions(full_state_dict=True, strict=False)
    weights = {prefix + k: v for k, v in weights.items()}
    if all(isinstance(k, int) for k in optim["state"]):  # written before 2026-11-30: by id
        set_model_state_dict(model, weights, options=options)
        optimizer.load_state_dict(optim)
    else:
        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim,
                       options=options)
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return json.loads((path / "state.json").read_text())
