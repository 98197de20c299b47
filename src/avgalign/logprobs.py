"""Per-sequence completion log-likelihoods from a causal LM.

For each completion y of a prompt x this computes sum_t log pi(y_t | x, y_<t) over completion tokens
only (prompt and padding excluded, the closing EOS included) and the completion token count |y|.

Two layouts of a batch of preference pairs:

- "shared_prompt" (default): one row per pair, [prompt | chosen | rejected]. A 4D attention mask
  lets chosen tokens see the prompt and earlier chosen tokens, rejected tokens see the prompt and
  earlier rejected tokens, never each other; the rejected tokens' position ids restart where the
  prompt ends. Every token is then computed exactly as in its own [prompt | completion] sequence,
  while the prompt is encoded (and backpropagated) once per pair instead of twice.
- "concat": two rows per pair, [prompt | chosen] and [prompt | rejected], as most trainers do.

Memory: logits are computed only at the positions that predict a completion token, in chunks of
at most `chunk_size` positions, so no [batch, length, vocab] tensor is ever built. Under autograd
every chunk but the last is checkpointed (its logits are freed and recomputed in the backward
pass); the last one keeps its logits until the backward pass, which starts with it, where a
recomputation would allocate the same tensor: one chunk of logits more between forward and
backward, and no recomputation at all for a batch whose completions fit in one chunk, the common
case. The short remainder chunk goes first, so the chunk that is not recomputed is a full one.
The backward pass of the log-softmax writes the logits' gradient into the saved logits
(`_PickedLogSoftmax`), allocating no further [positions, vocab] tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

LAYOUTS = ("shared_prompt", "concat")


@dataclass
class PackedBatch:
    """Token rows plus where to read each completion token's log-probability.

    Completion k (k < num_sequences) consists of the tokens `target_ids[seq_index == k]`,
    each predicted by the hidden state at flat position `source_index` of the [rows * length]
    hidden states: the previous token of the same sequence.
    """

    input_ids: torch.Tensor  # [rows, length]
    position_ids: torch.Tensor  # [rows, length]
    segment_ids: torch.Tensor  # [rows, length]: 0 prompt, 1.. completion, -1 padding
    source_index: torch.Tensor  # [num_tokens]
    target_ids: torch.Tensor  # [num_tokens]
    seq_index: torch.Tensor  # [num_tokens]
    num_sequences: int
    num_real_tokens: int  # tokens the model processes that are not padding

    def to(self, device: torch.device | str) -> PackedBatch:
        tensors = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return PackedBatch(
            **tensors, num_sequences=self.num_sequences, num_real_tokens=self.num_real_tokens
        )


def pack_rows(
    rows: Sequence[tuple[Sequence[int], Sequence[tuple[Sequence[int], int]]]], pad_id: int
) -> PackedBatch:
    """Pack rows of (prompt_ids, [(completion_ids, sequence_index), ...]) into a PackedBatch.

    Each completion of a row continues the row's prompt (positions restart at len(prompt)); the
    sequence_index says which output slot its log-likelihood goes to.
    """
    if not rows:
        raise ValueError("cannot pack an empty batch")
    width = max(len(p) + sum(len(c) for c, _ in comps) for p, comps in rows)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    segment_ids = torch.full((n_rows, width), -1, dtype=torch.long)
    source, target, seq = [], [], []
    num_sequences = 0
    for r, (prompt, comps) in enumerate(rows):
        if len(prompt) == 0:
            raise ValueError("every pair needs at least one prompt token (e.g. BOS)")
        p = len(prompt)
        input_ids[r, :p] = torch.as_tensor(prompt)
        position_ids[r, :p] = torch.arange(p)
        segment_ids[r, :p] = 0
        start = p
        for segment, (comp, k) in enumerate(comps, start=1):
            n = len(comp)
            if n == 0:
                raise ValueError("every completion needs at least one token")
            input_ids[r, start : start + n] = torch.as_tensor(comp)
            position_ids[r, start : start + n] = torch.arange(p, p + n)
            segment_ids[r, start : start + n] = segment
            base = r * width
            # first completion token is predicted by the last prompt token, the rest by their
            # predecessor within the same completion
            previous = torch.arange(start - 1, start + n - 1)
            previous[0] = p - 1
            source.append(base + previous)
            target.append(torch.as_tensor(comp, dtype=torch.long))
            seq.append(torch.full((n,), k, dtype=torch.long))
            num_sequences = max(num_sequences, k + 1)
            start += n
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        segment_ids=segment_ids,
        source_index=torch.cat(source),
        target_ids=torch.cat(target),
        seq_index=torch.cat(seq),
        num_sequences=num_sequences,
        num_real_tokens=int((segment_ids >= 0).sum()),
    )


def pack_pairs(
    prompts: Sequence[Sequence[int]],
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]],
    pad_id: int,
    layout: str = "shared_prompt",
) -> PackedBatch:
    """Pack B preference pairs; output slots 0..B-1 are chosen, B..2B-1 rejected."""
    b = len(prompts)
    if layout == "shared_prompt":
        rows = [(prompts[i], [(chosen[i], i), (rejected[i], b + i)]) for i in range(b)]
    elif layout == "concat":
        rows = [(prompts[i], [(chosen[i], i)]) for i in range(b)]
        rows += [(prompts[i], [(rejected[i], b + i)]) for i in range(b)]
    else:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    return pack_rows(rows, pad_id)


def attention_mask_4d(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [rows, 1, L, L]: query i sees key j iff j <= i, j is not padding, and j is in
    the prompt or in i's own completion. Every position sees itself, so no row is fully masked."""
    length = segment_ids.shape[1]
    idx = torch.arange(length, device=segment_ids.device)
    causal = idx[None, :] <= idx[:, None]  # [L(query), L(key)]
    seg_q = segment_ids[:, :, None]
    seg_k = segment_ids[:, None, :]
    allowed = causal & (seg_k >= 0) & ((seg_k == 0) | (seg_k == seg_q))
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=segment_ids.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def chunk_bounds(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering 0..n in chunks of at most chunk_size (0: one chunk), the
    short remainder first and every later chunk full."""
    if chunk_size <= 0 or n <= chunk_size:
        return [(0, n)]
    first = n % chunk_size or chunk_size
    return [(0, first)] + [(s, s + chunk_size) for s in range(first, n, chunk_size)]


class _PickedLogSoftmax(torch.autograd.Function):
    """log_softmax(logits)[i, targets[i]] for logits [n, vocab], with a lean backward pass.

    The gradient with respect to the logits, g_i * (onehot(targets_i) - softmax(logits_i)), is
    written into the saved logits tensor in place: the backward pass allocates no [n, vocab]
    tensor (autograd's own gather + logsumexp backward allocates three). The price: backward can
    run once per forward (no retain_graph), and nothing else may hold on to `logits`.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.consumed = False
        return logits.gather(-1, targets[:, None]).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.consumed:
            raise RuntimeError("the completion log-probs support one backward pass per forward")
        ctx.consumed = True
        logits, targets, lse = ctx.saved_tensors
        g = logits.sub_(lse[:, None]).exp_().mul_(-grad[:, None])  # -g_i * softmax, in place
        g.scatter_add_(-1, targets[:, None], grad[:, None])
        return g, None


def _token_logps(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None
):
    """log pi(target | position) for each row of `hidden` [n, d]: logits of the LM head, in
    float32, log-softmax picked at the targets (after the final-logit soft cap, if any)."""
    logits = head(hidden).float()
    if softcap:  # the gradient through the cap needs the capped logits: autograd's own ops
        logits = torch.tanh(logits / softcap) * softcap
        picked = logits.gather(-1, targets[:, None]).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)
    return _PickedLogSoftmax.apply(logits, targets)


class CompletionLogProbs(nn.Module):
    """Wraps a causal LM (or a peft model around one); forward(batch) -> (summed logps, counts).

    `chunk_size`: LM-head positions per chunk (0: all at once); bounds the logits memory to
    chunk_size x vocab floats. Under autograd, backward may run once per forward.

    Being an nn.Module whose forward does the whole computation, it is what gets wrapped by
    Accelerate (DDP / FSDP), so gradient synchronisation sees a normal forward call.
    """

    def __init__(self, lm: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        decoder, head = base.get_decoder(), base.get_output_embeddings()
        if decoder is base or head is None:
            raise ValueError(f"{type(base).__name__} does not expose a decoder and an LM head")
        # a plain tuple, so the submodules are not registered twice (they live under self.lm)
        self._parts = (decoder, head)
        self._softcap = getattr(base.config, "final_logit_softcapping", None)
        if getattr(base.config, "logit_scale", None) not in (None, 1.0):
            raise ValueError("models with a logit_scale are not supported")

    def forward(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        decoder, head = self._parts
        dtype = next(head.parameters()).dtype
        hidden = decoder(
            input_ids=batch.input_ids,
            attention_mask=attention_mask_4d(batch.segment_ids, dtype),
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])[batch.source_index]
        bounds = chunk_bounds(hidden.shape[0], self.chunk_size)
        pieces = []
        for i, (start, stop) in enumerate(bounds):
            h, t = hidden[start:stop], batch.target_ids[start:stop]
            if torch.is_grad_enabled() and i < len(bounds) - 1:
                pieces.append(
                    checkpoint(_token_logps, head, h, t, self._softcap, use_reentrant=False)
                )
            else:
                pieces.append(_token_logps(head, h, t, self._softcap))
        token_logps = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        sums = torch.zeros(batch.num_sequences, dtype=token_logps.dtype, device=token_logps.device)
        sums = sums.index_add(0, batch.seq_index, token_logps)
        counts = torch.bincount(batch.seq_index, minlength=batch.num_sequences)
        return sums, counts


@torch.no_grad()
def sequence_logps(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and token counts of independent (prompt, completion) pairs."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError("prompt_ids and completion_ids must have the same length")
    scorer = model if isinstance(model, CompletionLogProbs) else CompletionLogProbs(model)
    device = next(scorer.parameters()).device
    was_training = scorer.training
    scorer.eval()
    sums, counts = [], []
    for start in range(0, len(prompt_ids), batch_size):
        stop = min(start + batch_size, len(prompt_ids))
        rows = [(prompt_ids[i], [(completion_ids[i], i - start)]) for i in range(start, stop)]
        s, c = scorer(pack_rows(rows, pad_id).to(device))
        sums.append(s.float().cpu())
        counts.append(c.cpu())
    scorer.train(was_training)
    return torch.cat(sums), torch.cat(counts)
