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
  Rows holding one sequence are right-padded and given to the model with a plain 2D padding mask,
  so the model builds its own attention masks and positions exactly as in `model(input_ids)`.

Exactness. The shared-prompt mask is the model's own attention rule, taken from transformers
(`causal_mask_function`, `sliding_window_causal_mask_function`) and evaluated on position ids
instead of row indices, intersected with the segment rule above; one mask per kind of layer the
config declares (`layer_types`: full or sliding-window attention), passed as the mapping the
decoder accepts. Where a model's attention is of a kind this cannot express (chunked or linear
attention, an attention implementation without additive masks, no `position_ids` input),
`AttentionSpec.shared_prompt_problem` says why and callers fall back to "concat". The LM head is
applied by hand (see Memory) with the model's own logit post-processing: Cohere's `logit_scale`,
Granite's `logits_scaling`, the final-logit soft cap of Gemma-2/3. `check_against_model` compares
the result with `model(input_ids).logits` on real pairs; the trainer runs it on the first batch.

Flex attention. Under `attn_implementation="flex_attention"` (see `use_flex_attention`) the same
rule goes to the model as a `BlockMask` instead (`shared_prompt_block_mask`): its mask_mod is the
rule above, evaluated element-wise inside the attention kernel, and only which 128 x 128 blocks
are empty, partial or full is stored, so no [L, L] tensor is built, not even while the block mask
is made (query blocks are classified one at a time). Memory grows with L (times L / 128 for the
block table), not L^2, and on CUDA the attention is a fused kernel that skips empty blocks, such
as the rejected completion's queries against the chosen completion's keys. PyTorch's flex
attention has no backward pass on CPU: it is a CUDA (training) or CPU inference path.

Split attention. Under `attention.SPLIT_ATTENTION` (see `use_split_attention`) a shared-prompt
batch goes to the model with no mask at all: the layout (`attention.SplitLayout`) rides along as
a keyword argument, and each completion's attention is a causal SDPA pass over its own
[prompt | completion], which is what the mask expresses, computed without the masked products.
A batch whose sliding window hides part of a sequence gets the dense mask instead.

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

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

from .attention import SPLIT_ATTENTION, SplitLayout

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask
except ImportError:  # pragma: no cover - older torch: no flex attention
    BlockMask = None

LAYOUTS = ("shared_prompt", "concat")
# attention kinds the shared-prompt mask reproduces, as named in a config's `layer_types`
_MASKED_KINDS = ("full_attention", "sliding_attention")
# attention implementations that take an additive [rows, 1, L, L] mask as given
_ADDITIVE_MASK_IMPLEMENTATIONS = ("eager", "sdpa", SPLIT_ATTENTION)
# attention implementations that take the mask as a flex-attention BlockMask
FLEX_ATTENTION = "flex_attention"
# the block size of the BlockMask, torch's default: queries x keys per tile of the block table
FLEX_BLOCK_SIZE = 128


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
    shared: bool = False  # some row holds several completions (the shared-prompt layout)
    longest_sequence: int = 0  # tokens of the longest prompt + completion sequence

    def to(self, device: torch.device | str) -> PackedBatch:
        values = vars(self).items()
        return PackedBatch(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in values})


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
    num_sequences = longest = 0
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
            longest = max(longest, p + n)
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
        shared=any(len(comps) > 1 for _, comps in rows),
        longest_sequence=longest,
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


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft model (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _decoder(base: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (base itself when there is none). transformers'
    get_decoder misses a few layouts, e.g. Llama-4's text model under `.model`."""
    decoder = base.get_decoder()
    if decoder is base and isinstance(getattr(base, "model", None), nn.Module):
        return base.model
    return decoder


MaskRule = Callable[..., torch.Tensor]  # transformers' (batch, head, q, kv) -> allowed


@dataclass(frozen=True)
class AttentionSpec:
    """What a packed batch must know of a model's self-attention: the kind of each layer
    ("full_attention" or "sliding_attention", as in a config's `layer_types`), the window of the
    sliding layers, why the shared-prompt layout cannot reproduce it (None: it can), and whether
    the shared-prompt mask goes to the model as a flex-attention BlockMask (the model runs
    `flex_attention`) rather than as an additive float mask (eager, sdpa)."""

    layer_types: tuple[str, ...]
    sliding_window: int | None
    shared_prompt_problem: str | None
    block_mask: bool = False
    split: bool = False

    @classmethod
    def of(cls, model: nn.Module, implementation: str | None = None) -> AttentionSpec:
        """Read from the config of a causal LM (or of the base model of a peft model). Layers
        without `layer_types` are sliding-window layers when the config sets `sliding_window`, as
        in Mistral, Mixtral and Phi-3. `implementation`: the attention implementation to assume
        instead of the config's."""
        base = _base_model(model)
        config = base.config
        window = getattr(config, "sliding_window", None)
        n = getattr(config, "num_hidden_layers", 1)
        layer_types = getattr(config, "layer_types", None) or [
            "sliding_attention" if window is not None else "full_attention"
        ] * n
        problem = None
        implementation = implementation or getattr(config, "_attn_implementation", None) or "eager"
        unknown = sorted(set(layer_types) - set(_MASKED_KINDS))
        if unknown:
            problem = f"its layers include {', '.join(unknown)}"
        elif getattr(config, "attention_chunk_size", None):
            problem = "it uses chunked attention"
        elif getattr(config, "use_bidirectional_attention", False):
            problem = "it uses bidirectional attention"
        elif getattr(config, "alibi", False):
            problem = "its ALiBi biases are built from a 2D mask"
        elif implementation not in (*_ADDITIVE_MASK_IMPLEMENTATIONS, FLEX_ATTENTION):
            problem = f"attention implementation {implementation!r} takes no custom mask"
        elif implementation == FLEX_ATTENTION and BlockMask is None:
            problem = "this torch has no flex attention"
        elif "position_ids" not in inspect.signature(_decoder(base).forward).parameters:
            problem = "its decoder takes no position_ids"
        if "sliding_attention" in layer_types and window is None:
            problem = problem or "it has sliding-window layers but no sliding_window"
        return cls(
            tuple(layer_types),
            window,
            problem,
            block_mask=implementation == FLEX_ATTENTION,
            split=implementation == SPLIT_ATTENTION,
        )

    def rule(self, layer_type: str, longest_sequence: int) -> MaskRule:
        """The model's own attention rule for one kind of layer, from transformers. A window
        wider than the longest sequence hides nothing: the plain causal rule, so that such a
        batch needs one mask."""
        if layer_type == "sliding_attention" and longest_sequence > self.sliding_window:
            return sliding_window_causal_mask_function(self.sliding_window)
        return causal_mask_function


def _shared_prompt_allowed(
    segments: torch.Tensor,
    positions: torch.Tensor,
    rule: MaskRule,
    row: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
) -> torch.Tensor:
    """Whether query token `query` of row `row` may see key token `key` in the shared-prompt
    layout: the model's rule allows it on their *positions* (so that a later completion, whose
    positions restart after the prompt, is treated as if it alone followed the prompt), the key
    is not padding, and it is in the prompt or in the query's own completion; every token sees
    itself, so no query is fully masked. The index tensors broadcast against each other (the
    dense mask) or are scalars (a flex-attention mask_mod): one definition for both masks."""
    seg_q, seg_k = segments[row, query], segments[row, key]
    allowed = rule(row, None, positions[row, query], positions[row, key])
    allowed = allowed & (seg_k >= 0) & ((seg_k == 0) | (seg_k == seg_q))
    return allowed | (query == key)


def shared_prompt_mask(batch: PackedBatch, rule: MaskRule, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [rows, 1, L, L] for rows [prompt | completion | completion ...], 0 where
    `_shared_prompt_allowed`, the dtype's minimum elsewhere."""
    seg, pos = batch.segment_ids, batch.position_ids
    rows, length = seg.shape
    index = torch.arange(length, device=seg.device)
    row = torch.arange(rows, device=seg.device)[:, None, None]
    allowed = _shared_prompt_allowed(seg, pos, rule, row, index[:, None], index[None, :])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def shared_prompt_block_mask(
    batch: PackedBatch, rule: MaskRule, block_size: int = FLEX_BLOCK_SIZE
) -> BlockMask:
    """The mask of `shared_prompt_mask` as a flex-attention BlockMask [rows, 1, L, L].

    Its mask_mod is `_shared_prompt_allowed` on the batch's segment and position ids (padded to
    whole blocks with padding tokens, so the kernel's indices past L stay in bounds). Which
    block_size x block_size tiles are empty (skipped), full (the kernel skips the mask_mod) or
    partial is found one query block at a time, so making it holds [rows, block_size, L] booleans
    at most, not [rows, L, L] as torch's `create_block_mask` does unless compiled. A tile that
    reaches past L counts as partial, as in `create_block_mask`.
    """
    if BlockMask is None:
        raise RuntimeError("flex attention needs torch >= 2.5")
    seg, pos = batch.segment_ids, batch.position_ids
    rows, length = seg.shape
    device = seg.device
    n_blocks = -(-length // block_size)
    extra = n_blocks * block_size - length
    segments = torch.nn.functional.pad(seg, (0, extra), value=-1)
    positions = torch.nn.functional.pad(pos, (0, extra), value=0)

    def mask_mod(b, h, q_idx, kv_idx):
        return _shared_prompt_allowed(segments, positions, rule, b, q_idx, kv_idx)

    keys = torch.arange(n_blocks * block_size, device=device)
    key_real = keys < length
    row = torch.arange(rows, device=device)[:, None, None]
    any_seen = torch.empty(rows, n_blocks, n_blocks, dtype=torch.bool, device=device)
    all_seen = torch.empty_like(any_seen)
    for i in range(n_blocks):
        queries = keys[i * block_size : (i + 1) * block_size, None]
        allowed = _shared_prompt_allowed(segments, positions, rule, row, queries, keys[None])
        allowed = allowed & key_real & (queries < length)  # [rows, block_size, padded L]
        tiles = allowed.view(rows, block_size, n_blocks, block_size)
        any_seen[:, i] = tiles.any(dim=3).any(dim=1)
        all_seen[:, i] = tiles.all(dim=3).all(dim=1)

    def ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # per query block: how many key blocks, and their indices first (BlockMask's layout)
        blocks = blocks[:, None].to(torch.int32)  # [rows, 1 (heads), q blocks, kv blocks]
        count = blocks.sum(dim=-1, dtype=torch.int32)
        order = torch.argsort(blocks, dim=-1, descending=True, stable=True).to(torch.int32)
        return count.contiguous(), order.contiguous()

    partial_count, partial_index = ordered(any_seen & ~all_seen)
    full_count, full_index = ordered(all_seen)
    return BlockMask.from_kv_blocks(
        partial_count,
        partial_index,
        full_count,
        full_index,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(length, length),
    )


def flex_attention_problem(model: nn.Module, device: torch.device | str) -> str | None:
    """Why a causal LM (or a peft model around one) is not to be trained on `device` with
    `attn_implementation="flex_attention"` and the shared-prompt BlockMask; None when it can be.

    Flex attention is offered on CUDA only (PyTorch's flex attention has no backward pass on
    CPU), for architectures whose transformers code supports it, without attention dropout
    (transformers' flex attention refuses it), with heads of 16 dimensions or more (the least
    torch's CUDA kernels take), and where the shared-prompt layout is exact under
    it (`AttentionSpec.shared_prompt_problem`: else the batches would be packed in "concat", and
    the BlockMask would not be used)."""
    base = _base_model(model)
    kind = torch.device(device).type
    if BlockMask is None:
        return "this torch has no flex attention"
    if kind != "cuda":
        return f"flex attention is used on CUDA only, not {kind} (it has no backward pass on CPU)"
    if not getattr(base, "_supports_flex_attn", False):
        return f"transformers' {type(base).__name__} does not support flex attention"
    if not hasattr(base, "set_attn_implementation"):
        return "this transformers cannot switch a loaded model's attention implementation"
    config = base.config
    dropout = getattr(config, "attention_dropout", 0.0) or 0.0
    if dropout > 0:
        return f"its attention dropout ({dropout}) is not supported by flex attention"
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // heads if heads and getattr(config, "hidden_size", None) else None
    )
    if head_dim is not None and head_dim < 16:
        return f"its head dimension ({head_dim}) is below the 16 torch's flex kernels need"
    return AttentionSpec.of(base, implementation=FLEX_ATTENTION).shared_prompt_problem


def use_flex_attention(model: nn.Module, device: torch.device | str) -> bool:
    """Switch a loaded causal LM (or the base model of a peft model) to flex attention where
    `flex_attention_problem` finds none, and say whether it now runs flex attention. Call it
    before wrapping the model in CompletionLogProbs, which then passes the shared-prompt mask as
    a BlockMask (see AttentionSpec.block_mask); otherwise the model is left as it is."""
    base = _base_model(model)
    if getattr(base.config, "_attn_implementation", None) == FLEX_ATTENTION:
        return True
    if flex_attention_problem(base, device) is not None:
        return False
    base.set_attn_implementation(FLEX_ATTENTION)
    return base.config._attn_implementation == FLEX_ATTENTION


def split_attention_problem(model: nn.Module) -> str | None:
    """Why a causal LM (or a peft model around one) is not to compute the shared-prompt layout
    as causal attention passes (`attention.SPLIT_ATTENTION`); None when it can. Split attention
    reproduces transformers' SDPA attention, so the model must run "sdpa", without attention
    soft-capping, and be one whose shared-prompt mask it could be given (AttentionSpec); batches
    whose sliding window hides part of a sequence still get the dense mask."""
    base = _base_model(model)
    implementation = getattr(base.config, "_attn_implementation", None)
    if implementation == SPLIT_ATTENTION:
        return None
    if getattr(base.config, "attn_logit_softcapping", None):
        return "its attention logits are soft-capped"
    if implementation != "sdpa":
        return f"it runs {implementation!r} attention; split attention reproduces 'sdpa'"
    if not hasattr(base, "set_attn_implementation"):
        return "this transformers cannot switch a loaded model's attention implementation"
    can_switch = getattr(base, "_can_set_attn_implementation", None)  # transformers' own test
    if can_switch is not None and not can_switch():
        return "its attention layers do not call transformers' AttentionInterface"
    return AttentionSpec.of(base, implementation=SPLIT_ATTENTION).shared_prompt_problem


def use_split_attention(model: nn.Module) -> str | None:
    """Switch a loaded causal LM (or the base model of a peft model) to split attention where
    `split_attention_problem` finds none; returns the problem (None: it now runs split
    attention). Anything but a shared-prompt batch then runs exactly as under "sdpa"."""
    problem = split_attention_problem(model)
    base = _base_model(model)
    implementation = base.config._attn_implementation
    if problem is not None:
        return problem
    if base.config._attn_implementation != SPLIT_ATTENTION:
        try:
            base.set_attn_implementation(SPLIT_ATTENTION)
        except ValueError as error:
            return f"transformers refused to switch it: {error}"
    if base.config._attn_implementation != SPLIT_ATTENTION:  # it only warns for some models
        return "its attention layers do not call transformers' AttentionInterface"
    calls, layers = _split_attention_probe(base)
    if calls != layers:
        base.set_attn_implementation(implementation)
        return f"its layers do not pass the layout to the attention function ({calls} of {layers})"
    return None


@torch.no_grad()
def _split_attention_probe(base: nn.Module) -> tuple[int, int]:
    """(attention calls that received the layout, attention layers) for one 3-token pair."""
    batch = pack_pairs([[0]], [[0]], [[0]], pad_id=0).to(next(base.parameters()).device)
    split = SplitLayout.of(batch.segment_ids)
    _decoder(base)(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        use_cache=False,
        shared_prompt_split=split,
    )
    return split.calls[0], len(AttentionSpec.of(base).layer_types)


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


@dataclass(frozen=True)
class LogitTransform:
    """What a model's causal-LM forward does to the LM head's output before the softmax:
    logits * scale (Cohere's `logit_scale`, 1 / Granite's `logits_scaling`, Falcon-H1's
    `lm_head_multiplier`), then the final-logit soft cap of Gemma-2 and Gemma-3,
    cap * tanh(logits / cap)."""

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, config) -> LogitTransform:
        scale = 1.0
        if getattr(config, "logit_scale", None) is not None:
            scale *= float(config.logit_scale)
        if getattr(config, "logits_scaling", None) is not None:
            scale /= float(config.logits_scaling)
        if getattr(config, "lm_head_multiplier", None) is not None:
            scale *= float(config.lm_head_multiplier)
        return cls(scale, getattr(config, "final_logit_softcapping", None) or None)


def _token_logps(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, transform: LogitTransform
):
    """log pi(target | position) for each row of `hidden` [n, d]: logits of the LM head, in
    float32, post-processed as the model does, log-softmax picked at the targets."""
    logits = head(hidden).float()
    if transform.scale != 1.0:
        logits = logits * transform.scale
    if transform.softcap:  # the gradient through the cap needs the capped logits: autograd's ops
        cap = transform.softcap
        logits = torch.tanh(logits / cap) * cap
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
        base = _base_model(lm)
        decoder, head = _decoder(base), base.get_output_embeddings()
        if decoder is base or head is None:
            raise ValueError(f"{type(base).__name__} does not expose a decoder and an LM head")
        # a plain tuple, so the submodules are not registered twice (they live under self.lm)
        self._parts = (decoder, head)
        self.attention = AttentionSpec.of(base)
        self.logit_transform = LogitTransform.of(base.config)
        self.architecture = type(base).__name__

    def layout_for(self, requested: str) -> str:
        """The layout to pack batches in: the requested one, or "concat" where the shared-prompt
        layout cannot be exact for this model (see AttentionSpec.shared_prompt_problem)."""
        if requested not in LAYOUTS:
            raise ValueError(f"unknown layout {requested!r}; expected one of {LAYOUTS}")
        if requested == "shared_prompt" and self.attention.shared_prompt_problem:
            return "concat"
        return requested

    def _attention_inputs(self, batch: PackedBatch, dtype: torch.dtype) -> dict:
        if not batch.shared:
            # one right-padded sequence per row: the model's own masks and positions
            return {"attention_mask": (batch.segment_ids >= 0).long()}
        if self.attention.shared_prompt_problem:
            raise ValueError(
                f"the shared_prompt layout cannot be exact for {self.architecture}: "
                f"{self.attention.shared_prompt_problem}; use the concat layout"
            )
        rules = {
            kind: self.attention.rule(kind, batch.longest_sequence)
            for kind in self.attention.layer_types
        }
        if self.attention.split and set(rules.values()) == {causal_mask_function}:
            split = SplitLayout.of(batch.segment_ids)
            return {"position_ids": batch.position_ids, "shared_prompt_split": split}
        masks = {}  # one mask per distinct rule, shared by the kinds of layer that use it
        for rule in rules.values():
            if rule not in masks:
                if self.attention.block_mask:
                    masks[rule] = shared_prompt_block_mask(batch, rule)
                else:
                    masks[rule] = shared_prompt_mask(batch, rule, dtype)
        if len(masks) == 1:
            mask = next(iter(masks.values()))
        else:  # per kind of layer, as the decoder's own mask mapping
            mask = {kind: masks[rule] for kind, rule in rules.items()}
        return {"attention_mask": mask, "position_ids": batch.position_ids}

    def forward(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        decoder, head = self._parts
        dtype = next(head.parameters()).dtype
        inputs = self._attention_inputs(batch, dtype)
        hidden = decoder(input_ids=batch.input_ids, use_cache=False, **inputs).last_hidden_state
        split = inputs.get("shared_prompt_split")
        if split is not None and split.calls[0] != len(self.attention.layer_types):
            raise RuntimeError(
                f"split attention ran in {split.calls[0]} of {self.architecture}'s "
                f"{len(self.attention.layer_types)} attention layers: its layers do not pass "
                f"the decoder's keyword arguments to the attention function; use "
                f"train.attention=model"
            )
        hidden = hidden.reshape(-1, hidden.shape[-1])[batch.source_index]
        bounds = chunk_bounds(hidden.shape[0], self.chunk_size)
        pieces = []
        for i, (start, stop) in enumerate(bounds):
            h, t = hidden[start:stop], batch.target_ids[start:stop]
            if torch.is_grad_enabled() and i < len(bounds) - 1:
                pieces.append(
                    checkpoint(_token_logps, head, h, t, self.logit_transform, use_reentrant=False)
                )
            else:
                pieces.append(_token_logps(head, h, t, self.logit_transform))
        token_logps = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        sums = torch.zeros(batch.num_sequences, dtype=token_logps.dtype, device=token_logps.device)
        sums = sums.index_add(0, batch.seq_index, token_logps)
        counts = torch.bincount(batch.seq_index, minlength=batch.num_sequences)
        return sums, counts


def model_logp(lm: nn.Module, prompt: Sequence[int], completion: Sequence[int]) -> float:
    """log pi(completion | prompt) from the model's own forward pass on the lone, unpadded
    sequence, `lm(input_ids).logits`, summed in float64: what the layouts must reproduce."""
    device = next(lm.parameters()).device
    ids = torch.tensor([list(prompt) + list(completion)], device=device)
    kwargs = {}
    if "logits_to_keep" in inspect.signature(lm.forward).parameters:
        kwargs["logits_to_keep"] = len(completion) + 1  # the positions that predict completion
    logits = lm(input_ids=ids, use_cache=False, **kwargs).logits[0, -len(completion) - 1 : -1]
    logp = torch.log_softmax(logits.double(), dim=-1)
    return float(logp.gather(-1, torch.tensor(completion, device=device)[:, None]).sum())


@dataclass(frozen=True)
class SelfCheck:
    """Summed completion log-probs of the training path against the model's forward pass:
    the largest |ours - model| / max(|model|, 1) over the checked sequences."""

    layout: str
    relative_error: float
    sequences: int
    seconds: float


@torch.no_grad()
def check_against_model(
    scorer: CompletionLogProbs,
    pairs: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
    *,
    pad_id: int,
    layout: str,
) -> SelfCheck:
    """Pack (prompt, chosen, rejected) token-id pairs in `layout` as training does (several pairs:
    padding included), and compare each completion's log-prob with `model_logp`. Dropout is off
    for the check (eval mode); the caller chooses the autocast context."""
    t0 = time.perf_counter()
    lm = scorer.lm
    was_training = lm.training
    lm.eval()
    try:
        device = next(lm.parameters()).device
        prompts, chosen, rejected = (list(column) for column in zip(*pairs))
        sums, _ = scorer(pack_pairs(prompts, chosen, rejected, pad_id, layout).to(device))
        expected = torch.tensor(
            [model_logp(lm, p, c) for comps in (chosen, rejected) for p, c in zip(prompts, comps)],
            dtype=torch.float64,
        )
    finally:
        lm.train(was_training)
    error = (sums.double().cpu() - expected).abs() / expected.abs().clamp(min=1.0)
    return SelfCheck(layout, float(error.max()), len(expected), time.perf_counter() - t0)


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
