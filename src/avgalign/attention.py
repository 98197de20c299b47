"""The shared-prompt layout computed as causal attention passes ("split" attention).

A shared-prompt row is [prompt | completion 1 | completion 2 ...]: every completion sees the
prompt and its own earlier tokens, never another completion. Given as a dense [L, L] mask, the
attention kernel computes every query against every key, masked or not: PyTorch's CPU flash
kernel skips the upper triangle only under `is_causal`, and CUDA's flash kernels take no mask
at all. Yet each completion's attention *is* causal attention over its own sequence
[prompt | completion k]. So this module computes it that way:

- pass 1: queries, keys and values of the row's prefix [prompt | completion 1], as they lie in
  the row, with `is_causal=True`; its outputs are kept for the prompt and completion 1;
- pass k (k >= 2): the row's [prompt | completion k] gathered into a right-padded sequence, with
  `is_causal=True`; its outputs are kept for completion k and scattered back to its place.

No mask is built or read; the prompt's keys are attended by every completion, and its queries
(cheap: a prompt is attended causally) are recomputed once per extra completion. Queries beyond a
row's own sequence in a pass (padding, another completion) see only earlier keys and are thrown
away, so they never affect a kept output. For a pair with prompt P and completions C, R this is
(P + C)^2 / 2 + (P + R)^2 / 2 query-key products instead of (P + C + R)^2.

It runs as a transformers attention implementation, `SPLIT_ATTENTION`, registered with
`AttentionInterface` (and with SDPA's mask function, so that anything else, such as generation or
a padded single-sequence batch, runs exactly as under "sdpa"): the model's attention layers call
`split_attention_forward` after their projections and rotary embeddings, and the layout arrives
as the keyword argument `shared_prompt_split` that the decoder passes down to its attention
layers. Each call is counted (`SplitLayout.calls`), so a model whose layers do not pass the
argument through is caught (`CompletionLogProbs` raises) rather than trained on the wrong
attention. It reproduces SDPA's computation only where every layer of the batch attends causally
(no sliding window narrower than the longest sequence, no soft cap, no attention sinks): callers
check `AttentionSpec` first and pass the dense mask otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

SPLIT_ATTENTION = "avgalign_split_sdpa"


@dataclass
class SplitLayout:
    """Where each pass of split attention reads and writes, for a batch of shared-prompt rows.

    `first_width`: the width of pass 1 (the longest [prompt | completion 1] of the batch).
    `extra`: one entry per further completion k >= 2: (gather [rows, width_k], the row positions
    that make up [prompt | completion k], right-padded with 0; mine [rows, L], True at completion
    k's tokens; back [rows, L], where in pass k's output each of those tokens is, 0 elsewhere).
    """

    first_width: int
    extra: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    calls: list[int] = field(default_factory=lambda: [0])  # attention calls made with it

    @classmethod
    def of(cls, segment_ids: torch.Tensor) -> SplitLayout:
        """From a batch's segment ids [rows, L] (0 prompt, 1.. completions in row order, -1
        padding), as laid out by `logprobs.pack_rows`: each row's prompt, then its completions."""
        seg = segment_ids.cpu()
        rows, length = seg.shape
        prompt = (seg == 0).sum(dim=1)
        first = prompt + (seg == 1).sum(dim=1)
        extra = []
        for k in range(2, int(seg.max()) + 1):
            mine = seg == k
            size = mine.sum(dim=1)
            width = int((prompt + size).max())
            gather = torch.zeros(rows, width, dtype=torch.long)
            back = torch.zeros(rows, length, dtype=torch.long)
            for r in range(rows):
                p, n = int(prompt[r]), int(size[r])
                where = mine[r].nonzero().squeeze(1)
                gather[r, :p] = torch.arange(p)
                gather[r, p : p + n] = where
                back[r, where] = torch.arange(p, p + n)
            extra.append((gather, mine, back))
        device = segment_ids.device
        moved = [tuple(t.to(device) for t in entry) for entry in extra]
        return cls(int(first.max()), moved)


def _causal(query, key, value, groups: int, dropout: float, scaling: float | None):
    """SDPA with is_causal; query [rows, heads, n, d], key and value [rows, heads / groups, n,
    d], repeated per group as transformers' SDPA attention does; returns [rows, n, heads, d]."""
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout, scale=scaling, is_causal=True
    )
    return out.transpose(1, 2)


def split_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    shared_prompt_split: SplitLayout | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [rows, heads, L, d], key and value
    [rows, kv heads, L, d]; returns ([rows, L, heads, d], None). Without a `shared_prompt_split`
    this is transformers' SDPA attention, mask and all."""
    split = shared_prompt_split
    if split is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            is_causal=is_causal, **kwargs,
        )
    for name in ("softcap", "sinks", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"split attention cannot reproduce attention with {name}")
    if getattr(module, "is_causal", True) is False or is_causal is False:
        raise ValueError("split attention reproduces causal self-attention only")
    groups = getattr(module, "num_key_value_groups", 1)
    heads, length = query.shape[1], query.shape[2]
    w = split.first_width
    first = _causal(query[:, :, :w], key[:, :, :w], value[:, :, :w], groups, dropout, scaling)
    out = torch.nn.functional.pad(first, (0, 0, 0, 0, 0, length - w))
    for gather, mine, back in split.extra:
        picked = [
            t.gather(2, gather[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))
            for t in (query, key, value)
        ]
        kth = _causal(*picked, groups, dropout, scaling)
        placed = kth.gather(1, back[:, :, None, None].expand(-1, -1, heads, kth.shape[3]))
        out = torch.where(mine[:, :, None, None], placed, out)
    split.calls[0] += 1
    return out.contiguous(), None


AttentionInterface.register(SPLIT_ATTENTION, split_attention_forward)
AttentionMaskInterface.register(SPLIT_ATTENTION, sdpa_mask)
