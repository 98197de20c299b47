"""Each loss described once, without torch: what config validation, the command line, the loss
defaults and the docs read. The functions that compute the losses are in `losses.py`, registered
under the same names.

A loss here says: whether it needs the reference model, which `loss.*` keys it reads besides beta
and the aggregation, its published setting (the aggregation and beta a config gets for the keys it
leaves out, see config.resolve_loss), and where it comes from. TRL's `loss_type` names that denote
one of these losses are in TRL_ALIASES.

Adding a loss: `losses.register_loss(name, function, LossSpec(...))`, from any module.
"""

from __future__ import annotations

from dataclasses import dataclass

AGGREGATIONS = ("sum", "mean", "power")


@dataclass(frozen=True)
class LossSpec:
    """One loss: its needs, its hyper-parameters and its published setting."""

    uses_reference: bool  # the loss reads reference log-likelihoods
    aggregation: str  # the published aggregation: what a config that leaves it out gets
    beta: float  # the published beta, for `aggregation` (another aggregation gets LossConfig's)
    source: str  # the published setting, as the run's log line says it
    params: tuple[str, ...] = ()  # the loss.* keys it reads besides beta, aggregation and alpha
    gamma_beta_ratio: float | None = None  # SimPO: simpo_gamma = ratio * beta, by default


LOSS_SPECS: dict[str, LossSpec] = {
    "dpo": LossSpec(True, "sum", 0.1, "DPO as published, TRL's sigmoid", ("label_smoothing",)),
    # the authors meant averaged log-likelihoods; TRL's ipo averages, with beta 0.1 (its default)
    "ipo": LossSpec(True, "mean", 0.1, "IPO as its authors and TRL define it"),
    "slic": LossSpec(True, "sum", 0.1, "SLiC-HF's summed hinge, TRL's hinge"),
    # SimPO (Meng et al. 2024) and its reference code: beta 2.0 (2.0 to 10 in practice) and
    # gamma / beta 0.5 as the starting point; our simpo_gamma is gamma itself, not the ratio
    "simpo": LossSpec(
        False, "mean", 2.0, "SimPO as published: gamma = 0.5 beta", ("simpo_gamma",),
        gamma_beta_ratio=0.5,
    ),
    "rdpo": LossSpec(True, "sum", 0.1, "R-DPO: DPO's setting", ("length_penalty",)),
}

# TRL DPOConfig.loss_type names that denote one of our losses: name -> (loss, aggregation).
# TRL's `ipo` is our `ipo`, whose published aggregation is mean.
TRL_ALIASES: dict[str, tuple[str, str]] = {
    "sigmoid": ("dpo", "sum"),
    "sigmoid_norm": ("dpo", "mean"),
    "hinge": ("slic", "sum"),
}


def loss_names() -> tuple[str, ...]:
    """The losses described here, sorted: the command line's choices."""
    return tuple(sorted(LOSS_SPECS))
