"""The training loop: any direct alignment loss, any aggregation, on Hugging Face Accelerate.

`train(cfg)` builds a `Trainer` and calls `fit()`. The trainer reads top to bottom: set-up (output
folder, data, model, reference log-probs, optimiser, resume), then `fit()`, a loop of `step()`s.
Each step takes a global batch of `batch_size` pairs, gives each process its share, runs it in
micro-batches (gradient accumulation), clips, steps, logs one JSON line. Multi-GPU or
multi-process CPU runs are started with `accelerate launch` (DDP or FSDP); the math is the same
for any number of processes, and checkpoints are full state dicts that resume on any of them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import (
    DistributedType,
    gather_object,
)
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from tqdm.auto import tqdm
from transformers import get_scheduler

from .attention import SPLIT_ATTENTION
from .attention_plan import (
    attention_plan,
    self_check,
)
from .batching import (
    activation_checkpointing,
    batch_order,
    check_pair_counts,
    micro_batches,
)
from .checkpoint import (
    HELDOUT_FILE,
    RunFinished,
    check_output_dir,
    checkpoint_dir,
    full_training_state,
    load_checkpoint,
    remove_paths,
    save_checkpoint,
)
from .config import Config, ConfigError
from .data import (
    TokenizedPair,
    write_heldout,
    write_prompt_rendering,
)
from .launching import (
    FULL_ON_CPU,
    _accelerator,
    _is_sharded,
    _mixed_precision,
    _unsharded_copy,
    check_launch,
    launch_report,
)
from .logprobs import (
    FLEX_ATTENTION,
    CompletionLogProbs,
    SelfCheck,
    flex_attention_problem,
    split_attention_problem,
    use_flex_attention,
    use_split_attention,
)
from .losses import LossParams, get_loss, preference_loss
from .modelcard import model_card, push_folder
from .models import (
    cache_root,
    fingerprint_model,
    is_peft,
    load_model,
    load_tokenizer,
    maybe_add_lora,
)
from .reference import (
    ReferenceLogps,
    cached_reference_logps,
    compute_reference_logps,
    pack,
    pair_length,
    reference_fingerprint,
)
from .seeding import seeded
from .stopping import StopSignals, TrainingInterrupted
from .tracking import (
    MetricsLog,
    mean_metrics,
    report_to,
    require_trackers,
    start_trackers,
    truncate_metrics,
)
from .training_data import (
    load_pairs,
)
from .versions import installed_versions, window_warning

log = logging.getLogger(__name__)

__all__ = [
    "ReferenceLogps",
    "TrainResult",
    "Trainer",
    "TrainingInterrupted",
    "batch_order",
    "compute_reference_logps",
    "pair_length",
    "train",
]


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    train_seconds: float
    reference_seconds: float
    reference_from_cache: bool
    last_train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    model_dir: Path | None
    layout: str = "shared_prompt"  # the layout batches were packed in
    self_check: SelfCheck | None = None
    skipped_steps: int = 0  # non-finite steps skipped (train.skip_nonfinite)
    overflow_steps: int = 0  # fp16 steps the loss scaler skipped

    @classmethod
    def of_finished_run(cls, out: Path) -> TrainResult:
        """The result of a run that finished earlier, read from its summary.json."""
        summary = json.loads((out / "summary.json").read_text())
        model_dir = next((out / d for d in ("model", "adapter") if (out / d).is_dir()), None)
        return cls(
            out,
            summary["steps"],
            summary["train_seconds"],
            summary["reference_seconds"],
            summary["reference_from_cache"],
            summary["last_train"],
            summary["eval"],
            model_dir,
            layout=summary["layout"],
            skipped_steps=summary["skipped_steps"],
            overflow_steps=summary["overflow_steps"],
        )


def adamw(params: list, lr: float, weight_decay: float, device: torch.device):
    """AdamW, with torch's fused kernel where it has one for the device (CPU, CUDA): one pass over
    the parameters per step instead of a dozen foreach passes. Over SmolLM2-135M on this 2-core
    CPU, clipping + step took 0.16 s instead of 0.40 s (`benchmarks/bench_step_parts.py`)."""
    fused = device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def train(
    cfg: Config,
    *,
    model=None,
    tokenizer=None,
    train_pairs: list[TokenizedPair] | None = None,
    eval_pairs: list[TokenizedPair] | None = None,
) -> TrainResult:
    """Train a policy with cfg.loss on preference pairs and save it under cfg.train.output_dir.

    `model`, `tokenizer` and the pairs may be given directly (tests, the toy world, sweeps);
    otherwise they are loaded from cfg.model and cfg.data. The run's randomness (LoRA
    initialisation, dropout) comes from train.seed alone, in a fork of torch's RNG: the caller's
    global RNG state is the same after the call as before, and what ran before does not matter.
    """
    mixed_precision = _mixed_precision(cfg.train.mixed_precision)
    trackers = report_to(cfg.train)
    require_trackers(trackers)  # before anything loads: a missing package is a one-line error
    accelerator = _accelerator(mixed_precision, trackers, Path(cfg.train.output_dir))
    with seeded(cfg.train.seed, accelerator.device):
        try:
            trainer = Trainer(
                cfg,
                accelerator,
                mixed_precision,
                model=model,
                tokenizer=tokenizer,
                train_pairs=train_pairs,
                eval_pairs=eval_pairs,
            )
        except RunFinished as done:  # --resume on a finished run: say so, change nothing
            if accelerator.is_main_process:
                print(done)
            return TrainResult.of_finished_run(Path(cfg.train.output_dir))
        return trainer.fit()


@dataclass
class Progress:
    """What a checkpoint must carry besides weights and optimiser state."""

    step: int = 0
    skipped_steps: int = 0  # non-finite steps skipped (train.skip_nonfinite)
    overflow_steps: int = 0  # fp16 steps the loss scaler skipped


def _as_float(x) -> float:
    """A grad norm as a float; under FSDP2 it is a replicated DTensor."""
    return float(x.full_tensor() if hasattr(x, "full_tensor") else x)


class Trainer:
    """One training run. The constructor does the set-up in the order it must happen; `fit()`
    runs the optimiser steps and writes the results. Every method is called on every process;
    only the main process writes files and prints."""

    def __init__(
        self,
        cfg: Config,
        accelerator: Accelerator,
        mixed_precision: str,
        *,
        model=None,
        tokenizer=None,
        train_pairs: list[TokenizedPair] | None = None,
        eval_pairs: list[TokenizedPair] | None = None,
    ):
        self.cfg, self.tc, self.lc = cfg, cfg.train, cfg.loss
        self.accelerator, self.mixed_precision = accelerator, mixed_precision
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.main = accelerator.is_main_process
        self.out = Path(self.tc.output_dir)
        self.check_backend()
        self.report_launch()
        self.resume_from = self.prepare_output_dir()
        self.load_data(tokenizer, train_pairs, eval_pairs)
        self.setup_model(model)
        self.setup_reference()
        self.setup_optimizer()
        self.progress = self.resume()
        self.last: dict[str, float] = {}  # the metrics of the last step that trained
        self._order: tuple[int, list[list[int]]] = (-1, [])  # (epoch, its batches)

    # ---- set-up

    def report_launch(self) -> None:
        """Refuse a launch that started fewer processes than asked; print and keep how the run
        was launched and the versions it runs with."""
        check_launch(self.accelerator)
        self.launch = launch_report(self.accelerator)
        self.versions = installed_versions()
        if self.main:
            launch = self.launch
            print(
                f"processes: {launch['processes']} on {launch['machines']} machine(s) "
                f"({launch['distributed']}, backend {launch['backend'] or 'none'}); "
                + ", ".join(f"{k} {v}" for k, v in self.versions.items())
            )
            if warning := window_warning(self.versions):
                print(warning)

    def check_backend(self) -> None:
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ConfigError(
                "DeepSpeed is not supported: its engine steps the optimiser inside backward, "
                "before this trainer's non-finite check, and its sharded states are not saved "
                "by this trainer's checkpoints; use FSDP (configs/accelerate/fsdp-*.yaml; "
                "SHARD_GRAD_OP is ZeRO-2, FULL_SHARD is ZeRO-3)"
            )
        if os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true":
            raise ConfigError(
                "fsdp_cpu_ram_efficient_loading: true loads the weights on the first process "
                "only, but every process scores its share of the reference pass and runs the "
                "self-check before the model is sharded; set it to false in the accelerate config"
            )
        if self.tc.batch_size % self.world:
            raise ConfigError(
                f"train.batch_size={self.tc.batch_size} must be divisible by the {self.world} "
                "processes"
            )

    def prepare_output_dir(self) -> Path | None:
        """Decide on every process what to resume or replace; then the main process acts."""
        resume_from, stale, note = check_output_dir(
            self.out, self.cfg.to_dict(), resume=self.tc.resume, overwrite=self.tc.overwrite
        )
        if self.world > 1:  # every process has decided, and the same way, before any deletes
            seen = gather_object([str(resume_from)])
            if len(set(seen)) > 1:
                raise ConfigError(
                    f"the processes see different runs in {self.out} (resume from: "
                    f"{', '.join(sorted(set(seen)))}): put train.output_dir on a disk every "
                    "machine shares (docs/distributed.md)"
                )
        if self.main:
            if note:
                print(note)
            remove_paths(stale)
            self.out.mkdir(parents=True, exist_ok=True)
            config_text = yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
            (self.out / "config.yaml").write_text(config_text)
            if note := self.lc.defaults_line():  # loss keys the config left to the loss's defaults
                print(note)
        return resume_from

    def load_data(self, tokenizer, train_pairs, eval_pairs) -> None:
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.cfg.model)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.data_report: dict[str, Any] = {}
        self.rendering = None  # pairs given as token ids: how prompts were rendered is unknown
        if train_pairs is None:
            loaded = load_pairs(self.cfg, self.tokenizer, self.accelerator, self.data_report)
            train_pairs, self.rendering = loaded.train_pairs, loaded.rendering
            if eval_pairs is None:
                eval_pairs = loaded.eval_pairs
                if self.main and loaded.eval_examples:
                    write_heldout(self.out / HELDOUT_FILE, loaded.eval_examples)
            if self.main and self.rendering is not None:
                write_prompt_rendering(self.out, self.rendering)
        self.train_pairs, self.eval_pairs = train_pairs, eval_pairs or []
        check_pair_counts(self.cfg, self.train_pairs, self.eval_pairs)
        self.lengths = [pair_length(p) for p in self.train_pairs]

    def setup_model(self, model) -> None:
        tc = self.tc
        model = model if model is not None else load_model(self.cfg.model, seed=tc.seed)
        self.spec = get_loss(self.lc.name)
        precompute = self.spec.uses_reference and tc.precompute_reference
        self.model_fp = fingerprint_model(model) if precompute else ""
        if not is_peft(model):
            model = maybe_add_lora(model, self.cfg.model, seed=tc.seed)
        self.model = model
        layout = self.choose_attention(model)
        self.policy = CompletionLogProbs(model, chunk_size=tc.logprob_chunk_size)
        self.layout = self.policy.layout_for(layout)
        if self.main and self.layout != layout:
            print(
                f"layout: concat, not {layout}: the shared-prompt mask cannot be exact for "
                f"{self.policy.architecture} ({self.policy.attention.shared_prompt_problem})"
            )
        checkpointing, note = activation_checkpointing(
            tc.gradient_checkpointing, self.train_pairs, self.layout, tc.max_tokens_per_micro_batch
        )
        if checkpointing:
            model.gradient_checkpointing_enable()
            if is_peft(model):
                model.enable_input_require_grads()
        if self.main and note:
            print(note)
        self.policy.to(self.accelerator.device)
        self.checked = self.run_self_check() if tc.self_check else None

    def choose_attention(self, model) -> str:
        """Apply train.attention (see attention_plan); returns the layout to pack batches in."""
        device = self.accelerator.device
        wanted = self.tc.attention != "model" and self.tc.layout == "shared_prompt"
        flex_problem = flex_attention_problem(model, device) if wanted else None
        split_problem = split_attention_problem(model) if wanted else None
        implementation, layout, note = attention_plan(
            self.tc.attention, self.tc.layout, device.type, flex_problem, split_problem
        )
        if implementation == FLEX_ATTENTION and not use_flex_attention(model, device):
            raise ConfigError(f"train.attention: could not switch {type(model).__name__} to flex")
        refused = use_split_attention(model) if implementation == SPLIT_ATTENTION else None
        if refused:  # some refusals show only when tried: plan again knowing it
            implementation, layout, note = attention_plan(
                self.tc.attention, self.tc.layout, device.type, flex_problem, refused
            )
        if self.main and note:
            print(note)
        return layout

    def run_self_check(self) -> SelfCheck:
        tc = self.tc
        first_batch = batch_order(self.lengths, tc.batch_size, 0, tc.seed, tc.group_by_length)[0]
        pair = self.train_pairs[max(first_batch, key=lambda i: self.lengths[i])]
        checked = self_check(self.policy, pair, self.pad_id, self.layout)
        if self.main:
            print(
                f"self-check: {self.layout} layout matches {self.policy.architecture}'s forward "
                f"pass to {checked.relative_error:.1e} on the longest pair of the first batch "
                f"({checked.seconds:.2f}s)"
            )
        return checked

    # ---- the reference: adapters disabled for LoRA (no second copy); precomputed from the
    # policy's own initial weights, before it is wrapped for DDP/FSDP; a frozen copy only when
    # computed on the fly for a full fine-tune

    def setup_reference(self) -> None:
        tc, uses = self.tc, self.spec.uses_reference
        self.reference_scorer = None
        if uses and not is_peft(self.model) and not tc.precompute_reference:
            frozen = copy.deepcopy(self.model).eval().requires_grad_(False)
            frozen.to(self.accelerator.device)
            self.reference_scorer = CompletionLogProbs(frozen, chunk_size=tc.logprob_chunk_size)
        self.ref_train = self.ref_eval = None
        self.ref_seconds, self.ref_hit = 0.0, False
        if not (uses and tc.precompute_reference):
            return
        t0 = time.perf_counter()
        self.ref_train, self.ref_hit = self.precomputed_reference(self.train_pairs)
        if self.eval_pairs:
            self.ref_eval, _ = self.precomputed_reference(self.eval_pairs)
        self.ref_seconds = time.perf_counter() - t0
        if self.main:
            how = "loaded from cache" if self.ref_hit else "computed once"
            print(
                f"reference log-probs: {how} ({len(self.train_pairs)} train, "
                f"{len(self.eval_pairs)} eval pairs, {self.ref_seconds:.1f}s"
                f"{f', shared by {self.world} processes' if self.world > 1 else ''})"
            )

    def reference_context(self):
        return self.model.disable_adapter() if is_peft(self.model) else contextlib.nullcontext()

    def precomputed_reference(self, pairs: list[TokenizedPair]) -> tuple[ReferenceLogps, bool]:
        tc, accelerator = self.tc, self.accelerator

        def compute() -> ReferenceLogps:
            # under the policy's autocast: at step 1 the log-ratios are 0 up to rounding
            with self.reference_context(), accelerator.autocast():
                return compute_reference_logps(
                    self.policy,
                    pairs,
                    pad_id=self.pad_id,
                    layout=self.layout,
                    batch_size=tc.eval_batch_size,
                    device=accelerator.device,
                    progress=tc.progress and self.main,
                    rank=self.rank,
                    world=self.world,
                    max_tokens=tc.max_tokens_per_micro_batch,
                )

        precision = f"{self.cfg.model.dtype}|autocast={self.mixed_precision}"
        key = reference_fingerprint(self.model_fp, pairs, precision)
        cache_dir = Path(tc.reference_cache_dir or cache_root() / "reference")
        return cached_reference_logps(cache_dir, key, compute, accelerator)

    def setup_optimizer(self) -> None:
        tc = self.tc
        self.steps_per_epoch = len(self.train_pairs) // tc.batch_size
        self.total_steps = tc.max_steps or max(1, int(tc.epochs * self.steps_per_epoch))
        auto = tc.save_every == "auto"
        self.save_every = max(1, -(-self.total_steps // 10)) if auto else tc.save_every
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = adamw(params, tc.learning_rate, tc.weight_decay, self.accelerator.device)
        self.scheduler = get_scheduler(
            "constant_with_warmup" if tc.scheduler == "constant" else tc.scheduler,
            optimizer,
            num_warmup_steps=int(tc.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        # the scheduler is not given to Accelerate, which would step it once per process per
        # step: here one step is one global batch, whatever the number of processes
        self.policy, self.optimizer = self.accelerator.prepare(self.policy, optimizer)
        # FSDP replaces the parameters by sharded ones: the list is taken again
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.loss_params = LossParams(
            **{f.name: getattr(self.lc, f.name) for f in dataclasses.fields(LossParams)}
        )

    # ---- save and resume: full state dicts, written by the main process

    def resume(self) -> Progress:
        """The reference above was computed from the initial weights, as it must be; now the
        weights, optimiser, scheduler and counters of the checkpoint, if resuming."""
        if self.resume_from is None:
            return Progress()
        acc = self.accelerator
        state = load_checkpoint(
            self.resume_from, self.policy, self.optimizer, self.scheduler, acc.scaler, "lm."
        )
        progress = Progress(
            state["step"], state.get("skipped_steps", 0), state.get("overflow_steps", 0)
        )
        if progress.step >= self.total_steps and (self.out / "summary.json").is_file():
            raise RunFinished(
                f"{self.out} holds a finished run of {progress.step} steps and this config asks "
                f"for {self.total_steps}: nothing to train, nothing changed"
            )
        if self.main:
            truncate_metrics(self.out / "metrics.jsonl", progress.step)
            print(f"resumed from {self.resume_from} (step {progress.step} of {self.total_steps})")
        return progress

    def save_checkpoint(self, step: int) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        weights, optimizer_state = full_training_state(self.policy, self.optimizer, "lm.")
        if self.main:
            extra = {
                "skipped_steps": self.progress.skipped_steps,
                "overflow_steps": self.progress.overflow_steps,
                "total_steps": self.total_steps,
                "config": self.cfg.to_dict(),
            }
            save_checkpoint(
                self.out, step, weights, optimizer_state, self.scheduler, extra,
                self.tc.keep_checkpoints, acc.scaler,
            )
        acc.wait_for_everyone()

    def save_model(self) -> Path | None:
        """The final model as a folder that AutoModelForCausalLM.from_pretrained loads (LoRA
        merged; the adapter also saved on its own). A collective call: under FSDP the full
        weights are gathered to the main process first."""
        if not self.tc.save_model:
            return None
        acc = self.accelerator
        sharded = _is_sharded(self.policy)
        full = get_model_state_dict(self.policy, options=FULL_ON_CPU) if sharded else None
        model_dir = self.out / "model"
        if self.main:
            lm = acc.unwrap_model(self.policy).lm
            if sharded:
                lm = _unsharded_copy(lm, {k.removeprefix("lm."): v for k, v in full.items()})
            if is_peft(lm):
                lm.save_pretrained(self.out / "adapter")
                lm = lm.merge_and_unload()  # a plain model that AutoModelForCausalLM reloads
            lm.save_pretrained(model_dir, safe_serialization=True)
            self.tokenizer.save_pretrained(model_dir)
            if self.rendering is not None:  # `avgalign evaluate` renders prompts the same way
                write_prompt_rendering(model_dir, self.rendering)
        acc.wait_for_everyone()
        return model_dir

    # ---- the loss on a batch, one optimiser step, evaluation

    def loss_on(self, pairs: list[TokenizedPair], idx: list[int], ref: ReferenceLogps | None):
        """(mean loss, per-pair metrics, packed batch) of `pairs`, the pairs `idx` of the split
        whose precomputed reference is `ref`."""
        acc = self.accelerator
        batch = pack(pairs, self.pad_id, self.layout).to(acc.device)
        with acc.autocast():
            sums, counts = self.policy(batch)
        m = len(pairs)
        rc = rr = None
        if self.spec.uses_reference:
            rc, rr = self.reference_sums(batch, counts, idx, ref, m)
        lc = self.lc
        loss, metrics = preference_loss(
            lc.name,
            sums[:m].float(),
            sums[m:].float(),
            rc,
            rr,
            counts[:m],
            counts[m:],
            self.loss_params,
            lc.aggregation,
            lc.alpha,
        )
        return loss, metrics, batch

    def reference_sums(self, batch, counts, idx, ref: ReferenceLogps | None, m: int):
        """The reference's summed log-likelihoods of chosen and rejected: precomputed, or
        computed now (on the fly)."""
        if ref is not None:
            r = ref.take(idx)
            if not (
                torch.equal(r.chosen_lengths, counts[:m].cpu())
                and torch.equal(r.rejected_lengths, counts[m:].cpu())
            ):
                raise RuntimeError("cached reference log-probs do not match the pairs' lengths")
            return r.chosen.to(counts.device), r.rejected.to(counts.device)
        with self.reference_context(), torch.no_grad(), self.accelerator.autocast():
            ref_sums, _ = (self.reference_scorer or self.policy)(batch)
        return ref_sums[:m].float(), ref_sums[m:].float()

    def evaluate(self) -> dict[str, float]:
        """Mean metrics over the held-out pairs, shared out over the processes. Every process
        makes the same number of forward passes (a sharded model's forward is collective): a
        process with fewer pairs repeats one and drops its result."""
        self.policy.eval()
        bs, pairs = self.tc.eval_batch_size, self.eval_pairs
        mine = list(range(self.rank, len(pairs), self.world))
        n_batches = math.ceil(math.ceil(len(pairs) / self.world) / bs)
        per_pair: dict[str, list[float]] = {}
        with torch.no_grad():
            for b in range(n_batches):
                idx = mine[b * bs : (b + 1) * bs]
                _, metrics, _ = self.loss_on([pairs[i] for i in idx or [0]], idx or [0],
                                             self.ref_eval)
                for k, v in metrics.items():
                    per_pair.setdefault(k, []).extend(v.float().cpu().tolist() if idx else [])
        self.policy.train()
        merged: dict[str, list[float]] = {}
        for d in gather_object([per_pair]):
            for k, v in d.items():
                merged.setdefault(k, []).extend(v)
        return mean_metrics(merged)

    def global_batch(self, step: int) -> list[int]:
        tc = self.tc
        epoch = step // self.steps_per_epoch
        if self._order[0] != epoch:
            order = batch_order(self.lengths, tc.batch_size, epoch, tc.seed, tc.group_by_length)
            self._order = (epoch, order)
        return self._order[1][step % self.steps_per_epoch]

    def accumulate(self, global_idx: list[int]):
        """Forward and backward of this process's share of a global batch, in micro-batches.
        Returns (per-pair metrics gathered from all processes, real tokens, padded tokens)."""
        tc, acc = self.tc, self.accelerator
        shares = [global_idx[r :: self.world] for r in range(self.world)]
        micro = micro_batches(shares, self.train_pairs, self.layout, tc.micro_batch_size,
                              tc.max_tokens_per_micro_batch)[self.rank]
        per_pair: dict[str, list[torch.Tensor]] = {}
        real_tokens = padded_tokens = 0
        for j, idx in enumerate(micro):
            sync = j == len(micro) - 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.policy):
                pairs = [self.train_pairs[i] for i in idx]
                loss, metrics, batch = self.loss_on(pairs, idx, self.ref_train)
                # mean over the global batch; DDP averages gradients over processes
                acc.backward(loss * len(idx) * self.world / tc.batch_size)
            for k, v in metrics.items():
                per_pair.setdefault(k, []).append(v)
            real_tokens += batch.num_real_tokens
            padded_tokens += batch.input_ids.numel()
        stacked = {k: acc.gather(torch.cat(v)).float() for k, v in per_pair.items()}
        return stacked, real_tokens, padded_tokens

    def step(self, step: int) -> dict[str, Any]:
        """One optimiser step on the global batch of `step`; returns its metrics record (split
        "train", or "skipped" for a step whose loss or gradient was not finite)."""
        tc, acc = self.tc, self.accelerator
        t0 = time.perf_counter()
        global_idx = self.global_batch(step)
        stacked, real_tokens, padded_tokens = self.accumulate(global_idx)
        # with max_grad_norm 0 an infinite threshold measures the norm without clipping;
        # under a loss scaler (fp16) this also unscales the gradients
        grad_norm = _as_float(acc.clip_grad_norm_(self.params, tc.max_grad_norm or math.inf))
        loss_finite = bool(torch.isfinite(stacked["loss"]).all())
        if not (loss_finite and math.isfinite(grad_norm)):
            return self.skip_step(step, global_idx, loss_finite)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = torch.tensor([real_tokens, padded_tokens], device=acc.device)
        real_tokens, padded_tokens = acc.reduce(tokens, "sum").tolist()
        seconds = time.perf_counter() - t0
        self.last = {k: float(v.mean()) for k, v in stacked.items()}
        record = {
            "split": "train",
            "step": step + 1,
            "epoch": step / self.steps_per_epoch,
            **self.last,
            "learning_rate": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "seconds": seconds,
            "pairs_per_s": tc.batch_size / seconds,
            "tokens_per_s": real_tokens / seconds,
            "padding_fraction": 1 - real_tokens / padded_tokens,
        }
        if acc.scaler is not None:
            record["loss_scale"] = acc.scaler.get_scale()
        return record

    def skip_step(self, step: int, global_idx: list[int], loss_finite: bool) -> dict[str, Any]:
        """A step whose loss or gradient is not finite: checked before the optimizer step, so
        the weights and the last checkpoint are still good; the step counts, its batch is not
        retried. Every process reaches this branch together (the loss is gathered, the norm
        global)."""
        scaler = self.accelerator.scaler
        skipped: dict[str, Any] = {"split": "skipped", "step": step + 1}
        if loss_finite and scaler is not None:
            # fp16 gradient overflow: as in PyTorch AMP, the scaler's step skips the update and
            # lowers the scale
            self.optimizer.step()
            self.progress.overflow_steps += 1
            skipped.update(reason="fp16 gradient overflow", loss_scale=scaler.get_scale())
        else:
            what = f"non-finite loss or gradient at step {step + 1} (pairs {global_idx})"
            if not self.tc.skip_nonfinite:
                raise FloatingPointError(
                    f"{what}; the last checkpoint is intact (set train.skip_nonfinite=true to "
                    "skip such steps)"
                )
            if scaler is not None:
                scaler.update()  # closes this step's unscale; lowers the scale on inf
            self.progress.skipped_steps += 1
            skipped["reason"] = what
        self.optimizer.zero_grad(set_to_none=True)
        return skipped

    # ---- the loop

    def fit(self) -> TrainResult:
        tc, lc, acc = self.tc, self.lc, self.accelerator
        log = self._metrics_log()
        bar = tqdm(
            total=self.total_steps,
            initial=self.progress.step,
            desc=f"{lc.name}/{lc.aggregation} beta={lc.beta:g}",
            disable=not (self.main and tc.progress),
        )
        self.policy.train()
        train_start = time.perf_counter()
        self.saved_at = time.monotonic()
        eval_metrics: dict[str, float] = {}
        with StopSignals() as stop, log:
            for step in range(self.progress.step, self.total_steps):
                record = self.step(step)
                self.progress.step = done = step + 1
                trained = record["split"] == "train"
                every = tc.eval_every
                if trained and self.eval_pairs and every and done % every == 0 and (
                    done < self.total_steps
                ):
                    eval_metrics = self.evaluate()
                    log.write({"split": "eval", "step": done, **eval_metrics})
                log.write(record)
                self._show(bar, record)
                self.checkpoint_or_stop(done, stop.agreed(acc), trained, bar)
            bar.close()
            train_seconds = time.perf_counter() - train_start
            if self.eval_pairs:
                eval_metrics = self.evaluate()
                log.write({"split": "eval", "step": self.total_steps, **eval_metrics})
        model_dir = self.save_model()
        if self.main:
            self.write_summary(train_seconds, self.last, eval_metrics)
            if model_dir is not None:
                self.share(model_dir, eval_metrics)
        acc.wait_for_everyone()
        return TrainResult(
            self.out,
            self.total_steps,
            train_seconds,
            self.ref_seconds,
            self.ref_hit,
            self.last,
            eval_metrics,
            model_dir,
            layout=self.layout,
            self_check=self.checked,
            skipped_steps=self.progress.skipped_steps,
            overflow_steps=self.progress.overflow_steps,
        )

    def checkpoint_or_stop(self, done: int, stop: str | None, trained: bool, bar) -> None:
        """After a step that trained, checkpoint every train.save_every steps, when
        train.save_minutes have passed since the last checkpoint, and at the end; after any
        step, checkpoint when stopped by a signal; then raise. Signal and clock are each agreed
        by all processes (a collective call each), so all save the same step."""
        every = self.save_every
        by_steps = every and (done % every == 0 or done == self.total_steps)
        due = trained and (by_steps or self.clock_due())
        if stop or due:
            self.save_checkpoint(done)
            self.saved_at = time.monotonic()
        if stop:
            bar.close()
            raise TrainingInterrupted(
                f"stopped by {stop} after step {done}; checkpoint saved in "
                f"{checkpoint_dir(self.out)}; continue with --resume (train.resume=true)"
            )

    def clock_due(self) -> bool:
        """Whether train.save_minutes have passed since the last checkpoint (or the start), by
        the main process's clock, the same answer on every process."""
        minutes = self.tc.save_minutes
        if not minutes:
            return False
        due = time.monotonic() - self.saved_at >= 60 * minutes
        if self.world == 1:
            return due
        flag = torch.tensor([float(due and self.main)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "sum").item())

    def _metrics_log(self):
        """metrics.jsonl, and the trackers of train.report_to started (main process only)."""
        if not self.main:
            return _NoLog()
        if self.tc.tensorboard:
            print("train.tensorboard is deprecated and goes in the next release: use "
                  "train.report_to: tensorboard (same folder, output_dir/tensorboard)")
        if self.accelerator.log_with:
            start_trackers(self.accelerator, self.cfg.to_dict(), self.out.name)
        return MetricsLog(self.out / "metrics.jsonl", self.accelerator)

    def share(self, model_dir: Path, eval_metrics: dict[str, float]) -> None:
        """The model card (README.md) in the saved model folder; then, with train.push_to_hub,
        the folder uploaded to the Hub. Main process only."""
        data = self.cfg.data
        # no data report: the pairs were given in code, their source is unknown here
        sources = ([s.path for s in data.sources] or [data.train]) if self.data_report else []
        card = model_card(
            self.cfg,
            sources=sources,
            train_pairs=self.train_pairs,
            eval_pairs=len(self.eval_pairs),
            steps=self.total_steps,
            last_train=self.last,
            eval_metrics=eval_metrics,
        )
        (model_dir / "README.md").write_text(card)
        if self.tc.push_to_hub:
            url = push_folder(self.tc.push_to_hub, model_dir)
            print(f"model folder {model_dir} pushed to the Hub: {url}")

    def _show(self, bar, record: dict[str, Any]) -> None:
        if self.main and record["split"] == "train":
            bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                margin=f"{record['reward_margin']:.3f}",
                pairs_s=f"{record['pairs_per_s']:.2f}",
            )
        bar.update(1)

    def write_summary(self, train_seconds: float, last: dict, eval_metrics: dict) -> None:
        summary = {
            "steps": self.total_steps,
            "skipped_steps": self.progress.skipped_steps,
            "overflow_steps": self.progress.overflow_steps,
            "layout": self.layout,
            "self_check": dataclasses.asdict(self.checked) if self.checked else None,
            "mixed_precision": self.mixed_precision,
            **self.launch,
            "versions": self.versions,
            "train_seconds": train_seconds,
            "reference_seconds": self.ref_seconds,
            "reference_from_cache": self.ref_hit,
            "train_pairs": len(self.train_pairs),
            "eval_pairs": len(self.eval_pairs),
            "data": self.data_report,
            "last_train": last,
            "eval": eval_metrics,
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))


class _NoLog:
    """The metrics log of a process that does not write one."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def __enter__(self) -> _NoLog:
        return self

    def __exit__(self, *exc) -> None:
        pass


