"""Evaluation: sampling, scoring, win rates, length statistics, KL to the reference.

It knows nothing of training: it takes models, a tokenizer, prompts and a scorer. Modules:
metrics (numpy only), generation, scoring, evaluate (one evaluation -> EvalResult), outputs,
prompts (rendered as in training). Everything public is importable from here.
"""

from __future__ import annotations

from .evaluate import (
    EvalResult,
    GenerationSettings,
    ScoredCompletion,
    evaluate_policy,
    per_prompt_means,
    reference_seed,
    score_completions,
    summarize_evaluation,
)
from .generation import (
    Completion,
    count_completion_tokens,
    encode_prompts,
    eval_mode,
    generate_completions,
    pad_token_id,
)
from .metrics import (
    MeanCI,
    WinRate,
    bootstrap,
    fit_logistic,
    kl_estimate,
    length_controlled_win_rate,
    length_summary,
    mean_ci,
    pairwise_outcomes,
    win_rate,
)
from .outputs import (
    headline,
    plot_length_and_score,
    write_eval_outputs,
)
from .prompts import (
    CHAT_TEMPLATE_CHOICES,
    PromptChoice,
    PromptSet,
    choose_chat_template,
    read_prompts,
)
from .scoring import (
    ScoreFn,
    Scorer,
    encode_reward_inputs,
    join_prompt_completion,
    load_scorer,
    prepare_reward_model,
    require_scalar_head,
    reward_model_scores,
)

__all__ = [
    "CHAT_TEMPLATE_CHOICES",
    "Completion",
    "EvalResult",
    "GenerationSettings",
    "MeanCI",
    "PromptChoice",
    "PromptSet",
    "ScoreFn",
    "ScoredCompletion",
    "Scorer",
    "WinRate",
    "bootstrap",
    "choose_chat_template",
    "count_completion_tokens",
    "encode_prompts",
    "encode_reward_inputs",
    "eval_mode",
    "evaluate_policy",
    "fit_logistic",
    "generate_completions",
    "headline",
    "join_prompt_completion",
    "kl_estimate",
    "length_controlled_win_rate",
    "length_summary",
    "load_scorer",
    "mean_ci",
    "pad_token_id",
    "pairwise_outcomes",
    "per_prompt_means",
    "plot_length_and_score",
    "prepare_reward_model",
    "read_prompts",
    "reference_seed",
    "require_scalar_head",
    "reward_model_scores",
    "score_completions",
    "summarize_evaluation",
    "win_rate",
    "write_eval_outputs",
]
