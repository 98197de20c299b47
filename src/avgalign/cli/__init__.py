"""`avgalign`: one entry point over training, data diagnostics, evaluation and the studies."""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from ..config import ConfigError
from .parsers import ADD_PARSERS, add_on_error

TRAIN_HELP = """\
Train a policy with a direct alignment loss. The config is YAML with sections model, data, loss,
train (see configs/ and docs/config.md); any key can be overridden with
--set section.key=value, e.g. --set loss.aggregation=mean --set loss.beta=2.0.
Multi-process / multi-GPU: `accelerate launch --multi_gpu --num_processes N -m avgalign train ...`
(docs/distributed.md).
"""


def _train(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from ..config import load_config
    from ..train import train

    overrides = list(args.set)
    for key, value in [
        ("loss.name", args.loss),
        ("loss.aggregation", args.aggregation),
        ("loss.alpha", args.alpha),
        ("loss.beta", args.beta),
        ("train.output_dir", args.output_dir),
        ("train.max_steps", args.max_steps),
        ("model.name", args.model),
        ("data.train", args.data),
    ]:
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.resume:
        overrides.append("train.resume=true")
    if args.overwrite:
        overrides.append("train.overwrite=true")
    cfg = load_config(args.config, overrides)  # fully validated before any model is loaded
    if not (cfg.data.train or cfg.data.sources):
        raise ConfigError("data.train is empty: give a dataset file or hub id (--data), or a "
                          "list of data.sources")
    result = train(cfg)
    if not PartialState().is_main_process:
        return
    print(
        f"done: {result.steps} steps in {result.train_seconds:.1f}s; eval: "
        + ", ".join(
            f"{k}={v:.4g}"
            for k, v in result.eval_metrics.items()
            if k in ("loss", "reward_accuracy", "reward_margin")
        )
    )
    if result.model_dir:
        print(f"model saved to {result.model_dir}")


def _data_stats(args: argparse.Namespace) -> None:
    from ..config import ModelConfig
    from ..data import format_length_stats, length_stats, load_preferences, tokenize_pairs
    from ..models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name=args.model))
    report = load_preferences(
        args.source, split=args.split, tokenizer=tokenizer, on_error=args.on_error, limit=args.limit
    )
    print(report.summary(max_notes=args.max_notes))
    pairs, truncation = tokenize_pairs(
        report.examples, tokenizer, max_length=args.max_length, on_error=args.on_error
    )
    print(f"tokenised with max_length={args.max_length}: {truncation.summary()}")
    print(format_length_stats(length_stats(pairs)))


def build_parser() -> argparse.ArgumentParser:
    """The CLI's parser, every subcommand's whole parser in it. Building it imports no torch:
    each handler imports what its subcommand needs when it runs (avgalign.cli.handlers), so that
    `avgalign --help` and `avgalign <subcommand> --help` print at once."""
    parser = argparse.ArgumentParser(
        prog="avgalign",
        description="Length-invariant direct alignment: DPO-family losses with summed or averaged "
        "log-likelihoods, and the study of generation length against score.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"avgalign {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train a policy from a YAML config",
        description=TRAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="YAML config file (optional if --set gives all)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable); the value is parsed as YAML",
    )
    p.add_argument("--loss", help="shortcut for loss.name: dpo, ipo, slic, simpo, rdpo")
    p.add_argument(
        "--aggregation",
        help="shortcut for loss.aggregation: sum, mean or power "
        "(divide sequence log-likelihoods by |y|^alpha)",
    )
    p.add_argument("--alpha", type=float, help="shortcut for loss.alpha (aggregation power)")
    p.add_argument("--beta", type=float, help="shortcut for loss.beta")
    p.add_argument("--model", help="shortcut for model.name: folder, hub id or smollm2-135m")
    p.add_argument(
        "--data",
        help="shortcut for data.train: file (.jsonl/.json/.gz/.parquet/.csv/.tsv) or "
        "hub id (e.g. Anthropic/hh-rlhf:harmless-base)",
    )
    p.add_argument(
        "--out",
        "--output-dir",
        dest="output_dir",
        help="output folder, shortcut for train.output_dir (the name every subcommand uses; "
        "--output-dir, its old name, still works)",
    )
    p.add_argument("--max-steps", type=int, help="shortcut for train.max_steps")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete "
        "checkpoint in the output folder (train.resume=true); starts fresh if none",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run already in the output folder (train.overwrite=true); without it, "
        "such a folder is refused",
    )
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "data-stats",
        help="load, validate and tokenise a preference dataset; "
        "print token lengths and its length bias (how often chosen is longer)",
    )
    p.add_argument("source", help="file (.jsonl/.json/.gz/.parquet/.csv/.tsv) or hub id")
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="tokenizer: model folder, hub id or smollm2-135m (default)",
    )
    p.add_argument("--split", default="train", help="split, for hub datasets")
    p.add_argument("--max-length", type=int, default=512, help="truncation length (default 512)")
    add_on_error(p)
    p.add_argument("--limit", type=int, help="read only the first N pairs")
    p.add_argument("--max-notes", type=int, default=10, help="skipped/warning lines to show")
    p.set_defaults(func=_data_stats)

    for add_parser in ADD_PARSERS:
        add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from ..data import DataError
    from ..errors import UsageError
    from ..train import TrainingInterrupted

    try:
        args.func(args)
    except (ConfigError, DataError, UsageError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
