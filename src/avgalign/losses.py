"""The math: aggregation of sequence log-likelihoods and the pairwise direct alignment losses.

Everything here is a pure function over tensors, independent of models and batching.

Notation (one preference pair): prompt x, preferred completion y_w ("chosen"), dispreferred y_l
("rejected"), policy pi, frozen reference pi_ref, temperature beta > 0. For a completion y with
|y| tokens, log pi(y|x) = sum_t log pi(y_t | x, y_<t) is the *summed* log-likelihood.

Aggregation (Grinsztajn et al. 2024, "Averaging log-likelihoods in direct alignment"):

    agg(log pi(y|x)) = log pi(y|x) / |y|^alpha

    sum   : alpha = 0  (the standard summed losses)
    mean  : alpha = 1  (the paper's averaging: per-token mean log-likelihood)
    power : any alpha in [0, 1], a continuous interpolation between the two

Policy and reference log-likelihoods of the same completion are divided by the same |y|^alpha, so
aggregating each of them equals aggregating their log-ratio. Every loss below takes *aggregated*
log-likelihoods, which is what makes the aggregation a switch that works with every loss.

Adding a loss: write one function with the `LossFn` signature and `register_loss` it with its
LossSpec (loss_specs.py), from this module or any other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .loss_specs import AGGREGATIONS, LOSS_SPECS, LossSpec


def aggregation_exponent(aggregation: str, alpha: float = 1.0) -> float:
    """The exponent of |y| that `aggregation` divides by: 0 for sum, 1 for mean, alpha for power."""
    if aggregation == "sum":
        return 0.0
    if aggregation == "mean":
        return 1.0
    if aggregation == "power":
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] for aggregation 'power', got {alpha}")
        return float(alpha)
    raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")


def aggregate(
    summed_logps: torch.Tensor, lengths: torch.Tensor, aggregation: str, alpha: float = 1.0
) -> torch.Tensor:
    """Aggregate per-sequence summed log-likelihoods: summed_logps / lengths ** exponent.

    `lengths` counts completion tokens (prompt and padding excluded, the closing EOS included) and
    must be >= 1. With aggregation 'sum' the input is returned unchanged.
    """
    exponent = aggregation_exponent(aggregation, alpha)
    if exponent == 0.0:
        return summed_logps
    lengths = lengths.to(summed_logps.dtype)
    if bool((lengths < 1).any()):
        raise ValueError("every completion must have at least one token to be aggregated")
    return summed_logps / lengths.pow(exponent)


@dataclass(frozen=True)
class LossParams:
    """Hyper-parameters shared by the losses; each loss reads the ones it needs."""

    beta: float = 0.1
    label_smoothing: float = 0.0  # DPO / conservative DPO: assumed probability of a flipped label
    simpo_gamma: float = 0.5  # SimPO: target reward margin (in units of beta * aggregated logp)
    length_penalty: float = 0.01  # R-DPO: weight of the (|y_w| - |y_l|) regulariser


@dataclass(frozen=True)
class PairLogps:
    """Aggregated log-likelihoods of a batch of preference pairs, plus their completion lengths.

    reference_* are None for reference-free losses (SimPO).
    """

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    reference_chosen: torch.Tensor | None
    reference_rejected: torch.Tensor | None
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor

    def logratio_margin(self) -> torch.Tensor:
        """h = [agg log pi(y_w) - agg log pi_ref(y_w)] - [agg log pi(y_l) - agg log pi_ref(y_l)]."""
        if self.reference_chosen is None or self.reference_rejected is None:
            raise ValueError("this loss needs reference log-likelihoods")
        return (self.policy_chosen - self.reference_chosen) - (
            self.policy_rejected - self.reference_rejected
        )


LossFn = Callable[[PairLogps, LossParams], torch.Tensor]


def dpo_loss(logps: PairLogps, params: LossParams) -> torch.Tensor:
    """DPO (Rafailov et al. 2023), with conservative label smoothing eps (Mitchell 2023):

    loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    """
    u = params.beta * logps.logratio_margin()
    eps = params.label_smoothing
    return -(1.0 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)


def ipo_loss(logps: PairLogps, params: LossParams) -> torch.Tensor:
    """IPO (Azar et al. 2023): loss = (h - 1 / (2 beta))^2."""
    return (logps.logratio_margin() - 1.0 / (2.0 * params.beta)) ** 2


def slic_loss(logps: PairLogps, params: LossParams) -> torch.Tensor:
    """SLiC / hinge (Zhao et al. 2023): loss = max(0, 1 - beta h)."""
    return torch.relu(1.0 - params.beta * logps.logratio_margin())


def simpo_loss(logps: PairLogps, params: LossParams) -> torch.Tensor:
    """SimPO (Meng et al. 2024), reference-free with target margin gamma:

    loss = -log sigmoid(beta (agg log pi(y_w) - agg log pi(y_l)) - gamma)

    SimPO as published uses the mean aggregation; here it follows the configured aggregation.
    """
    u = params.beta * (logps.policy_chosen - logps.policy_rejected) - params.simpo_gamma
    return -F.logsigmoid(u)


def rdpo_loss(logps: PairLogps, params: LossParams) -> torch.Tensor:
    """R-DPO (Park et al. 2024): DPO with a length-difference regulariser of weight a:

    loss = -log sigmoid(beta h - a (|y_w| - |y_l|))
    """
    length_gap = (logps.chosen_lengths - logps.rejected_lengths).to(logps.policy_chosen.dtype)
    u = params.beta * logps.logratio_margin() - params.length_penalty * length_gap
    return -F.logsigmoid(u)


@dataclass(frozen=True)
class Loss:
    """A registered loss: the function that computes it and its description."""

    fn: LossFn
    spec: LossSpec

    @property
    def uses_reference(self) -> bool:
        return self.spec.uses_reference


LOSSES: dict[str, Loss] = {}


def register_loss(name: str, fn: LossFn, spec: LossSpec | None = None) -> None:
    """Make loss `name` available to configs, the command line and training: `fn` computes it,
    `spec` describes it (given for a new loss; a built-in loss's is in loss_specs.LOSS_SPECS).
    A new hyper-parameter is a field of LossParams and of config.LossConfig of the same name."""
    if name in LOSSES:
        raise ValueError(f"loss {name!r} is already registered")
    if spec is not None:
        LOSS_SPECS[name] = spec
    LOSSES[name] = Loss(fn, LOSS_SPECS[name])


for _name, _fn in {
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "slic": slic_loss,
    "simpo": simpo_loss,
    "rdpo": rdpo_loss,
}.items():
    register_loss(_name, _fn)


def get_loss(name: str) -> Loss:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}") from None


def aggregate_pairs(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor | None,
    reference_rejected: torch.Tensor | None,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    aggregation: str,
    alpha: float = 1.0,
) -> PairLogps:
    """Aggregate summed log-likelihoods of a batch of pairs, each by its own completion length."""

    def agg(x: torch.Tensor | None, lengths: torch.Tensor) -> torch.Tensor | None:
        return None if x is None else aggregate(x, lengths, aggregation, alpha)

    return PairLogps(
        policy_chosen=agg(policy_chosen, chosen_lengths),
        policy_rejected=agg(policy_rejected, rejected_lengths),
        reference_chosen=agg(reference_chosen, chosen_lengths),
        reference_rejected=agg(reference_rejected, rejected_lengths),
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )


def preference_loss(
    loss: str,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor | None,
    reference_rejected: torch.Tensor | None,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    params: LossParams,
    aggregation: str = "sum",
    alpha: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss over the batch and per-pair metrics, from *summed* log-likelihoods.

    Inputs are per-sequence sums of completion-token log-probabilities and completion token counts,
    shape [batch]. The metrics are in the loss's own units (the configured aggregation):

        reward_chosen   = beta * agg(log pi(y_w) - log pi_ref(y_w))   (beta * agg log pi(y_w) for
        reward_rejected = beta * agg(log pi(y_l) - log pi_ref(y_l))    reference-free losses)
        reward_margin   = reward_chosen - reward_rejected
        reward_accuracy = 1[reward_chosen > reward_rejected]

    plus the summed and per-token-mean policy log-likelihoods and the token lengths of chosen and
    rejected, whatever the aggregation, for length diagnostics.
    """
    spec = get_loss(loss)
    if spec.uses_reference and (reference_chosen is None or reference_rejected is None):
        raise ValueError(f"loss {loss!r} needs reference log-likelihoods")
    logps = aggregate_pairs(
        policy_chosen,
        policy_rejected,
        reference_chosen if spec.uses_reference else None,
        reference_rejected if spec.uses_reference else None,
        chosen_lengths,
        rejected_lengths,
        aggregation,
        alpha,
    )
    per_pair = spec.fn(logps, params)
    with torch.no_grad():
        if spec.uses_reference:
            reward_chosen = params.beta * (logps.policy_chosen - logps.reference_chosen)
            reward_rejected = params.beta * (logps.policy_rejected - logps.reference_rejected)
        else:
            reward_chosen = params.beta * logps.policy_chosen
            reward_rejected = params.beta * logps.policy_rejected
        metrics = {
            "loss": per_pair.detach(),
            "reward_chosen": reward_chosen.detach(),
            "reward_rejected": reward_rejected.detach(),
            "reward_margin": (reward_chosen - reward_rejected).detach(),
            "reward_accuracy": (reward_chosen > reward_rejected).float(),
            "logp_sum_chosen": policy_chosen.detach(),
            "logp_sum_rejected": policy_rejected.detach(),
            "logp_mean_chosen": policy_chosen.detach() / chosen_lengths,
            "logp_mean_rejected": policy_rejected.detach() / rejected_lengths,
            "length_chosen": chosen_lengths.float(),
            "length_rejected": rejected_lengths.float(),
            "length_gap": (chosen_lengths - rejected_lengths).float(),
        }
    return per_pair.mean(), metrics
