"""One evaluation: sample from a policy (and a reference), score, and summarise into an
EvalResult with per-prompt means, win rates, KL and lengths."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass

import numpy as np

from .generation import Completion, generate_completions, pad_token_id
from .metrics import (
    MeanCI,
    WinRate,
    _as_1d,
    kl_estimate,
    length_controlled_win_rate,
    length_summary,
    mean_ci,
    pairwise_outcomes,
    win_rate,
)


@dataclass(frozen=True)
class GenerationSettings:
    """How completions are sampled, for the policy and the reference alike."""

    num_samples: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    do_sample: bool = True
    batch_size: int = 8
    seed: int = 0
    use_chat_template: bool | str = "auto"
    system_prompt: str | None = None  # put first when prompts are templated (encode_prompts)

    @property
    def samples_policy(self) -> bool:
        """True when completions are draws from pi itself, as the KL estimate requires."""
        return self.do_sample and self.temperature == 1.0 and self.top_p == 1.0


@dataclass(frozen=True)
class ScoredCompletion:
    """A completion with its score, as written to completions.jsonl; `model` says whose it is."""

    model: str  # "policy" or "reference"
    prompt_index: int
    sample_index: int
    prompt: str
    text: str
    num_tokens: int
    finished: bool
    score: float


def score_completions(
    scorer: Callable[[list[str], list[str]], list[float]],
    completions: Sequence[Completion],
    model: str,
) -> list[ScoredCompletion]:
    """Score completions (prompt text and completion text, as the scorer sees them); `model`
    labels whose they are."""
    scores = scorer([c.prompt for c in completions], [c.text for c in completions])
    return [
        ScoredCompletion(
            model=model,
            prompt_index=c.prompt_index,
            sample_index=c.sample_index,
            prompt=c.prompt,
            text=c.text,
            num_tokens=c.num_tokens,
            finished=c.finished,
            score=s,
        )
        for c, s in zip(completions, scores, strict=True)
    ]


@dataclass
class EvalResult:
    """Summary of one evaluation; reference-side fields are None without a reference.

    kl is None when no reference log-likelihoods were available or the completions were not
    samples of the policy (see GenerationSettings.samples_policy).
    """

    num_prompts: int
    num_samples: int
    policy_score: MeanCI
    policy_length: dict[str, float]
    policy_finished: float  # fraction of policy completions that ended with EOS
    reference_score: MeanCI | None = None
    reference_length: dict[str, float] | None = None
    reference_finished: float | None = None
    win_rate: WinRate | None = None
    lc_win_rate: WinRate | None = None
    kl: MeanCI | None = None
    settings: GenerationSettings | None = None
    # per prompt (in prompt order), the means over its samples: score, length, and where measured
    # kl and win (see per_prompt_means); what a bootstrap over prompts (and seeds) resamples
    per_prompt: dict[str, list[float]] = field(default_factory=dict, repr=False)
    # kept for write_eval_outputs; not part of the summary
    completions: list[ScoredCompletion] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("completions", "per_prompt"):
                continue
            if isinstance(value, MeanCI):
                value = value._asdict()
            elif is_dataclass(value):
                value = asdict(value)
            out[f.name] = value
        return out


def _by_key(samples: Sequence[ScoredCompletion]) -> list[ScoredCompletion]:
    return sorted(samples, key=lambda s: (s.prompt_index, s.sample_index))


def per_prompt_means(
    policy: Sequence[ScoredCompletion],
    reference: Sequence[ScoredCompletion] | None = None,
    kl_terms=None,
) -> dict[str, list[float]]:
    """Per prompt (ordered by prompt_index), the mean over its samples of the policy's score and
    length, of the KL terms log pi(y|x) - log pi_ref(y|x) (given in the order of `policy`), and of
    the policy's outcome against the reference's sample of the same index (1 win, 0.5 tie)."""
    order = sorted(range(len(policy)), key=lambda i: (policy[i].prompt_index,
                                                      policy[i].sample_index))
    ranked = [policy[i] for i in order]  # as _by_key orders them, paired with the reference
    _, group = np.unique([s.prompt_index for s in ranked], return_inverse=True)
    counts = np.bincount(group)

    def means(values) -> list[float]:
        return (np.bincount(group, weights=np.asarray(values, dtype=float)) / counts).tolist()

    out = {"score": means([s.score for s in ranked]),
           "length": means([s.num_tokens for s in ranked])}
    if kl_terms is not None:
        out["kl"] = means(_as_1d(kl_terms, "kl_terms")[order])
    if reference:
        out["win"] = means(pairwise_outcomes([s.score for s in ranked],
                                             [s.score for s in _by_key(reference)]))
    return out


def summarize_evaluation(
    policy: Sequence[ScoredCompletion],
    reference: Sequence[ScoredCompletion] | None = None,
    *,
    policy_logps=None,
    reference_logps=None,
    settings: GenerationSettings | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> EvalResult:
    """Metrics from scored completions (no model needed, so the toy world can call it).

    Policy and reference completions are paired by (prompt_index, sample_index).
    policy_logps / reference_logps: log pi(y|x) and log pi_ref(y|x) of the *policy's*
    completions, in the order of `policy`; both given -> KL estimate.
    """
    if not policy:
        raise ValueError("no policy completions to evaluate")
    keys = [(s.prompt_index, s.sample_index) for s in policy]
    num_prompts = len({k[0] for k in keys})
    result = EvalResult(
        num_prompts=num_prompts,
        num_samples=len(policy) // num_prompts,
        policy_score=mean_ci([s.score for s in policy]),
        policy_length=length_summary([s.num_tokens for s in policy]),
        policy_finished=float(np.mean([s.finished for s in policy])),
        settings=settings,
        completions=list(policy) + list(reference or []),
    )
    kl_terms = None
    if policy_logps is not None and reference_logps is not None:
        result.kl = kl_estimate(policy_logps, reference_logps)
        kl_terms = _as_1d(policy_logps, "policy_logps") - _as_1d(reference_logps, "reference_logps")
    if reference:
        pol, ref = _by_key(policy), _by_key(reference)
        if [(s.prompt_index, s.sample_index) for s in ref] != sorted(keys):
            raise ValueError("policy and reference completions do not cover the same prompts")
        result.reference_score = mean_ci([s.score for s in ref])
        result.reference_length = length_summary([s.num_tokens for s in ref])
        result.reference_finished = float(np.mean([s.finished for s in ref]))
        scores = ([s.score for s in pol], [s.score for s in ref])
        lengths = ([s.num_tokens for s in pol], [s.num_tokens for s in ref])
        result.win_rate = win_rate(*scores, n_boot=n_boot, seed=seed)
        result.lc_win_rate = length_controlled_win_rate(*scores, *lengths, n_boot=n_boot, seed=seed)
    result.per_prompt = per_prompt_means(policy, reference, kl_terms)
    return result


def reference_seed(seed: int) -> int:
    """The reference's sampling seed: its own random stream. With the policy's seed, the policy
    and reference samples of a prompt would share their random numbers, so near the reference the
    pairs would tie more often than independent samples do and the win rate would be pulled to 50%.
    """
    return seed + 1_000_003


def evaluate_policy(
    policy,
    reference,
    tokenizer,
    prompts: Sequence[str],
    scorer: Callable[[list[str], list[str]], list[float]],
    *,
    settings: GenerationSettings | None = None,
    reference_context: Callable[[], contextlib.AbstractContextManager] | None = None,
    logp_batch_size: int = 8,
    n_boot: int = 2000,
    progress: bool = True,
) -> EvalResult:
    """Sample from the policy (and the reference, same prompts and settings), score, compare.

    reference: a causal LM sharing the policy's tokenizer, or None (no win rates, no KL).
    reference_context: entered around every use of the reference. For a LoRA policy whose
    reference is its base model, pass reference=policy and reference_context=policy.disable_adapter.
    The KL estimate uses the policy's completions, scored by the policy and by the reference
    (avgalign.logprobs.sequence_logps); it is skipped unless settings.samples_policy.
    """
    from ..logprobs import sequence_logps

    settings = settings or GenerationSettings()
    reference_context = reference_context or contextlib.nullcontext
    gen = {**asdict(settings), "progress": progress}

    policy_samples = generate_completions(policy, tokenizer, prompts, **gen)
    policy_scored = score_completions(scorer, policy_samples, "policy")
    if reference is None:
        return summarize_evaluation(
            policy_scored, settings=settings, n_boot=n_boot, seed=settings.seed
        )

    with reference_context():
        reference_samples = generate_completions(
            reference, tokenizer, prompts, **{**gen, "seed": reference_seed(settings.seed)}
        )
    reference_scored = score_completions(scorer, reference_samples, "reference")

    policy_logps = reference_logps = None
    if settings.samples_policy:
        prompt_ids = [c.prompt_ids for c in policy_samples]
        completion_ids = [c.token_ids for c in policy_samples]
        kwargs = {"batch_size": logp_batch_size, "pad_id": pad_token_id(tokenizer)}
        policy_logps, _ = sequence_logps(policy, prompt_ids, completion_ids, **kwargs)
        with reference_context():
            reference_logps, _ = sequence_logps(reference, prompt_ids, completion_ids, **kwargs)
    else:
        warnings.warn(
            "KL(pi || pi_ref) not estimated: it needs samples of the policy itself "
            "(do_sample, temperature=1, top_p=1)",
            stacklevel=2,
        )
    return summarize_evaluation(
        policy_scored,
        reference_scored,
        policy_logps=policy_logps,
        reference_logps=reference_logps,
        settings=settings,
        n_boot=n_boot,
        seed=settings.seed,
    )
