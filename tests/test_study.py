"""The sweep runner: grid, beta calibration (numbers by hand), resumable results, findings."""

from __future__ import annotations

import json

import pytest

from avgalign.data import TokenizedPair
from avgalign.evaluation import ScoredCompletion, summarize_evaluation
from avgalign.study import (
    BASELINE_KEY,
    append_row,
    calibrate_beta,
    compare_to_sum,
    eval_measurements,
    mean_completion_length,
    plan_runs,
    plot_score_vs_length,
    read_rows,
    results_table,
    run_sweep,
    verdict,
    write_report,
)

# ------------------------------------------------------------------------------ beta and grid


def test_calibrate_beta_by_hand():
    assert calibrate_beta(0.1, 0.0, 6.0) == pytest.approx(0.1)  # sum: unchanged
    assert calibrate_beta(0.1, 1.0, 6.0) == pytest.approx(0.6)  # mean: times L
    assert calibrate_beta(0.1, 0.5, 4.0) == pytest.approx(0.2)  # power 1/2: times sqrt(L)
    with pytest.raises(ValueError):
        calibrate_beta(0.1, 1.0, 0.0)


def test_mean_completion_length_counts_chosen_and_rejected():
    pairs = [TokenizedPair([1], [5, 2], [5, 6, 7, 2]), TokenizedPair([1, 4], [2], [5, 6, 2])]
    assert mean_completion_length(pairs) == pytest.approx((2 + 4 + 1 + 3) / 4)


def test_plan_runs_grid_and_calibrated_betas():
    specs = plan_runs(["dpo", "ipo"], ["sum", "mean", "power"], [0.1, 0.3], 4.0, alphas=[0.5])
    assert len(specs) == 2 * 3 * 2
    assert len({s.key for s in specs}) == len(specs)
    by_key = {s.key: s for s in specs}
    assert by_key["dpo/sum/beta_sum=0.1"].beta == pytest.approx(0.1)
    assert by_key["dpo/mean/beta_sum=0.1"].beta == pytest.approx(0.4)
    assert by_key["ipo/power0.5/beta_sum=0.3"].beta == pytest.approx(0.6)
    assert by_key["ipo/power0.5/beta_sum=0.3"].alpha == 0.5
    with pytest.raises(ValueError, match="alpha"):
        plan_runs(["dpo"], ["power"], [0.1], 4.0)


# ------------------------------------------------------------------------------ results file


def fake_measurements(length: float, score: float, spread: float = 0.05) -> dict:
    return {
        "length_mean": length, "length_std": 1.0, "length_lo": length - spread,
        "length_hi": length + spread, "score": score, "score_lo": score - spread,
        "score_hi": score + spread, "win_rate": 0.6, "win_lo": 0.55, "win_hi": 0.65,
        "lc_win_rate": 0.6, "lc_win_lo": 0.55, "lc_win_hi": 0.65, "kl": 1.0, "kl_lo": 0.9,
        "kl_hi": 1.1, "train_seconds": 1.0,
    }


def test_sweep_resumes_without_duplicates(tmp_path):
    path = tmp_path / "results.jsonl"
    specs = plan_runs(["dpo"], ["sum"], [0.1, 0.3, 1.0], 5.0)
    calls = []

    def run_one(spec):
        calls.append(spec.key)
        return fake_measurements(5.0 + spec.beta_sum, 0.5)

    first = run_sweep(specs[:2], run_one, path, context="c", progress=False)
    assert first.ran == [s.key for s in specs[:2]]
    calls.clear()
    second = run_sweep(specs, run_one, path, context="c", progress=False)
    assert calls == [specs[2].key]  # only the missing run ran
    assert [r["key"] for r in second.rows] == [s.key for s in specs]
    keys = [json.loads(line)["key"] for line in path.read_text().splitlines()]
    assert sorted(keys) == sorted(s.key for s in specs)  # one row per run
    # another context (e.g. another seed) reuses nothing
    calls.clear()
    run_sweep(specs[:1], run_one, path, context="other", progress=False)
    assert calls == [specs[0].key]


def test_truncated_last_line_is_tolerated(tmp_path):
    path = tmp_path / "results.jsonl"
    specs = plan_runs(["dpo"], ["sum", "mean"], [0.1], 5.0)
    run_sweep(specs[:1], lambda s: fake_measurements(5.0, 0.5), path, context="c", progress=False)
    with path.open("a") as f:  # a kill in the middle of writing the second row
        f.write('{"context": "c", "key": "dpo/mean/beta_sum=0.1", "score": 0.')
    assert list(read_rows(path, "c")) == [specs[0].key]
    calls = []
    result = run_sweep(specs, lambda s: calls.append(s.key) or fake_measurements(5.0, 0.4), path,
                       context="c", progress=False)
    assert calls == [specs[1].key]
    assert result.rows[1]["score"] == 0.4
    assert list(read_rows(path, "c")) == [s.key for s in specs]


def test_read_rows_keeps_the_first_row_of_a_key(tmp_path):
    path = tmp_path / "results.jsonl"
    append_row(path, {"context": "c", "key": "a", "score": 1})
    append_row(path, {"context": "c", "key": "a", "score": 2})
    path.write_text(path.read_text() + "\n\nnot json\n[1, 2]\n")
    assert read_rows(path, "c") == {"a": {"context": "c", "key": "a", "score": 1}}


def test_baseline_runs_once(tmp_path):
    path = tmp_path / "results.jsonl"
    specs = plan_runs(["dpo"], ["sum"], [0.1], 5.0)
    calls = []

    def baseline():
        calls.append("baseline")
        return fake_measurements(5.0, 0.3)

    for _ in range(2):
        result = run_sweep(specs, lambda s: fake_measurements(6.0, 0.5), path, context="c",
                           baseline=baseline, progress=False)
    assert calls == ["baseline"]
    assert result.baseline["key"] == BASELINE_KEY and result.baseline["beta"] is None


# ---------------------------------------------------------------------- measurements, outputs


def scored(model: str, lengths: list[int], scores: list[float]) -> list[ScoredCompletion]:
    return [
        ScoredCompletion(model, i // 2, i % 2, f"p{i // 2}", "x", n, True, s)
        for i, (n, s) in enumerate(zip(lengths, scores, strict=True))
    ]


def test_eval_measurements_flattens_an_evaluation():
    policy = scored("policy", [4, 6, 5, 5], [1.0, 0.5, 0.5, 1.0])
    reference = scored("reference", [3, 3, 3, 3], [0.5, 0.5, 0.5, 0.5])
    result = summarize_evaluation(policy, reference, policy_logps=[-1.0, -2.0, -1.0, -2.0],
                                  reference_logps=[-2.0, -2.0, -2.0, -2.0], n_boot=50)
    row = eval_measurements(result)
    assert row["length_mean"] == 5.0 and row["length_lo"] < 5.0 < row["length_hi"]
    assert row["score"] == pytest.approx(0.75)
    assert row["win_rate"] == pytest.approx((1 + 0.5 + 0.5 + 1) / 4)  # ties count half
    assert row["kl"] == pytest.approx(0.5)


def rows_for(changes: dict[float, tuple[float, float]], spread: float = 0.05) -> list[dict]:
    """dpo/sum at (6 tokens, score 0.5) and dpo/mean shifted by (length, score) per beta_sum."""
    rows = []
    for spec in plan_runs(["dpo"], ["sum", "mean"], sorted(changes), 5.0):
        dl, ds = changes[spec.beta_sum] if spec.aggregation == "mean" else (0.0, 0.0)
        rows.append({"key": spec.key, "curve": spec.curve, "loss": spec.loss,
                     "aggregation": spec.aggregation, "alpha": None, "beta_sum": spec.beta_sum,
                     "beta": spec.beta, **fake_measurements(6.0 + dl, 0.5 + ds, spread)})
    return rows


def test_verdict_reads_the_numbers():
    trade_off = compare_to_sum(rows_for({0.1: (-1.0, -0.2), 0.3: (-0.5, -0.15)}))
    assert [c.length_clear and c.score_clear for c in trade_off] == [True, True]
    assert "moved together, the trade-off the paper reports" in verdict(trade_off)
    dominated = compare_to_sum(rows_for({0.1: (+2.0, -0.3), 0.3: (+1.0, -0.2)}))
    text = verdict(dominated)
    assert "opposite directions" in text and "longer and worse" in text
    noise = compare_to_sum(rows_for({0.1: (0.02, 0.01), 0.3: (-0.03, -0.02)}))
    assert "same length and score within the 95% intervals" in verdict(noise)
    length_only = compare_to_sum(rows_for({0.1: (-1.0, 0.0), 0.3: (0.0, 0.0)}))
    text = verdict(length_only)
    assert "in 1 of 2 comparisons" in text and "No comparison changed both" in text
    assert "Only one of the two changed beyond noise in: dpo/mean at beta_sum=0.1" in text


def test_table_plot_and_report(tmp_path):
    rows = rows_for({0.1: (+8.0, -2.0), 0.3: (-0.5, -0.1), 1.0: (0.0, 0.0)})
    baseline = {"key": BASELINE_KEY, "curve": BASELINE_KEY, "loss": BASELINE_KEY,
                "aggregation": None, "alpha": None, "beta_sum": None, "beta": None,
                **fake_measurements(5.0, 0.3), "win_rate": None, "win_lo": None, "win_hi": None}
    table = results_table(rows, baseline)
    assert len(table.splitlines()) == 2 + 1 + len(rows)
    assert "dpo/mean/beta_sum=0.3" in table and "0.50 [0.45, 0.55]" in table
    plot_score_vs_length(rows, baseline, tmp_path / "plot.png", ideal_length=5.5)
    assert (tmp_path / "plot.png").stat().st_size > 0
    text = write_report(tmp_path / "report.md", title="t", rows=rows, baseline=baseline,
                        setting=["a measured fact"], ideal_length=5.5, plot_file="plot.png")
    assert text == (tmp_path / "report.md").read_text()
    assert "a measured fact" in text and "Verdict:" in text and "![" in text
    assert "6 of 6 aligned runs beat the SFT policy" in text
