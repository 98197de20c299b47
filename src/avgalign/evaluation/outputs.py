"""What an evaluation writes: summary.json, samples.jsonl, a headline and a plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .evaluate import EvalResult, ScoredCompletion


def write_eval_outputs(
    result: EvalResult, completions: Sequence[ScoredCompletion], out_dir: str | Path
) -> dict[str, Path]:
    """Write completions.jsonl, summary.json and eval.png (length histograms, score vs length)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "completions": out / "completions.jsonl",
        "summary": out / "summary.json",
        "plot": out / "eval.png",
    }
    with paths["completions"].open("w", encoding="utf-8") as f:
        for c in completions:
            row = {
                "model": c.model,
                "prompt_index": c.prompt_index,
                "sample_index": c.sample_index,
                "prompt": c.prompt,
                "completion": c.text,
                "tokens": c.num_tokens,
                "finished": c.finished,
                "score": c.score,
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    paths["summary"].write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    plot_length_and_score(completions, paths["plot"], title=headline(result))
    return paths


def headline(result: EvalResult) -> str:
    """The evaluation in one line: prompts x samples, the policy's (and reference's) mean score
    and length, the win rates and the KL, with 95% intervals."""
    parts = [f"{result.num_prompts} prompts x {result.num_samples} samples",
             f"score {_ci(result.policy_score)}, length {result.policy_length['mean']:.1f}"]
    if result.reference_score is not None and result.reference_length is not None:
        parts.append(f"reference score {_ci(result.reference_score)}, "
                     f"length {result.reference_length['mean']:.1f}")
    for name, wr in (("win rate", result.win_rate), ("LC win rate", result.lc_win_rate)):
        if wr is not None:
            parts.append(f"{name} {wr.rate:.3f} [{wr.lo:.3f}, {wr.hi:.3f}]")
    if result.kl is not None:
        parts.append(f"KL {_ci(result.kl)}")
    return ", ".join(parts)


def _ci(value) -> str:
    return f"{value.mean:.3g} [{value.lo:.3g}, {value.hi:.3g}]"


def plot_length_and_score(
    completions: Sequence[ScoredCompletion], path: str | Path, title: str = ""
) -> None:
    """Length histograms per model (policy, reference) and score against length."""
    # Figure + savefig needs no pyplot, hence no global backend switch in a library
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    hist, scatter = fig.subplots(1, 2)
    groups = sorted({c.model for c in completions}, key=lambda m: m != "policy")
    all_lengths = [c.num_tokens for c in completions]
    # lengths are integers: bins of whole tokens, at most about 30 of them
    low, high = min(all_lengths), max(all_lengths)
    width = max(1, int(np.ceil((high - low + 1) / 30)))
    bins = np.arange(low - 0.5, high + width, width)
    for model in groups:
        lengths = [c.num_tokens for c in completions if c.model == model]
        scores = [c.score for c in completions if c.model == model]
        hist.hist(lengths, bins=bins, alpha=0.5, label=f"{model} (mean {np.mean(lengths):.1f})")
        scatter.scatter(lengths, scores, s=10, alpha=0.6, label=model)
    hist.set_xlabel("completion length (tokens)")
    hist.set_ylabel("completions")
    hist.legend()
    scatter.set_xlabel("completion length (tokens)")
    scatter.set_ylabel("score")
    scatter.legend()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)
