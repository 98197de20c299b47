"""`avgalign study`: the length/score study on a real model and real preferences (HH-RLHF).

    avgalign study configs/hh-smollm2/cpu-small.yaml --out docs/results/hh-smollm2-cpu-small
    python -m avgalign.recipes.hh CONFIG --out DIR            (the same, without the CLI)

1. split the HH file into disjoint parts BY PROMPT (no prompt in two parts): the gold reward
   model's training and held-out pairs, the policy's training and held-out pairs, and the
   evaluation prompts. Only records whose prompt and completions fit `data.max_length` tokens are
   used, so the reward model always reads a whole prompt and a whole completion. The dialogues
   are rendered with the tokenizer's chat template (data.chat_template), so an instruct model
   answers as it was tuned to and ends its turn with its EOS;
2. train the gold reward model (Bradley-Terry, avgalign.reward_model) and report its held-out
   pairwise accuracy with a 95% interval;
3. tokenize the policy pairs, measure their mean completion length L and plan the sweep
   (avgalign.study.plan_runs: beta = beta_sum * L for the averaged loss);
4. the baseline: the untouched model sampled on the evaluation prompts and scored by the gold RM;
5. each run trains a fresh copy of the model (LoRA when policy.model.lora.r > 0) with
   avgalign.train, samples it on the same prompts, and is compared with the baseline (win rate,
   length-controlled win rate, KL to the reference, lengths, gold score);
6. write results.jsonl (resumable), results.md, score_vs_length.png, report.md, run.json (the
   command, wall time per stage, the machine), split.json, reward_model.json, and runs/<run>/
   (training metrics, scored completions) under --out.

Big files (the reward model, cached reference log-probs and samples) go to `work_dir`, never to
--out. Every stage is cached: a re-run reuses the reward model and skips finished runs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import platform
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import sweep as engine
from ..config import Config, ConfigError, LoraConfig, from_mapping, read_yaml, validate
from ..data import PreferenceExample, TokenizedPair, load_preferences, tokenize_pairs
from ..evaluation import GenerationSettings, load_scorer, reference_seed
from ..models import load_model, load_tokenizer, resolve_model_path
from ..reward_model import RewardModelResult, train_reward_model
from ..seeding import seeded
from ..study import RunSpec, mean_completion_length, plan_runs

# bump when a code change alters what a run measures, so old rows and caches are not reused
# 3: the reference is sampled with its own seed (evaluation.reference_seed); rows of version 2
# shared the policies' seed and are not reused
RECIPE_VERSION = 3
PARTS = ("eval_prompts", "rm_eval", "policy_eval", "policy_train", "rm_train")

# ------------------------------------------------------------------------------------- config


@dataclass
class SplitConfig:
    """How the HH file is cut. Sizes count pairs; the evaluation uses the distinct prompts of its
    eval_prompts pairs (HH repeats almost no prompt)."""

    path: str = "../shared/data/hh-rlhf-harmless-base/test.jsonl.gz"  # relative to the cwd
    seed: int = 0
    # render the HH dialogue with the tokenizer's chat template (what an instruct model was tuned
    # on, and how it learns to end its turn); false keeps the raw "\n\nHuman: ..." text
    chat_template: bool = True
    # prompt + longer completion must fit (and prompt + eval.max_new_tokens): the reward model
    # reads whole texts and the policy's pairs are never truncated
    max_length: int = 256
    rm_pairs: int = 400
    rm_eval_pairs: int = 200
    policy_pairs: int = 128
    policy_eval_pairs: int = 32  # the trainer's held-out reward accuracy
    eval_prompts: int = 32


@dataclass
class RewardModelConfig:
    """The gold reward model: the policy's backbone with a scalar head, Bradley-Terry loss."""

    epochs: int = 1
    learning_rate: float = 1e-4
    batch_size: int = 8
    trainable_layers: int | None = 4  # the last N decoder layers, the norm and the head; None: all


@dataclass
class SweepConfig:
    losses: list[str] = field(default_factory=lambda: ["dpo", "ipo"])
    aggregations: list[str] = field(default_factory=lambda: ["sum", "mean"])
    betas: list[float] = field(default_factory=lambda: [0.1, 0.5])  # on the summed scale
    alphas: list[float] = field(default_factory=list)  # aggregation "power" only


@dataclass
class EvalConfig:
    """Sampling on the evaluation prompts, at temperature 1 so the KL estimate is valid."""

    samples_per_prompt: int = 1
    max_new_tokens: int = 48
    temperature: float = 1.0
    batch_size: int = 16  # sequences per generate / scoring call
    n_boot: int = 1000  # bootstrap resamples of the win-rate intervals
    seed: int = 0


@dataclass
class RecipeConfig:
    work_dir: str = "runs/hh-smollm2"  # caches: reward model, reference log-probs and samples
    # torch CPU threads (null: torch's default). On a shared CPU one thread can be several times
    # faster than two that wait on each other
    threads: int | None = None
    data: SplitConfig = field(default_factory=SplitConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    # how every run trains (avgalign.config sections model, data, loss, train); loss name,
    # aggregation and beta come from the sweep, output and cache folders from the recipe
    policy: Config = field(default_factory=Config)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_recipe_config(path: str | Path) -> RecipeConfig:
    """The recipe config from YAML (safe-loaded), every key and type checked."""
    cfg = from_mapping(RecipeConfig, read_yaml(path))
    validate(cfg.policy)
    d = cfg.data
    sizes = [d.rm_pairs, d.rm_eval_pairs, d.policy_pairs, d.policy_eval_pairs, d.eval_prompts]
    if min(sizes) < 1:
        raise ConfigError("data: every part needs at least one pair")
    if d.max_length <= cfg.eval.max_new_tokens:
        raise ConfigError("data.max_length must exceed eval.max_new_tokens")
    if cfg.policy.data.max_length < d.max_length:
        raise ConfigError("policy.data.max_length must be >= data.max_length (no truncation)")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError("threads must be >= 1 or null")
    if cfg.reward_model.trainable_layers is not None and cfg.reward_model.trainable_layers < 0:
        raise ConfigError("reward_model.trainable_layers must be >= 0 or null")
    return cfg


def sweep_context(cfg: RecipeConfig) -> str:
    """What, besides its grid coordinates, shapes a run's row: rows of another context are not
    reused. Paths and progress bars do not shape a run."""
    policy = copy.deepcopy(cfg.policy)
    policy.train.output_dir, policy.train.reference_cache_dir = "", None
    policy.train.progress = True
    return engine.digest({
        "version": RECIPE_VERSION, "data": dataclasses.asdict(cfg.data),
        "reward_model": dataclasses.asdict(cfg.reward_model), "policy": policy.to_dict(),
        "eval": dataclasses.asdict(cfg.eval),
    })


# -------------------------------------------------------------------------------------- split


def split_by_prompt(
    examples: Sequence[PreferenceExample], sizes: dict[str, int], seed: int
) -> dict[str, list[PreferenceExample]]:
    """Disjoint parts by prompt: the distinct prompts are shuffled with `seed` and dealt, all
    pairs of a prompt together, to each part in turn until it holds sizes[part] pairs (a part's
    last prompt may bring more pairs than needed: they are left out, never given to another part).
    Raises ValueError when the prompts run out."""
    groups: dict[str, list[PreferenceExample]] = {}
    for example in examples:
        groups.setdefault(example.prompt, []).append(example)
    prompts = list(groups)
    random.Random(seed).shuffle(prompts)
    dealt = iter(prompts)
    parts: dict[str, list[PreferenceExample]] = {}
    for name, size in sizes.items():
        part: list[PreferenceExample] = []
        while len(part) < size:
            prompt = next(dealt, None)
            if prompt is None:
                raise ValueError(
                    f"only {len(prompts)} distinct prompts: not enough for part {name!r} "
                    f"({len(part)} of {size} pairs); ask for smaller parts"
                )
            part.extend(groups[prompt])
        parts[name] = part[:size]
    return parts


HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def hh_messages(prompt: str) -> list[dict[str, str]]:
    """The turns of an HH prompt "\n\nHuman: ...\n\nAssistant: ...\n\nHuman: ...\n\nAssistant:" as
    chat messages, without the final, empty Assistant turn (the one to generate)."""
    pieces = HH_TURN.split(prompt)  # ["", "Human", " text", "Assistant", " text", ...]
    messages = [
        {"role": HH_ROLES[who], "content": text.strip()}
        for who, text in zip(pieces[1::2], pieces[2::2], strict=True)
    ]
    if pieces[0].strip() or len(messages) < 2 or messages[-1] != {"role": "assistant",
                                                                  "content": ""}:
        raise ValueError("not an HH dialogue ending with an empty Assistant turn")
    return messages[:-1]


def render_chat(example: PreferenceExample, tokenizer) -> PreferenceExample:
    """The example with its prompt rendered by the chat template (generation prompt included)
    and its completions stripped: the template, not a leading space, starts the answer."""
    prompt = tokenizer.apply_chat_template(
        hh_messages(example.prompt), add_generation_prompt=True, tokenize=False
    )
    return dataclasses.replace(
        example, prompt=prompt, chosen=example.chosen.strip(), rejected=example.rejected.strip()
    )


def fits(pair: TokenizedPair, max_length: int, max_new_tokens: int) -> bool:
    """The prompt with its longer completion, and with a full generation, fit max_length."""
    longest = max(len(pair.chosen_ids), len(pair.rejected_ids), max_new_tokens)
    return len(pair.prompt_ids) + longest <= max_length


@dataclass
class Split:
    parts: dict[str, list[PreferenceExample]]
    pairs: dict[str, list[TokenizedPair]]  # policy_train and policy_eval, tokenized
    stats: dict[str, Any]


def make_split(cfg: RecipeConfig, tokenizer) -> Split:
    d = cfg.data
    report = load_preferences(d.path, on_error="skip")
    examples, unparsed = report.examples, []
    if d.chat_template:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError("data.chat_template is true but the tokenizer has no chat template")
        rendered = []
        for e in examples:
            try:
                rendered.append(render_chat(e, tokenizer))
            except ValueError as err:
                unparsed.append(f"{e.location}: {err}")
        examples = rendered
    # tokenized with the policy's rules; nothing is truncated since every kept record fits
    tokenized, _ = tokenize_pairs(examples, tokenizer, max_length=1_000_000)
    kept = [e for e, p in zip(examples, tokenized, strict=True)
            if fits(p, d.max_length, cfg.eval.max_new_tokens)]
    sizes = dict(zip(PARTS, (d.eval_prompts, d.rm_eval_pairs, d.policy_eval_pairs,
                             d.policy_pairs, d.rm_pairs), strict=True))
    parts = split_by_prompt(kept, sizes, d.seed)
    # nothing is cut: every kept record fits data.max_length <= policy.data.max_length
    pairs = {
        name: tokenize_pairs(parts[name], tokenizer, max_length=cfg.policy.data.max_length)[0]
        for name in ("policy_train", "policy_eval")
    }
    stats = {
        "source": d.path,
        "records": report.records,
        "skipped": [f"{loc}: {why}" for loc, why in report.skipped],
        "pairs": len(report.examples),
        "chat_template": d.chat_template,
        "not_a_dialogue": unparsed,
        "fit_max_length": len(kept),
        "distinct_prompts_fit": len({e.prompt for e in kept}),
        "parts": {name: len(part) for name, part in parts.items()},
        "part_digests": {
            name: engine.digest([e.location for e in part]) for name, part in parts.items()
        },
        "locations": {name: [e.location for e in part] for name, part in parts.items()},
    }
    return Split(parts, pairs, stats)


# ------------------------------------------------------------------------------ reward model


def freeze_backbone(model, trainable_layers: int | None):
    """Leave only the last `trainable_layers` decoder layers, the final norm and the scalar head
    trainable (Llama-style names: model.layers, model.norm, score)."""
    if trainable_layers is None:
        return model
    base = model.base_model
    if not all(hasattr(m, n) for m, n in ((base, "layers"), (base, "norm"), (model, "score"))):
        raise ValueError("reward_model.trainable_layers needs a Llama-style model; set it to null")
    model.requires_grad_(False)
    keep = list(base.layers)[len(base.layers) - trainable_layers:] if trainable_layers else []
    for module in (*keep, base.norm, model.score):
        module.requires_grad_(True)
    return model


def gold_reward_model(cfg: RecipeConfig, tokenizer, split: Split, say) -> tuple[Path, dict]:
    """Train the gold RM on its part, or reuse the one trained with the same settings and data."""
    rm = cfg.reward_model
    key = engine.digest({
        "version": RECIPE_VERSION, "model": cfg.policy.model.name,
        "rm": dataclasses.asdict(rm), "max_length": cfg.data.max_length,
        "train": split.stats["part_digests"]["rm_train"],
        "eval": split.stats["part_digests"]["rm_eval"],
    })
    out = Path(cfg.work_dir) / f"reward_model-{key}"
    info_path = out / "recipe.json"
    if info_path.is_file():
        say(f"gold reward model: reusing {out}")
        return out, {**json.loads(info_path.read_text()), "from_cache": True}
    from transformers import AutoModelForSequenceClassification

    with seeded(cfg.data.seed):  # the scalar head's initialisation; the caller's RNG untouched
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(cfg.policy.model.name), num_labels=1
        )
    freeze_backbone(model, rm.trainable_layers)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"gold reward model: training on {len(split.parts['rm_train'])} pairs "
        f"({trainable / 1e6:.1f}M trainable parameters)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    result: RewardModelResult = train_reward_model(
        model, tokenizer, split.parts["rm_train"], split.parts["rm_eval"], epochs=rm.epochs,
        lr=rm.learning_rate, batch_size=rm.batch_size, max_length=cfg.data.max_length,
        seed=cfg.data.seed, out_dir=tmp, progress=cfg.policy.train.progress,
    )
    info = {**result.to_dict(), "trainable_parameters": trainable,
            "seconds": time.perf_counter() - t0, "fingerprint": key}
    info["out_dir"] = str(out)
    (tmp / "recipe.json").write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, out)  # a killed training leaves no folder that looks finished
    return out, {**info, "from_cache": False}


# ---------------------------------------------------------------------------------- evaluation


def make_evaluator(cfg: RecipeConfig, tokenizer, prompts: list[str], scorer,
                   context: str) -> engine.Evaluator:
    """Samples policies on the evaluation prompts, scores them with the gold RM, and compares
    them with the reference's samples (drawn once, cached in work_dir)."""
    e = cfg.eval
    # the prompts are already rendered as in training (chat template or raw HH text)
    settings = GenerationSettings(
        num_samples=e.samples_per_prompt, max_new_tokens=e.max_new_tokens,
        temperature=e.temperature, batch_size=e.batch_size, seed=e.seed,
        use_chat_template=False,
    )

    def load_reference():
        """The untouched model (LoRA off), on the GPU when there is one."""
        model_cfg = dataclasses.replace(cfg.policy.model, lora=LoraConfig(r=0))
        return load_model(model_cfg).to(device())

    # the reference samples independently of the policies (see evaluation.reference_seed)
    return engine.Evaluator(
        tokenizer, prompts, scorer, settings, n_boot=e.n_boot,
        reference_seed=reference_seed(e.seed), load_reference=load_reference,
        cache=Path(cfg.work_dir) / f"reference_samples-{context}.json",
    )


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------- runs


def run_config(cfg: RecipeConfig, spec: RunSpec, run_dir: Path) -> Config:
    """One run's training config: the recipe's policy settings, the run's loss and folders."""
    return engine.run_train_config(cfg.policy, spec, run_dir, Path(cfg.work_dir) / "reference")


def plan_sweep(cfg: RecipeConfig, out: Path, tokenizer, split: Split, rm_dir: Path) -> engine.Sweep:
    """Every run trains a fresh copy of the model on the policy pairs; the gold RM scores."""
    data = engine.TrainData(tokenizer, split.pairs["policy_train"], split.pairs["policy_eval"])
    mean_length = mean_completion_length(data.train_pairs)
    s = cfg.sweep
    specs = plan_runs(s.losses, s.aggregations, s.betas, mean_length, s.alphas)
    context = sweep_context(cfg)
    prompts = list(dict.fromkeys(e.prompt for e in split.parts["eval_prompts"]))
    scorer = load_scorer(str(rm_dir), device=device(), batch_size=cfg.eval.batch_size)
    evaluator = make_evaluator(cfg, tokenizer, prompts, scorer, context)

    def load_policy(run_cfg: Config):
        # LoRA adapters from the run's seed: the same cell alone, in a sweep or resumed
        return load_model(cfg.policy.model, seed=run_cfg.train.seed)

    return engine.Sweep(
        out, specs, mean_length, context, evaluator, data,
        config_for=lambda spec, train_dir: run_config(cfg, spec, train_dir),
        load_policy=load_policy, train_subdir="train", progress=cfg.policy.train.progress,
        time_baseline=True,
    )


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import transformers

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }


def setting_lines(cfg: RecipeConfig, split: Split, rm: dict, mean_length: float,
                  baseline: dict) -> list[str]:
    s, p, t = split.stats, cfg.policy, cfg.policy.train
    lora = f"LoRA r={p.model.lora.r}" if p.model.lora.r else "full fine-tuning"
    form = ("rendered with the tokenizer's chat template (the answer ends with its end-of-turn "
            "token)" if cfg.data.chat_template else 'kept as raw "Human: / Assistant:" text')
    steps = t.max_steps or int(t.epochs * (len(split.pairs["policy_train"]) // t.batch_size))
    return [
        f"Data: {s['source']}: {s['records']} records, {len(s['skipped'])} skipped as malformed, "
        f"{s['fit_max_length']} fit {cfg.data.max_length} tokens (prompt + longer completion, "
        f"and prompt + {cfg.eval.max_new_tokens} generated tokens). Disjoint by prompt (seed "
        f"{cfg.data.seed}): " + ", ".join(f"{k} {v}" for k, v in s["parts"].items())
        + f". Dialogues {form}.",
        f"Gold reward model: {p.model.name} with a scalar head, "
        f"{rm['trainable_parameters'] / 1e6:.1f}M trainable parameters, {rm['epochs']} "
        f"epoch(s) on {rm['n_train']} pairs; held-out "
        f"pairwise accuracy {rm['accuracy']:.3f} [95% CI {rm['lo']:.3f}, {rm['hi']:.3f}] on "
        f"{rm['n_eval']} pairs (chance 0.5).",
        f"Policy: {p.model.name}, {lora}, {steps} steps of {t.batch_size} pairs, learning rate "
        f"{t.learning_rate:g} ({t.scheduler}), on {len(split.pairs['policy_train'])} pairs; "
        "every run starts from the same model, which is also the reference and the baseline.",
        engine.beta_calibration_line(mean_length, " tokens"),
        f"Evaluation: {baseline['num_prompts']} held-out prompts x "
        f"{cfg.eval.samples_per_prompt} sample(s), at most {cfg.eval.max_new_tokens} new tokens, "
        f"temperature {cfg.eval.temperature:g}, scored by the gold reward model. Baseline "
        f"generations: {baseline['length_mean']:.2f} tokens on average, "
        f"{baseline['finished']:.0%} ended with EOS.",
    ]


def previous_invocations(path: Path, context: str) -> list[dict[str, Any]]:
    """The invocations already in run.json for this context: a resumed or re-run study keeps
    the command, wall time and machine of every run that measured something."""
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    return old["invocations"] if old.get("context") == context else []


@dataclass
class RecipeOutputs(engine.StudyOutputs):
    reward_model: dict[str, Any]


class Stages:
    """Wall time per stage of the recipe, in seconds (run.json), each said when it ends."""

    def __init__(self, say: Callable[[str], None]):
        self.say, self.seconds = say, {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        self.say(f"[{name}] {self.seconds[name]:.1f}s")


def prepare_data(
    cfg: RecipeConfig, out: Path, say, stages: Stages
) -> tuple[Any, Split, Path, dict]:
    """The tokenizer, the split and the gold reward model (its folder and its facts)."""
    with stages("split"):
        tokenizer = load_tokenizer(cfg.policy.model)  # converts and caches SmolLM2 the first time
        split = make_split(cfg, tokenizer)
        (out / "split.json").write_text(json.dumps(split.stats, indent=2) + "\n")
    with stages("reward_model"):
        rm_dir, rm = gold_reward_model(cfg, tokenizer, split, say)
        (out / "reward_model.json").write_text(json.dumps(rm, indent=2) + "\n")
        say(f"gold RM held-out accuracy {rm['accuracy']:.3f} [{rm['lo']:.3f}, {rm['hi']:.3f}] "
            f"on {rm['n_eval']} pairs")
    return tokenizer, split, rm_dir, rm


def write_run_record(
    path: Path, cfg: RecipeConfig, sweep: engine.Sweep, info: dict[str, Any]
) -> None:
    """run.json: the context, L, the config, and every invocation that measured in this context."""
    record = {
        "context": sweep.context, "mean_completion_length": sweep.mean_length,
        "config": {**dataclasses.asdict(cfg), "policy": cfg.policy.to_dict()},
        "invocations": [*previous_invocations(path, sweep.context), info],
    }
    path.write_text(json.dumps(record, indent=2) + "\n")


def run_recipe(cfg: RecipeConfig, out: str | Path, *, command: str = "") -> RecipeOutputs:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = engine.reporter(cfg.policy.train.progress)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started, stages = time.time(), Stages(say)
    info = {"command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": machine()}
    tokenizer, split, rm_dir, rm = prepare_data(cfg, out, say, stages)
    with stages("plan"):
        sweep = plan_sweep(cfg, out, tokenizer, split, rm_dir)
    with stages("sweep"):
        say(f"sweep: {len(sweep.specs)} runs + baseline, L = {sweep.mean_length:.2f}, results in "
            f"{sweep.results_path}")
        result = sweep.run()
    with stages("outputs"):
        outputs = engine.write_outputs(
            out, result, title="Averaging vs summing log-likelihoods: SmolLM2 on HH-RLHF",
            plot_title=f"HH harmless, {cfg.policy.model.name}: gold RM score vs length",
            setting=setting_lines(cfg, split, rm, sweep.mean_length, result.baseline),
        )
        outputs.files.update(run=out / "run.json", split=out / "split.json",
                             reward_model=out / "reward_model.json")
    info.update({"wall_seconds": round(time.time() - started, 1),
                 "stages_seconds": stages.seconds, "runs_done_now": result.ran})
    write_run_record(outputs.files["run"], cfg, sweep, info)
    return RecipeOutputs(**vars(outputs), reward_model=rm)


# ------------------------------------------------------------------------------------------- CLI


if __name__ == "__main__":  # python -m avgalign.recipes.hh ARGS: avgalign study ARGS
    from ..cli import main

    raise SystemExit(main(["study", *sys.argv[1:]]))
