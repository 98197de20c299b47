"""avgalign.frontier: the bootstrap over seeds and prompts, matched comparisons, the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from avgalign.frontier import (
    Cell,
    Draws,
    Estimate,
    Setting,
    analyse,
    common_seeds,
    matched,
    write_study,
)


def row(curve, beta_sum, seed, score, length, kl, win=None):
    """A sweep row with per-prompt means (lists, one value per prompt)."""
    per_prompt = {"score": list(score), "length": list(length), "kl": list(kl)}
    if win is not None:
        per_prompt["win"] = list(win)
    return {"key": f"{curve}/beta_sum={beta_sum:g}/seed={seed}", "curve": curve,
            "aggregation": curve.split("/")[1], "loss": "dpo", "beta_sum": beta_sum,
            "beta": beta_sum, "seed": seed, "per_prompt": per_prompt}


def baseline(score, length):
    return {"key": "sft", "per_prompt": {"score": list(score), "length": list(length),
                                         "kl": [0.0] * len(score)}}


def test_draws_resample_seeds_and_prompts_together():
    m = np.array([[1.0, 2.0, 3.0], [5.0, 7.0, 11.0]])  # 2 seeds x 3 prompts
    draws = Draws([0, 1], num_prompts=3, n_boot=50, seed=0)
    e = draws.estimate(m)
    assert e.point == pytest.approx(m.mean())
    for b in range(3):  # replicate b by hand: weighted by how often each seed and prompt drawn
        ws, wp = draws.seed_w[b], draws.prompt_w[b]
        assert ws.sum() == pytest.approx(1) and wp.sum() == pytest.approx(1)
        by_hand = sum(ws[s] * wp[p] * m[s, p] for s in range(2) for p in range(3))
        assert e.reps[b] == pytest.approx(by_hand)
    # seeds vary the replicates: with a seed effect and no prompt effect, the interval is wide
    seed_only = draws.estimate(np.array([[0.0] * 3, [10.0] * 3]))
    assert seed_only.hi - seed_only.lo > 5


def test_the_same_seed_pairs_the_comparison():
    """Summing and averaging share each seed's noise: their difference is exact although each
    cell alone is uncertain."""
    prompts = 4
    noise = {0: -3.0, 1: 0.0, 2: 4.0}  # a large seed effect, the same for both curves
    rows = []
    for seed, shift in noise.items():
        rows.append(row("dpo/sum", 0.1, seed, [0.2 + shift] * prompts, [10] * prompts,
                        [1.0] * prompts))
        rows.append(row("dpo/mean", 0.1, seed, [0.3 + shift] * prompts, [12] * prompts,
                        [1.0] * prompts))
    setting = Setting("s", rows, baseline([0.0] * prompts, [10] * prompts))
    draws = Draws(common_seeds([setting]), prompts, n_boot=200, seed=0)
    found = analyse(setting, draws)
    cell = next(c for c in found.cells if c.curve == "dpo/sum")
    assert cell.values["score"].hi - cell.values["score"].lo > 3  # one cell: seed noise
    [(beta_sum, diff)] = found.same_beta["dpo/mean"]
    assert beta_sum == 0.1
    assert (diff["score"].point, diff["score"].lo, diff["score"].hi) == pytest.approx((0.1,) * 3)
    assert (diff["length"].point, diff["length"].lo, diff["length"].hi) == pytest.approx((2,) * 3)


def test_common_seeds_drops_a_seed_a_cell_lacks():
    rows = [row("dpo/sum", 0.1, s, [0], [1], [0]) for s in (0, 1, 2)]
    rows += [row("dpo/mean", 0.1, s, [0], [1], [0]) for s in (0, 2)]
    assert common_seeds([Setting("s", rows, baseline([0], [1]))]) == [0, 2]


def fixed(**values) -> dict[str, Estimate]:
    """Estimates without noise: every replicate equals the point."""
    return {k: Estimate(v, np.full(10, float(v))) for k, v in values.items()}


def test_matched_kl_interpolates_each_curve_by_hand():
    sft = Cell("sft", "sft", None, None, fixed(kl=0.0, score=0.0, length=10))
    summed = [Cell("dpo/sum", "sum", 1.0, 1.0, fixed(kl=1.0, score=0.2, length=12)),
              Cell("dpo/sum", "sum", 0.1, 0.1, fixed(kl=2.0, score=0.3, length=14))]
    averaged = [Cell("dpo/mean", "mean", 1.0, 9.0, fixed(kl=1.0, score=0.3, length=11)),
                Cell("dpo/mean", "mean", 0.1, 0.9, fixed(kl=3.0, score=0.5, length=13))]
    m = matched(averaged, summed, sft, "kl", "score")
    assert m.range == (1.0, 2.0)  # the KL where both curves have runs
    # at KL 1.25: 0.325 - 0.225 (averaged between 0.3 at KL 1 and 0.5 at KL 3, summed between
    # 0.2 at KL 1 and 0.3 at KL 2); likewise at 1.5 and 1.75
    assert [x for x, _ in m.points] == pytest.approx([1.25, 1.5, 1.75])
    assert [d.point for _, d in m.points] == pytest.approx([0.1, 0.1, 0.1])
    assert m.average.point == pytest.approx(0.1)
    assert m.average.lo == pytest.approx(m.average.point)  # no noise, no width
    lengths = matched(averaged, summed, sft, "kl", "length")
    # at KL 1.5: averaged 11.5 (between 11 at KL 1 and 13 at KL 3), summed 13
    assert [d.point for _, d in lengths.points] == pytest.approx([-1.25, -1.5, -1.75])
    assert lengths.average.point == pytest.approx(-1.5)


def test_no_shared_range_no_comparison():
    sft = Cell("sft", "sft", None, None, fixed(length=10, score=0.0, kl=0.0))
    a = [Cell("dpo/sum", "sum", 1.0, 1.0, fixed(length=20, score=0.2, kl=1.0))]
    b = [Cell("dpo/mean", "mean", 1.0, 1.0, fixed(length=5, score=0.2, kl=1.0))]
    assert matched(b, a, sft, "length", "score") is None  # runs at lengths 5 and 20 only


def study_settings(bias_effect: float) -> dict[str, Setting]:
    """Two settings whose averaged runs are 'bias_effect' tokens longer than summed ones in the
    biased setting only; three seeds of prompt noise."""
    rng = np.random.default_rng(0)
    prompts = 16
    out = {}
    for name, extra in (("fair", 0.0), ("biased", bias_effect)):
        rows = []
        for seed in (0, 1, 2):
            for beta, kl in ((0.1, 4.0), (1.0, 1.0)):
                noise = rng.normal(0, 0.5, prompts)
                rows.append(row("dpo/sum", beta, seed, 0.5 - 0.05 * kl + 0.01 * noise,
                                20 + kl + noise, kl + 0.1 * noise, [0.6] * prompts))
                rows.append(row("dpo/mean", beta, seed, 0.5 - 0.05 * kl + 0.01 * noise,
                                20 + kl + extra + noise, kl + 0.1 * noise, [0.6] * prompts))
        out[name] = Setting(name, rows, baseline([0.5] * prompts, [20.0] * prompts),
                            note=f"{name} labels")
    return out


def test_write_study_reports_the_numbers_and_is_deterministic(tmp_path):
    settings = study_settings(bias_effect=5.0)
    first, again = (
        write_study(tmp_path, settings, n_boot=300, seed=0, title="T", setting=["a line"],
                    ideal_length=21.0)
        for _ in range(2)
    )
    assert again.report == first.report  # fixed seeds: identical tables
    for name in ("report", "numbers", "length_plot", "kl_plot"):
        assert first.files[name].stat().st_size > 0
    report = first.report
    assert "## fair" in report and "## biased" in report and "- biased labels" in report
    assert "## Length bias as the cause" in report
    numbers = json.loads(first.files["numbers"].read_text())
    fair, biased = (numbers["settings"][k]["same_beta"]["dpo/mean"] for k in ("fair", "biased"))
    assert [d["length"]["value"] for d in fair] == pytest.approx([0.0, 0.0])
    assert [d["length"]["value"] for d in biased] == pytest.approx([5.0, 5.0])
    # the length difference that comes with the biased labels is named beyond noise
    did = next(line for line in report.splitlines() if "dpo/mean - sum, length" in line)
    assert "+5.00" in did and "beyond noise" in did
    # equal scores at equal KL: the report says averaging moves along the frontier
    assert "no different beyond noise" in report
