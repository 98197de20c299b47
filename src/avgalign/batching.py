"""How a run's pairs become optimizer steps and forward passes: the order of each epoch (a pure
function of the seed, so a resumed run sees the same), micro-batches under a token budget, and
when activation checkpointing is needed."""

from __future__ import annotations

import torch

from .config import Config
from .data import (
    DataError,
    TokenizedPair,
)
from .reference import (
    budget_batches,
    packed_tokens,
)


def batch_order(
    lengths: list[int], batch_size: int, epoch: int, seed: int, group_by_length: bool
) -> list[list[int]]:
    """The pair indices of each optimizer step of one epoch: a pure function of its arguments,
    so a resumed run sees the same order. Incomplete last batches are dropped.

    With group_by_length, pairs are shuffled, cut into mega-batches of 32 batches, sorted by length
    inside each, and the batches shuffled again: batches of similar length, still random.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    if group_by_length:
        mega = batch_size * 32
        perm = [
            i
            for start in range(0, len(perm), mega)
            for i in sorted(perm[start : start + mega], key=lambda j: -lengths[j])
        ]
    batches = [perm[i : i + batch_size] for i in range(0, len(perm) - batch_size + 1, batch_size)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches

def activation_checkpointing(
    setting: bool | str, pairs: list[TokenizedPair], layout: str, max_tokens: int
) -> tuple[bool, str | None]:
    """(checkpoint activations?, what to print) for train.gradient_checkpointing=`setting`.
    The token budget bounds what a forward pass holds, except for a pair that alone packs to
    more than `max_tokens`: "auto" turns checkpointing on only then (it recomputes each layer's
    forward pass in the backward pass, about a third more compute), true and false force it."""
    if setting != "auto":
        return bool(setting), None
    over = [n for n in (packed_tokens([p], layout) for p in pairs) if max_tokens and n > max_tokens]
    if not over:
        return False, None
    return True, (
        f"activation checkpointing: on, as {len(over)} of {len(pairs)} pairs alone pack to more "
        f"than train.max_tokens_per_micro_batch={max_tokens} tokens (up to {max(over)}); "
        f"train.gradient_checkpointing=false turns it off"
    )

def micro_batches(
    shares: list[list[int]],
    pairs: list[TokenizedPair],
    layout: str,
    max_pairs: int,
    max_tokens: int = 0,
) -> list[list[list[int]]]:
    """The micro-batches of each process's share of a global batch: at most `max_pairs` pairs
    and (when max_tokens > 0) at most `max_tokens` packed tokens each, longest pairs first; a
    pair over the budget alone goes in a micro-batch of its own. Every process gets the same
    number of micro-batches (a sharded model's forward pass is collective): shorter plans have
    their biggest micro-batch halved until they match. Pure: each process computes all plans
    and takes its own, with no communication."""
    plans = [budget_batches(share, pairs, layout, max_pairs, max_tokens) for share in shares]
    target = max(len(p) for p in plans)
    for plan in plans:
        while len(plan) < target:
            big = max(range(len(plan)), key=lambda k: len(plan[k]))
            half = (len(plan[big]) + 1) // 2
            plan[big : big + 1] = [plan[big][:half], plan[big][half:]]
    return plans

def check_pair_counts(cfg: Config, train_pairs: list, eval_pairs: list) -> None:
    """One-line errors, naming the data and the key to change, for data too small to train on."""
    source = (cfg.data.train or " + ".join(s.path for s in cfg.data.sources)
              or "the training pairs")
    if not train_pairs:
        raise DataError(source, "no usable training pairs (see the skipped records above)")
    if len(train_pairs) < cfg.train.batch_size:
        held = f" after holding out {len(eval_pairs)} for evaluation" if eval_pairs else ""
        raise DataError(
            source,
            f"{len(train_pairs)} training pairs{held}, fewer than train.batch_size="
            f"{cfg.train.batch_size}; lower train.batch_size or give more data",
        )
