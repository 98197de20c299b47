"""The run's Accelerator and what Accelerate leaves to us: precision on CPUs, FSDP on CPU processes,
launches that started fewer processes than asked, and full (unsharded) copies of a sharded model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DistributedType,
    FullyShardedDataParallelPlugin,
    ProjectConfiguration,
)
from torch.distributed.checkpoint.state_dict import StateDictOptions

from .config import ConfigError
from .models import (
    is_peft,
)


def _mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"

def _accelerator(
    mixed_precision: str, trackers: list[str] | None = None, output_dir: Path | None = None
) -> Accelerator:
    """The run's Accelerator, with the experiment `trackers` (train.report_to) of a run whose
    folder is `output_dir` (TensorBoard writes in output_dir/tensorboard). Three fixes to
    Accelerate's defaults:
    - its state is a per-process singleton that refuses another precision: in a single-process
      run (a sweep or a notebook calling train() with bf16 after fp32) it is reset;
    - it leaves mixed_precision="fp16" off on a CPU without a word (no autocast, no loss scaler):
      turned on as on a GPU, float16 autocast and PyTorch's CPU GradScaler, used by
      Accelerate's own backward, unscale and optimizer step;
    - it ignores FSDP on CPU processes (gloo): see _fsdp_on_cpu."""
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision:
        if state.get("num_processes", 1) == 1:
            AcceleratorState._reset_state()
    project = None
    if output_dir is not None:
        project = ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "tensorboard")
        )
    accelerator = Accelerator(
        mixed_precision=mixed_precision, log_with=trackers or None, project_config=project
    )
    _fsdp_on_cpu(accelerator)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu")
    return accelerator

def check_launch(accelerator: Accelerator, env=os.environ) -> None:
    """Refuse a launch that asked for several processes and started one. `accelerate launch
    --num_processes N` without --multi_gpu (or a config file) on a machine with fewer than two
    GPUs, and with --cpu, starts one process: its simple launcher sets MASTER_ADDR for the N
    processes it was asked for, but no WORLD_SIZE, which every multi-process launcher sets."""
    simple = "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env and "WORLD_SIZE" not in env
    if accelerator.num_processes == 1 and simple:
        raise ConfigError(
            "accelerate launch was asked for several processes but started one (without "
            "--multi_gpu or a config file it runs a single process). Launch with "
            "`accelerate launch --multi_gpu --num_processes N -m avgalign train ...` on GPUs, "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...` on CPUs"
        )

def launch_report(accelerator: Accelerator, env=os.environ) -> dict[str, Any]:
    """How the run was launched: processes, machines, Accelerate's distributed type and the
    torch.distributed backend (None for one process)."""
    per_machine = int(env.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    return {
        "processes": accelerator.num_processes,
        "machines": max(1, accelerator.num_processes // max(1, per_machine)),
        "distributed": str(accelerator.distributed_type.value),
        "backend": backend,
    }

def _fsdp_on_cpu(accelerator: Accelerator) -> None:
    """`accelerate launch --use_fsdp` on CPU processes (gloo) runs plain DDP: Accelerate takes
    FSDP only on accelerators. FSDP2 (`fully_shard`) runs on CPU, so such a run is made FSDP as
    asked, with the plugin Accelerate builds from the launcher's settings: sharded training on
    CPU-only machines, and the sharded code paths testable without a GPU."""
    state = accelerator.state
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not (wants_fsdp and state.distributed_type == DistributedType.MULTI_CPU):
        return
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ConfigError("FSDP on CPU processes needs fsdp_version: 2 in the accelerate config")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin

FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)

def _is_sharded(module: torch.nn.Module) -> bool:
    """Whether FSDP (1 or 2) holds `module`'s parameters in shards. Read from the module, not
    from Accelerate's distributed type, which does not say FSDP for CPU processes."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return isinstance(module, (FSDPModule, FullyShardedDataParallel))

def _unsharded_copy(lm, state: dict[str, torch.Tensor]):
    """A plain copy, on the CPU, of an FSDP-sharded model, holding its gathered full `state`:
    what save_pretrained (and PEFT's merge) needs. Main process only."""
    from transformers import AutoModelForCausalLM

    base = lm.get_base_model() if is_peft(lm) else lm
    fresh = AutoModelForCausalLM.from_config(base.config, dtype=base.dtype)
    if is_peft(lm):
        from peft import get_peft_model

        fresh = get_peft_model(fresh, lm.peft_config[lm.active_adapter])
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"gathered state does not match {type(base).__name__}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    return fresh
