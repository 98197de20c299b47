"""The pairs a run trains and evaluates on, loaded from the config's sources and tokenised once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator

from .config import Config
from .data import (
    LoadReport,
    PreferenceExample,
    TokenizedPair,
    load_data,
    prompt_rendering,
    tokenize_pairs,
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
    """Training and held-out pairs from the configured sources (`data.train`, or the mix of
    `data.sources` drawn with train.seed; see data.load_data). What was skipped, warned about and
    truncated is printed and, per source, added to `data_report` (for the run summary)."""
    examples: list[PreferenceExample] = []

    def tokenize(report: LoadReport) -> tuple[list[TokenizedPair], list[PreferenceExample]]:
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
            data_report[report.source] = {
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

    train_reports, held_report = load_data(cfg.data, tokenizer=tokenizer, seed=cfg.train.seed)
    train_pairs: list[TokenizedPair] = []
    train_examples: list[PreferenceExample] = []
    for report in train_reports:  # one per source, in the order of data.sources
        pairs, kept = tokenize(report)
        train_pairs += pairs
        train_examples += kept
    eval_pairs, eval_examples = tokenize(held_report) if held_report else ([], [])
    rendering = prompt_rendering(examples, tokenizer, cfg.data.system_prompt) if examples else None
    n_eval = 0 if cfg.data.eval else int(round(cfg.data.eval_fraction * len(train_pairs)))
    if n_eval:
        g = torch.Generator().manual_seed(cfg.train.seed)
        held = set(torch.randperm(len(train_pairs), generator=g)[:n_eval].tolist())
        eval_pairs = [p for i, p in enumerate(train_pairs) if i in held]
        eval_examples = [e for i, e in enumerate(train_examples) if i in held]
        train_pairs = [p for i, p in enumerate(train_pairs) if i not in held]
    return LoadedData(train_pairs, eval_pairs, eval_examples, rendering)
