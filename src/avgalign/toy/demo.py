"""`avgalign demo`: the paper's length/score study end to end in the toy world, minutes on a CPU.

    avgalign demo            a subset of the design, under 5 minutes on 2 CPU cores
    avgalign demo --full     the whole design (aggregations x betas x seeds x length bias)
    avgalign demo [--out runs/demo] [--aggregations sum mean] [--betas 0.01 0.1] [--seeds 0 1] ...
    python -m avgalign.toy.demo ...            (the same, without the CLI)

1. build the toy world, or reuse it from the cache (tokenizer, SFT policy, pairs of SFT samples);
2. sample the SFT policy on held-out prompts: the baseline every run is compared with;
3. for each length bias of the annotator, label the pairs, and sweep (loss, aggregation, beta,
   training seed): each run trains a fresh copy of the SFT policy with avgalign.train, then is
   sampled and scored on the same held-out prompts;
4. write, under --out: per setting <setting>/results.jsonl (resumable) and results.md, and
   runs/<run>/ (the trainer's metrics, the run's scored completions); over all settings
   report.md, frontier.json, score_vs_length.png and score_vs_kl.png (avgalign.frontier).

The world is cached in <cache>/world-<hash of its config>, <cache> being --cache-dir, else
$AVGALIGN_CACHE/toy, else ~/.cache/avgalign/toy. Everything runs on one CPU thread: this is
faster for a model this small on a shared machine, and makes a re-run with the same seed give the
same table on any machine.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import frontier
from .. import sweep as engine
from ..config import Config
from ..evaluation import GenerationSettings, Scorer
from ..models import cache_root
from ..study import RunSpec, mean_completion_length, plan_runs, results_table
from .build import Preferences, World, WorldConfig, build_world
from .sft import ModelSize, SFTConfig, single_thread
from .world import TOPICS, AnnotatorConfig, Task, oracle_scorer, sub_seed

# bump when a code change alters what a run measures, so old rows are not reused
DEMO_VERSION = 2


@dataclass(frozen=True)
class AlignConfig:
    """How every aligned run trains (avgalign.train); the loss and beta come from the grid."""

    # with Adam, how far a run moves is set by learning rate x steps more than by beta; 1e-4 keeps
    # the largest betas near the SFT policy (KL ~0.1-0.3), so the beta grid traces a frontier
    learning_rate: float = 1e-4
    epochs: float = 1.0
    batch_size: int = 32
    warmup_ratio: float = 0.1
    scheduler: str = "cosine"


@dataclass(frozen=True)
class EvalConfig:
    """Sampling on held-out prompts, at temperature 1 (so the KL estimate is valid)."""

    num_prompts: int = 64
    samples_per_prompt: int = 8
    n_boot: int = 1000  # bootstrap resamples of the intervals


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    cache_dir: str | None = None  # default: <avgalign cache>/toy
    losses: tuple[str, ...] = ("dpo",)
    aggregations: tuple[str, ...] = ("sum", "mean")
    betas: tuple[float, ...] = (0.03, 0.3, 3.0)  # on the summed scale
    alphas: tuple[float, ...] = (0.5,)  # used by aggregation "power" only
    seeds: tuple[int, ...] = (0, 1)  # training seeds: every cell is trained once per seed
    # the annotator's taste for length, in logits per token: one sweep per value
    length_biases: tuple[float, ...] = (0.3,)
    annotator_temperature: float = 0.2
    world: WorldConfig = field(default_factory=WorldConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rebuild: bool = False  # rebuild the world and rerun every run, ignoring caches
    progress: bool = True


def full_config() -> DemoConfig:
    """The whole design (`avgalign demo --full`): three aggregations, a beta grid from near the
    SFT policy to over-optimisation, three training seeds, the annotator's length bias off and
    strong."""
    return DemoConfig(
        out="runs/demo-full",
        aggregations=("sum", "mean", "power"),
        betas=(0.03, 0.1, 0.3, 1.0, 3.0),
        seeds=(0, 1, 2),
        length_biases=(0.0, 0.3),
    )


def quick_config() -> DemoConfig:
    """A much smaller world and grid (tests, smoke runs): seconds instead of minutes."""
    return DemoConfig(
        betas=(0.1,),
        seeds=(0,),
        world=WorldConfig(
            n_max=8,
            model=ModelSize(hidden_size=32, intermediate_size=64, max_positions=48),
            sft=SFTConfig(steps=150),
            num_pairs=256,
            num_eval_pairs=32,
            max_new_tokens=16,
        ),
        eval=EvalConfig(num_prompts=12, samples_per_prompt=2, n_boot=200),
    )


@dataclass
class DemoOutputs:
    table: str  # the cells' table of the report
    report: str
    files: dict[str, Path]
    settings: dict[str, frontier.Setting]  # by name (length bias)
    ran: list[str]  # keys run this time (the others came from the results files)
    world: World


def base_train_config(cfg: DemoConfig, world: World) -> Config:
    """How every run trains; loss, beta, seed and folders come from the run (run_train_config)."""
    config = Config()
    config.model.name = str(world.model_dir)
    a, t = cfg.align, config.train
    t.seed = cfg.world.seed
    t.batch_size = t.micro_batch_size = a.batch_size
    t.epochs, t.learning_rate, t.warmup_ratio, t.scheduler = (
        a.epochs, a.learning_rate, a.warmup_ratio, a.scheduler)
    t.progress = False
    t.mixed_precision = "no"
    return config


def eval_tasks(world: World, cfg: DemoConfig) -> list[Task]:
    """The held-out tasks the runs are evaluated on."""
    tasks = world.test_tasks
    if cfg.eval.num_prompts > len(tasks):
        raise ValueError(f"--num-prompts {cfg.eval.num_prompts}: the world holds out only "
                         f"{len(tasks)} prompts")
    return tasks[: cfg.eval.num_prompts]


def ideal_length(tasks: list[Task]) -> float:
    """The oracle-optimal mean completion length on these tasks: n items, then EOS."""
    return sum(t.n + 1 for t in tasks) / len(tasks)


def make_evaluator(world: World, cfg: DemoConfig, tasks: list[Task]) -> engine.Evaluator:
    """Samples a policy on the held-out prompts, scores it with the oracle, and compares it with
    the SFT policy's samples, drawn here, once."""
    # policy and reference draw from independent random streams: the win rate compares
    # independent samples, as a judge comparing two systems would
    settings = GenerationSettings(
        num_samples=cfg.eval.samples_per_prompt, max_new_tokens=world.config.max_new_tokens,
        batch_size=512, seed=sub_seed(cfg.world.seed, "eval.policy"),
    )
    reference = world.load_policy()
    evaluator = engine.Evaluator(
        world.tokenizer, [t.prompt for t in tasks],
        Scorer("toy oracle", oracle_scorer(world.config.error_penalty)), settings,
        n_boot=cfg.eval.n_boot, reference_seed=sub_seed(cfg.world.seed, "eval.reference"),
        load_reference=lambda: reference,
    )
    evaluator.reference_samples()  # now, before any run: every run is compared with them
    return evaluator


def annotator(cfg: DemoConfig, length_bias: float) -> AnnotatorConfig:
    return AnnotatorConfig(temperature=cfg.annotator_temperature, length_bias=length_bias)


def setting_name(length_bias: float) -> str:
    """The folder and label of one annotator setting."""
    return f"length-bias-{length_bias:g}"


def sweep_context(cfg: DemoConfig, labels: AnnotatorConfig) -> str:
    """What, besides its grid coordinates, shapes a run's row: a row of another context is not
    reused."""
    return engine.digest({
        "version": DEMO_VERSION, "world": cfg.world.fingerprint(),
        "annotator": dataclasses.asdict(labels),
        "align": dataclasses.asdict(cfg.align), "eval": dataclasses.asdict(cfg.eval),
    })


def plan_sweep(
    cfg: DemoConfig, world: World, prefs: Preferences, out: Path, evaluator: engine.Evaluator
) -> engine.Sweep:
    """Every run trains a fresh copy of the SFT policy on the pairs as this annotator labelled
    them; runs of training seed s draw their evaluation samples from stream s."""
    mean_length = mean_completion_length(prefs.train_pairs)
    specs = plan_runs(cfg.losses, cfg.aggregations, cfg.betas, mean_length, cfg.alphas,
                      seeds=cfg.seeds)
    base = base_train_config(cfg, world)

    def config_for(spec: RunSpec, run_dir: Path) -> Config:
        return engine.run_train_config(base, spec, run_dir, world.path / "reference")

    return engine.Sweep(
        out, specs, mean_length, sweep_context(cfg, prefs.annotator), evaluator,
        engine.TrainData(world.tokenizer, prefs.train_pairs, prefs.eval_pairs),
        config_for=config_for, load_policy=lambda _config: world.load_policy(),
        progress=cfg.progress,
        eval_seed=lambda spec: sub_seed(cfg.world.seed, f"eval.policy.seed={spec.seed}"),
    )


def world_lines(world: World, cfg: DemoConfig, baseline: dict, ideal: float) -> list[str]:
    """The measured facts of the world that the report states before its findings."""
    s, w = world.stats, world.config
    sft = s["sft_sample_length"]
    return [
        f"Task: list n distinct items of a topic except one named item ({len(TOPICS)} topics, "
        f"n = {w.n_min}..{w.n_max}); oracle score = (hits - {w.error_penalty:g} x errors) / n, "
        f"best at exactly n items. {s['test_tasks']} prompts held out, {cfg.eval.num_prompts} "
        f"used for evaluation x {cfg.eval.samples_per_prompt} samples (temperature 1).",
        f"SFT policy: a {s['parameters'] / 1e6:.2f}M-parameter Llama trained {w.sft.steps} steps "
        f"on noisy demonstrations (final loss {s['sft_loss_last']:.3f}).",
        f"Length is a real axis: the SFT samples in the preference data are {sft['mean']:.1f} "
        f"tokens long on average (sd {sft['std']:.1f}, min {sft['min']:.0f}, max "
        f"{sft['max']:.0f}); on the held-out prompts, {baseline['length_mean']:.1f} (sd "
        f"{baseline['length_std']:.1f}), against an oracle-optimal mean length of {ideal:.1f}.",
        f"Preference data: {s['train_pairs']} pairs of SFT samples (two per prompt), labelled by a "
        f"Bradley-Terry annotator of temperature {cfg.annotator_temperature:g} with a length "
        "bias in logits per token; each setting below labels the same pairs with the same coin "
        "flips.",
        f"Training: {cfg.align.epochs:g} epoch(s), batch {cfg.align.batch_size} pairs, learning "
        f"rate {cfg.align.learning_rate:g} ({cfg.align.scheduler}), from the same SFT policy for "
        f"every run; training seeds {', '.join(map(str, cfg.seeds))} (the order of the pairs, "
        "and the stream of the run's evaluation samples).",
    ]


def label_line(prefs: Preferences, mean_length: float) -> str:
    p = prefs.stats
    return (
        f"length bias {prefs.annotator.length_bias:g} logits/token: the chosen completion is the "
        f"longer one in {p['chosen_longer_share']:.1%} of the {p['unequal']} pairs of unequal "
        f"length (without length bias: {p['unbiased_longer_share']:.1%} expected); the labels "
        f"agree with the oracle in {p['oracle_agreement']:.1%} of the pairs it can tell apart. "
        + engine.beta_calibration_line(mean_length)
    )


def run_demo(cfg: DemoConfig) -> DemoOutputs:
    say = engine.reporter(cfg.progress)
    out = Path(cfg.out)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else cache_root() / "toy"
    settings: dict[str, frontier.Setting] = {}
    ran: list[str] = []
    with single_thread():
        t0 = time.perf_counter()
        world = build_world(cfg.world, cache_dir, rebuild=cfg.rebuild, progress=cfg.progress)
        say(f"world ready in {time.perf_counter() - t0:.1f}s")
        tasks = eval_tasks(world, cfg)
        evaluator = make_evaluator(world, cfg, tasks)
        for bias in cfg.length_biases:
            name = setting_name(bias)
            prefs = world.preferences(annotator(cfg, bias))
            sub = out / name
            sub.mkdir(parents=True, exist_ok=True)
            if cfg.rebuild:
                (sub / "results.jsonl").unlink(missing_ok=True)
            sweep = plan_sweep(cfg, world, prefs, sub, evaluator)
            say(f"{name}: {len(sweep.specs)} runs + SFT baseline, results in "
                f"{sweep.results_path}")
            result = sweep.run()
            ran += [f"{name}/{key}" for key in result.ran]
            (sub / "results.md").write_text(results_table(result.rows, result.baseline) + "\n")
            settings[name] = frontier.Setting(name, result.rows, result.baseline,
                                              label_line(prefs, sweep.mean_length))
    ideal = ideal_length(tasks)
    first = next(iter(settings.values()))
    written = frontier.write_study(
        out, settings, n_boot=cfg.eval.n_boot, seed=cfg.world.seed,
        title="Averaging vs summing log-likelihoods in the toy world",
        setting=world_lines(world, cfg, first.baseline, ideal), ideal_length=ideal,
    )
    return DemoOutputs(written.table, written.report, written.files, settings, ran, world)


if __name__ == "__main__":  # python -m avgalign.toy.demo ARGS: avgalign demo ARGS
    from ..cli import main

    raise SystemExit(main(["demo", *sys.argv[1:]]))
