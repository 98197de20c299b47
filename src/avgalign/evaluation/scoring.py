"""Scorers: a Python function `module:function`, or a single-head reward model folder."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .generation import eval_mode, pad_token_id

ScoreFn = Callable[[list[str], list[str]], Sequence[float]]


@dataclass
class Scorer:
    """Scores (prompt, completion) texts, higher is better: scorer(prompts, completions)."""

    name: str
    score_fn: ScoreFn

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        scores = [float(s) for s in self.score_fn(list(prompts), list(completions))]
        if len(scores) != len(completions):
            raise ValueError(
                f"scorer {self.name} gave {len(scores)} scores for {len(completions)} completions"
            )
        if not all(np.isfinite(scores)):
            raise ValueError(f"scorer {self.name} returned NaN or infinite scores")
        return scores


def join_prompt_completion(prompt: str, completion: str) -> str:
    """The text a reward model reads: prompt then completion, with a newline between them only
    when neither side brings whitespace, so words never fuse and existing formatting is kept."""
    if not prompt or not completion or prompt[-1].isspace() or completion[0].isspace():
        return prompt + completion
    return prompt + "\n" + completion


def encode_reward_inputs(
    tokenizer, prompts: Sequence[str], completions: Sequence[str], *, max_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask) of join_prompt_completion texts, each cut to its
    first max_length tokens. Right padding matters: sequence-classification heads pool the last
    token that is not the pad token."""
    pad_id = pad_token_id(tokenizer)
    rows = [
        list(tokenizer(join_prompt_completion(p, c))["input_ids"])[:max_length]
        for p, c in zip(prompts, completions, strict=True)
    ]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


def require_scalar_head(config) -> None:
    """A reward model has one output: r(x, y)."""
    if config.num_labels != 1:
        raise ValueError(
            f"reward model must have a single scalar head, got num_labels={config.num_labels}"
        )


def prepare_reward_model(model, tokenizer):
    """Check the single scalar head and make the model pool at the last real token.

    Sequence-classification models find the last token by looking for pad_token_id, so the
    config must carry the same pad id the inputs are padded with.
    """
    require_scalar_head(model.config)
    model.config.pad_token_id = pad_token_id(tokenizer)
    return model


def reward_model_scores(
    model,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
) -> list[float]:
    """The scalar head's output r(x, y) for each (prompt, completion)."""
    device = next(model.parameters()).device
    scores: list[float] = []
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            input_ids, attention_mask = encode_reward_inputs(
                tokenizer,
                prompts[start : start + batch_size],
                completions[start : start + batch_size],
                max_length=max_length,
            )
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
            scores.extend(logits.logits[:, 0].float().cpu().tolist())
    return scores


_FUNCTION_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def load_scorer(spec: str, *, device: str = "cpu", batch_size: int = 8) -> Scorer:
    """A Scorer from `module:function` or from a reward-model folder / hub id.

    `module:function` names f(prompts: list[str], completions: list[str]) -> list[float]. A model
    must be a transformers sequence-classification model with num_labels == 1; it reads
    join_prompt_completion(prompt, completion), right-padded, and its logit is the score.
    """
    if _FUNCTION_SPEC.fullmatch(spec) and not Path(spec).exists():
        module_name, function_name = spec.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"scorer {spec!r}: cannot import module {module_name!r}: {e}") from e
        function = getattr(module, function_name, None)
        if not callable(function):
            raise ValueError(f"scorer {spec!r}: {module_name!r} has no function {function_name!r}")
        return Scorer(spec, function)

    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from ..models import resolve_model_path

    try:
        path = resolve_model_path(spec)
    except FileNotFoundError as e:
        raise ValueError(
            f"scorer {spec!r} is neither module:function nor a reward model folder: {e}"
        ) from e
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except OSError as e:
        raise ValueError(f"scorer {spec!r}: cannot load a reward model from it: {e}") from e
    require_scalar_head(config)  # before loading any weights
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=False)
    model = prepare_reward_model(model, tokenizer).to(device)

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        return reward_model_scores(model, tokenizer, prompts, completions, batch_size=batch_size)

    return Scorer(spec, score)
