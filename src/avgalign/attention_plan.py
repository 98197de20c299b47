"""Before the first step: which attention computes the shared-prompt layout on this device and
model, and the self-check of the training path against the model's own forward pass."""

from __future__ import annotations

import torch

from .attention import SPLIT_ATTENTION
from .config import ConfigError
from .data import (
    TokenizedPair,
)
from .logprobs import (
    FLEX_ATTENTION,
    CompletionLogProbs,
    SelfCheck,
    check_against_model,
)

# |ours - model| / max(|model|, 1) on a summed completion log-prob. In float32 the layouts agree
# with the model's forward to ~1e-6 (SmolLM2, 500 tokens); the errors they exist to catch (a lost
# sliding window, a missing logit scale) are 2e-3 to 2e-2. Half-precision weights round at ~1e-2.
SELF_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4}

HALF_PRECISION_TOLERANCE = 5e-2

def self_check(
    scorer: CompletionLogProbs, pair: TokenizedPair, pad_id: int, layout: str
) -> SelfCheck:
    """One pair through the training path and through model(...) before the first step; raises
    ConfigError when they differ, naming the layout to try. Runs outside autocast: in the
    weights' own precision, so that the check is tight whenever the weights are float32."""
    dtype = next(scorer.parameters()).dtype
    tolerance = SELF_CHECK_TOLERANCE.get(dtype, HALF_PRECISION_TOLERANCE)
    device = next(scorer.parameters()).device
    triple = [(pair.prompt_ids, pair.chosen_ids, pair.rejected_ids)]
    with torch.autocast(device.type, enabled=False):
        result = check_against_model(scorer, triple, pad_id=pad_id, layout=layout)
        if result.relative_error <= tolerance:
            return result
        fallback = None
        if layout == "shared_prompt":
            fallback = check_against_model(scorer, triple, pad_id=pad_id, layout="concat")
    what = (
        f"self-check failed: {scorer.architecture} with train.layout={layout} gives completion "
        f"log-probs that differ from the model's own forward pass by {result.relative_error:.1e} "
        f"(relative; tolerance {tolerance:g})"
    )
    if fallback is not None and fallback.relative_error <= tolerance:
        raise ConfigError(f"{what}; train.layout=concat matches it: set that")
    raise ConfigError(
        f"{what}{' and so does train.layout=concat' if fallback else ''}: this architecture's "
        "forward pass (e.g. its logit post-processing) is not reproduced; it cannot be trained "
        "exactly here (train.self_check=false skips this check at your own risk)"
    )

def attention_plan(
    choice: str,
    layout: str,
    device_type: str,
    flex_problem: str | None,
    split_problem: str | None,
) -> tuple[str | None, str, str | None]:
    """(attention implementation to switch the model to, or None; layout to pack in; what to
    print) for train.attention=`choice` and train.layout=`layout`. `flex_problem` and
    `split_problem` are logprobs.flex_attention_problem's and split_attention_problem's answers
    for this model and device (None: it can).

    The shared-prompt layout needs a custom mask. Given as a dense [L, L] mask, SDPA computes
    every query against every key, and on a GPU it costs L^2 memory and keeps SDPA off its flash
    kernel. "auto" takes, on CUDA, flex attention with a block mask; elsewhere, or where flex
    cannot run, split attention (causal SDPA passes, no mask; see avgalign.attention); where
    neither can, the dense mask on a CPU, the concat layout (the model's own attention) on CUDA."""
    if choice == "model" or layout != "shared_prompt":
        return None, layout, None
    flex_note = "attention: flex_attention, shared-prompt mask as a BlockMask"
    split_note = "attention: split (causal SDPA passes per completion, no shared-prompt mask)"
    if choice == "flex":
        if flex_problem:
            raise ConfigError(f"train.attention=flex: {flex_problem}; use train.attention=auto")
        return FLEX_ATTENTION, layout, flex_note
    if choice == "split":
        if split_problem:
            raise ConfigError(f"train.attention=split: {split_problem}; use train.attention=auto")
        return SPLIT_ATTENTION, layout, split_note
    if device_type == "cuda" and flex_problem is None:
        return FLEX_ATTENTION, layout, flex_note
    if split_problem is None:
        return SPLIT_ATTENTION, layout, split_note
    if device_type == "cuda":
        return None, "concat", (
            f"layout: concat with the model's own attention, not shared_prompt with a dense "
            f"[L, L] mask: no flex attention ({flex_problem}) nor split attention "
            f"({split_problem}); train.attention=model keeps it"
        )
    return None, layout, f"attention: a dense shared-prompt mask (no split: {split_problem})"
