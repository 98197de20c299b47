"""The sweep engine both recipes share (the toy demo and the HH study): how a policy is evaluated
against the reference, how one run of the grid is trained and measured, and how the outputs of a
finished sweep are written.

A recipe keeps only what is its own: its data and world, the scorer, the training settings, the
words of its report. It builds an `Evaluator` (its prompts, scorer, sampling settings, and how the
reference is loaded) and a `Sweep` (the grid, the data every run trains on, how a run's config is
made and its starting policy loaded), calls `Sweep.run`, then `write_outputs`.

    evaluator = Evaluator(tokenizer, prompts, scorer, settings, n_boot=1000,
                          reference_seed=..., load_reference=...)
    sweep = Sweep(out, specs, mean_length, context, evaluator, TrainData(...),
                  config_for=..., load_policy=...)
    outputs = write_outputs(out, sweep.run(), title=..., plot_title=..., setting=[...])

Every run trains a fresh copy of the starting policy with avgalign.train, is sampled on the same
prompts, and is compared with the reference's samples (drawn once, from their own random stream).
study.run_sweep keeps the resumable results file; study.write_report computes the findings.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, validate
from .data import TokenizedPair
from .evaluation import (
    Completion,
    EvalResult,
    GenerationSettings,
    ScoredCompletion,
    generate_completions,
    pad_token_id,
    score_completions,
    summarize_evaluation,
    write_eval_outputs,
)
from .logprobs import sequence_logps
from .models import is_peft
from .study import (
    BASELINE_KEY,
    RunSpec,
    SweepResult,
    eval_measurements,
    plot_score_vs_length,
    results_table,
    run_sweep,
    write_report,
)
from .train import TrainResult, train


def digest(value: Any) -> str:
    """A short, stable hash of a JSON value: sweep contexts and cache keys."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def reporter(progress: bool) -> Callable[[str], None]:
    """print, or a function that says nothing."""
    return print if progress else (lambda _: None)


# ---------------------------------------------------------------------------------- evaluation


class Evaluator:
    """Samples policies on fixed prompts, scores their completions, and compares them with the
    reference's samples: drawn once from their own random stream (seed `reference_seed`), and kept
    in `cache` (a JSON file) when one is given, so that a re-run does not draw them again.

    load_reference() gives the reference model: it samples the reference completions, and scores
    the policies' completions for the KL estimate, except for a LoRA policy, whose reference is the
    same model with its adapters off."""

    def __init__(
        self,
        tokenizer,
        prompts: list[str],
        scorer: Callable[[list[str], list[str]], list[float]],
        settings: GenerationSettings,
        *,
        n_boot: int,
        reference_seed: int,
        load_reference: Callable[[], Any],
        cache: Path | None = None,
    ):
        self.tokenizer, self.prompts, self.scorer = tokenizer, prompts, scorer
        self.settings, self.n_boot = settings, n_boot
        self.reference_seed, self.load_reference, self.cache = reference_seed, load_reference, cache
        self._reference: list[ScoredCompletion] | None = None

    def sample(
        self, model, name: str, *, seed: int | None = None
    ) -> tuple[list[Completion], list[ScoredCompletion]]:
        """The model's completions of the prompts (the settings' seed unless `seed`), scored and
        labelled `name`."""
        settings = dataclasses.asdict(self.settings)
        if seed is not None:
            settings["seed"] = seed
        completions = generate_completions(
            model, self.tokenizer, self.prompts, **settings, progress=False
        )
        return completions, score_completions(self.scorer, completions, name)

    def reference_samples(self) -> list[ScoredCompletion]:
        if self._reference is None:
            if self.cache is not None and self.cache.is_file():
                rows = json.loads(self.cache.read_text())
                self._reference = [ScoredCompletion(**row) for row in rows]
            else:
                _, self._reference = self.sample(
                    self.load_reference(), "reference", seed=self.reference_seed
                )
                if self.cache is not None:
                    self.cache.parent.mkdir(parents=True, exist_ok=True)
                    rows = [dataclasses.asdict(s) for s in self._reference]
                    self.cache.write_text(json.dumps(rows))
        return self._reference

    def reference_for(self, policy) -> tuple[Any, Callable[[], contextlib.AbstractContextManager]]:
        """The model that scores the policy's completions as the reference, and the context to
        score them in: for a LoRA policy, the policy itself with its adapters off."""
        if is_peft(policy):
            return policy, policy.disable_adapter
        return self.load_reference(), contextlib.nullcontext

    def baseline(self) -> EvalResult:
        """The reference's samples evaluated on their own (no win rate, no KL)."""
        return summarize_evaluation(self.reference_samples(), settings=self.settings,
                                    n_boot=self.n_boot, seed=self.settings.seed)

    def evaluate(self, policy, *, seed: int | None = None) -> EvalResult:
        """The policy's samples (drawn with `seed`, else the settings' seed), against the
        reference's: win rates, and the KL estimate from the log-likelihoods of the policy's
        completions under the policy and the reference."""
        reference_samples = self.reference_samples()
        completions, scored = self.sample(policy, "policy", seed=seed)
        prompt_ids = [c.prompt_ids for c in completions]
        completion_ids = [c.token_ids for c in completions]
        kwargs = {"batch_size": self.settings.batch_size, "pad_id": pad_token_id(self.tokenizer)}
        policy_logps, _ = sequence_logps(policy, prompt_ids, completion_ids, **kwargs)
        reference, off = self.reference_for(policy)
        with off():
            reference_logps, _ = sequence_logps(reference, prompt_ids, completion_ids, **kwargs)
        return summarize_evaluation(
            scored, reference_samples, policy_logps=policy_logps, reference_logps=reference_logps,
            settings=self.settings, n_boot=self.n_boot, seed=self.settings.seed,
        )


# --------------------------------------------------------------------------------------- runs


def run_train_config(
    base: Config, spec: RunSpec, output_dir: Path, reference_cache_dir: Path
) -> Config:
    """One run's training config: `base` with the spec's loss, aggregation, beta (alpha, seed), the
    run's output folder and the sweep's reference cache. No weights are saved: a run is evaluated
    in memory."""
    config = copy.deepcopy(base)
    loss = config.loss
    loss.name, loss.aggregation, loss.beta = spec.loss, spec.aggregation, spec.beta
    if spec.alpha is not None:
        loss.alpha = spec.alpha
    t = config.train
    if spec.seed is not None:
        t.seed = spec.seed
    t.output_dir, t.reference_cache_dir = str(output_dir), str(reference_cache_dir)
    t.save_model = False
    t.save_every, t.save_minutes = 0, 0  # a sweep resumes run by run: no checkpoints within one
    return validate(config)


def training_measurements(result: TrainResult) -> dict[str, Any]:
    """The row fields of a training: steps, reward accuracies, where the time went."""
    return {
        "steps": result.steps,
        "reward_accuracy": result.eval_metrics.get("reward_accuracy"),
        "train_reward_accuracy": result.last_train_metrics.get("reward_accuracy"),
        "train_seconds": result.train_seconds,
        "reference_seconds": result.reference_seconds,
        "reference_from_cache": result.reference_from_cache,
    }


@dataclass
class TrainData:
    """What every run of a sweep trains on."""

    tokenizer: Any
    train_pairs: Sequence[TokenizedPair]
    eval_pairs: Sequence[TokenizedPair] | None


@dataclass
class Sweep:
    """A grid of runs from one starting policy, evaluated by one evaluator, rows in
    <out>/results.jsonl and each run's files in <out>/runs/<run>/ (the baseline's in runs/sft/)."""

    out: Path
    specs: list[RunSpec]
    mean_length: float  # of the training pairs' completions: it calibrated the betas
    context: str  # study.run_sweep reuses only rows of this context
    evaluator: Evaluator
    data: TrainData
    config_for: Callable[[RunSpec, Path], Config]  # (spec, the trainer's folder) -> config
    load_policy: Callable[[Config], Any]  # a fresh copy of the starting policy, for that config
    train_subdir: str = ""  # the trainer's folder inside runs/<run>/ ("": that folder itself)
    progress: bool = True
    time_baseline: bool = False  # give the baseline's row its eval_seconds too
    # the seed a run's samples are drawn with (None: the evaluator's); runs of different training
    # seeds should draw different samples, so that seeds also resample the evaluation's noise
    eval_seed: Callable[[RunSpec], int | None] = lambda spec: None

    @property
    def results_path(self) -> Path:
        return self.out / "results.jsonl"

    def run_dir(self, spec: RunSpec) -> Path:
        return self.out / "runs" / spec.key.replace("/", "_")

    def measure_baseline(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        result = self.evaluator.baseline()
        write_eval_outputs(result, result.completions, self.out / "runs" / BASELINE_KEY)
        row = {**eval_measurements(result), "kl": 0.0, "kl_lo": 0.0, "kl_hi": 0.0}
        row["per_prompt"]["kl"] = [0.0] * result.num_prompts  # the reference against itself
        if self.time_baseline:
            row["eval_seconds"] = time.perf_counter() - t0
        return row

    def run_one(self, spec: RunSpec) -> dict[str, Any]:
        """Train a fresh copy of the starting policy, evaluate it, return its row's measurements;
        the trainer's output goes to its train.log, not to the sweep's progress bar."""
        run_dir = self.run_dir(spec)
        shutil.rmtree(run_dir, ignore_errors=True)  # what a killed attempt left
        train_dir = run_dir / self.train_subdir
        config = self.config_for(spec, train_dir)
        policy = self.load_policy(config)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            result = train(config, model=policy, tokenizer=self.data.tokenizer,
                           train_pairs=self.data.train_pairs, eval_pairs=self.data.eval_pairs)
        (train_dir / "train.log").write_text(log.getvalue())
        t_eval = time.perf_counter()
        evaluation = self.evaluator.evaluate(policy, seed=self.eval_seed(spec))
        write_eval_outputs(evaluation, evaluation.completions, run_dir)
        return {**eval_measurements(evaluation), **training_measurements(result),
                "eval_seconds": time.perf_counter() - t_eval}

    def run(self) -> SweepResult:
        """The baseline and every run not yet in the results file for this context."""
        return run_sweep(self.specs, self.run_one, self.results_path, context=self.context,
                         baseline=self.measure_baseline, progress=self.progress)


# ------------------------------------------------------------------------------------ outputs


@dataclass
class StudyOutputs:
    table: str
    report: str
    rows: list[dict[str, Any]]
    baseline: dict[str, Any] | None
    files: dict[str, Path]
    ran: list[str]  # keys run this time (the others came from the results file)


def beta_calibration_line(mean_length: float, unit: str = "") -> str:
    """The report's setting line on how averaged runs' betas were calibrated."""
    return (f"Beta calibration: mean completion length of the training pairs L = "
            f"{mean_length:.2f}{unit}, so an averaged run uses beta = beta_sum x "
            f"{mean_length:.2f}.")


def write_outputs(
    out: Path,
    sweep: SweepResult,
    *,
    title: str,
    plot_title: str,
    setting: Sequence[str],
    ideal_length: float | None = None,
) -> StudyOutputs:
    """results.md, score_vs_length.png and report.md under `out`, beside results.jsonl."""
    files = {
        "results": out / "results.jsonl", "table": out / "results.md",
        "plot": out / "score_vs_length.png", "report": out / "report.md",
    }
    table = results_table(sweep.rows, sweep.baseline)
    files["table"].write_text(table + "\n")
    plot_score_vs_length(sweep.rows, sweep.baseline, files["plot"], ideal_length=ideal_length,
                         title=plot_title)
    report = write_report(
        files["report"], title=title, rows=sweep.rows, baseline=sweep.baseline, setting=setting,
        ideal_length=ideal_length, plot_file=files["plot"].name,
    )
    return StudyOutputs(table, report, sweep.rows, sweep.baseline, files, sweep.ran)


# ---------------------------------------------------------------------------------------- CLI


def run_command(name: str, run: Callable[[], StudyOutputs]) -> StudyOutputs:
    """Run a study for the CLI, then print its table, the files it wrote and the time it took.
    No transformers progress bars: a "Loading weights" bar for every run would drown the sweep's."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    outputs = run()
    print()
    print(outputs.table)
    print()
    print(f"wrote {', '.join(str(p) for p in outputs.files.values())}")
    print(f"{name} finished in {time.perf_counter() - t0:.1f}s ({len(outputs.ran)} runs done now, "
          "the others reused from the results file)")
    return outputs
