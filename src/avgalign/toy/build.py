"""Building the toy world once and caching it: tokenizer, SFT policy and pairs of SFT samples.

    world = build_world(cfg, cache_dir)
    prefs = world.preferences(AnnotatorConfig(length_bias=0.3))   # labelled pairs, in memory

Steps (all seeded by cfg.seed): split the tasks into train and held-out prompts; train the SFT
policy on noisy demonstrations of train tasks; sample two completions per train prompt from the
SFT policy (the real `generate` path, via avgalign.evaluation), scored by the oracle.

Labelling is not part of the cached build: an annotator labels the cached pairs in a blink, with
one uniform draw per pair taken from a stream that does not depend on the annotator. So annotators
that differ only in their length bias label the very same pairs with the same coin flips, and a
comparison between them isolates the bias.

The result lives in `<cache_dir>/world-<hash of cfg>/`, written to a temporary folder and renamed
when complete, so a killed build leaves no half-world behind and any config change builds anew:

    sft/                tokenizer and model (save_pretrained; reload with AutoTokenizer and
                        AutoModelForCausalLM)
    pairs.train.jsonl   one pair of SFT samples per line (a, b): texts, token ids, oracle scores
    pairs.eval.jsonl    the same for held-out prompts (the trainer's held-out reward accuracy)
    world.json          the config and what the build measured (SFT lengths and scores, ...)
    sft.metrics.jsonl   the SFT loss and learning rate of every step
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import TokenizedPair
from ..evaluation import generate_completions, length_summary
from ..tracking import MetricsLog
from .sft import ModelSize, SFTConfig, build_model, single_thread, train_sft
from .world import (
    AnnotatorConfig,
    DemoNoise,
    Task,
    all_tasks,
    build_tokenizer,
    length_bias_report,
    oracle_score,
    prefers_first,
    sample_demo,
    split_tasks,
    sub_seed,
)

# bump when a code change alters what a given config builds, so old caches are not reused
WORLD_VERSION = 2


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    n_min: int = 2
    n_max: int = 40
    test_fraction: float = 0.25  # share of (topic, n, excluded) combinations held out
    error_penalty: float = 1.0  # oracle: cost of an error relative to a hit
    noise: DemoNoise = field(default_factory=DemoNoise)
    model: ModelSize = field(default_factory=ModelSize)
    sft: SFTConfig = field(default_factory=SFTConfig)
    num_pairs: int = 4096  # training preference pairs (one per sampled train prompt)
    num_eval_pairs: int = 256  # held-out preference pairs
    # cap on sampled completions: 2 x n_max covers the demonstrations' spread (exp(2 sigma) = 2.0)
    max_new_tokens: int = 80

    def fingerprint(self) -> str:
        text = json.dumps({"version": WORLD_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Preferences:
    """The world's pairs as one annotator labelled them, with what the labels show."""

    annotator: AnnotatorConfig
    train_pairs: list[TokenizedPair]
    eval_pairs: list[TokenizedPair]
    stats: dict[str, Any]  # length bias and oracle agreement of the labels (LengthBiasReport)


@dataclass
class World:
    config: WorldConfig
    path: Path
    tokenizer: Any
    train_rows: list[dict[str, Any]]  # unlabelled pairs of SFT samples (a, b)
    eval_rows: list[dict[str, Any]]
    test_tasks: list[Task]  # held-out prompts for evaluation, in a fixed seeded order
    stats: dict[str, Any]
    from_cache: bool

    @property
    def model_dir(self) -> Path:
        return self.path / "sft"

    def load_policy(self):
        """A fresh copy of the SFT policy from its saved folder."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.model_dir).eval()

    def preferences(self, annotator: AnnotatorConfig) -> Preferences:
        """The pairs labelled by `annotator`: pair i is decided by the i-th draw of a stream seeded
        by the world alone, whatever the annotator."""
        train, train_stats = label_pairs(
            self.train_rows, annotator, sub_seed(self.config.seed, "labels.train"))
        evals, _ = label_pairs(self.eval_rows, annotator, sub_seed(self.config.seed, "labels.eval"))
        return Preferences(annotator, train, evals, train_stats)


def _encode(tokenizer, words: list[str]) -> list[int]:
    return [*tokenizer.convert_tokens_to_ids(words), tokenizer.eos_token_id]


def _sample_pairs(
    model, tokenizer, tasks: list[Task], cfg: WorldConfig, seed: int, progress: bool
) -> list[dict[str, Any]]:
    """Two SFT samples per task, scored by the oracle; identical pairs dropped (no signal)."""
    samples = generate_completions(
        model, tokenizer, [t.prompt for t in tasks], num_samples=2,
        max_new_tokens=cfg.max_new_tokens, batch_size=512, seed=seed, progress=progress,
    )
    rows = []
    for task, a, b in zip(tasks, samples[0::2], samples[1::2], strict=True):
        if a.token_ids == b.token_ids:
            continue
        rows.append({
            "prompt": task.prompt,
            "prompt_ids": a.prompt_ids,
            "a": a.text,
            "b": b.text,
            "a_ids": a.token_ids,
            "b_ids": b.token_ids,
            "a_score": oracle_score(task, a.text.split(), cfg.error_penalty),
            "b_score": oracle_score(task, b.text.split(), cfg.error_penalty),
        })
    return rows


def label_pairs(
    rows: list[dict[str, Any]], annotator: AnnotatorConfig, seed: int
) -> tuple[list[TokenizedPair], dict[str, Any]]:
    """(chosen, rejected) pairs as `annotator` labels `rows`, and the labels' length-bias report."""
    rng = random.Random(seed)
    pairs, chosen, rejected = [], [], []
    for r in rows:
        first = prefers_first(r["a_score"], r["b_score"], len(r["a_ids"]), len(r["b_ids"]),
                              annotator, rng)
        c, j = ("a", "b") if first else ("b", "a")
        pairs.append(TokenizedPair(r["prompt_ids"], r[f"{c}_ids"], r[f"{j}_ids"]))
        chosen.append(r[c + "_score"])
        rejected.append(r[j + "_score"])
    report = length_bias_report([len(p.chosen_ids) for p in pairs],
                                [len(p.rejected_ids) for p in pairs], chosen, rejected, annotator)
    return pairs, dataclasses.asdict(report)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _build(cfg: WorldConfig, folder: Path, say: Callable[[str], None], progress: bool) -> dict:
    """Build every file of the world into `folder`; returns the stats written to world.json."""
    t_start = time.perf_counter()
    rng = random.Random(cfg.seed)
    tokenizer = build_tokenizer()
    train_tasks, test_tasks = split_tasks(
        all_tasks(cfg.n_min, cfg.n_max), cfg.test_fraction, cfg.seed
    )

    def demo_batch() -> tuple[list[list[int]], list[list[int]]]:
        tasks = rng.choices(train_tasks, k=cfg.sft.batch_size)
        prompts = [tokenizer(t.prompt)["input_ids"] for t in tasks]
        return prompts, [_encode(tokenizer, sample_demo(t, cfg.noise, rng)) for t in tasks]

    model = build_model(tokenizer, cfg.model, cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"toy world: SFT of a {n_params / 1e6:.2f}M-parameter Llama on noisy demonstrations "
        f"({cfg.sft.steps} steps)")
    with MetricsLog(folder / "sft.metrics.jsonl") as log:
        losses = train_sft(
            model, demo_batch, cfg.sft, pad_id=tokenizer.pad_token_id, progress=progress, log=log
        )
    sft_seconds = time.perf_counter() - t_start
    model.save_pretrained(folder / "sft", safe_serialization=True)
    tokenizer.save_pretrained(folder / "sft")

    say(f"toy world: sampling {cfg.num_pairs} + {cfg.num_eval_pairs} pairs of completions from "
        "the SFT policy")
    t0 = time.perf_counter()
    pair_tasks = rng.choices(train_tasks, k=cfg.num_pairs)
    eval_tasks = rng.choices(test_tasks, k=cfg.num_eval_pairs)
    train_rows = _sample_pairs(
        model, tokenizer, pair_tasks, cfg, sub_seed(cfg.seed, "pairs.train"), progress
    )
    eval_rows = _sample_pairs(
        model, tokenizer, eval_tasks, cfg, sub_seed(cfg.seed, "pairs.eval"), progress
    )
    _write_jsonl(folder / "pairs.train.jsonl", train_rows)
    _write_jsonl(folder / "pairs.eval.jsonl", eval_rows)

    lengths = [len(r[k]) for r in train_rows for k in ("a_ids", "b_ids")]
    scores = [r[k] for r in train_rows for k in ("a_score", "b_score")]
    return {
        "fingerprint": cfg.fingerprint(),
        "config": dataclasses.asdict(cfg),
        "parameters": n_params,
        "sft_loss_first": losses[0],
        "sft_loss_last": sum(losses[-50:]) / len(losses[-50:]),
        "sft_seconds": sft_seconds,
        "sampling_seconds": time.perf_counter() - t0,
        "train_tasks": len(train_tasks),
        "test_tasks": len(test_tasks),
        "train_pairs": len(train_rows),
        "eval_pairs": len(eval_rows),
        # the SFT policy's own samples, as they enter the preference data
        "sft_sample_length": length_summary(lengths),
        "sft_sample_score": sum(scores) / len(scores),
        "ideal_length_train": sum(t.n + 1 for t in pair_tasks) / len(pair_tasks),
    }


def build_world(
    cfg: WorldConfig, cache_dir: str | Path, *, rebuild: bool = False, progress: bool = True
) -> World:
    """The world of `cfg`, from `<cache_dir>/world-<fingerprint>` if built before (unless
    `rebuild`), else built there (~1 minute on 2 CPU cores with the default config)."""
    say = print if progress else (lambda _: None)
    cache_dir = Path(cache_dir)
    path = cache_dir / f"world-{cfg.fingerprint()}"
    from_cache = (path / "world.json").is_file() and not rebuild
    if from_cache:
        say(f"toy world: reusing {path}")
    else:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{path.name}-"))
        try:
            with single_thread():
                stats = _build(cfg, tmp, say, progress)
            (tmp / "world.json").write_text(json.dumps(stats, indent=2) + "\n")
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        say(f"toy world: built in {path}")
    from transformers import AutoTokenizer

    _, test_tasks = split_tasks(all_tasks(cfg.n_min, cfg.n_max), cfg.test_fraction, cfg.seed)
    return World(
        config=cfg,
        path=path,
        tokenizer=AutoTokenizer.from_pretrained(path / "sft"),
        train_rows=_read_jsonl(path / "pairs.train.jsonl"),
        eval_rows=_read_jsonl(path / "pairs.eval.jsonl"),
        test_tasks=test_tasks,
        stats=json.loads((path / "world.json").read_text()),
        from_cache=from_cache,
    )
