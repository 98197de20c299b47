"""Sampling completions from a policy, and the token counting lengths rely on (|y|: the stop
token that ends a completion included, prompt and padding excluded)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..data import (
    encode_prompt_texts,
    stop_token_ids,
    user_turn,
)
from ..seeding import seeded


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
