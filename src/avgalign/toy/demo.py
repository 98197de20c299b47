"""`avgalign demo`: the paper's length/score study end to end in the toy world, minutes on a CPU.

    avgalign demo [--quick] [--out runs/demo] [--losses dpo ipo] [--betas 0.03 0.1 0.3] ...
    python -m avgalign.toy.demo ...            (the same, without the CLI)

1. build the toy world, or reuse it from the cache (tokenizer, SFT policy, labelled pairs);
2. sample the SFT policy on held-out prompts: the baseline every run is compared with;
3. sweep (loss, aggregation, beta): each run trains a fresh copy of the SFT policy with
   avgalign.train on the same pairs, then is sampled and scored on the same held-out prompts;
4. write, under --out: results.jsonl (resumable), results.md, score_vs_length.png, report.md,
   and runs/<run>/ (the trainer's metrics, the run's scored completions).

The world is cached in <cache>/world-<hash of its config>, <cache> being --cache-dir, else
$AVGALIGN_CACHE/toy, else ~/.cache/avgalign/toy. Everything runs on one CPU thread: this is
faster for a model this small on a shared machine, and makes a re-run with the same seed give the
same table on any machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, validate
from ..evaluation import (
    Completion,
    EvalResult,
    GenerationSettings,
    ScoredCompletion,
    Scorer,
    generate_completions,
    pad_token_id,
    score_completions,
    summarize_evaluation,
    write_eval_outputs,
)
from ..logprobs import sequence_logps
from ..losses import AGGREGATIONS, LOSSES
from ..models import cache_root
from ..study import (
    RunSpec,
    eval_measurements,
    mean_completion_length,
    plan_runs,
    plot_score_vs_length,
    results_table,
    run_sweep,
    write_report,
)
from ..train import train
from .build import World, WorldConfig, build_world
from .sft import ModelSize, SFTConfig, single_thread
from .world import TOPICS, oracle_scorer, sub_seed

# bump when a code change alters what a run measures, so old rows are not reused
DEMO_VERSION = 1


@dataclass(frozen=True)
class AlignConfig:
    """How every aligned run trains (avgalign.train); the loss and beta come from the grid."""

    learning_rate: float = 1e-3
    epochs: float = 1.0
    batch_size: int = 32
    warmup_ratio: float = 0.1
    scheduler: str = "cosine"


@dataclass(frozen=True)
class EvalConfig:
    """Sampling on held-out prompts, at temperature 1 (so the KL estimate is valid)."""

    num_prompts: int = 64
    samples_per_prompt: int = 8
    n_boot: int = 1000  # bootstrap resamples of the win-rate intervals


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    cache_dir: str | None = None  # default: <avgalign cache>/toy
    losses: tuple[str, ...] = ("dpo", "ipo")
    aggregations: tuple[str, ...] = ("sum", "mean")
    betas: tuple[float, ...] = (0.1, 0.3, 1.0)  # on the summed scale
    alphas: tuple[float, ...] = (0.5,)  # used by aggregation "power" only
    world: WorldConfig = field(default_factory=WorldConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rebuild: bool = False  # rebuild the world and rerun every run, ignoring caches
    progress: bool = True


def quick_config() -> DemoConfig:
    """A much smaller world and grid (tests, smoke runs): seconds instead of minutes."""
    return DemoConfig(
        losses=("dpo",),
        betas=(0.1,),
        world=WorldConfig(
            n_max=5,
            model=ModelSize(hidden_size=32, intermediate_size=64),
            sft=SFTConfig(steps=150),
            num_pairs=256,
            num_eval_pairs=32,
            max_new_tokens=12,
        ),
        eval=EvalConfig(num_prompts=12, samples_per_prompt=2, n_boot=200),
    )


@dataclass
class DemoOutputs:
    table: str
    report: str
    rows: list[dict[str, Any]]
    baseline: dict[str, Any]
    files: dict[str, Path]
    world: World
    ran: list[str]


def train_config(cfg: DemoConfig, spec: RunSpec, run_dir: Path, world: World) -> Config:
    config = Config()
    config.model.name = str(world.model_dir)
    loss = config.loss
    loss.name, loss.aggregation, loss.beta = spec.loss, spec.aggregation, spec.beta
    if spec.alpha is not None:
        loss.alpha = spec.alpha
    a, t = cfg.align, config.train
    t.output_dir, t.seed = str(run_dir), cfg.world.seed
    t.batch_size = t.micro_batch_size = a.batch_size
    t.epochs, t.learning_rate, t.warmup_ratio, t.scheduler = (
        a.epochs, a.learning_rate, a.warmup_ratio, a.scheduler)
    t.reference_cache_dir = str(world.path / "reference")
    t.progress, t.save_model = False, False
    t.mixed_precision = "no"
    return validate(config)


class Evaluator:
    """Samples a policy on the held-out prompts and compares it with the SFT policy's samples."""

    def __init__(self, world: World, cfg: DemoConfig):
        tasks = world.test_tasks
        if cfg.eval.num_prompts > len(tasks):
            raise ValueError(f"--num-prompts {cfg.eval.num_prompts}: the world holds out only "
                             f"{len(tasks)} prompts")
        tasks = tasks[: cfg.eval.num_prompts]
        self.prompts = [t.prompt for t in tasks]
        self.ideal_length = sum(t.n + 1 for t in tasks) / len(tasks)  # n items, then EOS
        self.tokenizer = world.tokenizer
        self.scorer = Scorer("toy oracle", oracle_scorer(world.config.error_penalty))
        # policy and reference draw from independent random streams: the win rate compares
        # independent samples, as a judge comparing two systems would
        self.settings = GenerationSettings(
            num_samples=cfg.eval.samples_per_prompt, max_new_tokens=world.config.max_new_tokens,
            batch_size=512, seed=sub_seed(cfg.world.seed, "eval.policy"),
        )
        self.n_boot = cfg.eval.n_boot
        self.reference = world.load_policy()
        reference_settings = dataclasses.replace(
            self.settings, seed=sub_seed(cfg.world.seed, "eval.reference")
        )
        _, self.reference_samples = self.sample(self.reference, "reference", reference_settings)

    def sample(
        self, model, name: str, settings: GenerationSettings
    ) -> tuple[list[Completion], list[ScoredCompletion]]:
        completions = generate_completions(
            model, self.tokenizer, self.prompts, **dataclasses.asdict(settings), progress=False
        )
        return completions, score_completions(self.scorer, completions, name)

    def baseline(self) -> EvalResult:
        """The SFT policy's samples evaluated on their own (no win rate, no KL)."""
        return summarize_evaluation(self.reference_samples, settings=self.settings,
                                    n_boot=self.n_boot, seed=self.settings.seed)

    def evaluate(self, policy) -> EvalResult:
        completions, scored = self.sample(policy, "policy", self.settings)
        prompt_ids = [c.prompt_ids for c in completions]
        completion_ids = [c.token_ids for c in completions]
        kwargs = {"batch_size": 512, "pad_id": pad_token_id(self.tokenizer)}
        policy_logps, _ = sequence_logps(policy, prompt_ids, completion_ids, **kwargs)
        reference_logps, _ = sequence_logps(self.reference, prompt_ids, completion_ids, **kwargs)
        return summarize_evaluation(
            scored, self.reference_samples, policy_logps=policy_logps,
            reference_logps=reference_logps, settings=self.settings, n_boot=self.n_boot,
            seed=self.settings.seed,
        )


def sweep_context(cfg: DemoConfig) -> str:
    """What, besides its grid coordinates, shapes a run's row: a row of another context is not
    reused."""
    text = json.dumps({
        "version": DEMO_VERSION, "world": cfg.world.fingerprint(),
        "align": dataclasses.asdict(cfg.align), "eval": dataclasses.asdict(cfg.eval),
    }, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def setting_lines(world: World, evaluator: Evaluator, baseline: dict, cfg: DemoConfig,
                  mean_length: float) -> list[str]:
    """The measured facts of the world that the report states before its findings."""
    s, w = world.stats, world.config
    pairs = s["train_pairs"]
    return [
        f"Task: list n distinct items of a topic except one named item ({len(TOPICS)} topics, "
        f"n = {w.n_min}..{w.n_max}); oracle score = (hits - {w.error_penalty:g} x errors) / n, "
        f"best at exactly n items. {s['test_tasks']} prompts held out, {cfg.eval.num_prompts} "
        f"used for evaluation x {cfg.eval.samples_per_prompt} samples (temperature 1).",
        f"SFT policy: a {s['parameters'] / 1e6:.2f}M-parameter Llama trained {w.sft.steps} steps "
        f"on noisy demonstrations (final loss {s['sft_loss_last']:.3f}).",
        f"SFT generations on held-out prompts: length {baseline['length_mean']:.2f} tokens on "
        f"average (sd {baseline['length_std']:.2f}, min {baseline['length_min']:.0f}, max "
        f"{baseline['length_max']:.0f}); oracle-optimal mean length {evaluator.ideal_length:.2f}.",
        f"Preference data: {pairs['pairs']} pairs of SFT samples labelled by a Bradley-Terry "
        f"annotator (temperature {w.annotator.temperature:g}, length bias "
        f"{w.annotator.length_bias:g} logits/token). The chosen completion is the longer one in "
        f"{pairs['chosen_longer_share']:.1%} of the {pairs['unequal']} pairs of unequal length "
        f"(an annotator without length bias: {pairs['unbiased_longer_share']:.1%} expected); "
        f"the annotator agrees with the oracle in {pairs['oracle_agreement']:.1%} of the pairs "
        "the oracle can tell apart.",
        f"Beta calibration: mean completion length of the training pairs L = {mean_length:.2f}, "
        f"so an averaged run uses beta = beta_sum x {mean_length:.2f}.",
        f"Training: {cfg.align.epochs:g} epoch(s), batch {cfg.align.batch_size} pairs, learning "
        f"rate {cfg.align.learning_rate:g} ({cfg.align.scheduler}), from the same SFT policy on "
        "the same pairs for every run.",
    ]


def run_demo(cfg: DemoConfig) -> DemoOutputs:
    say = print if cfg.progress else (lambda _: None)
    out = Path(cfg.out)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else cache_root() / "toy"
    results_path = out / "results.jsonl"
    with single_thread():
        t0 = time.perf_counter()
        world = build_world(cfg.world, cache_dir, rebuild=cfg.rebuild, progress=cfg.progress)
        say(f"world ready in {time.perf_counter() - t0:.1f}s")
        out.mkdir(parents=True, exist_ok=True)
        if cfg.rebuild:
            results_path.unlink(missing_ok=True)
        mean_length = mean_completion_length(world.train_pairs)
        specs = plan_runs(cfg.losses, cfg.aggregations, cfg.betas, mean_length, cfg.alphas)
        evaluator = Evaluator(world, cfg)

        def measure_baseline() -> dict[str, Any]:
            result = evaluator.baseline()
            write_eval_outputs(result, result.completions, out / "runs" / "sft")
            return {**eval_measurements(result), "kl": 0.0, "kl_lo": 0.0, "kl_hi": 0.0}

        def run_one(spec: RunSpec) -> dict[str, Any]:
            run_dir = out / "runs" / spec.key.replace("/", "_")
            shutil.rmtree(run_dir, ignore_errors=True)  # what a killed attempt left
            policy = world.load_policy()
            log = io.StringIO()
            with contextlib.redirect_stdout(log):  # keep the sweep's progress bar readable
                result = train(train_config(cfg, spec, run_dir, world), model=policy,
                               tokenizer=world.tokenizer, train_pairs=world.train_pairs,
                               eval_pairs=world.eval_pairs)
            (run_dir / "train.log").write_text(log.getvalue())
            t_eval = time.perf_counter()
            evaluation = evaluator.evaluate(policy)
            write_eval_outputs(evaluation, evaluation.completions, run_dir)
            return {
                **eval_measurements(evaluation),
                "steps": result.steps,
                "reward_accuracy": result.eval_metrics.get("reward_accuracy"),
                "train_reward_accuracy": result.last_train_metrics.get("reward_accuracy"),
                "train_seconds": result.train_seconds,
                "reference_seconds": result.reference_seconds,
                "reference_from_cache": result.reference_from_cache,
                "eval_seconds": time.perf_counter() - t_eval,
            }

        say(f"sweep: {len(specs)} runs + SFT baseline, results in {results_path}")
        sweep = run_sweep(specs, run_one, results_path, context=sweep_context(cfg),
                          baseline=measure_baseline, progress=cfg.progress)

    files = {
        "results": results_path,
        "table": out / "results.md",
        "plot": out / "score_vs_length.png",
        "report": out / "report.md",
    }
    table = results_table(sweep.rows, sweep.baseline)
    files["table"].write_text(table + "\n")
    plot_score_vs_length(sweep.rows, sweep.baseline, files["plot"],
                         ideal_length=evaluator.ideal_length,
                         title="Toy world: oracle score against generation length")
    report = write_report(
        files["report"], title="Averaging vs summing log-likelihoods in the toy world",
        rows=sweep.rows, baseline=sweep.baseline,
        setting=setting_lines(world, evaluator, sweep.baseline, cfg, mean_length),
        ideal_length=evaluator.ideal_length, plot_file=files["plot"].name,
    )
    return DemoOutputs(table, report, sweep.rows, sweep.baseline, files, world, sweep.ran)


# ------------------------------------------------------------------------------------------- CLI


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Register `demo`; the handler is set as the parser's `func` default."""
    p = subparsers.add_parser(
        "demo",
        help="the length/score study end to end in a toy world with a known oracle (CPU, minutes)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--cache-dir", help="where the toy world is cached (default: "
                   "$AVGALIGN_CACHE/toy or ~/.cache/avgalign/toy)")
    p.add_argument("--losses", nargs="+", choices=sorted(LOSSES),
                   help="losses to sweep (default: dpo ipo)")
    p.add_argument("--aggregations", nargs="+", choices=AGGREGATIONS,
                   help="aggregations to sweep (default: sum mean)")
    p.add_argument("--betas", nargs="+", type=float,
                   help="betas on the summed scale; averaged runs use beta x mean length "
                   "(default: 0.1 0.3 1)")
    p.add_argument("--alphas", nargs="+", type=float,
                   help="exponents for aggregation 'power' (default: 0.5)")
    p.add_argument("--seed", type=int, help="seed of the world, the training and the sampling")
    p.add_argument("--num-prompts", type=int, help="held-out prompts to evaluate on (default 64)")
    p.add_argument("--samples-per-prompt", type=int, help="samples per prompt (default 8)")
    p.add_argument("--quick", action="store_true",
                   help="a much smaller world and grid (smoke test, seconds)")
    p.add_argument("--no-cache", action="store_true",
                   help="rebuild the world and rerun every run instead of reusing them")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run_demo_command)
    return p


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    cfg = quick_config() if args.quick else DemoConfig()
    cfg.out = args.out
    cfg.cache_dir = args.cache_dir
    cfg.rebuild = args.no_cache
    cfg.progress = not args.quiet
    for name in ("losses", "aggregations", "betas", "alphas"):
        if getattr(args, name):
            setattr(cfg, name, tuple(getattr(args, name)))
    if args.seed is not None:
        cfg.world = dataclasses.replace(cfg.world, seed=args.seed)
    if args.num_prompts is not None:
        cfg.eval = dataclasses.replace(cfg.eval, num_prompts=args.num_prompts)
    if args.samples_per_prompt is not None:
        cfg.eval = dataclasses.replace(cfg.eval, samples_per_prompt=args.samples_per_prompt)
    return cfg


def run_demo_command(args: argparse.Namespace) -> DemoOutputs:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars for every run drown the sweep's
    t0 = time.perf_counter()
    outputs = run_demo(config_from_args(args))
    print()
    print(outputs.table)
    print()
    print(f"wrote {', '.join(str(p) for p in outputs.files.values())}")
    print(f"demo finished in {time.perf_counter() - t0:.1f}s "
          f"({len(outputs.ran)} runs done now, the others reused from {outputs.files['results']})")
    return outputs


def main_demo(argv: list[str] | None = None) -> DemoOutputs:
    parser = argparse.ArgumentParser(prog="avgalign")
    add_demo_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["demo", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    main_demo()
