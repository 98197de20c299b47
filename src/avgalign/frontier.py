"""The study's findings over training seeds: cells, frontiers and matched comparisons, with
intervals from one bootstrap over seeds and prompts.

    written = write_study(out, {"length-bias-0": Setting(...), ...}, n_boot=1000, seed=0, ...)

Inputs are sweep rows (avgalign.study): one row per run (curve, beta_sum, seed), each holding
`per_prompt` means over its samples of score, length, kl and win (evaluation.per_prompt_means).
A *cell* is a grid point (curve, beta_sum); its value for a metric is the mean over seeds and
prompts. A *setting* is one sweep (here: one annotator), with the SFT policy as its baseline.

Bootstrap. Replicate b draws multiplicities w_s of the S training seeds and v_p of the P prompts
(both with replacement); a cell's replicate value is sum_{s,p} w_s v_p M[s, p] / (S P), M the
cell's per-seed, per-prompt means. The same draws serve every cell of every setting, so a
difference between two cells (summing against averaging at the same seed: paired) or between two
settings is resampled as a whole, and its interval counts the noise of training seeds and of
prompts. With one seed the interval covers prompts and samples only. Intervals are the 2.5 and
97.5 percentiles of the replicates.

Frontier. A curve (one aggregation) is its cells ordered by beta, with the SFT policy as the end
that beta -> infinity reaches (KL 0, the SFT length and score). To compare two curves at matched
KL (or length), each curve's score on a replicate is interpolated linearly in x at fixed points
of the range where both curves have runs (from the point estimates), and the difference taken.
If averaging only moved along the summed frontier, a cell would differ from the summed cell of
the same beta but not at matched KL; if it moves the frontier, the difference at matched KL is
beyond noise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .study import BASELINE_KEY

METRICS = ("score", "length", "kl", "win")
AGAINST = "sum"  # the aggregation every other one is compared with
GRID = (0.25, 0.5, 0.75)  # matched points, as fractions of the shared range
AVERAGE_POINTS = 21  # points of the shared range averaged into one difference


@dataclass
class Setting:
    """One sweep: its rows, its SFT baseline row, and a line saying what the setting is."""

    name: str
    rows: list[dict[str, Any]]
    baseline: dict[str, Any]
    note: str = ""


@dataclass
class Estimate:
    """A point estimate and its bootstrap replicates."""

    point: float
    reps: np.ndarray = field(repr=False)

    @property
    def lo(self) -> float:
        return float(np.percentile(self.reps, 2.5))

    @property
    def hi(self) -> float:
        return float(np.percentile(self.reps, 97.5))

    @property
    def clear(self) -> bool:
        """The 95% interval excludes 0."""
        return self.lo > 0 or self.hi < 0

    def __sub__(self, other: Estimate) -> Estimate:
        return Estimate(self.point - other.point, self.reps - other.reps)

    def to_dict(self) -> dict[str, float]:
        return {"value": self.point, "lo": self.lo, "hi": self.hi}

    def text(self, digits: int = 3, sign: bool = False) -> str:
        f = f"{{:{'+' if sign else ''}.{digits}f}}"
        return f"{f.format(self.point)} [{f.format(self.lo)}, {f.format(self.hi)}]"


class Draws:
    """The bootstrap's resampling weights of seeds and prompts, shared by every cell."""

    def __init__(self, seeds: Sequence[int | None], num_prompts: int, n_boot: int, seed: int):
        rng = np.random.default_rng(seed)
        s, p = len(seeds), num_prompts
        self.seeds = list(seeds)
        self.seed_w = rng.multinomial(s, np.full(s, 1.0 / s), size=n_boot).astype(float) / s
        self.prompt_w = rng.multinomial(p, np.full(p, 1.0 / p), size=n_boot).astype(float) / p

    def estimate(self, matrix: np.ndarray) -> Estimate:
        """Mean of a [seeds, prompts] matrix, with its replicates."""
        reps = np.einsum("bs,sp,bp->b", self.seed_w, matrix, self.prompt_w)
        return Estimate(float(matrix.mean()), reps)


@dataclass
class Cell:
    curve: str
    aggregation: str
    beta_sum: float | None  # None: the SFT baseline
    beta: float | None
    values: dict[str, Estimate]


def _matrix(rows: Sequence[dict[str, Any]], metric: str) -> np.ndarray:
    return np.array([r["per_prompt"][metric] for r in rows], dtype=float)


def common_seeds(settings: Sequence[Setting]) -> list[int | None]:
    """The seeds every cell of every setting has: the bootstrap resamples these."""
    seeds: set | None = None
    for setting in settings:
        by_cell: dict[tuple, set] = {}
        for r in setting.rows:
            by_cell.setdefault((r["curve"], r["beta_sum"]), set()).add(r.get("seed"))
        for cell_seeds in by_cell.values():
            seeds = cell_seeds if seeds is None else seeds & cell_seeds
    if not seeds:
        raise ValueError("no training seed is common to every cell: nothing to resample")
    return sorted(seeds, key=lambda s: -1 if s is None else s)


def cells(setting: Setting, draws: Draws) -> list[Cell]:
    """The baseline, then every (curve, beta_sum) in the rows' order, over the draws' seeds."""
    base = setting.baseline
    base_values = {m: draws.estimate(np.repeat(_matrix([base], m), len(draws.seeds), axis=0))
                   for m in ("score", "length", "kl")}
    out = [Cell(BASELINE_KEY, BASELINE_KEY, None, None, base_values)]
    grouped: dict[tuple, dict[Any, dict]] = {}
    for r in setting.rows:
        grouped.setdefault((r["curve"], r["beta_sum"]), {})[r.get("seed")] = r
    for (curve, beta_sum), by_seed in grouped.items():
        rows = [by_seed[s] for s in draws.seeds]
        metrics = [m for m in METRICS if all(m in r["per_prompt"] for r in rows)]
        out.append(Cell(curve, rows[0]["aggregation"], beta_sum, rows[0]["beta"],
                        {m: draws.estimate(_matrix(rows, m)) for m in metrics}))
    return out


def curve_cells(all_cells: Sequence[Cell]) -> dict[str, list[Cell]]:
    """The cells of each curve, by beta_sum."""
    out: dict[str, list[Cell]] = {}
    for c in all_cells:
        if c.beta_sum is not None:
            out.setdefault(c.curve, []).append(c)
    return {k: sorted(v, key=lambda c: c.beta_sum) for k, v in out.items()}


# --------------------------------------------------------------------------------- comparisons


@dataclass
class Matched:
    """Curve against the summed curve at matched x: the differences (curve - sum) of `y` at
    points of the shared range, and averaged over it."""

    curve: str
    x: str
    y: str
    range: tuple[float, float]
    points: list[tuple[float, Estimate]]  # (x, difference)
    average: Estimate


def _rows(cells: list[Cell], metric: str) -> np.ndarray:
    """[1 + B, K]: the cells' point estimates in row 0, their bootstrap replicates below."""
    return np.stack([np.concatenate([[c.values[metric].point], c.values[metric].reps])
                     for c in cells], axis=1)


def _interp_rows(xs: np.ndarray, ys: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Row by row (xs, ys [R, K]), the piecewise-linear y at `at` [G], x sorted -> [R, G]."""
    order = np.argsort(xs, axis=1)
    xs, ys = np.take_along_axis(xs, order, 1), np.take_along_axis(ys, order, 1)
    return np.stack([np.interp(at, x, y) for x, y in zip(xs, ys, strict=True)])


def matched(curve: list[Cell], against: list[Cell], baseline: Cell, x: str, y: str
            ) -> Matched | None:
    """`curve` - `against` in y at matched x, over the range of x where both curves have runs
    (point estimates); None when they share none. Both curves start from the baseline, which
    only matters for a replicate whose runs moved above a point of that range."""
    xa, ya = _rows([baseline, *curve], x), _rows([baseline, *curve], y)
    xb, yb = _rows([baseline, *against], x), _rows([baseline, *against], y)
    lo, hi = max(xa[0, 1:].min(), xb[0, 1:].min()), min(xa[0, 1:].max(), xb[0, 1:].max())
    if not hi > lo:
        return None
    at = np.array([lo + f * (hi - lo) for f in GRID])
    at_diff = _interp_rows(xa, ya, at) - _interp_rows(xb, yb, at)
    dense = np.linspace(lo, hi, AVERAGE_POINTS)
    average = (_interp_rows(xa, ya, dense) - _interp_rows(xb, yb, dense)).mean(axis=1)
    return Matched(
        curve[0].curve, x, y, (float(lo), float(hi)),
        [(float(v), Estimate(float(at_diff[0, i]), at_diff[1:, i])) for i, v in enumerate(at)],
        Estimate(float(average[0]), average[1:]),
    )


def same_beta(curve: list[Cell], against: list[Cell]) -> list[tuple[float, dict[str, Estimate]]]:
    """(beta_sum, curve - against per metric) at every beta_sum both curves ran: paired by seed
    and prompt."""
    by_beta = {c.beta_sum: c for c in against}
    return [(c.beta_sum, {m: c.values[m] - by_beta[c.beta_sum].values[m]
                          for m in ("length", "score", "kl") if m in c.values})
            for c in curve if c.beta_sum in by_beta]


@dataclass
class SettingFindings:
    setting: Setting
    cells: list[Cell]
    same_beta: dict[str, list[tuple[float, dict[str, Estimate]]]]  # by curve
    matched: dict[str, list[Matched]]  # by curve: (kl -> score), (kl -> length), (length -> score)


MATCHINGS = (("kl", "score"), ("kl", "length"), ("length", "score"))


def analyse(setting: Setting, draws: Draws) -> SettingFindings:
    all_cells = cells(setting, draws)
    by_curve = curve_cells(all_cells)
    summed = next((v for k, v in by_curve.items() if v[0].aggregation == AGAINST), None)
    same, match = {}, {}
    for name, group in by_curve.items():
        if summed is None or group is summed:
            continue
        same[name] = same_beta(group, summed)
        found = [matched(group, summed, all_cells[0], x, y) for x, y in MATCHINGS]
        match[name] = [m for m in found if m is not None]
    return SettingFindings(setting, all_cells, same, match)


def mean_over_betas(pairs: list[tuple[float, dict[str, Estimate]]], metric: str) -> Estimate:
    values = [d[metric] for _, d in pairs]
    return Estimate(float(np.mean([v.point for v in values])),
                    np.mean([v.reps for v in values], axis=0))


# ------------------------------------------------------------------------------------- report


def _x_text(name: str, value: float) -> str:
    return f"KL {value:.2f}" if name == "kl" else f"length {value:.1f}"


def _sign_word(e: Estimate, more: str, less: str) -> str:
    if not e.clear:
        return "no different beyond noise"
    return more if e.point > 0 else less


def verdict_lines(f: SettingFindings) -> list[str]:
    """What averaging (each non-sum curve) does against summing in this setting, computed."""
    lines = []
    for name, pairs in f.same_beta.items():
        if not pairs:
            continue
        length = mean_over_betas(pairs, "length")
        score = mean_over_betas(pairs, "score")
        clear_len = sum(d["length"].clear for _, d in pairs)
        clear_score = sum(d["score"].clear for _, d in pairs)
        lines.append(
            f"**{name} vs {AGAINST}, same beta_sum** (paired by seed): length "
            f"{length.text(2, True)} tokens and score {score.text(3, True)} on average over the "
            f"{len(pairs)} betas; the length differs beyond noise at {clear_len} of them, the "
            f"score at {clear_score}."
        )
        by = {(m.x, m.y): m for m in f.matched.get(name, [])}
        if ("kl", "score") in by:
            m = by[("kl", "score")]
            word = _sign_word(m.average, f"higher: {name} moves the score-KL frontier up",
                              f"lower: {name} moves the score-KL frontier down")
            lines.append(
                f"**{name} vs {AGAINST}, matched KL** ({m.range[0]:.2f} to {m.range[1]:.2f}): "
                f"score {m.average.text(3, True)} on average over the range, {word}"
                + ("" if m.average.clear else
                   f" (no sign that {name} moves the score-KL frontier: it moves along it)")
                + "."
            )
        if ("kl", "length") in by:
            m = by[("kl", "length")]
            lines.append(
                f"**{name} vs {AGAINST}, matched KL**: length {m.average.text(2, True)} tokens on "
                f"average over the range, "
                f"{_sign_word(m.average, 'longer at equal KL', 'shorter at equal KL')}."
            )
        if ("length", "score") in by:
            m = by[("length", "score")]
            lines.append(
                f"**{name} vs {AGAINST}, matched length** ({m.range[0]:.1f} to "
                f"{m.range[1]:.1f} tokens): score {m.average.text(3, True)} on average, "
                f"{_sign_word(m.average, 'higher at equal length', 'lower at equal length')}."
            )
    for name, group in curve_cells(f.cells).items():
        best = max(group, key=lambda c: c.values["score"].point)
        v = best.values
        lines.append(
            f"{name}: best score at beta_sum={best.beta_sum:g}: {v['score'].text(3)}, length "
            f"{v['length'].text(1)}, KL {v['kl'].text(2)} (SFT: score "
            f"{f.cells[0].values['score'].point:.3f}, length "
            f"{f.cells[0].values['length'].point:.1f})."
        )
    return lines


def bias_lines(findings: Sequence[SettingFindings]) -> list[str]:
    """How the sum-vs-average difference changes between the first and last setting
    (difference in differences at the same beta, paired by seed and prompt)."""
    if len(findings) < 2:
        return []
    first, last = findings[0], findings[-1]
    lines = []
    for name in last.same_beta:
        a, b = first.same_beta.get(name), last.same_beta[name]
        if not a or not b:
            continue
        for metric, unit, digits in (("length", " tokens", 2), ("score", "", 3)):
            d_a, d_b = mean_over_betas(a, metric), mean_over_betas(b, metric)
            did = d_b - d_a
            lines.append(
                f"**{name} - {AGAINST}, {metric}**: {d_a.text(digits, True)}{unit} in "
                f"{first.setting.name}, {d_b.text(digits, True)}{unit} in {last.setting.name}; "
                f"the change, {did.text(digits, True)}{unit}, is "
                + ("beyond noise: this part of the difference comes with the length bias of the "
                   "labels." if did.clear else "within noise.")
            )
    return lines


def cells_table(f: SettingFindings) -> str:
    header = ["curve", "beta (sum scale)", "beta (used)", "length [95% CI]", "score [95% CI]",
              "KL [95% CI]", "win rate vs SFT [95% CI]"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in f.cells:
        v = c.values
        lines.append("| " + " | ".join([
            c.curve, "-" if c.beta_sum is None else f"{c.beta_sum:g}",
            "-" if c.beta is None else f"{c.beta:.4g}", v["length"].text(1), v["score"].text(3),
            v["kl"].text(2), v["win"].text(3) if "win" in v else "-",
        ]) + " |")
    return "\n".join(lines)


def differences_table(f: SettingFindings) -> str:
    header = ["comparison", "where", "length difference", "score difference", "KL difference"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, pairs in f.same_beta.items():
        for beta_sum, d in pairs:
            lines.append(f"| {name} - {AGAINST} | beta_sum={beta_sum:g} | "
                         f"{d['length'].text(2, True)} | {d['score'].text(3, True)} | "
                         f"{d['kl'].text(2, True)} |")
        for m in f.matched.get(name, []):
            for at, d in [*m.points, (None, m.average)]:
                where = (f"matched {_x_text(m.x, at)}" if at is not None else
                         f"matched {m.x}, average over {m.range[0]:.2f}..{m.range[1]:.2f}")
                cells = {m.y: d.text(3 if m.y == "score" else 2, True)}
                lines.append(f"| {name} - {AGAINST} | {where} | {cells.get('length', '-')} | "
                             f"{cells.get('score', '-')} | - |")
    return "\n".join(lines)


def findings_json(findings: Sequence[SettingFindings], seeds: list) -> dict[str, Any]:
    out: dict[str, Any] = {"seeds": seeds, "settings": {}}
    for f in findings:
        out["settings"][f.setting.name] = {
            "cells": [{"curve": c.curve, "beta_sum": c.beta_sum, "beta": c.beta,
                       **{m: e.to_dict() for m, e in c.values.items()}} for c in f.cells],
            "same_beta": {name: [{"beta_sum": b, **{m: e.to_dict() for m, e in d.items()}}
                                 for b, d in pairs] for name, pairs in f.same_beta.items()},
            "matched": {name: [{"x": m.x, "y": m.y, "range": list(m.range),
                                "average": m.average.to_dict(),
                                "points": [{"at": at, **e.to_dict()} for at, e in m.points]}
                               for m in ms] for name, ms in f.matched.items()},
        }
    return out


# --------------------------------------------------------------------------------------- plots


def plot_frontiers(findings: Sequence[SettingFindings], x: str, path: Path, *,
                   ideal_length: float | None = None, title: str = "") -> None:
    """Score against `x` (length or kl), one panel per setting, one curve per aggregation (cells
    in beta order from the SFT star), bars the 95% intervals in both directions."""
    from matplotlib.figure import Figure  # no pyplot: no global backend switch

    fig = Figure(figsize=(6.5 * len(findings), 5), layout="constrained")
    axes = fig.subplots(1, len(findings), squeeze=False)[0]  # own scales: settings differ a lot
    for ax, f in zip(axes, findings, strict=True):
        base = f.cells[0].values
        for name, group in curve_cells(f.cells).items():
            pts = [base, *[c.values for c in reversed(group)]]  # SFT (beta -> inf) first
            xs = [v[x].point for v in pts]
            ys = [v["score"].point for v in pts]
            style = "-" if group[0].aggregation == AGAINST else "--"
            (line,) = ax.plot(xs, ys, style, marker="o", label=name)
            xerr = [[v[x].point - v[x].lo for v in pts[1:]],
                    [v[x].hi - v[x].point for v in pts[1:]]]
            yerr = [[v["score"].point - v["score"].lo for v in pts[1:]],
                    [v["score"].hi - v["score"].point for v in pts[1:]]]
            ax.errorbar(xs[1:], ys[1:], xerr=xerr, yerr=yerr, fmt="none",
                        ecolor=line.get_color(), alpha=0.5, capsize=2)
            for c in group:
                ax.annotate(f"{c.beta_sum:g}", (c.values[x].point, c.values["score"].point),
                            fontsize=7, xytext=(3, 3), textcoords="offset points",
                            color=line.get_color())
        ax.plot([base[x].point], [base["score"].point], "k*", markersize=14, label="SFT")
        if x == "length" and ideal_length is not None:
            ax.axvline(ideal_length, color="gray", linestyle=":", label="oracle-optimal length")
        ax.set_xlabel("mean generation length (tokens)" if x == "length" else
                      "KL(policy || SFT), nats per completion")
        ax.set_title(f"{f.setting.name}", fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.set_ylabel("mean score")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}\n(labels: beta on the summed scale; bars: 95% intervals over seeds "
                 "and prompts)", fontsize=10)
    fig.savefig(path, dpi=120)


# -------------------------------------------------------------------------------------- write


@dataclass
class StudyFiles:
    table: str
    report: str
    files: dict[str, Path]
    findings: list[SettingFindings]


def write_study(out: str | Path, settings: dict[str, Setting], *, n_boot: int, seed: int,
                title: str, setting: Sequence[str] = (), ideal_length: float | None = None
                ) -> StudyFiles:
    """report.md, frontier.json, score_vs_length.png and score_vs_kl.png under `out`, every
    number computed from the settings' rows."""
    out = Path(out)
    seeds = common_seeds(list(settings.values()))
    num_prompts = len(next(iter(settings.values())).baseline["per_prompt"]["score"])
    draws = Draws(seeds, num_prompts, n_boot, seed)
    findings = [analyse(s, draws) for s in settings.values()]
    files = {"report": out / "report.md", "numbers": out / "frontier.json",
             "length_plot": out / "score_vs_length.png", "kl_plot": out / "score_vs_kl.png"}
    plot_frontiers(findings, "length", files["length_plot"], ideal_length=ideal_length,
                   title=f"{title}: score against length")
    plot_frontiers(findings, "kl", files["kl_plot"], title=f"{title}: score against KL")
    files["numbers"].write_text(json.dumps(findings_json(findings, seeds), indent=1) + "\n")
    seeds_text = "none named (one run per cell)" if seeds == [None] else ", ".join(map(str, seeds))
    parts = [f"# {title}", "", "## Setting", "", *[f"- {s}" for s in setting],
             f"- Intervals: 95%, from {n_boot} bootstrap replicates resampling the training seeds "
             f"({seeds_text}) and the {num_prompts} prompts together (avgalign.frontier).", ""]
    for f in findings:
        parts += [f"## {f.setting.name}", ""]
        if f.setting.note:
            parts += [f"- {f.setting.note}", ""]
        parts += [*[f"- {s}" for s in verdict_lines(f)], "", cells_table(f), "",
                  differences_table(f), ""]
    did = bias_lines(findings)
    if did:
        parts += ["## Length bias as the cause", "", *[f"- {s}" for s in did], ""]
    parts += ["## Plots", "", f"![score against length]({files['length_plot'].name})", "",
              f"![score against KL]({files['kl_plot'].name})", ""]
    report = "\n".join(parts)
    files["report"].write_text(report, encoding="utf-8")
    table = "\n\n".join(cells_table(f) for f in findings)
    return StudyFiles(table, report, files, findings)
