"""The training loop: any direct alignment loss, any aggregation, on Hugging Face Accelerate.

Read top to bottom: set-up (seed, model, data, reference log-probs), then one loop over optimizer
steps. Each step takes a global batch of `batch_size` pairs, gives each process its share, runs
it in micro-batches (gradient accumulation), clips, steps, logs one JSON line. Multi-GPU or
multi-process CPU runs are started with `accelerate launch`; the math is the same for any number
of processes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from .checkpoint import (
    HELDOUT_FILE,
    check_output_dir,
    checkpoint_dir,
    load_checkpoint,
    remove_paths,
    save_checkpoint,
)
from .config import Config, ConfigError
from .data import (
    DataError,
    PreferenceExample,
    TokenizedPair,
    load_preferences,
    prompt_rendering,
    tokenize_pairs,
    write_heldout,
    write_prompt_rendering,
    write_text_atomic,
)
from .logprobs import CompletionLogProbs, SelfCheck, check_against_model, pack_pairs
from .losses import LossParams, get_loss, preference_loss
from .models import (
    cache_root,
    fingerprint_model,
    is_peft,
    load_model,
    load_tokenizer,
    maybe_add_lora,
)
from .seeding import seeded

log = logging.getLogger(__name__)


@dataclass
class ReferenceLogps:
    """Summed reference log-likelihoods and token counts, one entry per pair."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor

    def take(self, idx: list[int]) -> ReferenceLogps:
        return ReferenceLogps(*(t[idx] for t in dataclasses.astuple(self)))


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


def batch_order(
    lengths: list[int], batch_size: int, epoch: int, seed: int, group_by_length: bool
) -> list[list[int]]:
    """The pair indices of each optimizer step of one epoch: a pure function of its arguments,
    so a resumed run sees the same order. Incomplete last batches are dropped.

    With group_by_length, pairs are shuffled, cut into mega-batches of 32 batches, sorted by length
    inside each, and the batches shuffled again: batches of similar length, still random.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    if group_by_length:
        mega = batch_size * 32
        perm = [
            i
            for start in range(0, len(perm), mega)
            for i in sorted(perm[start : start + mega], key=lambda j: -lengths[j])
        ]
    batches = [perm[i : i + batch_size] for i in range(0, len(perm) - batch_size + 1, batch_size)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


def pair_length(p: TokenizedPair) -> int:
    return len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)


def _pack(pairs: list[TokenizedPair], pad_id: int, layout: str):
    return pack_pairs(
        [p.prompt_ids for p in pairs],
        [p.chosen_ids for p in pairs],
        [p.rejected_ids for p in pairs],
        pad_id,
        layout,
    )


@torch.inference_mode()
def compute_reference_logps(
    scorer: CompletionLogProbs,
    pairs: list[TokenizedPair],
    *,
    pad_id: int,
    layout: str,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
) -> ReferenceLogps:
    """Reference log-likelihoods of every pair, batched by length to waste little on padding."""
    n = len(pairs)
    out = ReferenceLogps(
        torch.zeros(n),
        torch.zeros(n),
        torch.zeros(n, dtype=torch.long),
        torch.zeros(n, dtype=torch.long),
    )
    order = sorted(range(n), key=lambda i: pair_length(pairs[i]))
    was_training = scorer.training
    scorer.eval()
    for start in tqdm(range(0, n, batch_size), desc="reference log-probs", disable=not progress):
        idx = order[start : start + batch_size]
        sums, counts = scorer(_pack([pairs[i] for i in idx], pad_id, layout).to(device))
        m = len(idx)
        out.chosen[idx], out.rejected[idx] = sums[:m].float().cpu(), sums[m:].float().cpu()
        out.chosen_lengths[idx], out.rejected_lengths[idx] = counts[:m].cpu(), counts[m:].cpu()
    scorer.train(was_training)
    return out


def reference_fingerprint(model_fp: str, pairs: list[TokenizedPair], dtype: str) -> str:
    h = hashlib.sha256(f"{model_fp}|{dtype}".encode())
    for p in pairs:
        h.update(json.dumps([p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    return h.hexdigest()[:24]


def cached_reference_logps(
    cache_dir: Path, key: str, compute, accelerator: Accelerator
) -> tuple[ReferenceLogps, bool]:
    """Load reference log-probs from `cache_dir/ref-<key>.safetensors`, or compute them on the main
    process and write them atomically. Returns (values, loaded_from_cache)."""
    path = cache_dir / f"ref-{key}.safetensors"
    hit = path.is_file()
    if not hit and accelerator.is_main_process:
        ref = compute()
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in dataclasses.asdict(ref).items()}, str(tmp))
        tmp.replace(path)
    accelerator.wait_for_everyone()
    return ReferenceLogps(**load_file(str(path))), hit


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


def _mean_metrics(per_pair: dict[str, list[float]]) -> dict[str, float]:
    return {k: float(sum(v) / len(v)) for k, v in per_pair.items() if v}


class MetricsLog:
    """One JSON object per line, flushed at once: a crash loses at most the line being written."""

    def __init__(self, path: Path, tensorboard_dir: Path | None):
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


def _mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _accelerator(mixed_precision: str) -> Accelerator:
    """The run's Accelerator. Two fixes to Accelerate's defaults:
    - its state is a per-process singleton that refuses another precision: in a single-process
      run (a sweep or a notebook calling train() with bf16 after fp32) it is reset;
    - it leaves mixed_precision="fp16" off on a CPU without a word (no autocast, no loss scaler):
      turned on as on a GPU, float16 autocast and PyTorch's CPU GradScaler, used by
      Accelerate's own backward, unscale and optimizer step."""
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision:
        if state.get("num_processes", 1) == 1:
            AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed_precision)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu")
    return accelerator


# |ours - model| / max(|model|, 1) on a summed completion log-prob. In float32 the layouts agree
# with the model's forward to ~1e-6 (SmolLM2, 500 tokens); the errors they exist to catch (a lost
# sliding window, a missing logit scale) are 2e-3 to 2e-2. Half-precision weights round at ~1e-2.
SELF_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4}
HALF_PRECISION_TOLERANCE = 5e-2


def self_check(
    scorer: CompletionLogProbs, pair: TokenizedPair, pad_id: int, layout: str
) -> SelfCheck:
    """One pair through the training path and through model(...) before the first step; raises
    ConfigError when they differ, naming the layout to try. Runs outside autocast: in the
    weights' own precision, so that the check is tight whenever the weights are float32."""
    dtype = next(scorer.parameters()).dtype
    tolerance = SELF_CHECK_TOLERANCE.get(dtype, HALF_PRECISION_TOLERANCE)
    device = next(scorer.parameters()).device
    triple = [(pair.prompt_ids, pair.chosen_ids, pair.rejected_ids)]
    with torch.autocast(device.type, enabled=False):
        result = check_against_model(scorer, triple, pad_id=pad_id, layout=layout)
        if result.relative_error <= tolerance:
            return result
        fallback = None
        if layout == "shared_prompt":
            fallback = check_against_model(scorer, triple, pad_id=pad_id, layout="concat")
    what = (
        f"self-check failed: {scorer.architecture} with train.layout={layout} gives completion "
        f"log-probs that differ from the model's own forward pass by {result.relative_error:.1e} "
        f"(relative; tolerance {tolerance:g})"
    )
    if fallback is not None and fallback.relative_error <= tolerance:
        raise ConfigError(f"{what}; train.layout=concat matches it: set that")
    raise ConfigError(
        f"{what}{' and so does train.layout=concat' if fallback else ''}: this architecture's "
        "forward pass (e.g. its logit post-processing) is not reproduced; it cannot be trained "
        "exactly here (train.self_check=false skips this check at your own risk)"
    )


def check_pair_counts(cfg: Config, train_pairs: list, eval_pairs: list) -> None:
    """One-line errors, naming the data and the key to change, for data too small to train on."""
    source = cfg.data.train or "the training pairs"
    if not train_pairs:
        raise DataError(source, "no usable training pairs (see the skipped records above)")
    if len(train_pairs) < cfg.train.batch_size:
        held = f" after holding out {len(eval_pairs)} for evaluation" if eval_pairs else ""
        raise DataError(
            source,
            f"{len(train_pairs)} training pairs{held}, fewer than train.batch_size="
            f"{cfg.train.batch_size}; lower train.batch_size or give more data",
        )


@dataclass
class LoadedData:
    """What `load_pairs` read: pairs as token ids, the held-out examples as text (written to the
    run folder, so that a trained policy is evaluated on prompts it was not trained on), and how
    the prompts were rendered (avgalign.data.prompt_rendering; None without examples)."""

    train_pairs: list[TokenizedPair]
    eval_pairs: list[TokenizedPair]
    eval_examples: list[PreferenceExample]
    rendering: dict | None


def load_pairs(
    cfg: Config, tokenizer, accelerator: Accelerator, data_report: dict | None = None
) -> LoadedData:
    """Training and held-out pairs from the configured sources. What was skipped, warned about
    and truncated is printed and, per source, added to `data_report` (for the run summary)."""
    examples: list[PreferenceExample] = []

    def load(source: str) -> tuple[list[TokenizedPair], list[PreferenceExample]]:
        report = load_preferences(
            source,
            split=cfg.data.split,
            tokenizer=tokenizer,
            on_error=cfg.data.on_error,
            limit=cfg.data.limit if source == cfg.data.train else None,
        )
        pairs, truncation = tokenize_pairs(
            report.examples,
            tokenizer,
            max_length=cfg.data.max_length,
            max_prompt_length=cfg.data.max_prompt_length,
            on_error=cfg.data.on_error,
        )
        dropped = set(truncation.dropped)
        kept = [e for e in report.examples if e.location not in dropped]  # aligned with pairs
        examples.extend(kept)
        if accelerator.is_main_process:
            print(f"{report.summary()}\n  tokenised: {truncation.summary()}")
        if data_report is not None:
            data_report[source] = {
                "records": report.records,
                "pairs": len(pairs),
                "skipped": [f"{loc}: {why}" for loc, why in report.skipped],
                "warnings": report.warnings,
                "truncated": {
                    "prompt": truncation.prompt_truncated,
                    "chosen": truncation.chosen_truncated,
                    "rejected": truncation.rejected_truncated,
                },
                "dropped": truncation.dropped,
            }
        return pairs, kept

    train_pairs, train_examples = load(cfg.data.train)
    eval_pairs, eval_examples = load(cfg.data.eval) if cfg.data.eval else ([], [])
    rendering = prompt_rendering(examples, tokenizer) if examples else None
    n_eval = 0 if cfg.data.eval else int(round(cfg.data.eval_fraction * len(train_pairs)))
    if n_eval:
        g = torch.Generator().manual_seed(cfg.train.seed)
        held = set(torch.randperm(len(train_pairs), generator=g)[:n_eval].tolist())
        eval_pairs = [p for i, p in enumerate(train_pairs) if i in held]
        eval_examples = [e for i, e in enumerate(train_examples) if i in held]
        train_pairs = [p for i, p in enumerate(train_pairs) if i not in held]
    return LoadedData(train_pairs, eval_pairs, eval_examples, rendering)


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
    accelerator = _accelerator(mixed_precision)
    with seeded(cfg.train.seed, accelerator.device):
        return _train(
            cfg,
            accelerator,
            mixed_precision,
            model=model,
            tokenizer=tokenizer,
            train_pairs=train_pairs,
            eval_pairs=eval_pairs,
        )


def _train(
    cfg: Config,
    accelerator: Accelerator,
    mixed_precision: str,
    *,
    model,
    tokenizer,
    train_pairs,
    eval_pairs,
) -> TrainResult:
    tc, lc = cfg.train, cfg.loss
    world, rank = accelerator.num_processes, accelerator.process_index
    main = accelerator.is_main_process
    if tc.batch_size % world:
        raise ConfigError(
            f"train.batch_size={tc.batch_size} must be divisible by the {world} processes"
        )
    out = Path(tc.output_dir)
    resume_from, stale = check_output_dir(
        out, cfg.to_dict(), resume=tc.resume, overwrite=tc.overwrite
    )
    accelerator.wait_for_everyone()  # every process has decided before anything is deleted
    if main:
        remove_paths(stale)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    # ---- model, tokenizer, data
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    data_report: dict[str, Any] = {}
    rendering = None  # pairs given as token ids: how their prompts were rendered is not known
    if train_pairs is None:
        loaded = load_pairs(cfg, tokenizer, accelerator, data_report)
        train_pairs, rendering = loaded.train_pairs, loaded.rendering
        if eval_pairs is None:
            eval_pairs = loaded.eval_pairs
            if main and loaded.eval_examples:
                write_heldout(out / HELDOUT_FILE, loaded.eval_examples)
        if main and rendering is not None:
            write_prompt_rendering(out, rendering)
    eval_pairs = eval_pairs or []
    check_pair_counts(cfg, train_pairs, eval_pairs)
    model = model if model is not None else load_model(cfg.model, seed=tc.seed)
    spec = get_loss(lc.name)
    model_fp = fingerprint_model(model) if spec.uses_reference and tc.precompute_reference else ""
    if not is_peft(model):
        model = maybe_add_lora(model, cfg.model, seed=tc.seed)
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if is_peft(model):
            model.enable_input_require_grads()
    policy = CompletionLogProbs(model, chunk_size=tc.logprob_chunk_size)
    layout = policy.layout_for(tc.layout)
    if main and layout != tc.layout:
        print(
            f"layout: concat, not {tc.layout}: the shared-prompt mask cannot be exact for "
            f"{policy.architecture} ({policy.attention.shared_prompt_problem})"
        )
    policy.to(accelerator.device)
    lengths = [pair_length(p) for p in train_pairs]
    checked = None
    if tc.self_check:
        first_batch = batch_order(lengths, tc.batch_size, 0, tc.seed, tc.group_by_length)[0]
        pair = train_pairs[max(first_batch, key=lambda i: lengths[i])]
        checked = self_check(policy, pair, pad_id, layout)
        if main:
            print(
                f"self-check: {layout} layout matches {policy.architecture}'s forward pass to "
                f"{checked.relative_error:.1e} on the longest pair of the first batch "
                f"({checked.seconds:.2f}s)"
            )

    # ---- reference: adapters disabled for LoRA (no second copy); precomputed from the policy's
    # own initial weights; a frozen copy only when computed on the fly for a full fine-tune
    reference_scorer = None
    if spec.uses_reference and not is_peft(model) and not tc.precompute_reference:
        frozen = copy.deepcopy(model).eval().requires_grad_(False).to(accelerator.device)
        reference_scorer = CompletionLogProbs(frozen, chunk_size=tc.logprob_chunk_size)

    def reference_context():
        return model.disable_adapter() if is_peft(model) else contextlib.nullcontext()

    def reference_forward(batch):
        with reference_context(), torch.no_grad():
            scorer = reference_scorer or policy
            return scorer(batch)

    ref_train = ref_eval = None
    ref_seconds, ref_hit = 0.0, False
    if spec.uses_reference and tc.precompute_reference:
        t0 = time.perf_counter()
        cache_dir = Path(tc.reference_cache_dir or cache_root() / "reference")

        def ref_for(pairs: list[TokenizedPair]):
            def compute():
                # under the policy's autocast: at step 1 the log-ratios are 0 up to rounding
                with reference_context(), accelerator.autocast():
                    return compute_reference_logps(
                        policy,
                        pairs,
                        pad_id=pad_id,
                        layout=layout,
                        batch_size=tc.eval_batch_size,
                        device=accelerator.device,
                        progress=tc.progress,
                    )

            precision = f"{cfg.model.dtype}|autocast={mixed_precision}"
            key = reference_fingerprint(model_fp, pairs, precision)
            return cached_reference_logps(cache_dir, key, compute, accelerator)

        ref_train, ref_hit = ref_for(train_pairs)
        if eval_pairs:
            ref_eval, _ = ref_for(eval_pairs)
        ref_seconds = time.perf_counter() - t0
        if main:
            how = "loaded from cache" if ref_hit else "computed once"
            print(
                f"reference log-probs: {how} ({len(train_pairs)} train, "
                f"{len(eval_pairs)} eval pairs, {ref_seconds:.1f}s)"
            )

    # ---- optimisation
    steps_per_epoch = len(train_pairs) // tc.batch_size
    total_steps = tc.max_steps or max(1, int(tc.epochs * steps_per_epoch))
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    scheduler = get_scheduler(
        "constant_with_warmup" if tc.scheduler == "constant" else tc.scheduler,
        optimizer,
        num_warmup_steps=int(tc.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    # the scheduler is not given to Accelerate, which would step it once per process per step:
    # here one step is one global batch, whatever the number of processes
    policy, optimizer = accelerator.prepare(policy, optimizer)
    loss_params = LossParams(
        beta=lc.beta,
        label_smoothing=lc.label_smoothing,
        simpo_gamma=lc.simpo_gamma,
        length_penalty=lc.length_penalty,
    )

    def run_loss(pairs: list[TokenizedPair], idx: list[int], ref: ReferenceLogps | None):
        batch = _pack(pairs, pad_id, layout).to(accelerator.device)
        with accelerator.autocast():
            sums, counts = policy(batch)
        m = len(pairs)
        rc = rr = None
        if spec.uses_reference:
            if ref is not None:
                r = ref.take(idx)
                if not (
                    torch.equal(r.chosen_lengths, counts[:m].cpu())
                    and torch.equal(r.rejected_lengths, counts[m:].cpu())
                ):
                    raise RuntimeError("cached reference log-probs do not match the pairs' lengths")
                rc, rr = r.chosen.to(sums.device), r.rejected.to(sums.device)
            else:
                with accelerator.autocast():
                    ref_sums, _ = reference_forward(batch)
                rc, rr = ref_sums[:m].float(), ref_sums[m:].float()
        loss, metrics = preference_loss(
            lc.name,
            sums[:m].float(),
            sums[m:].float(),
            rc,
            rr,
            counts[:m],
            counts[m:],
            loss_params,
            lc.aggregation,
            lc.alpha,
        )
        return loss, metrics, batch

    def evaluate() -> dict[str, float]:
        policy.eval()
        mine = list(range(rank, len(eval_pairs), world))
        per_pair: dict[str, list[float]] = {}
        with torch.no_grad():
            for s in range(0, len(mine), tc.eval_batch_size):
                idx = mine[s : s + tc.eval_batch_size]
                _, metrics, _ = run_loss([eval_pairs[i] for i in idx], idx, ref_eval)
                for k, v in metrics.items():
                    per_pair.setdefault(k, []).extend(v.float().cpu().tolist())
        policy.train()
        gathered = gather_object([per_pair])
        merged: dict[str, list[float]] = {}
        for d in gathered:
            for k, v in d.items():
                merged.setdefault(k, []).extend(v)
        return _mean_metrics(merged)

    # ---- resume: the reference above was computed from the initial weights, as it must be
    start_step, skipped_steps, overflow_steps = 0, 0, 0
    if resume_from is not None:
        lm = accelerator.unwrap_model(policy).lm
        state = load_checkpoint(resume_from, lm, optimizer, scheduler, accelerator.scaler)
        start_step, skipped_steps = state["step"], state.get("skipped_steps", 0)
        overflow_steps = state.get("overflow_steps", 0)
        if main:
            truncate_metrics(out / "metrics.jsonl", start_step)
            print(f"resumed from {resume_from} (step {start_step} of {total_steps})")

    def checkpoint(step: int) -> None:
        accelerator.wait_for_everyone()
        if main:
            lm = accelerator.unwrap_model(policy).lm
            extra = {
                "skipped_steps": skipped_steps,
                "overflow_steps": overflow_steps,
                "total_steps": total_steps,
                "config": cfg.to_dict(),
            }
            save_checkpoint(
                out, step, lm, optimizer, scheduler, extra, tc.keep_checkpoints, accelerator.scaler
            )
        accelerator.wait_for_everyone()

    metrics_log = (
        MetricsLog(out / "metrics.jsonl", out / "tensorboard" if tc.tensorboard else None)
        if main
        else None
    )
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc=f"{lc.name}/{lc.aggregation} beta={lc.beta:g}",
        disable=not (main and tc.progress),
    )
    policy.train()
    train_start = time.perf_counter()
    last: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    orders: dict[int, list[list[int]]] = {}
    with StopSignals() as stop:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            epoch = step // steps_per_epoch
            if epoch not in orders:
                orders = {
                    epoch: batch_order(lengths, tc.batch_size, epoch, tc.seed, tc.group_by_length)
                }
            global_idx = orders[epoch][step % steps_per_epoch]
            mine = global_idx[rank::world]
            micro = [
                mine[i : i + tc.micro_batch_size] for i in range(0, len(mine), tc.micro_batch_size)
            ]
            per_pair: dict[str, list[torch.Tensor]] = {}
            real_tokens = padded_tokens = 0
            for j, idx in enumerate(micro):
                sync = j == len(micro) - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(policy):
                    loss, metrics, batch = run_loss([train_pairs[i] for i in idx], idx, ref_train)
                    # mean over the global batch; DDP averages gradients over processes
                    accelerator.backward(loss * len(idx) * world / tc.batch_size)
                for k, v in metrics.items():
                    per_pair.setdefault(k, []).append(v)
                real_tokens += batch.num_real_tokens
                padded_tokens += batch.input_ids.numel()
            # with max_grad_norm 0 an infinite threshold measures the norm without clipping
            # under a loss scaler (fp16) this also unscales the gradients
            grad_norm = float(accelerator.clip_grad_norm_(params, tc.max_grad_norm or math.inf))
            stacked = {k: accelerator.gather(torch.cat(v)).float() for k, v in per_pair.items()}
            loss_finite = bool(torch.isfinite(stacked["loss"]).all())
            scaler = accelerator.scaler
            if not (loss_finite and math.isfinite(grad_norm)):
                # checked before the optimizer step, so the weights and the last checkpoint are
                # still good; the step counts, its batch is not retried
                skipped = {"split": "skipped", "step": step + 1}
                if loss_finite and scaler is not None:
                    # fp16 gradient overflow: as in PyTorch AMP, the scaler's step skips the
                    # update and lowers the scale
                    optimizer.step()
                    overflow_steps += 1
                    skipped.update(reason="fp16 gradient overflow", loss_scale=scaler.get_scale())
                else:
                    what = f"non-finite loss or gradient at step {step + 1} (pairs {global_idx})"
                    if not tc.skip_nonfinite:
                        raise FloatingPointError(
                            f"{what}; the last checkpoint is intact (set "
                            "train.skip_nonfinite=true to skip such steps)"
                        )
                    if scaler is not None:
                        scaler.update()  # closes this step's unscale; lowers the scale on inf
                    skipped_steps += 1
                    skipped["reason"] = what
                optimizer.zero_grad(set_to_none=True)
                if main:
                    metrics_log.write(skipped)
                    bar.update(1)
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            tokens = torch.tensor([real_tokens, padded_tokens], device=accelerator.device)
            real_tokens, padded_tokens = accelerator.reduce(tokens, "sum").tolist()
            seconds = time.perf_counter() - t0
            last = {k: float(v.mean()) for k, v in stacked.items()}
            record = {
                "split": "train",
                "step": step + 1,
                "epoch": step / steps_per_epoch,
                **last,
                "learning_rate": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "seconds": seconds,
                "pairs_per_s": tc.batch_size / seconds,
                "tokens_per_s": real_tokens / seconds,
                "padding_fraction": 1 - real_tokens / padded_tokens,
            }
            if accelerator.scaler is not None:
                record["loss_scale"] = accelerator.scaler.get_scale()
            if (
                eval_pairs
                and tc.eval_every
                and (step + 1) % tc.eval_every == 0
                and step + 1 < total_steps
            ):
                eval_metrics = evaluate()
                if main:
                    metrics_log.write({"split": "eval", "step": step + 1, **eval_metrics})
            if main:
                metrics_log.write(record)
                bar.set_postfix(
                    loss=f"{last['loss']:.4f}",
                    margin=f"{last['reward_margin']:.3f}",
                    pairs_s=f"{record['pairs_per_s']:.2f}",
                )
                bar.update(1)
            done = step + 1
            if (
                stop.requested
                or (tc.save_every and done % tc.save_every == 0)
                or (tc.save_every and done == total_steps)
            ):
                checkpoint(done)
            if stop.requested:
                bar.close()
                if main:
                    metrics_log.close()
                raise TrainingInterrupted(
                    f"stopped by {stop.requested} after step {done}; checkpoint saved in "
                    f"{checkpoint_dir(out)}; continue with --resume (train.resume=true)"
                )
    bar.close()
    train_seconds = time.perf_counter() - train_start
    if eval_pairs:
        eval_metrics = evaluate()
        if main:
            metrics_log.write({"split": "eval", "step": total_steps, **eval_metrics})

    model_dir = None
    accelerator.wait_for_everyone()
    if main:
        metrics_log.close()
        if tc.save_model:
            model_dir = out / "model"
            lm = accelerator.unwrap_model(policy).lm
            if is_peft(lm):
                lm.save_pretrained(out / "adapter")
                lm = lm.merge_and_unload()  # a plain model that AutoModelForCausalLM reloads
            lm.save_pretrained(model_dir, safe_serialization=True)
            tokenizer.save_pretrained(model_dir)
            if rendering is not None:  # so that `avgalign evaluate` renders prompts the same way
                write_prompt_rendering(model_dir, rendering)
        summary = {
            "steps": total_steps,
            "skipped_steps": skipped_steps,
            "overflow_steps": overflow_steps,
            "layout": layout,
            "self_check": dataclasses.asdict(checked) if checked else None,
            "mixed_precision": mixed_precision,
            "train_seconds": train_seconds,
            "reference_seconds": ref_seconds,
            "reference_from_cache": ref_hit,
            "train_pairs": len(train_pairs),
            "eval_pairs": len(eval_pairs),
            "data": data_report,
            "last_train": last,
            "eval": eval_metrics,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return TrainResult(
        out,
        total_steps,
        train_seconds,
        ref_seconds,
        ref_hit,
        last,
        eval_metrics,
        model_dir,
        layout=layout,
        self_check=checked,
        skipped_steps=skipped_steps,
        overflow_steps=overflow_steps,
    )
