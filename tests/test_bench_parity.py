"""The benchmark's parity criterion (benchmarks/bench_dpo.py, `dpo_parity`), on numbers only.

The criterion: every summed log-prob agrees to LOGP_RTOL (1e-5) relative, and each pair's DPO
loss agrees within the bound its log-prob differences imply,
    |L_a - L_b| <= 2 * (sigmoid(-min(m_a, m_b)) * beta * D + R),
D = sum of the |differences| of the pair's four summed log-probs, R the float32 rounding of the
loss (derivation in bench_dpo.py). The numbers below are those of a long pair (about 1,000
tokens per completion, beta 0.1): float32 noise must pass, real mismatches must fail.

bench_dpo.py imports only the standard library at module level (torch and TRL inside its
workers), so these tests load it from its path and need neither a model nor TRL.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_dpo.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_dpo_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


BETA = 0.1
EPS32 = 2.0**-23
# One long pair: policy chosen, policy rejected, reference chosen, reference rejected (nats).
# m = 0.1 * ((-1000 + 997) - (-1100 + 1104)) = 0.1 * (-3 - 4) = -0.7
PAIR = (-1000.0, -1100.0, -997.0, -1104.0)
# The same sums with float32 noise of 9e-7 relative (the largest measured on the long workload),
# signed so that all four errors push the margin the same way (the worst case):
# pc - 9e-4, pr + 9.9e-4, rc + 8.973e-4, rr - 9.936e-4.
NOISY = (-1000.0009, -1099.99901, -996.9991027, -1104.0009936)
D_NOISE = 9e-4 + 9.9e-4 + 8.973e-4 + 9.936e-4  # = 3.7809e-3 nats


def dpo_loss(beta: float, pc: float, pr: float, rc: float, rr: float) -> float:
    """-log sigmoid(m) = log(1 + exp(-m)), in float64."""
    return math.log1p(math.exp(-beta * ((pc - rc) - (pr - rr))))


def test_margin_and_bound_by_hand(bench):
    assert bench.dpo_margin(BETA, PAIR) == pytest.approx(-0.7, abs=1e-12)
    # a = PAIR, b = NOISY: m_a = -0.7, m_b = -0.1 * 7.0037809 = -0.70037809
    assert bench.dpo_margin(BETA, NOISY) == pytest.approx(-0.70037809, abs=1e-9)
    loss_a, loss_b = dpo_loss(BETA, *PAIR), dpo_loss(BETA, *NOISY)
    assert loss_a == pytest.approx(math.log(1 + math.exp(0.7)), rel=1e-12)  # 1.1031860...
    # bound = 2 * (sigmoid(0.70037809) * 0.1 * 3.7809e-3
    #              + 4 * 2^-23 * (0.1 * (3.0017973 + 4.0019836) + 1 + 1.1034388))
    #       = 2 * (0.6682710 * 3.7809e-4 + 4.76837e-7 * 2.8038169)
    #       = 2 * (2.526666e-4 + 1.336964e-6) = 5.080071e-4
    bound = bench.dpo_loss_bound(BETA, PAIR, NOISY, loss_a, loss_b)
    assert bound == pytest.approx(5.080071e-4, rel=1e-5)
    # |L_a - L_b| ~ sigmoid(0.7) * 0.1 * D = 0.66819 * 3.7809e-4 = 2.5264e-4 (first order)
    assert abs(loss_b - loss_a) == pytest.approx(2.5264e-4, rel=1e-3)


def test_long_sequence_float32_noise_passes(bench):
    """Log-probs equal to 9e-7 relative: the loss differs by 2.5e-4, which the old fixed 1e-4
    tolerance failed (relative: 2.3e-4), and the bound implied by D passes (ratio ~0.5)."""
    loss_a, loss_b = dpo_loss(BETA, *PAIR), dpo_loss(BETA, *NOISY)
    assert abs(loss_a - loss_b) / loss_b > 1e-4  # the old criterion's verdict: FAILED
    result = bench.dpo_parity(BETA, [PAIR], [NOISY], [loss_a], [loss_b])
    assert result["logps_rel"] == pytest.approx(9e-7, rel=1e-3)
    assert result["logps_ok"] and result["losses_ok"] and result["passed"]
    assert result["loss_bound_ratio"] == pytest.approx(2.5264e-4 / 5.080071e-4, rel=2e-3)


def test_noise_over_many_pairs_and_float32_loss_passes(bench):
    """Eight pairs of different lengths and margins; side b's loss also rounded to float32 (as
    TRL computes it): still within the bound."""
    import struct

    def f32(x: float) -> float:
        return struct.unpack("f", struct.pack("f", x))[0]

    logps_a, logps_b, losses_a, losses_b = [], [], [], []
    for i in range(8):
        tokens = 100 + 150 * i  # 100 ... 1,150 tokens per completion, about 1.1 nats each
        pc, pr = -1.1 * tokens, -1.2 * tokens
        rc, rr = pc + (-1) ** i * 2.5 * (i + 1), pr + 1.5 * (i - 3)
        a = (pc, pr, rc, rr)
        b = tuple(f32(x * (1 + (-1) ** (i + k) * 9e-7)) for k, x in enumerate(a))
        logps_a.append(a)
        logps_b.append(b)
        losses_a.append(dpo_loss(BETA, *a))
        losses_b.append(f32(dpo_loss(BETA, *b)))
    result = bench.dpo_parity(BETA, logps_a, logps_b, losses_a, losses_b)
    assert result["passed"], result


def test_wrong_beta_fails(bench):
    """Same log-probs, side b's loss with beta 0.11: L(0.77) - L(0.7) ~ 0.668 * 0.07 = 0.047,
    against a bound of 2 R ~ 3e-6 (D = 0); with the long-sequence noise in D, 5e-4."""
    loss_a = dpo_loss(BETA, *PAIR)
    wrong = dpo_loss(0.11, *PAIR)
    assert wrong - loss_a == pytest.approx(0.0473, abs=5e-4)
    assert not bench.dpo_parity(BETA, [PAIR], [PAIR], [loss_a], [wrong])["losses_ok"]
    wrong_noisy = dpo_loss(0.11, *NOISY)
    result = bench.dpo_parity(BETA, [PAIR], [NOISY], [loss_a], [wrong_noisy])
    assert result["logps_ok"] and not result["losses_ok"] and not result["passed"]
    assert result["loss_bound_ratio"] > 50


def test_swapped_chosen_and_rejected_fails(bench):
    """L(m) against L(-m): log 2 +- 0.35, far outside the bound."""
    loss_a = dpo_loss(BETA, *PAIR)
    swapped = dpo_loss(BETA, PAIR[1], PAIR[0], PAIR[3], PAIR[2])
    assert not bench.dpo_parity(BETA, [PAIR], [NOISY], [loss_a], [swapped])["passed"]


@pytest.mark.parametrize("noise", [False, True])
def test_one_token_off_by_a_hundredth_inside_the_loss_fails(bench, noise):
    """Side b reports its log-probs but its loss saw one chosen token 0.01 nats lower: the margin
    moves by 0.1 * 0.01 = 1e-3, the loss by ~0.668e-3. With identical log-probs the bound is
    2 R ~ 3e-6; with the worst-case long-sequence noise (aligned with the error) it is 5.1e-4
    against a difference of ~0.668 * (3.78e-4 + 1e-3) = 9.2e-4."""
    reported = NOISY if noise else PAIR
    pc, pr, rc, rr = reported
    loss_b = dpo_loss(BETA, pc - 0.01, pr, rc, rr)
    loss_a = dpo_loss(BETA, *PAIR)
    result = bench.dpo_parity(BETA, [PAIR], [reported], [loss_a], [loss_b])
    assert result["logps_ok"] and not result["losses_ok"] and not result["passed"]
    assert result["loss_bound_ratio"] > (1.5 if noise else 100)


def test_dropped_token_fails_on_the_log_probs(bench):
    """Side b's chosen sum lacks one token (-1.2 nats): relative 1.2e-3, far above 1e-5. Its loss
    is consistent with its log-probs (the bound's D holds the 1.2), so the log-prob check is the
    one that fails."""
    dropped = (PAIR[0] + 1.2, *PAIR[1:])
    result = bench.dpo_parity(
        BETA, [PAIR], [dropped], [dpo_loss(BETA, *PAIR)], [dpo_loss(BETA, *dropped)]
    )
    assert result["logps_rel"] == pytest.approx(1.2 / 998.8, rel=1e-6)  # |a - b| / |b|
    assert result["losses_ok"] and not result["logps_ok"] and not result["passed"]


def test_one_token_off_by_a_hundredth_in_the_log_probs_fails(bench):
    """A 700-token completion (-700 nats) with one token's log-prob 0.01 nats off:
    0.01 / 700 = 1.43e-5 relative, above LOGP_RTOL = 1e-5 (a sum of 1,000 nats or more hides
    it: that is the check's resolution, 8x the largest float32 difference measured)."""
    a = (-700.0, -760.0, -698.0, -763.0)
    b = (-700.01, *a[1:])
    result = bench.dpo_parity(BETA, [a], [b], [dpo_loss(BETA, *a)], [dpo_loss(BETA, *b)])
    assert result["logps_rel"] == pytest.approx(0.01 / 700.01, rel=1e-6)  # |a - b| / |b|
    assert not result["logps_ok"] and not result["passed"]


def test_lengths_must_match(bench):
    with pytest.raises(ValueError):
        bench.dpo_parity(BETA, [PAIR], [PAIR, PAIR], [0.7], [0.7])


# ----------------------------------------------------------------- the long workload's records


def test_sharegpt_ranking_record_to_messages(bench):
    record = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "Name a colour"},
        ],
        "chosen": {"from": "gpt", "value": "Blue"},
        "rejected": {"from": "gpt", "value": "No"},
    }
    assert bench.is_sharegpt_ranking(record)
    assert not bench.is_sharegpt_ranking({"prompt": "a", "chosen": "b", "rejected": "c"})
    assert bench.sharegpt_ranking_to_messages(record, "x[0]") == {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Name a colour"},
        ],
        "chosen": [{"role": "assistant", "content": "Blue"}],
        "rejected": [{"role": "assistant", "content": "No"}],
    }
    tool = dict(record, conversations=[{"from": "observation", "value": "{}"}])
    with pytest.raises(ValueError, match="unsupported role 'observation'"):
        bench.sharegpt_ranking_to_messages(tool, "x[1]")
    ends_with_gpt = dict(record, conversations=record["conversations"][:3])
    with pytest.raises(ValueError, match="end with a human turn"):
        bench.sharegpt_ranking_to_messages(ends_with_gpt, "x[2]")


def test_trl_records_end_chat_completions_at_eos(bench):
    """A chat-template completion loses the whitespace after its EOS (TRL then appends none);
    a raw completion is left alone (both projects append EOS)."""
    tokenizer = SimpleNamespace(eos_token="<|im_end|>")
    chat = SimpleNamespace(
        prompt="<|im_start|>user\nHi<|im_end|>\n",
        chosen="Yes<|im_end|>\n",
        rejected="No<|im_end|>\n",
    )
    raw = SimpleNamespace(prompt="\n\nHuman: hi\n\nAssistant:", chosen=" yes", rejected=" no ")
    assert bench.trl_records([chat, raw], tokenizer) == [
        {"prompt": chat.prompt, "chosen": "Yes<|im_end|>", "rejected": "No<|im_end|>"},
        {"prompt": raw.prompt, "chosen": " yes", "rejected": " no "},
    ]
