"""Bradley-Terry reward models: a scalar head on a causal-LM backbone, trained on preference pairs.

The trained folder is what `avgalign.evaluation.load_scorer` reads, so the study can score
generations with a reward model it trained itself. Texts are built and tokenized exactly as the
scorer does (evaluation.encode_reward_inputs), so training and scoring see the same inputs.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

# re-exported from its torch-free home, where the CLI builds it
from .evaluation import (
    encode_reward_inputs,
    prepare_reward_model,
    require_scalar_head,
    reward_model_scores,
    win_rate,
)
from .seeding import seeded
from .tracking import MetricsLog

PairTexts = tuple[str, str, str]  # (prompt, chosen, rejected)


@dataclass
class RewardModelResult:
    """Held-out pairwise accuracy P(r(x, y_w) > r(x, y_l)) with its bootstrap interval."""

    accuracy: float
    lo: float
    hi: float
    n_eval: int
    n_train: int
    epochs: int
    train_loss: list[float] = field(default_factory=list)  # mean Bradley-Terry loss per epoch
    out_dir: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
) -> torch.Tensor:
    """Negative log-likelihood of the preferences under Bradley-Terry, batch mean:

    L = -mean_i log sigmoid(r(x_i, y_w,i) - r(x_i, y_l,i))
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def as_pair_texts(pairs: Sequence) -> list[PairTexts]:
    """(prompt, chosen, rejected) tuples from tuples or objects with those attributes
    (avgalign.data.PreferenceExample)."""
    out = []
    for pair in pairs:
        if isinstance(pair, tuple | list):
            prompt, chosen, rejected = pair
        else:
            prompt, chosen, rejected = pair.prompt, pair.chosen, pair.rejected
        out.append((str(prompt), str(chosen), str(rejected)))
    return out


def split_by_prompt(
    pairs: Sequence[PairTexts], eval_fraction: float, seed: int
) -> tuple[list[PairTexts], list[PairTexts]]:
    """Hold out about `eval_fraction` of the distinct prompts (with all their pairs), so that no
    prompt is seen in training and in evaluation."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    prompts = list(dict.fromkeys(p for p, _, _ in pairs))
    random.Random(seed).shuffle(prompts)
    n_eval = max(1, round(eval_fraction * len(prompts)))
    if n_eval >= len(prompts):
        raise ValueError(f"need at least 2 distinct prompts to hold some out, got {len(prompts)}")
    held_out = set(prompts[:n_eval])
    train = [pair for pair in pairs if pair[0] not in held_out]
    return train, [pair for pair in pairs if pair[0] in held_out]


def _load_backbone(backbone):
    from transformers import AutoModelForSequenceClassification

    from .models import resolve_model_path

    if not isinstance(backbone, str | Path):
        require_scalar_head(backbone.config)
        return backbone
    # the causal LM's weights are kept, its LM head dropped and a fresh scalar head added
    return AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(str(backbone)), num_labels=1, trust_remote_code=False
    )


def fit_bradley_terry(
    model,
    tokenizer,
    train: list[PairTexts],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    max_length: int,
    seed: int,
    progress: bool,
    log: MetricsLog | None = None,
) -> list[float]:
    """AdamW on the Bradley-Terry loss, pairs shuffled by `seed` each epoch; returns the mean
    loss of each epoch. With `log`, one record per step (split "train", step, epoch, loss)."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    order_rng = random.Random(seed)
    epoch_losses = []
    steps_per_epoch = (len(train) + batch_size - 1) // batch_size
    bar = tqdm(total=epochs * steps_per_epoch, desc="reward model", disable=not progress)
    model.train()
    for epoch in range(epochs):
        order = list(range(len(train)))
        order_rng.shuffle(order)
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = [train[i] for i in order[start : start + batch_size]]
            prompts = [p for p, _, _ in batch]
            # chosen and rejected in one forward: rows [0, B) chosen, [B, 2B) rejected
            input_ids, attention_mask = encode_reward_inputs(
                tokenizer,
                prompts + prompts,
                [c for _, c, _ in batch] + [r for _, _, r in batch],
                max_length=max_length,
            )
            rewards = model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
            ).logits[:, 0]
            loss = bradley_terry_loss(rewards[: len(batch)], rewards[len(batch) :])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if log is not None:
                step = epoch * steps_per_epoch + start // batch_size + 1
                log.write({"split": "train", "step": step, "epoch": epoch, "loss": loss.item()})
        epoch_losses.append(total / len(train))
    bar.close()
    return epoch_losses


def train_reward_model(
    backbone_path_or_model,
    tokenizer,
    train_pairs: Sequence,
    eval_pairs: Sequence,
    *,
    epochs: int = 1,
    lr: float = 1e-5,
    batch_size: int = 8,
    max_length: int = 512,
    seed: int = 0,
    out_dir: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
) -> RewardModelResult:
    """Fit r(x, y) by minimising the Bradley-Terry loss with AdamW; report held-out accuracy.

    backbone_path_or_model: a causal-LM folder / hub id (a single-output sequence-classification
    head is put on it) or a sequence-classification model with num_labels == 1. tokenizer: None
    loads the backbone folder's. Texts are cut to their first max_length tokens. With out_dir, the
    model (safetensors), its tokenizer and reward_model.json are saved there, ready for
    load_scorer(out_dir).
    """
    if tokenizer is None:
        if not isinstance(backbone_path_or_model, str | Path):
            raise ValueError("a tokenizer is needed when the backbone is given as a model")
        from transformers import AutoTokenizer

        from .models import resolve_model_path

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(str(backbone_path_or_model)))
    train, held_out = as_pair_texts(train_pairs), as_pair_texts(eval_pairs)
    if not train or not held_out:
        raise ValueError(
            f"need training and evaluation pairs, got {len(train)} and {len(held_out)}"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    # the new head's initialisation and the dropout masks, from the run's own seed: the
    # caller's random streams are left as they were
    with seeded(seed, device):
        model = prepare_reward_model(_load_backbone(backbone_path_or_model), tokenizer).to(device)
        log = None
        if out_dir is not None:  # a fresh record of this fit's steps
            (Path(out_dir) / "metrics.jsonl").unlink(missing_ok=True)
            log = MetricsLog(Path(out_dir) / "metrics.jsonl")
        with log or contextlib.nullcontext():
            epoch_losses = fit_bradley_terry(
                model, tokenizer, train, epochs=epochs, lr=lr, batch_size=batch_size,
                max_length=max_length, seed=seed, progress=progress, log=log,
            )

    prompts = [p for p, _, _ in held_out]
    score = {"batch_size": batch_size, "max_length": max_length}
    chosen = reward_model_scores(model, tokenizer, prompts, [c for _, c, _ in held_out], **score)
    rejected = reward_model_scores(model, tokenizer, prompts, [r for _, _, r in held_out], **score)
    # pairwise accuracy is the chosen completion's win rate (ties count half)
    accuracy = win_rate(chosen, rejected, seed=seed)
    result = RewardModelResult(
        accuracy=accuracy.rate,
        lo=accuracy.lo,
        hi=accuracy.hi,
        n_eval=len(held_out),
        n_train=len(train),
        epochs=epochs,
        train_loss=epoch_losses,
        out_dir=str(out_dir) if out_dir is not None else None,
    )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "reward_model.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result
