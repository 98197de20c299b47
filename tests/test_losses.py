"""Losses and aggregation against numbers worked out by hand.

One pair throughout: policy log pi(y_w) = -10, pi_ref(y_w) = -11 (log-ratio +1), |y_w| = 4;
policy log pi(y_l) = -12, pi_ref(y_l) = -11 (log-ratio -1), |y_l| = 2; beta = 0.5.

    sum   : h = 1 - (-1)                   = 2        beta h = 1
    mean  : h = 1/4 - (-1/2)               = 0.75     beta h = 0.375
    power : h = 1/sqrt(4) + 1/sqrt(2)      = 1.207107 beta h = 0.603553   (alpha = 0.5)

-log sigmoid(u) = log(1 + exp(-u)):
    u = 1 -> 0.313262,  u = 0.375 -> 0.523123,  u = 0.603553 -> 0.436230
"""

import math

import pytest
import torch

from avgalign.losses import (
    LOSSES,
    LossParams,
    aggregate,
    aggregation_exponent,
    preference_loss,
)

PC, PR, RC, RR, LC, LR = -10.0, -12.0, -11.0, -11.0, 4, 2


def loss_of(name, aggregation, alpha=1.0, **params):
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    loss, metrics = preference_loss(
        name,
        t(PC),
        t(PR),
        t(RC),
        t(RR),
        torch.tensor([LC]),
        torch.tensor([LR]),
        LossParams(beta=0.5, **params),
        aggregation,
        alpha,
    )
    return loss.item(), metrics


HAND = {
    # (loss, aggregation): value
    ("dpo", "sum"): 0.313262,  # log(1 + e^-1)
    ("dpo", "mean"): 0.523123,  # log(1 + e^-0.375)
    ("dpo", "power"): 0.436230,  # log(1 + e^-0.603553)
    ("ipo", "sum"): 1.0,  # (2 - 1/(2*0.5))^2
    ("ipo", "mean"): 0.0625,  # (0.75 - 1)^2
    ("ipo", "power"): 0.042893,  # (1.207107 - 1)^2
    ("slic", "sum"): 0.0,  # max(0, 1 - 1)
    ("slic", "mean"): 0.625,  # 1 - 0.375
    ("slic", "power"): 0.396447,  # 1 - 0.603553
    # SimPO (gamma 0.5), no reference: sum: 0.5*(-10+12) - 0.5 = 0.5 -> log(1+e^-0.5)
    ("simpo", "sum"): 0.474077,
    # mean: 0.5*(-10/4 + 12/2) - 0.5 = 1.25 -> log(1+e^-1.25)
    ("simpo", "mean"): 0.251929,
    # power: 0.5*(-10/2 + 12/sqrt(2)) - 0.5 = 1.242641 -> log(1+e^-1.242641)
    ("simpo", "power"): 0.253573,
    # R-DPO (length_penalty 0.1): u = beta h - 0.1*(4-2)
    ("rdpo", "sum"): 0.371101,  # u = 0.8
    ("rdpo", "mean"): 0.609470,  # u = 0.175
    ("rdpo", "power"): 0.511591,  # u = 0.403553
}


@pytest.mark.parametrize(("name", "aggregation"), sorted(HAND))
def test_every_loss_with_every_aggregation(name, aggregation):
    value, _ = loss_of(name, aggregation, alpha=0.5, simpo_gamma=0.5, length_penalty=0.1)
    assert value == pytest.approx(HAND[(name, aggregation)], abs=1e-5)


def test_registry_is_covered_by_hand_numbers():
    assert {name for name, _ in HAND} == set(LOSSES)


def test_dpo_label_smoothing():
    # -(0.9) log sigmoid(1) - 0.1 log sigmoid(-1) = 0.9*0.313262 + 0.1*1.313262
    value, _ = loss_of("dpo", "sum", label_smoothing=0.1)
    assert value == pytest.approx(0.413262, abs=1e-5)


def test_mean_dpo_is_minus_logsigmoid_of_average_logratios():
    value, _ = loss_of("dpo", "mean")
    avg_chosen = (PC - RC) / LC
    avg_rejected = (PR - RR) / LR
    expected = -math.log(1 / (1 + math.exp(-0.5 * (avg_chosen - avg_rejected))))
    assert value == pytest.approx(expected, rel=1e-9)


def test_power_endpoints_equal_sum_and_mean():
    for name in LOSSES:
        assert loss_of(name, "power", alpha=0.0)[0] == pytest.approx(loss_of(name, "sum")[0])
        assert loss_of(name, "power", alpha=1.0)[0] == pytest.approx(loss_of(name, "mean")[0])


def test_aggregate_divides_each_sequence_by_its_own_length():
    sums = torch.tensor([-8.0, -9.0])
    lengths = torch.tensor([4, 9])
    assert aggregate(sums, lengths, "sum").tolist() == [-8.0, -9.0]
    assert aggregate(sums, lengths, "mean").tolist() == [-2.0, -1.0]
    assert aggregate(sums, lengths, "power", alpha=0.5).tolist() == [-4.0, -3.0]


def test_aggregation_errors():
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregation_exponent("median")
    with pytest.raises(ValueError, match="alpha must be in"):
        aggregation_exponent("power", 1.5)
    with pytest.raises(ValueError, match="at least one token"):
        aggregate(torch.tensor([-1.0]), torch.tensor([0]), "mean")
    with pytest.raises(ValueError, match="unknown loss"):
        loss_of("kto", "sum")


def test_metrics_are_in_the_loss_units():
    _, m = loss_of("dpo", "mean")
    # beta * mean log-ratio: 0.5 * 1/4 and 0.5 * (-1/2)
    assert m["reward_chosen"].item() == pytest.approx(0.125)
    assert m["reward_rejected"].item() == pytest.approx(-0.25)
    assert m["reward_margin"].item() == pytest.approx(0.375)
    assert m["reward_accuracy"].item() == 1.0
    assert m["logp_sum_chosen"].item() == PC
    assert m["logp_mean_rejected"].item() == pytest.approx(PR / LR)
    assert m["length_gap"].item() == LC - LR
    _, m = loss_of("dpo", "sum")
    assert m["reward_margin"].item() == pytest.approx(1.0)


def test_reference_free_loss_ignores_missing_reference():
    t = torch.tensor([-3.0], dtype=torch.float64)
    loss, _ = preference_loss(
        "simpo",
        t,
        t - 1,
        None,
        None,
        torch.tensor([1]),
        torch.tensor([1]),
        LossParams(beta=1.0, simpo_gamma=0.0),
    )
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    with pytest.raises(ValueError, match="needs reference"):
        preference_loss("dpo", t, t, None, None, torch.tensor([1]), torch.tensor([1]), LossParams())


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize(("aggregation", "alpha"), [("sum", 1.0), ("mean", 1.0), ("power", 0.3)])
def test_gradcheck(name, aggregation, alpha):
    torch.manual_seed(0)
    inputs = [torch.randn(3, dtype=torch.float64, requires_grad=True) * 1.0 for _ in range(4)]
    inputs = [x.detach().requires_grad_() for x in inputs]
    lengths_c, lengths_r = torch.tensor([3, 5, 1]), torch.tensor([2, 7, 4])

    def f(pc, pr, rc, rr):
        return preference_loss(
            name, pc, pr, rc, rr, lengths_c, lengths_r, LossParams(beta=0.7), aggregation, alpha
        )[0]

    # the hinge has a kink at 1; random inputs keep away from it almost surely
    assert torch.autograd.gradcheck(f, inputs)
