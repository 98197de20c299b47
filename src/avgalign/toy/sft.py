"""The toy world's language model: a small Llama built from a config, trained from scratch by
supervised fine-tuning on noisy demonstrations. The result is the reference (SFT) policy.

SFT loss: the token-averaged cross-entropy of completion tokens (the closing EOS included) given
the prompt,

    L = - sum_{i, t} log pi(y_{i,t} | x_i, y_{i,<t}) / sum_i |y_i|,

the length-invariant objective that, as method.md recalls, summed direct alignment losses are not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig, get_scheduler

from ..seeding import seeded
from ..tracking import MetricsLog

IGNORE = -100  # label of positions that are not predicted (prompt, padding)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one CPU thread, then restore the previous count.

    A model this small gains nothing from intra-op threads, and on a shared 2-core machine their
    synchronisation made every step several times slower. One thread also fixes the order of
    floating-point reductions, so results do not depend on how many cores the machine has.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class ModelSize:
    """Shape of the toy Llama (~0.2M parameters by default: trains in seconds on 2 cores)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 192
    max_positions: int = 128


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning on freshly sampled demonstrations, one batch per step."""

    steps: int = 300  # the loss is flat after ~200 (4.2 nats: mostly the choice among ~47 items)
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01


def build_model(tokenizer, size: ModelSize, seed: int):
    """A freshly initialised causal LM (tied embeddings) whose generation config knows the
    tokenizer's BOS, EOS and PAD, so `generate` stops at EOS without being told."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_heads,
        max_position_embeddings=size.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with seeded(seed):  # the caller's random streams are left as they were
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def sft_batch(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded [prompt | completion] rows; labels are the completion tokens, IGNORE elsewhere
    (the model shifts labels by one position itself)."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        row = torch.as_tensor([*p, *c], dtype=torch.long)
        input_ids[i, : len(row)] = row
        attention_mask[i, : len(row)] = 1
        labels[i, len(p) : len(row)] = row[len(p) :]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def train_sft(
    model,
    next_batch: Callable[[], tuple[list[list[int]], list[list[int]]]],
    cfg: SFTConfig,
    *,
    pad_id: int,
    progress: bool = True,
    log: MetricsLog | None = None,
) -> list[float]:
    """Train `model` in place; next_batch() -> (prompt ids, completion ids) of one step.

    Returns the loss of every step, also written to `log` if given. AdamW, linear warm-up then
    cosine decay to 0.
    """
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    scheduler = get_scheduler("cosine", optimizer, cfg.warmup_steps, cfg.steps)
    model.train()
    losses = []
    bar = tqdm(range(cfg.steps), desc="SFT", disable=not progress, leave=False)
    for step in bar:
        batch = sft_batch(*next_batch(), pad_id=pad_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log is not None:
            lr = scheduler.get_last_lr()[0]
            log.write({"split": "train", "step": step + 1, "loss": losses[-1], "learning_rate": lr})
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses
