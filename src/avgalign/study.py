"""The study: a sweep over (loss, aggregation, beta[, alpha]) from one reference policy, with
resumable results, a table, a score-against-length plot and a report whose findings are computed.

Generic: it knows neither the toy world nor how a run trains or is evaluated. A recipe (the toy
demo, a real-model recipe) gives `run_sweep` a function run_one(spec) -> measurements and, for the
baseline, baseline() -> measurements; this module plans the grid, calibrates beta between
aggregations, keeps the results file, and writes the outputs. avgalign.sweep builds those two
functions for both recipes (train a run with avgalign.train, sample and score it, compare it with
the reference).

Beta calibration. Averaging divides a sequence log-ratio by |y| (by |y|^alpha for "power"), so the
same beta regularises an averaged loss far more weakly than a summed one. The grid is given on the
summed scale, beta_sum, and each run uses

    beta = beta_sum * L ** e,   e = 0 (sum), 1 (mean), alpha (power),

with L the mean completion length of the training pairs (chosen and rejected, in tokens): at
|y| = L both losses see the same argument beta * h. Runs at the same beta_sum are "comparable".

Results file (JSON lines). Each finished run is one row, written with one flushed write; rows name
their run (`key`) and the `context` (a hash of everything else that shapes a run: data, reference,
training and evaluation settings). A re-run skips every key already there for its context, reads
past a line cut short by a kill, and keeps the first row of a key if one were ever written twice.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .data import TokenizedPair, mean_completion_length  # noqa: F401 (re-exported)
from .evaluation import EvalResult, mean_ci
from .losses import aggregation_exponent

BASELINE_KEY = "sft"
# fields that measure the machine, not the method: they differ between identical runs
VOLATILE_FIELDS = ("train_seconds", "eval_seconds", "reference_seconds", "reference_from_cache")

# ------------------------------------------------------------------------------ grid and beta


def calibrate_beta(beta_sum: float, exponent: float, mean_length: float) -> float:
    """beta = beta_sum * mean_length ** exponent (exponent 0: sum, 1: mean, alpha: power)."""
    if mean_length <= 0:
        raise ValueError(f"mean completion length must be > 0, got {mean_length}")
    return beta_sum * mean_length**exponent


@dataclass(frozen=True)
class RunSpec:
    """One run of the sweep. beta_sum is the grid coordinate, beta the value the loss uses."""

    loss: str
    aggregation: str
    beta_sum: float
    beta: float
    alpha: float | None = None  # only for aggregation "power"
    seed: int | None = None  # the training seed, when the sweep repeats each cell over seeds

    @property
    def curve(self) -> str:
        """The (loss, aggregation[, alpha]) a run belongs to: one curve of the plot."""
        suffix = f"{self.alpha:g}" if self.aggregation == "power" else ""
        return f"{self.loss}/{self.aggregation}{suffix}"

    @property
    def cell(self) -> str:
        """The grid point (curve, beta_sum), common to the runs that differ only by seed."""
        return f"{self.curve}/beta_sum={self.beta_sum:g}"

    @property
    def key(self) -> str:
        return self.cell if self.seed is None else f"{self.cell}/seed={self.seed}"


def plan_runs(
    losses: Iterable[str],
    aggregations: Iterable[str],
    betas: Iterable[float],
    mean_length: float,
    alphas: Iterable[float] = (),
    seeds: Iterable[int | None] = (None,),
) -> list[RunSpec]:
    """Every (loss, aggregation, beta_sum), one curve per alpha for "power", betas calibrated;
    each cell once per training seed (seed None: the training config's own seed)."""
    alphas, seeds = list(alphas), list(seeds)
    specs = []
    for loss in losses:
        for aggregation in aggregations:
            if aggregation == "power" and not alphas:
                raise ValueError("aggregation 'power' needs at least one alpha")
            for alpha in alphas if aggregation == "power" else [None]:
                exponent = aggregation_exponent(aggregation, 1.0 if alpha is None else alpha)
                for beta_sum in betas:
                    beta = calibrate_beta(beta_sum, exponent, mean_length)
                    specs += [RunSpec(loss, aggregation, beta_sum, beta, alpha, seed)
                              for seed in seeds]
    return specs


# -------------------------------------------------------------------------------- results file


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append one JSON row in a single flushed write. If the file ends in a line cut short by a
    kill, the row starts on a new line, so only the cut row is lost."""
    path = Path(path)
    text = json.dumps(row) + "\n"
    if path.is_file() and path.stat().st_size > 0:
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                text = "\n" + text
    with path.open("a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_rows(path: str | Path, context: str | None = None) -> dict[str, dict[str, Any]]:
    """Rows by key (first occurrence wins), of `context` only when given. Lines that are not a
    JSON object (the cut last line of a killed run) are skipped."""
    path = Path(path)
    rows: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or "key" not in row:
            continue
        if context is not None and row.get("context") != context:
            continue
        rows.setdefault(row["key"], row)
    return rows


def spec_fields(spec: RunSpec) -> dict[str, Any]:
    return {
        "key": spec.key, "curve": spec.curve, "loss": spec.loss, "aggregation": spec.aggregation,
        "alpha": spec.alpha, "beta_sum": spec.beta_sum, "beta": spec.beta, "seed": spec.seed,
    }


BASELINE_FIELDS = {
    "key": BASELINE_KEY, "curve": BASELINE_KEY, "loss": BASELINE_KEY, "aggregation": None,
    "alpha": None, "beta_sum": None, "beta": None, "seed": None,
}


@dataclass
class SweepResult:
    baseline: dict[str, Any] | None
    rows: list[dict[str, Any]]  # one per spec, in the order of the specs
    ran: list[str]  # keys run this time (the others came from the results file)


def run_sweep(
    specs: Sequence[RunSpec],
    run_one: Callable[[RunSpec], dict[str, Any]],
    results_path: str | Path,
    *,
    context: str,
    baseline: Callable[[], dict[str, Any]] | None = None,
    progress: bool = True,
) -> SweepResult:
    """Run the baseline and every spec not yet in the results file for this context; append each
    row as soon as it is measured. Returns all rows of the sweep, old and new."""
    keys = [s.key for s in specs]
    if len(set(keys)) != len(keys):
        raise ValueError("the sweep has duplicate runs")
    done = read_rows(results_path, context)
    ran: list[str] = []

    def record(fields: dict[str, Any], measure: Callable[[], dict[str, Any]]) -> None:
        row = {"context": context, **fields, **measure()}
        append_row(results_path, row)
        done[row["key"]] = row
        ran.append(row["key"])

    if baseline is not None and BASELINE_KEY not in done:
        record(BASELINE_FIELDS, baseline)
    todo = [s for s in specs if s.key not in done]
    bar = tqdm(total=len(specs), initial=len(specs) - len(todo), desc="sweep", disable=not progress)
    for spec in todo:
        bar.set_postfix_str(spec.key)
        record(spec_fields(spec), functools.partial(run_one, spec))
        bar.update(1)
    bar.close()
    return SweepResult(done.get(BASELINE_KEY), [done[k] for k in keys], ran)


def eval_measurements(result: EvalResult) -> dict[str, Any]:
    """The flat row fields of an evaluation: lengths (with a CI on the mean), score, win rates
    against the reference, KL.

    The length CI reads the policy's completions from result.completions, where
    summarize_evaluation puts them first: those sharing the first completion's `model` tag.
    """
    policy_tag = result.completions[0].model
    length_ci = mean_ci([c.num_tokens for c in result.completions if c.model == policy_tag])
    row: dict[str, Any] = {
        "num_prompts": result.num_prompts,
        "num_samples": result.num_samples,
        **{f"length_{k}": v for k, v in result.policy_length.items()},
        "length_lo": length_ci.lo,
        "length_hi": length_ci.hi,
        "finished": result.policy_finished,
        "score": result.policy_score.mean,
        "score_lo": result.policy_score.lo,
        "score_hi": result.policy_score.hi,
    }
    for name, value in (("win", result.win_rate), ("lc_win", result.lc_win_rate)):
        row[f"{name}_rate"] = value.rate if value else None
        row[f"{name}_lo"] = value.lo if value else None
        row[f"{name}_hi"] = value.hi if value else None
    row["kl"] = result.kl.mean if result.kl else None
    row["kl_lo"] = result.kl.lo if result.kl else None
    row["kl_hi"] = result.kl.hi if result.kl else None
    row["per_prompt"] = result.per_prompt
    return row


# --------------------------------------------------------------------------------------- table


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _ci(row: dict[str, Any], mean: str, lo: str, hi: str, digits: int = 2) -> str:
    if row.get(mean) is None:
        return "-"
    return f"{row[mean]:.{digits}f} [{row[lo]:.{digits}f}, {row[hi]:.{digits}f}]"


def results_table(rows: Sequence[dict[str, Any]], baseline: dict[str, Any] | None = None) -> str:
    """A markdown table: one line per run, the baseline first."""
    header = [
        "run", "loss", "aggregation", "beta (sum scale)", "beta (used)", "length mean (sd)",
        "oracle score [95% CI]", "win rate vs SFT [95% CI]", "length-controlled win rate",
        "KL(pi||ref) [95% CI]", "held-out reward acc.", "train s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in ([baseline] if baseline else []) + list(rows):
        aggregation = row["aggregation"] or "-"
        if row["aggregation"] == "power":
            aggregation = f"power (alpha={row['alpha']:g})"
        cells = [
            row["key"], row["loss"], aggregation, _fmt(row["beta_sum"]), _fmt(row["beta"]),
            f"{row['length_mean']:.2f} ({row['length_std']:.2f})",
            _ci(row, "score", "score_lo", "score_hi"),
            _ci(row, "win_rate", "win_lo", "win_hi"),
            _ci(row, "lc_win_rate", "lc_win_lo", "lc_win_hi"),
            _ci(row, "kl", "kl_lo", "kl_hi"),
            _fmt(row.get("reward_accuracy"), 2),
            _fmt(row.get("train_seconds"), 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- plot


def curves(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by curve, each sorted by beta_sum; curves in order of first appearance."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row["curve"], []).append(row)
    return {name: sorted(group, key=lambda r: r["beta_sum"]) for name, group in out.items()}


def _far_out(values: Sequence[float], k: float = 3.0) -> list[bool]:
    """Tukey's far-out test: outside [Q1 - k IQR, Q3 + k IQR]."""
    ordered = sorted(values)
    q1, q3 = (ordered[int(q * (len(ordered) - 1))] for q in (0.25, 0.75))
    lo, hi = q1 - k * (q3 - q1), q3 + k * (q3 - q1)
    return [not lo <= v <= hi for v in values]


def plot_score_vs_length(
    rows: Sequence[dict[str, Any]],
    baseline: dict[str, Any] | None,
    path: str | Path,
    *,
    ideal_length: float | None = None,
    title: str = "score against generation length",
) -> None:
    """One line per (loss, aggregation) across beta, points labelled with beta_sum, vertical bars
    the score CI; the baseline a black star; the oracle's optimal mean length, when known, a
    dotted line. When some runs are far out (a collapsed policy), a second panel zooms on the
    others, so that one outlier does not flatten every curve."""
    from matplotlib.figure import Figure  # no pyplot: no global backend switch

    points = [*rows, *([baseline] if baseline else [])]
    far = [a or b for a, b in zip(_far_out([r["length_mean"] for r in points]),
                                  _far_out([r["score"] for r in points]), strict=True)]
    zoom = any(far) and not all(far)
    fig = Figure(figsize=(13 if zoom else 7.5, 5), layout="constrained")
    axes = fig.subplots(1, 2 if zoom else 1, squeeze=False)[0]
    for ax in axes:
        for name, group in curves(rows).items():
            x = [r["length_mean"] for r in group]
            y = [r["score"] for r in group]
            err = [[r["score"] - r["score_lo"] for r in group],
                   [r["score_hi"] - r["score"] for r in group]]
            style = "-" if group[0]["aggregation"] == "sum" else "--"
            (line,) = ax.plot(x, y, style, marker="o", label=name)
            ax.errorbar(x, y, yerr=err, fmt="none", ecolor=line.get_color(), alpha=0.5, capsize=2)
            for r in group:
                ax.annotate(f"{r['beta_sum']:g}", (r["length_mean"], r["score"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points", color=line.get_color())
        if baseline is not None:
            ax.plot([baseline["length_mean"]], [baseline["score"]], "k*", markersize=14,
                    label="SFT")
        if ideal_length is not None:
            ax.axvline(ideal_length, color="gray", linestyle=":", label="oracle-optimal length")
        ax.set_xlabel("mean generation length (tokens)")
        ax.set_ylabel("mean score")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"{title}\n(labels: beta on the summed scale; solid: sum, dashed: averaged)",
                      fontsize=10)
    if zoom:
        kept = [r for r, f in zip(points, far, strict=True) if not f]
        xs = [r["length_mean"] for r in kept] + ([ideal_length] if ideal_length else [])
        ys = [v for r in kept for v in (r["score_lo"], r["score_hi"])]
        pad_x, pad_y = 0.08 * (max(xs) - min(xs) or 1.0), 0.08 * (max(ys) - min(ys) or 1.0)
        axes[1].set_xlim(min(xs) - pad_x, max(xs) + pad_x)
        axes[1].set_ylim(min(ys) - pad_y, max(ys) + pad_y)
        axes[1].set_title(f"zoom: {sum(far)} far-out run(s) left out of view", fontsize=10)
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------ findings


@dataclass(frozen=True)
class Comparison:
    """An aggregation against the summed loss, same loss and beta_sum. A change is "clear" when
    the two 95% intervals (of mean length, of mean score) do not overlap."""

    loss: str
    curve: str
    beta_sum: float
    length_change: float  # tokens, this aggregation minus sum
    score_change: float
    length_clear: bool
    score_clear: bool

    def describe(self) -> str:
        return f"{self.curve} at beta_sum={self.beta_sum:g}: {self.change()}"

    def change(self) -> str:
        return f"{self.length_change:+.2f} tokens, score {self.score_change:+.3f}"


def _disjoint(a: dict[str, Any], b: dict[str, Any], name: str) -> bool:
    return a[f"{name}_lo"] > b[f"{name}_hi"] or a[f"{name}_hi"] < b[f"{name}_lo"]


def compare_to_sum(rows: Sequence[dict[str, Any]]) -> list[Comparison]:
    """Every non-sum run that has a summed run of the same loss, beta_sum (and seed)."""
    summed = {(r["loss"], r["beta_sum"], r.get("seed")): r
              for r in rows if r["aggregation"] == "sum"}
    out = []
    for r in rows:
        s = summed.get((r["loss"], r["beta_sum"], r.get("seed")))
        if r["aggregation"] == "sum" or s is None:
            continue
        out.append(Comparison(
            loss=r["loss"], curve=r["curve"], beta_sum=r["beta_sum"],
            length_change=r["length_mean"] - s["length_mean"], score_change=r["score"] - s["score"],
            length_clear=_disjoint(r, s, "length"), score_clear=_disjoint(r, s, "score"),
        ))
    return out


def _count(n: int, total: int) -> str:
    return f"{n} of {total}"


def aggregation_findings(rows: Sequence[dict[str, Any]]) -> list[str]:
    """How each non-sum aggregation changed length and score relative to summing, from the rows."""
    comparisons = compare_to_sum(rows)
    if not comparisons:
        return ["No aggregation was run against the summed loss at the same beta: nothing to "
                "compare."]
    lines = []
    for curve in dict.fromkeys(c.curve for c in comparisons):
        group = [c for c in comparisons if c.curve == curve]
        m = len(group)
        lines.append(
            f"**{curve} vs {group[0].loss}/sum** at the same beta_sum: shorter in "
            f"{_count(sum(c.length_change < 0 for c in group), m)} comparisons, longer in "
            f"{_count(sum(c.length_change > 0 for c in group), m)} (clearly, i.e. with disjoint "
            f"95% intervals, in {_count(sum(c.length_clear for c in group), m)}); higher score in "
            f"{_count(sum(c.score_change > 0 for c in group), m)} (clearly in "
            f"{_count(sum(c.score_clear for c in group), m)}). Per beta: "
            + "; ".join(f"beta_sum={c.beta_sum:g}: {c.change()}" for c in group) + "."
        )
    lines.append(verdict(comparisons))
    return lines


def _listed(comparisons: Sequence[Comparison]) -> str:
    return "; ".join(c.describe() for c in comparisons)


def verdict(comparisons: Sequence[Comparison]) -> str:
    """The conclusion on the length/score trade-off, from the clear changes only.

    A trade-off: where averaging changed both length and score clearly, they moved together
    (shorter and lower-scoring, or longer and higher-scoring), so neither aggregation is better on
    both counts. Opposite moves (shorter and better, longer and worse) are not a trade-off.
    """
    m = len(comparisons)
    clear = [c for c in comparisons if c.length_clear or c.score_clear]
    if not clear:
        return (f"Verdict: at comparable beta, averaging and summing gave the same length and "
                f"score within the 95% intervals in all {m} comparisons; no trade-off is visible "
                "in this setting.")
    both = [c for c in clear if c.length_clear and c.score_clear]
    together = [c for c in both if (c.length_change > 0) == (c.score_change > 0)]
    opposite = [c for c in both if c not in together]
    parts = [f"Verdict: at comparable beta, averaging changed length or score beyond noise in "
             f"{_count(len(clear), m)} comparisons."]
    if together and not opposite:
        parts.append(f"Where it changed both, they moved together, the trade-off the paper "
                     f"reports ({_listed(together)}).")
    elif opposite and not together:
        kinds = {"longer and worse" if c.length_change > 0 else "shorter and better"
                 for c in opposite}
        parts.append(f"Where it changed both, they moved in opposite directions (averaging was "
                     f"{' or '.join(sorted(kinds))}), which is not the trade-off the paper "
                     f"reports ({_listed(opposite)}).")
    elif both:
        parts.append(f"Where it changed both, the directions were mixed, so there is no "
                     f"consistent trade-off ({_listed(both)}).")
    else:
        parts.append("No comparison changed both beyond noise, so no trade-off is visible.")
    single = [c for c in clear if c not in both]
    if single:
        parts.append(f"Only one of the two changed beyond noise in: {_listed(single)}.")
    return " ".join(parts)


def baseline_findings(
    rows: Sequence[dict[str, Any]],
    baseline: dict[str, Any],
    ideal_length: float | None = None,
) -> list[str]:
    """Which runs beat the baseline (win-rate CI above 50%), how lengths moved, and how each
    curve moves along beta."""
    lines = []
    winners = [r for r in rows if r.get("win_lo") is not None and r["win_lo"] > 0.5]
    best = max(rows, key=lambda r: r["score"])
    lines.append(
        f"{_count(len(winners), len(rows))} aligned runs beat the SFT policy with a win-rate "
        "interval entirely above 50%"
        + (f": {', '.join(r['key'] for r in winners)}." if winners else ".")
        + f" Best oracle score: {best['key']}, {best['score']:.3f} vs {baseline['score']:.3f} for "
        f"SFT, win rate {best['win_rate']:.1%} [{best['win_lo']:.1%}, {best['win_hi']:.1%}], "
        f"length {best['length_mean']:.2f} tokens."
    )
    longer = sum(r["length_mean"] > baseline["length_mean"] for r in rows)
    ideal = ("" if ideal_length is None else
             f"; the oracle-optimal mean length on these prompts is {ideal_length:.2f}")
    lines.append(
        f"{_count(longer, len(rows))} runs generate longer than the SFT policy "
        f"({baseline['length_mean']:.2f} tokens{ideal}); run lengths range from "
        f"{min(r['length_mean'] for r in rows):.2f} to {max(r['length_mean'] for r in rows):.2f}."
    )
    for name, group in curves(rows).items():
        if len(group) > 1:
            lo, hi = group[0], group[-1]
            lines.append(
                f"{name}: from beta_sum={lo['beta_sum']:g} to {hi['beta_sum']:g}, length "
                f"{lo['length_mean']:.2f} -> {hi['length_mean']:.2f}, score {lo['score']:.3f} -> "
                f"{hi['score']:.3f}, KL {_fmt(lo['kl'])} -> {_fmt(hi['kl'])}."
            )
    return lines


def write_report(
    path: str | Path,
    *,
    title: str,
    rows: Sequence[dict[str, Any]],
    baseline: dict[str, Any],
    setting: Sequence[str] = (),
    ideal_length: float | None = None,
    plot_file: str | None = None,
) -> str:
    """Write the markdown report (setting, findings, table, plot) and return its text. Every
    finding is computed from `rows`; `setting` holds the recipe's own measured facts."""
    parts = [f"# {title}", ""]
    if setting:
        parts += ["## Setting", "", *[f"- {s}" for s in setting], ""]
    parts += ["## Averaging vs summing", "", *[f"- {s}" for s in aggregation_findings(rows)], ""]
    parts += ["## Against the SFT policy", "",
              *[f"- {s}" for s in baseline_findings(rows, baseline, ideal_length)], ""]
    parts += ["## Results", "", results_table(rows, baseline), ""]
    if plot_file:
        parts += [f"![score against length]({plot_file})", ""]
    text = "\n".join(parts)
    Path(path).write_text(text, encoding="utf-8")
    return text
