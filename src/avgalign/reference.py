"""Reference log-likelihoods: computed once before training, shared out over the processes of a
multi-process run, and cached on disk under a key that names the model, the pairs and the
precision (not the number of processes, so a cache written by 1 process serves 8, and back)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import TokenizedPair
from .logprobs import CompletionLogProbs, pack_pairs


@dataclass
class ReferenceLogps:
    """Summed reference log-likelihoods and token counts, one entry per pair."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor

    def take(self, idx: list[int]) -> ReferenceLogps:
        return ReferenceLogps(*(t[idx] for t in dataclasses.astuple(self)))


def pair_length(p: TokenizedPair) -> int:
    return len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)


def pack(pairs: list[TokenizedPair], pad_id: int, layout: str):
    return pack_pairs(
        [p.prompt_ids for p in pairs],
        [p.chosen_ids for p in pairs],
        [p.rejected_ids for p in pairs],
        pad_id,
        layout,
    )


# the reference pass's batches: at most this fraction of padding. With few pairs, length-sorted
# batches of 8 pad short pairs to a long one's length: `benchmarks/bench_step_parts.py --parts
# reference` measured 0.83x the time of batches of 8 with this cap on 16 HH pairs, 0.70x on 16
# long pairs (docs/benchmarks.md)
REFERENCE_MAX_PADDING = 0.1


def packed_tokens(pairs: list[TokenizedPair], layout: str) -> int:
    """Tokens of the packed batch of `pairs` (rows x padded length), what a forward pass holds:
    one row per pair in the shared-prompt layout, two in concat."""
    if not pairs:
        return 0
    if layout == "shared_prompt":
        return len(pairs) * max(pair_length(p) for p in pairs)
    prompt = [len(p.prompt_ids) for p in pairs]
    longest = max(n + max(len(p.chosen_ids), len(p.rejected_ids)) for n, p in zip(prompt, pairs))
    return 2 * len(pairs) * longest


def budget_batches(
    indices: list[int],
    pairs: list[TokenizedPair],
    layout: str,
    max_pairs: int,
    max_tokens: int,
    max_padding: float = 1.0,
) -> list[list[int]]:
    """`indices` in batches of at most `max_pairs` pairs and (max_tokens > 0) at most
    `max_tokens` packed tokens, longest pairs first, each batch filled greedily; a pair over the
    budget alone is a batch of its own. `max_padding` < 1: a pair also starts a new batch where
    it would make more than that fraction of the batch's packed tokens padding. Without a
    budget or a padding cap: runs of max_pairs, in order."""
    if not max_tokens and max_padding >= 1.0:
        return [indices[i : i + max_pairs] for i in range(0, len(indices), max_pairs)]
    alone = {i: packed_tokens([pairs[i]], layout) for i in indices}  # each pair's own tokens
    batches: list[list[int]] = []
    for i in sorted(indices, key=lambda i: -pair_length(pairs[i])):
        grown = batches[-1] + [i] if batches else []
        packed = packed_tokens([pairs[j] for j in grown], layout)
        real = sum(alone[j] for j in grown)
        if (
            grown
            and len(grown) <= max_pairs
            and (not max_tokens or packed <= max_tokens)
            and packed - real <= max_padding * packed
        ):
            batches[-1] = grown
        else:
            batches.append([i])
    return batches


@torch.inference_mode()
def compute_reference_logps(
    scorer: CompletionLogProbs,
    pairs: list[TokenizedPair],
    *,
    pad_id: int,
    layout: str,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
    max_tokens: int = 0,
) -> ReferenceLogps:
    """Reference log-likelihoods of every pair, batched by length to waste little on padding:
    at most `batch_size` pairs, (max_tokens > 0) `max_tokens` packed tokens and
    REFERENCE_MAX_PADDING padding per batch, so that one long pair does not pad several short
    ones to its length.

    With world > 1 (a multi-process run; `scorer` must not be wrapped for sharding, as each
    process runs a different number of forward passes) this process computes batches rank,
    rank + world, ... and the results are gathered: every process returns all pairs, each batch
    computed exactly as one process would have."""
    n = len(pairs)
    order = sorted(range(n), key=lambda i: pair_length(pairs[i]))
    batches = budget_batches(order, pairs, layout, batch_size, max_tokens, REFERENCE_MAX_PADDING)
    mine = batches[rank::world]
    was_training = scorer.training
    scorer.eval()
    rows: list[tuple[int, float, float, int, int]] = []
    for idx in tqdm(mine, desc="reference log-probs", disable=not progress):
        sums, counts = scorer(pack([pairs[i] for i in idx], pad_id, layout).to(device))
        m = len(idx)
        sums, counts = sums.float().cpu(), counts.cpu()
        rows += zip(idx, sums[:m].tolist(), sums[m:].tolist(), counts[:m].tolist(),
                    counts[m:].tolist())
    scorer.train(was_training)
    if world > 1:
        rows = gather_object(rows)
    out = ReferenceLogps(
        torch.zeros(n),
        torch.zeros(n),
        torch.zeros(n, dtype=torch.long),
        torch.zeros(n, dtype=torch.long),
    )
    idx = [r[0] for r in rows]
    if sorted(idx) != list(range(n)):
        raise RuntimeError(f"reference log-probs: gathered {len(idx)} pairs, expected {n}")
    out.chosen[idx] = torch.tensor([r[1] for r in rows])
    out.rejected[idx] = torch.tensor([r[2] for r in rows])
    out.chosen_lengths[idx] = torch.tensor([r[3] for r in rows])
    out.rejected_lengths[idx] = torch.tensor([r[4] for r in rows])
    return out


def reference_fingerprint(model_fp: str, pairs: list[TokenizedPair], dtype: str) -> str:
    h = hashlib.sha256(f"{model_fp}|{dtype}".encode())
    for p in pairs:
        h.update(json.dumps([p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    return h.hexdigest()[:24]


def cached_reference_logps(
    cache_dir: Path, key: str, compute: Callable[[], ReferenceLogps], accelerator
) -> tuple[ReferenceLogps, bool]:
    """Load reference log-probs from `cache_dir/ref-<key>.safetensors`, or compute them (every
    process takes part in `compute`) and have the main process write them atomically.
    Returns (values, loaded_from_cache); every process gets the same values."""
    path = cache_dir / f"ref-{key}.safetensors"
    hit = path.is_file()
    if accelerator.num_processes > 1:
        # one decision for all processes: the main process's file, loaded only if every
        # process sees it (a file that appears between two processes' checks, or a cache on
        # node-local disks that only some machines hold, means computing it again)
        seen = gather_object([(key, hit)])
        key, hit = seen[0][0], all(h for _, h in seen)
        path = cache_dir / f"ref-{key}.safetensors"
    if hit:
        return ReferenceLogps(**load_file(str(path))), True
    ref = compute()
    if accelerator.is_main_process:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{accelerator.process_index}")
        save_file({k: v.contiguous() for k, v in dataclasses.asdict(ref).items()}, str(tmp))
        tmp.replace(path)
    accelerator.wait_for_everyone()
    return ref, False
