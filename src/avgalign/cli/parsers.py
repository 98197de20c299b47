"""The parsers of the subcommands whose work needs torch, transformers and accelerate: evaluate,
reward-model, study and demo (their handlers: avgalign.cli.handlers).

They are built from argparse alone, so that `avgalign <subcommand> --help` prints at once; a
subcommand's handler (its parser's `func` default) imports the module that does the work only
when the subcommand runs. The choices and descriptions below are copies of values defined in those
modules, which import torch; tests/test_cli.py checks that each copy equals its original.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import Any

from ..loss_specs import AGGREGATIONS, loss_names

LOSS_NAMES = loss_names()
# copies of values in torch-importing modules (tests/test_cli.py keeps them equal)
CHAT_TEMPLATE_CHOICES = ("trained", "auto", "yes", "no")  # avgalign.evaluation's
# the first paragraph of the docstring of avgalign.toy.demo, and of avgalign.recipes.hh
DEMO_DESCRIPTION = (
    "`avgalign demo`: the paper's length/score study end to end in the toy world, minutes on a CPU."
)
STUDY_DESCRIPTION = (
    "`avgalign study`: the length/score study on a real model and real preferences (HH-RLHF)."
)


def runs(function: str) -> Callable[[argparse.Namespace], Any]:
    """A subcommand's handler: imports avgalign.cli.handlers (and through it torch) when the
    subcommand runs, not when its parser is built, and calls `handlers.function(args)`."""

    def handler(args: argparse.Namespace) -> Any:
        return getattr(importlib.import_module(".handlers", __package__), function)(args)

    return handler


def add_on_error(p: argparse.ArgumentParser) -> None:
    """--on-error, for the subcommands that read a preference dataset."""
    p.add_argument(
        "--on-error",
        choices=["error", "skip"],
        default="error",
        help="stop at the first malformed record (default) or skip and count it",
    )


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """Register `evaluate` (avgalign.cli.handlers.run_evaluate)."""
    p = subparsers.add_parser(
        "evaluate",
        help="sample from a policy (and a reference), score, win rates, KL, length statistics",
    )
    p.add_argument("--policy", required=True, help="model folder, hub id or smollm2-135m")
    p.add_argument("--reference", help="reference model (usually the SFT model); omit for none")
    p.add_argument(
        "--prompts",
        required=True,
        help=".txt (one prompt per line), .jsonl with a 'prompt' field, or a preference dataset",
    )
    p.add_argument("--split", default="test", help="split of a hub preference dataset")
    p.add_argument("--limit", type=int, help="evaluate the first N prompts")
    p.add_argument("--scorer", required=True, help="reward model folder/hub id or module:function")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true", help="greedy decoding (no KL estimate)")
    p.add_argument(
        "--chat-template",
        choices=CHAT_TEMPLATE_CHOICES,
        default="trained",
        help="wrap plain prompts (.txt, 'prompt' .jsonl) in the tokenizer's chat template: "
        "trained (default): as the policy was trained, from its prompt_rendering.json (auto if "
        "none); auto: if the tokenizer has one; yes; no. A preference dataset's prompts are "
        "always rendered as in training",
    )
    p.add_argument(
        "--system-prompt",
        metavar="TEXT",
        help="a system message put first in plain prompts wrapped in the chat template, as "
        "data.system_prompt is in training ('' for none); default: with --chat-template trained, "
        "the one the policy was trained with (its prompt_rendering.json), else none",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=runs("run_evaluate"))
    return p


def add_reward_model_parser(subparsers) -> argparse.ArgumentParser:
    """Register `reward-model` (avgalign.cli.handlers.run_reward_model)."""
    p = subparsers.add_parser(
        "reward-model", help="train a Bradley-Terry reward model on preference pairs"
    )
    p.add_argument("--model", required=True, help="backbone: model folder, hub id or smollm2-135m")
    p.add_argument("--data", required=True, help="preference dataset (avgalign.data sources)")
    p.add_argument("--split", default="train", help="split of a hub dataset")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="prompts held out")
    p.add_argument("--limit", type=int, help="use the first N records")
    add_on_error(p)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--out", required=True, help="output folder (load it with --scorer OUT)")
    p.set_defaults(func=runs("run_reward_model"))
    return p


def add_study_parser(subparsers) -> argparse.ArgumentParser:
    """Register `study` (avgalign.cli.handlers.run_study_command)."""
    p = subparsers.add_parser(
        "study",
        help="the length/score study on a real model and HH-RLHF (gold RM, sweep, report)",
        description=STUDY_DESCRIPTION,
    )
    p.add_argument("config", help="recipe YAML, e.g. configs/hh-smollm2/cpu-small.yaml")
    p.add_argument("--out", required=True, help="output folder for the small result files")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=runs("run_study_command"))
    return p


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Register `demo` (avgalign.cli.handlers.run_demo_command)."""
    p = subparsers.add_parser(
        "demo",
        help="the length/score study end to end in a toy world with a known oracle (CPU, minutes)",
        description=DEMO_DESCRIPTION,
    )
    p.add_argument("--full", action="store_true",
                   help="the whole design: sum, mean and power 0.5 over a wide beta grid, 3 "
                   "training seeds, length bias off and strong (~25 min on 2 CPU cores)")
    p.add_argument("--out", help="output folder (default: runs/demo, runs/demo-full with --full)")
    p.add_argument("--cache-dir", help="where the toy world is cached (default: "
                   "$AVGALIGN_CACHE/toy or ~/.cache/avgalign/toy)")
    p.add_argument("--losses", nargs="+", choices=LOSS_NAMES,
                   help="losses to sweep (default: dpo)")
    p.add_argument("--aggregations", nargs="+", choices=AGGREGATIONS,
                   help="aggregations to sweep (default: sum mean; --full: sum mean power)")
    p.add_argument("--betas", nargs="+", type=float,
                   help="betas on the summed scale; averaged runs use beta x mean length "
                   "(default: 0.03 0.3 3; --full: 0.03 0.1 0.3 1 3)")
    p.add_argument("--alphas", nargs="+", type=float,
                   help="exponents for aggregation 'power' (default: 0.5)")
    p.add_argument("--seeds", nargs="+", type=int,
                   help="training seeds, each cell trained once per seed (default: 0 1; --full: "
                   "0 1 2)")
    p.add_argument("--length-biases", nargs="+", type=float,
                   help="the annotator's length bias in logits per token, one sweep per value "
                   "(default: 0.3; --full: 0 0.3)")
    p.add_argument("--seed", type=int, help="seed of the world and its sampling")
    p.add_argument("--num-prompts", type=int, help="held-out prompts to evaluate on (default 64)")
    p.add_argument("--samples-per-prompt", type=int, help="samples per prompt (default 8)")
    p.add_argument("--quick", action="store_true",
                   help="a much smaller world and grid (smoke test, seconds)")
    p.add_argument("--no-cache", action="store_true",
                   help="rebuild the world and rerun every run instead of reusing them")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=runs("run_demo_command"))
    return p


# the order `avgalign --help` lists them in, after train and data-stats
ADD_PARSERS = (add_evaluate_parser, add_reward_model_parser, add_study_parser, add_demo_parser)
