"""Evaluation: sampling, scoring, win rates, length statistics, KL to the reference.

It knows nothing of training: it takes models, a tokenizer, prompts and a scorer, and is used both
by the toy-world study (through the pure metrics and `summarize_evaluation`) and by the real-model
study (through `evaluate_policy` and the `evaluate` subcommand).

Layout, top to bottom:
- pure metrics over arrays (mean_ci, win_rate, length_controlled_win_rate, kl_estimate,
  length_summary), each with its formula in the docstring;
- generation (generate_completions) and the token counting it relies on (count_completion_tokens);
- scoring (load_scorer: a Python function or a single-head reward model);
- orchestration (evaluate_policy -> EvalResult), outputs (write_eval_outputs) and the CLI hook,
  which renders prompts as the policy's training did (read_prompts, choose_chat_template, and the
  record avgalign.data.prompt_rendering leaves in the model folder).

Lengths are completion token counts |y| as in method.md: the stop token that ends a completion
(EOS, or the chat template's end-of-turn token: avgalign.data.stop_token_ids) included, prompt
and padding excluded.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from statistics import NormalDist
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import (
    PROMPT_RENDERING_FILE,
    DataError,
    chat_template_probe,
    encode_prompt_texts,
    json_records,
    load_preferences,
    read_prompt_rendering,
    stop_token_ids,
    user_turn,
)

from .errors import UsageError
from .seeding import seeded

# ---------------------------------------------------------------------------------------------
# Pure metrics
# ---------------------------------------------------------------------------------------------


class MeanCI(NamedTuple):
    """A mean with the bounds of its confidence interval."""

    mean: float
    lo: float
    hi: float


@dataclass(frozen=True)
class WinRate:
    """A (possibly length-controlled) win rate in [0, 1] with a bootstrap confidence interval."""

    rate: float
    lo: float
    hi: float
    n: int  # number of paired comparisons


def _as_1d(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def mean_ci(values, confidence: float = 0.95) -> MeanCI:
    """Mean with a normal-approximation interval: mean +- z * s / sqrt(n).

    s is the sample standard deviation (ddof=1) and z = Phi^-1((1 + confidence) / 2). With a
    single value there is no spread to estimate, so lo = hi = mean.
    """
    x = _as_1d(values, "values")
    mean = float(x.mean())
    if x.size == 1:
        return MeanCI(mean, mean, mean)
    z = NormalDist().inv_cdf((1.0 + confidence) / 2.0)
    half = z * float(x.std(ddof=1)) / np.sqrt(x.size)
    return MeanCI(mean, mean - half, mean + half)


def pairwise_outcomes(policy_scores, reference_scores) -> np.ndarray:
    """Pair outcomes, policy vs reference: 1 if the policy scores higher, 0.5 if tied, else 0."""
    p = _as_1d(policy_scores, "policy_scores")
    r = _as_1d(reference_scores, "reference_scores")
    if p.shape != r.shape:
        raise ValueError(f"got {p.size} policy scores but {r.size} reference scores")
    return (p > r).astype(np.float64) + 0.5 * (p == r)


def _percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = 100.0 * (1.0 - confidence) / 2.0
    lo, hi = np.percentile(samples, [tail, 100.0 - tail])
    return float(lo), float(hi)


def bootstrap(statistic: Callable[[np.ndarray], np.ndarray], n: int, n_boot: int, seed: int):
    """statistic(counts) over n_boot resamplings of n pairs with replacement -> [n_boot] values.

    A resampling is given as its multiplicities counts [B, n] (how often each pair was drawn):
    re-weighting is the same as resampling, and lets weighted statistics (and the logistic fit
    below) run on many replicates at once. Replicates go in chunks to bound memory.
    """
    rng = np.random.default_rng(seed)
    chunk = max(1, 1_000_000 // n)
    values = []
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(np.float64)
        values.append(statistic(counts))
    return np.concatenate(values)


def win_rate(
    policy_scores,
    reference_scores,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> WinRate:
    """Paired win rate of the policy over the reference: mean_i o_i, o_i in {1, 0.5, 0}.

    Pair i compares the policy's and the reference's completion for the same prompt and sample
    index. The interval is the percentile bootstrap over pairs.
    """
    outcomes = pairwise_outcomes(policy_scores, reference_scores)
    n = outcomes.size
    boot = bootstrap(lambda counts: counts @ outcomes / n, n, n_boot, seed)
    lo, hi = _percentile_interval(boot, confidence)
    return WinRate(float(outcomes.mean()), lo, hi, n)


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + exp(-z)), without overflow


def _logistic_objective(w: np.ndarray, x: np.ndarray, t: np.ndarray, c: np.ndarray, l2: float):
    """sum_i c_i [softplus(z_i) - t_i z_i] + l2/2 |w|^2 with z = x w, for each row of w [B, k]."""
    z = w @ x.T  # [B, n]
    return (c * (np.logaddexp(0.0, z) - t * z)).sum(axis=1) + 0.5 * l2 * (w * w).sum(axis=1)


def fit_logistic(
    x: np.ndarray,
    targets: np.ndarray,
    weights: np.ndarray,
    *,
    l2: float,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> np.ndarray:
    """L2-penalised logistic regression with soft targets, by damped Newton; one fit per row of
    `weights`.

    Minimises  sum_i c_i [-t_i log s(x_i.w) - (1 - t_i) log(1 - s(x_i.w))] + l2/2 |w|^2,
    s the sigmoid, x [n, k] features, t [n] targets in [0, 1], c [B, n] weights; returns w [B, k].
    A soft target t counts a row as t of a success and 1 - t of a failure, which is how ties
    (t = 0.5) enter as half a win and half a loss. With l2 > 0 the objective is strictly convex, so
    the minimiser exists and is finite even under perfect separation. Each Newton step is halved
    until the objective does not increase.
    """
    if l2 <= 0:
        raise ValueError("l2 must be > 0 (it keeps the fit finite under perfect separation)")
    c = np.atleast_2d(weights)
    n_fits, k = c.shape[0], x.shape[1]
    w = np.zeros((n_fits, k))
    eye = np.eye(k)
    outer = (x[:, :, None] * x[:, None, :]).reshape(len(x), k * k)  # x_i x_i^T, flattened
    f = _logistic_objective(w, x, targets, c, l2)
    for _ in range(max_iter):
        s = _sigmoid(w @ x.T)
        grad = (c * (s - targets)) @ x + l2 * w
        hess = ((c * s * (1.0 - s)) @ outer).reshape(n_fits, k, k) + l2 * eye
        step = np.linalg.solve(hess, grad[..., None])[..., 0]
        if np.max(np.abs(step)) < tol:
            break
        # near the optimum f changes below round-off, hence the slack in "does not increase"
        slack = 1e-12 * (1.0 + np.abs(f))
        eta = np.ones(n_fits)
        for _ in range(50):
            w_try = w - eta[:, None] * step
            f_try = _logistic_objective(w_try, x, targets, c, l2)
            worse = f_try > f + slack
            if not worse.any():
                break
            eta = np.where(worse, eta / 2.0, eta)
        w, f = w_try, f_try
    return w


def length_controlled_win_rate(
    policy_scores,
    reference_scores,
    policy_lengths,
    reference_lengths,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    l2: float = 0.1,
) -> WinRate:
    """Win rate at zero length difference, in the spirit of AlpacaEval 2's length control.

    Fit P(policy wins | d) = s(a + b * d / sd(d)), with d = len_policy - len_reference per pair and
    s the sigmoid, by L2-penalised logistic regression (ties count as half a win and half a loss),
    and report s(a): the win rate a policy would have if its completions were as long as the
    reference's. d is scaled by its standard deviation but not centred, so that the intercept sits
    at d = 0. The l2 penalty (on a and b, summed loss) keeps the fit finite when the outcome is
    perfectly separated by d or is the same for every pair; it shrinks a towards 0 (a rate of 0.5)
    by an amount that vanishes as the number of pairs grows. Interval: percentile bootstrap over
    pairs, refitting on each replicate with the scale of d held fixed.
    """
    outcomes = pairwise_outcomes(policy_scores, reference_scores)
    lp = _as_1d(policy_lengths, "policy_lengths")
    lr = _as_1d(reference_lengths, "reference_lengths")
    if not (lp.size == lr.size == outcomes.size):
        raise ValueError("scores and lengths must all have one entry per pair")
    d = lp - lr
    scale = float(d.std())
    x = np.stack([np.ones_like(d), d / (scale if scale > 0 else 1.0)], axis=1)
    n = outcomes.size
    w = fit_logistic(x, outcomes, np.ones((1, n)), l2=l2)

    def intercepts(counts: np.ndarray) -> np.ndarray:
        return fit_logistic(x, outcomes, counts, l2=l2)[:, 0]

    lo, hi = _percentile_interval(_sigmoid(bootstrap(intercepts, n, n_boot, seed)), confidence)
    return WinRate(float(_sigmoid(w[0, 0])), lo, hi, n)


def kl_estimate(policy_logps, reference_logps, confidence: float = 0.95) -> MeanCI:
    """Monte-Carlo estimate of KL(pi || pi_ref) from completions sampled from pi.

    KL = E_{y ~ pi(.|x)} [log pi(y|x) - log pi_ref(y|x)] ~ (1/N) sum_i (log pi(y_i|x_i) -
    log pi_ref(y_i|x_i)), with sequence (summed over tokens) log-likelihoods. Unbiased only if the
    y_i really are samples of pi (temperature 1, no top-p / top-k truncation); single terms can be
    negative. Interval from `mean_ci`.
    """
    p = _as_1d(policy_logps, "policy_logps")
    r = _as_1d(reference_logps, "reference_logps")
    if p.shape != r.shape:
        raise ValueError(f"got {p.size} policy log-probs but {r.size} reference log-probs")
    return mean_ci(p - r, confidence)


def length_summary(lengths) -> dict[str, float]:
    """mean, median, p90 (linear interpolation), min, max and std (sample std, ddof=1; 0 if n=1)."""
    x = _as_1d(lengths, "lengths")
    return {
        "mean": float(x.mean()),
        "median": float(np.median(x)),
        "p90": float(np.percentile(x, 90)),
        "min": float(x.min()),
        "max": float(x.max()),
        "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
    }


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Completion:
    """One sampled completion. token_ids run up to and including the first EOS (no padding)."""

    prompt_index: int
    sample_index: int
    prompt: str  # as given, or decoded when the prompt was given as token ids
    text: str  # decoded token_ids, special tokens skipped
    token_ids: list[int]
    num_tokens: int  # |y| = len(token_ids)
    finished: bool  # ended with EOS (False: cut at max_new_tokens)
    prompt_ids: list[int]  # what the model was conditioned on (chat template applied)


@contextlib.contextmanager
def eval_mode(model):
    """Dropout off for evaluation; the model is left in the mode it was found in (evaluation may
    run in the middle of a training loop)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def count_completion_tokens(generated: Sequence[int], eos_ids: set[int]) -> tuple[int, bool]:
    """(|y|, finished) of one generated row: tokens up to and including the first EOS.

    `generate` pads a finished row until the batch ends, with a pad token that may equal EOS, so
    everything after the first EOS is padding. A row without EOS was cut at max_new_tokens and all
    of its tokens count.
    """
    for i, token in enumerate(generated):
        if int(token) in eos_ids:
            return i + 1, True
    return len(generated), False


def _eos_ids(model, tokenizer) -> set[int]:
    """Where generation stops: the model's generation-config EOS ids and the tokenizer's stop
    tokens (EOS and the chat template's end-of-turn token), so generated completions end where
    training completions end (avgalign.data.tokenize_pairs)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    ids.extend(stop_token_ids(tokenizer))
    if not ids:
        raise ValueError("neither the model's generation config nor the tokenizer defines an EOS")
    return {int(i) for i in ids}


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token, or its EOS when it has none (common for causal LMs)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError(
        "the tokenizer has neither a pad token nor an EOS token to pad with; "
        "set tokenizer.pad_token before evaluating"
    )


def encode_prompts(
    tokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    use_chat_template="auto",
    system_prompt: str | None = None,
) -> list[list[int]]:
    """Prompt token ids. Strings get the tokenizer's chat template (one user turn, after a system
    message when `system_prompt` is set, plus the generation prompt) when use_chat_template is
    True, or "auto" and the tokenizer has one, and are then tokenized as training tokenizes
    prompts (avgalign.data.encode_prompt_texts): a templated string gets the ids a conversational
    record with that one user message trains on under `data.system_prompt: system_prompt`, an
    untemplated one the ids of the same text as a raw-text record. Token-id prompts are taken as
    they are. A system prompt that would not be rendered (raw text, token ids) is a ValueError."""
    if use_chat_template not in ("auto", True, False):
        raise ValueError(f"use_chat_template must be 'auto', True or False: {use_chat_template!r}")
    if not prompts or not isinstance(prompts[0], str):
        if system_prompt and prompts:
            raise ValueError("a system prompt cannot be added to prompts given as token ids")
        return [[int(t) for t in p] for p in prompts]
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if use_chat_template is True and not has_template:
        raise ValueError("use_chat_template=True but the tokenizer has no chat template")
    if use_chat_template is False or not has_template:
        if system_prompt:
            raise ValueError("a system prompt needs the chat template; these prompts are raw text")
        return encode_prompt_texts(tokenizer, prompts)
    texts = [
        tokenizer.apply_chat_template(
            user_turn(p, system_prompt), add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]
    return encode_prompt_texts(tokenizer, texts)


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row) == 0:
            raise ValueError("every prompt needs at least one token")
        input_ids[i, width - len(row) :] = torch.as_tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


def generate_completions(
    model,
    tokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
    batch_size: int = 8,
    seed: int = 0,
    use_chat_template="auto",
    system_prompt: str | None = None,
    progress: bool = True,
) -> list[Completion]:
    """Sample `num_samples` completions per prompt with batched, left-padded `model.generate`.

    Returns them ordered by (prompt_index, sample_index). Sampling is plain ancestral sampling
    from pi at `temperature`, with nucleus `top_p` (top-k is switched off, whatever the model's
    generation config says, so that temperature 1 and top_p 1 sample pi itself). Each batch of
    `batch_size` sequences is seeded with seed + batch index, so a given (prompts, settings) gives
    the same completions whatever ran before; the caller's random generators are left as they
    were (avgalign.seeding.seeded). Prompts are encoded by `encode_prompts` (use_chat_template,
    system_prompt).
    """
    if num_samples < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError("num_samples, batch_size and max_new_tokens must be >= 1")
    pad_id = pad_token_id(tokenizer)
    eos_ids = _eos_ids(model, tokenizer)
    prompt_ids = encode_prompts(tokenizer, prompts, use_chat_template, system_prompt)
    prompt_texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts]
    jobs = [(i, k) for i in range(len(prompt_ids)) for k in range(num_samples)]
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": 0} if do_sample else {}
    device = next(model.parameters()).device
    completions = []
    starts = range(0, len(jobs), batch_size)
    for batch_index, start in enumerate(tqdm(starts, desc="generate", disable=not progress)):
        batch = jobs[start : start + batch_size]
        input_ids, attention_mask = _left_pad([prompt_ids[i] for i, _ in batch], pad_id)
        with seeded(seed + batch_index, device), eval_mode(model), torch.inference_mode():
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                pad_token_id=pad_id,
                eos_token_id=sorted(eos_ids),
                **sampling,
            )
        generated = output[:, input_ids.shape[1] :].cpu().tolist()
        for (i, k), row in zip(batch, generated, strict=True):
            n, finished = count_completion_tokens(row, eos_ids)
            completions.append(
                Completion(
                    prompt_index=i,
                    sample_index=k,
                    prompt=prompt_texts[i],
                    text=tokenizer.decode(row[:n], skip_special_tokens=True),
                    token_ids=row[:n],
                    num_tokens=n,
                    finished=finished,
                    prompt_ids=prompt_ids[i],
                )
            )
    return completions


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------

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

    from .models import resolve_model_path

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


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------


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
    from .logprobs import sequence_logps

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


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


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
    plot_length_and_score(completions, paths["plot"], title=_headline(result))
    return paths


def _headline(result: EvalResult) -> str:
    parts = [f"{result.num_prompts} prompts x {result.num_samples} samples"]
    for name, wr in (("win rate", result.win_rate), ("LC win rate", result.lc_win_rate)):
        if wr is not None:
            parts.append(f"{name} {wr.rate:.3f} [{wr.lo:.3f}, {wr.hi:.3f}]")
    if result.kl is not None:
        parts.append(f"KL {result.kl.mean:.3g}")
    return ", ".join(parts)


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


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSet:
    """Prompts to evaluate on, as the scorer reads them (`texts`).

    rendering: None for plain prompts (a .txt file, a .jsonl of "prompt" rows), which still wait
    for the chat-template decision (`choose_chat_template`); for the prompts of a preference
    dataset, how avgalign.data rendered them ("raw", "chat_template" or "mixed"): those are final,
    tokenized as training tokenizes prompts and never templated again.
    """

    texts: list[str]
    rendering: str | None = None


def read_prompts(
    source: str, *, tokenizer=None, limit: int | None = None, split: str = "test"
) -> PromptSet:
    """Prompts from a .txt file (one per line, blank lines skipped), a .jsonl file whose rows have
    a "prompt" and no "chosen" field, or any preference dataset avgalign.data.load_preferences
    reads (its prompts, duplicates dropped, in order), loaded with `tokenizer` as training loads
    it, so conversational records are rendered by the chat template exactly as in training (a
    tokenizer with a chat template is needed only for those). At most `limit` prompts.
    A bad source raises DataError, one line: "<location>: <reason>"."""
    path = Path(source).expanduser()
    if path.suffix == ".txt":
        lines = _read_lines(path, source)
        prompts, rendering = [line for line in lines if line.strip()], None
    elif path.suffix == ".jsonl" and path.is_file() and _is_prompt_jsonl(path, source):
        prompts, rendering = [], None
        for location, row in json_records(path, source):
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if not isinstance(prompt, str):
                raise DataError(location, "no string 'prompt' field")
            prompts.append(prompt)
    else:
        # only prompts are needed: a pair with a broken completion still gives its prompt
        examples = load_preferences(source, split=split, tokenizer=tokenizer, on_error="skip")
        renderings: dict[str, str] = {}  # prompt -> its rendering, in order of first appearance
        for e in examples.examples:
            renderings.setdefault(e.prompt, e.rendering)
        prompts = list(renderings)
        kinds = {renderings[p] for p in prompts[:limit]}
        rendering = kinds.pop() if len(kinds) == 1 else "mixed"
    prompts = prompts[:limit]
    if not prompts:
        raise DataError(source, "no prompts")
    return PromptSet(prompts, rendering)


def _read_lines(path: Path, source: str) -> list[str]:
    if not path.is_file():
        raise DataError(source, "no such file")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(source, f"invalid UTF-8 at byte {e.start}") from None


def _is_prompt_jsonl(path: Path, source: str) -> bool:
    """Whether the first record has a "prompt" and no "chosen" field (read up to it only); an
    empty file is read as prompts, then reported as empty."""
    for _, row in json_records(path, source):
        return isinstance(row, dict) and "prompt" in row and "chosen" not in row
    return True


CHAT_TEMPLATE_CHOICES = ("trained", "auto", "yes", "no")
_RENDERING_WORDS = {
    "raw": "raw text",
    "chat_template": "rendered with the chat template",
    "mixed": "partly raw text, partly rendered with the chat template",
}


class PromptChoice(NamedTuple):
    """How plain prompts are rendered (generate_completions' use_chat_template and system_prompt)
    and one line saying which rendering and why."""

    use_chat_template: bool
    system_prompt: str | None
    line: str


def choose_chat_template(
    prompts: PromptSet,
    choice: str,
    policy: str | Path,
    tokenizer,
    system_prompt: str | None = None,
) -> PromptChoice:
    """How to render `prompts` for generate_completions, and the line saying so.

    A preference dataset's prompts are never templated again: they already are what training
    conditioned on. Plain prompts follow `choice`: "yes" wrap them in the tokenizer's chat
    template, "no" don't, "auto" wrap them when the tokenizer has a template, "trained" (the CLI
    default) render them as the policy's training prompts were, read from
    <policy>/prompt_rendering.json ("chat_template": wrap, "raw": don't); a missing record, or one
    that says "mixed", falls back to "auto", and the line says so.

    Wrapped plain prompts get a system message first, as training put `data.system_prompt` first:
    `system_prompt` (--system-prompt; "" for none) when given, else under "trained" the record's
    "system_prompt" (none in a record written before that key existed), else none. A non-empty
    `system_prompt` for plain prompts that stay raw text is a ValueError.
    """
    if choice not in CHAT_TEMPLATE_CHOICES:
        raise ValueError(f"chat template choice must be one of {CHAT_TEMPLATE_CHOICES}: {choice!r}")
    has_template = getattr(tokenizer, "chat_template", None) is not None
    record_path = Path(policy).expanduser() / PROMPT_RENDERING_FILE
    record = read_prompt_rendering(policy)
    recorded = record["rendering"] if record else None
    recorded_system = record.get("system_prompt") if record else None

    if prompts.rendering is not None:
        line = (
            f"prompts: the dataset's own, {_RENDERING_WORDS[prompts.rendering]}, tokenized as "
            "training tokenizes them (no chat template added)"
        )
        if choice != "trained":
            line += f"; --chat-template {choice} applies only to plain prompts"
        if system_prompt is not None:
            line += "; --system-prompt applies only to plain prompts"
        if recorded is not None and recorded != prompts.rendering:
            line += f"; note: {record_path} records {_RENDERING_WORDS[recorded]} in training"
        return PromptChoice(False, None, line)

    def words(wrap: bool) -> str:
        return "wrapped in the chat template" if wrap else "raw text"

    having = "the tokenizer " + ("has a chat template" if has_template else "has no chat template")
    if choice == "yes" and not has_template:
        raise ValueError("--chat-template yes, but the tokenizer has no chat template")
    if choice in ("yes", "no"):
        wrap = choice == "yes"
        line = f"prompts: {words(wrap)} (--chat-template {choice})"
    elif choice == "auto":
        wrap = has_template
        line = f"prompts: {words(wrap)} (--chat-template auto: {having})"
    elif recorded in ("raw", "chat_template"):
        wrap = recorded == "chat_template"
        if wrap and not has_template:
            raise ValueError(
                f"{record_path} records chat-template prompts, but the tokenizer has no chat "
                "template; give --chat-template no to evaluate on raw text"
            )
        line = f"prompts: {words(wrap)}, as recorded in {record_path}"
        probe = record.get("chat_template_probe")
        if wrap and probe is not None and probe != chat_template_probe(tokenizer, recorded_system):
            line += (
                "; warning: the tokenizer's chat template renders a prompt differently from the "
                "recorded one"
            )
    else:
        if record:
            why = f"{record_path} records mixed renderings"
        else:
            why = f"no {PROMPT_RENDERING_FILE} in {policy}"
        wrap = has_template
        line = f"prompts: {words(wrap)}; {why}, so falling back to --chat-template auto ({having})"
    if choice != "trained":
        recorded_system = None  # the record speaks only for "trained"
    if not wrap:
        if system_prompt:
            raise ValueError(
                "--system-prompt needs the chat template, but the prompts stay "
                + line.removeprefix("prompts: ")
            )
        return PromptChoice(False, None, line)
    chosen = (recorded_system if system_prompt is None else system_prompt) or None
    named = f"system prompt {_quote(chosen)} first" if chosen else "no system prompt"
    if system_prompt is not None:
        line += f"; {named} (--system-prompt"
        if recorded_system and recorded_system != chosen:
            line += f"; {record_path} records {_quote(recorded_system)}"
        line += ")"
    elif chosen:
        line += f"; {named}, as recorded in {record_path}"
    return PromptChoice(True, chosen, line)


def _quote(text: str, limit: int = 60) -> str:
    """`text` quoted for a log line; a long one cut to `limit` characters, its length given."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def _load_causal_lm(name: str, dtype: str, device: str):
    from .config import ModelConfig
    from .models import load_model

    try:
        return load_model(ModelConfig(name=name, dtype=dtype)).to(device)
    except (FileNotFoundError, OSError) as e:
        raise UsageError(f"cannot load model {name!r}: {e}") from e


def run_evaluate(args: argparse.Namespace) -> EvalResult:
    from .config import ModelConfig
    from .models import load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = load_tokenizer(ModelConfig(name=args.policy))
    except (FileNotFoundError, OSError) as e:
        raise UsageError(f"cannot load the tokenizer of {args.policy!r}: {e}") from e
    try:
        prompts = read_prompts(
            args.prompts, tokenizer=tokenizer, limit=args.limit, split=args.split
        )
        rendering = choose_chat_template(
            prompts, args.chat_template, args.policy, tokenizer, args.system_prompt
        )
        scorer = load_scorer(args.scorer, device=device, batch_size=args.batch_size)
    except ValueError as e:
        raise UsageError(f"{e}") from e
    print(rendering.line)
    policy = _load_causal_lm(args.policy, args.dtype, device)
    reference = _load_causal_lm(args.reference, args.dtype, device) if args.reference else None
    settings = GenerationSettings(
        num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        do_sample=not args.greedy,
        batch_size=args.batch_size,
        seed=args.seed,
        use_chat_template=rendering.use_chat_template,
        system_prompt=rendering.system_prompt,
    )
    result = evaluate_policy(policy, reference, tokenizer, prompts.texts, scorer, settings=settings)
    paths = write_eval_outputs(result, result.completions, args.out)
    print(json.dumps(result.to_dict(), indent=2))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return result
