"""Search efficiency on a noisy landscape: what a search saw, what it crowned, and its regret.

The pure part of ``benchmarks/search_efficiency.py`` (no Ray): the landscape's per-seed samples
and seed means, the per-trial draw of the seed a trial sees, the anytime regret of a search's
recorded trajectory, and the report (tables, targets judged on fixed statistics, plot).

A landscape (``benchmarks/landscape.py``) holds, for every grid point, one record per training
seed. A configuration's true value is its *seed mean* (mean final ``stream_loss`` over the
seeds); a trial sees ONE seed's reports, drawn for it from the search seed's RNG, as a real
trial sees one noisy run. A search crowns the finished trial with the best *observed* final
``stream_loss``; "found" is the seed mean of the crowned configuration, and regret is found
minus the best seed mean of the grid.
"""

from __future__ import annotations

import json
import math
import random
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

LABELS = {
    "default": "adaptune default: TPE + ASHA, stopped = PRUNED",
    "tpe": "TPE, no ASHA",
    "random+asha": "random + ASHA",
    "random": "random, no ASHA",
    "tpe+asha/complete": "TPE + ASHA, stopped = COMPLETE (stock OptunaSearch)",
}
# The target and the statistics that judge it, fixed before any search ran.
TARGET_NATS = 0.01
TARGET_BUDGET = 0.25
TARGET_SHARE = 0.5  # met: the 95% lower bound of the share of searches within TARGET_NATS
BOOTSTRAP = 10_000  # resamples for the bootstrap intervals, drawn from a fixed RNG (seed 0)


def key_of(params: dict[str, Any], names: list[str]) -> str:
    """A grid point's lookup key: its knob values, in the landscape's knob order."""
    return json.dumps([float(params[n]) for n in names])


def landscape_samples(
    landscape: dict[str, Any], only: list[int] | None = None
) -> tuple[dict[str, dict[int, list[dict[str, Any]]]], list[int], dict[str, float]]:
    """Per point, each seed's per-task reports; the seeds used; the seed means.

    ``only``: these training seeds (each must be complete); default: every seed that every grid
    point has (a landscape still being extended counts only its complete seeds). A record
    without a ``seed`` is seed 0.
    """
    names = list(landscape["meta"]["paths"])
    table: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for rec in landscape["configs"]:
        table.setdefault(key_of(rec["params"], names), {})[int(rec.get("seed", 0))] = rec["tasks"]
    complete = sorted(set.intersection(*(set(v) for v in table.values())))
    seeds = complete if only is None else sorted(only)
    if not seeds or not set(seeds) <= set(complete):
        raise ValueError(
            f"training seeds {seeds} are not all complete for every grid point of the "
            f"landscape; complete: {complete}"
        )
    table = {k: {s: v[s] for s in seeds} for k, v in table.items()}
    means = {k: statistics.fmean(v[s][-1]["stream_loss"] for s in seeds) for k, v in table.items()}
    return table, seeds, means


def sample_seed_drawer(search_seed: int, seeds: list[int]) -> Callable[[], int]:
    """The landscape seed each new trial of one search sees, in trial order.

    Seeded by the search seed alone, so every variant's i-th trial sees the same draw.
    """
    rng = random.Random(f"landscape-sample:{search_seed}")
    return lambda: rng.choice(seeds)


def anytime(
    events: list[list[Any]], T: int, means: dict[str, float] | None = None
) -> list[tuple[int, float | None]]:
    """(tokens spent after each result, seed mean of the crowned configuration so far).

    The crowned trial is the finished one with the best observed final ``stream_loss`` (ties:
    the first). Events are ``[trial, task, observed loss, tokens, point]``; without a point or
    seed means (a single-seed landscape), the observed value is the found one.
    """
    last: dict[str, int] = {}
    spent, best, found = 0, math.inf, None
    curve = []
    for trial_id, task, loss, tokens, *point in events:
        spent += tokens - last.get(trial_id, 0)
        last[trial_id] = tokens
        if task == T and loss < best:
            best = loss
            found = means[point[0]] if means and point else loss
        curve.append((spent, found))
    return curve


def found_at(curve: list[tuple[int, float | None]], budget_tokens: float) -> float | None:
    """What the search had crowned when it had spent ``budget_tokens``."""
    found = None
    for spent, value in curve:
        if spent > budget_tokens:
            break
        found = value
    return found


def trials_at(events: list[list[Any]], budget_tokens: float) -> int:
    """How many trials the search had started within ``budget_tokens``."""
    last: dict[str, int] = {}
    spent = 0
    for trial_id, _task, _loss, tokens, *_ in events:
        spent += tokens - last.get(trial_id, 0)
        if spent > budget_tokens:
            break
        last[trial_id] = tokens
    return len(last)


def common_seeds(results: dict[str, Any]) -> list[int]:
    """The search seeds every variant ran: the only ones any comparison uses."""
    per = [
        {r["seed"] for r in results["runs"] if r["variant"] == v}
        for v in results["meta"]["variants"]
    ]
    return sorted(set.intersection(*per)) if per else []


def all_variants(meta: dict[str, Any]) -> list[str]:
    """The searched variants, then each read with every confirmation setting of ``--confirm``."""
    derived = [f"{v}+confirm{k}x{s}" for k, s in meta.get("confirm", []) for v in meta["variants"]]
    return [*meta["variants"], *derived]


def split_variant(variant: str) -> tuple[str, tuple[int, int] | None]:
    """``default+confirm3x2`` -> (``default``, (3, 2)); a searched variant -> (it, None)."""
    m = re.fullmatch(r"(.+)\+confirm(\d+)x(\d+)", variant)
    return (m[1], (int(m[2]), int(m[3]))) if m else (variant, None)


def label(variant: str) -> str:
    base, confirm = split_variant(variant)
    if confirm is None:
        return LABELS[base]
    return f"{LABELS[base]} + confirm (top {confirm[0]}, {confirm[1]} more seeds)"


def target_variant(meta: dict[str, Any]) -> str:
    """The variant the headline goal is judged on (fixed in the results' settings)."""
    return str(meta.get("target", "default"))


def base_runs(results: dict[str, Any], variant: str) -> list[dict[str, Any]]:
    """The searches a (searched or confirmation) variant is read from, common seeds, in order."""
    base, _ = split_variant(variant)
    seeds = set(common_seeds(results))
    runs = [r for r in results["runs"] if r["variant"] == base and r["seed"] in seeds]
    return sorted(runs, key=lambda r: r["seed"])


def confirm_cut(meta: dict[str, Any], budget_tokens: float, confirm: tuple[int, int]) -> float:
    """Where a search followed by confirmation stops: the budget less the confirmation's
    reserve (top_k x seeds x the grid's longest full run), so confirming never overruns."""
    return budget_tokens - confirm[0] * confirm[1] * meta["run_tokens_max"]


def confirmed_found_at(
    events: list[list[Any]], meta: dict[str, Any], budget_tokens: float, confirm: tuple[int, int]
) -> float | None:
    """The true value of the configuration a search + ``search.confirm`` crowns.

    The search runs to :func:`confirm_cut`; its best ``top_k`` finished trials by observed
    final loss (ties: the first) are each re-run on ``seeds`` more training seeds, the ones
    after the trial's own in the drawn seeds' order (as ``search.confirm`` uses the trial's
    seed + 1 ..); the crowned one has the best mean over its runs (ties: the better-observed).
    Events must carry the drawn seed (``[trial, task, loss, tokens, point, seed]``).
    """
    top_k, seeds = confirm
    draw, finals, T = meta["landscape_seeds"], meta["point_finals"], meta["tasks"]
    cut = confirm_cut(meta, budget_tokens, confirm)
    last: dict[str, int] = {}
    spent, done = 0, []
    for i, (trial_id, task, loss, tokens, point, seed) in enumerate(events):
        spent += tokens - last.get(trial_id, 0)
        if spent > cut:
            break
        last[trial_id] = tokens
        if task == T:
            done.append((loss, i, point, seed))
    if not done:
        return None

    def mean(trial: tuple[float, int, str, int]) -> float:
        loss, _, point, seed = trial
        j = draw.index(seed)
        more = [finals[point][(j + n) % len(draw)] for n in range(1, seeds + 1)]
        return statistics.fmean([loss, *more])

    winner = min(sorted(done)[:top_k], key=mean)
    return meta["point_means"][winner[2]]


def regrets_at(results: dict[str, Any], variant: str, frac: float) -> list[float]:
    """Each common seed's regret at ``frac`` of the grid's compute (inf: nothing finished)."""
    meta = results["meta"]
    budget = frac * meta["grid_tokens"]
    _, confirm = split_variant(variant)
    means = meta.get("point_means")
    found = [
        found_at(anytime(r["events"], meta["tasks"], means), budget)
        if confirm is None
        else confirmed_found_at(r["events"], meta, budget, confirm)
        for r in base_runs(results, variant)
    ]
    return [math.inf if f is None else f - meta["grid_best"] for f in found]


def share_ci(hits: int, n: int) -> tuple[float, float]:
    """95% Clopper-Pearson interval of a binomial share."""
    from scipy.stats import beta

    lo = 0.0 if hits == 0 else float(beta.ppf(0.025, hits, n - hits + 1))
    hi = 1.0 if hits == n else float(beta.ppf(0.975, hits + 1, n - hits))
    return lo, hi


def bootstrap_ci(values: list[float], stat: Callable[[Any], Any]) -> tuple[float, float]:
    """95% percentile-bootstrap interval of ``stat`` (a numpy reducer taking ``axis``)."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    idx = np.random.default_rng(0).integers(0, len(x), size=(BOOTSTRAP, len(x)))
    boot = stat(x[idx], axis=1)
    return float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def mann_whitney_p(a: list[float], b: list[float]) -> float:
    """Two-sided Mann-Whitney U p-value (scipy; seeds without a finished trial count as worst)."""
    from scipy.stats import mannwhitneyu

    if len(set(a) | set(b)) == 1:
        return 1.0
    big = 1e9  # mannwhitneyu ranks; inf would make it return nan
    return float(mannwhitneyu([min(x, big) for x in a], [min(x, big) for x in b]).pvalue)


def _nats(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "none yet"


def _capped(reg: list[float], worst: float) -> list[float]:
    """A search with no finished trial counts as crowning the grid's worst point."""
    return [min(r, worst) for r in reg]


def target_verdict(reg: list[float]) -> tuple[str, str]:
    """(value, met) of the headline target, judged on the share of searches within it.

    Met ("yes") when the 95% Clopper-Pearson lower bound of the share of searches within
    TARGET_NATS is at least TARGET_SHARE; "no" when its upper bound is below; otherwise
    "not shown" (the seeds cannot tell).
    """
    import numpy as np

    hits = sum(r <= TARGET_NATS for r in reg)
    lo, hi = share_ci(hits, len(reg))
    mlo, mhi = bootstrap_ci([min(r, 1e9) for r in reg], np.median)
    met = "yes" if lo >= TARGET_SHARE else "no" if hi < TARGET_SHARE else "not shown"
    value = (
        f"{hits}/{len(reg)} = {hits / len(reg):.0%} [{lo:.0%}, {hi:.0%}]; median "
        f"{_nats(statistics.median(reg))} [{_nats(mlo)}, {_nats(mhi)}]"
    )
    return value, met


def _budget_table(results: dict[str, Any], frac: float) -> list[str]:
    import numpy as np

    meta = results["meta"]
    total = meta["grid_tokens"]
    lines = [
        f"\n### {frac:.0%} of the grid's compute ({frac * total:,.0f} trained tokens)\n",
        "| variant | median regret (nats) [95% CI] | mean ± std | min - max | "
        f"within {TARGET_NATS} nats [95% CI] | trials (median) |",
        "|---|---|---|---|---|---|",
    ]
    for variant in all_variants(meta):
        reg = regrets_at(results, variant, frac)
        lo, hi = bootstrap_ci([min(r, 1e9) for r in reg], np.median)
        capped = _capped(reg, meta.get("grid_worst_regret", math.inf))
        mean = statistics.fmean(capped)
        std = statistics.stdev(capped) if len(capped) > 1 and math.isfinite(mean) else 0.0
        hits = sum(r <= TARGET_NATS for r in reg)
        slo, shi = share_ci(hits, len(reg))
        _, confirm = split_variant(variant)
        spend = frac * total if confirm is None else confirm_cut(meta, frac * total, confirm)
        runs = base_runs(results, variant)
        trials = statistics.median(trials_at(r["events"], spend) for r in runs)
        lines.append(
            f"| {label(variant)} | {_nats(statistics.median(reg))} [{_nats(lo)}, {_nats(hi)}] "
            f"| {_nats(mean)} ± {std:.4f} | {_nats(min(reg))} - {_nats(max(reg))} | "
            f"{hits}/{len(reg)} [{slo:.0%}, {shi:.0%}] | {trials:g} |"
        )
    return lines


def _lowest(results: dict[str, Any], frac: float, stat: Callable[[list[float]], float]) -> str:
    """Every variant at the lowest value of ``stat`` (ties listed, in the variants' order)."""
    meta = results["meta"]
    worst = meta.get("grid_worst_regret", math.inf)
    vals = {v: stat(_capped(regrets_at(results, v, frac), worst)) for v in all_variants(meta)}
    low = min(vals.values())
    tied = [label(v) for v, x in vals.items() if x == low]
    return ("tie: " if len(tied) > 1 else "") + "; ".join(tied) + f" ({_nats(low)})"


def _compared(meta: dict[str, Any]) -> list[str]:
    """What the target variant is compared with: random search with and without ASHA read the
    same way (with the target's confirmation, if any), and the target without confirmation."""
    target = target_variant(meta)
    base, confirm = split_variant(target)
    suffix = "" if confirm is None else f"+confirm{confirm[0]}x{confirm[1]}"
    others = [f"{rnd}{suffix}" for rnd in ("random", "random+asha")]
    if confirm is not None:
        others.append(base)
    variants = all_variants(meta)
    return [v for v in others if v in variants and v != target]


def _comparisons(results: dict[str, Any]) -> list[str]:
    """The target against each :func:`_compared` variant: the mean-regret difference, its
    bootstrap CI."""
    import numpy as np

    meta = results["meta"]
    worst = meta.get("grid_worst_regret", math.inf)
    target = target_variant(meta)
    lines = []
    if target not in all_variants(meta):
        return lines
    for other in _compared(meta):
        for frac in meta["budgets"]:
            d = _capped(regrets_at(results, target, frac), worst)
            r = _capped(regrets_at(results, other, frac), worst)
            if not all(math.isfinite(x) for x in d + r):
                continue
            diffs = np.random.default_rng(0).integers(0, len(d), size=(BOOTSTRAP, 2, len(d)))
            boot = np.asarray(d)[diffs[:, 0]].mean(1) - np.asarray(r)[diffs[:, 1]].mean(1)
            lo, hi = np.percentile(boot, [2.5, 97.5])
            diff = statistics.fmean(d) - statistics.fmean(r)
            verdict = "lower" if hi < 0 else "higher" if lo > 0 else "no difference shown"
            lines.append(
                f"| {target} - {label(other)}, mean regret at {frac:.0%} | {diff:+.4f} "
                f"[{lo:+.4f}, {hi:+.4f}] | {verdict} |"
            )
    return lines


def report(results: dict[str, Any]) -> str:
    """Markdown: one table per budget, the targets and comparisons, the Mann-Whitney tests."""
    meta = results["meta"]
    target = target_variant(meta)
    judged = target in all_variants(meta)
    lines = []
    if meta.get("reference_seeds") and meta["reference_seeds"] != meta["landscape_seeds"]:
        lines.append(
            f"Trials draw training seeds {meta['landscape_seeds']}; regret is judged on the "
            f"mean over held-out seeds {meta['reference_seeds']}, which no search reads."
        )
    for frac in meta["budgets"]:
        lines += _budget_table(results, frac)
    lines += ["", "| target / comparison (statistic fixed in advance) | value | verdict |"]
    lines.append("|---|---|---|")
    for frac in meta["budgets"] if judged else []:
        value, met = target_verdict(regrets_at(results, target, frac))
        goal = " (the goal)" if frac == TARGET_BUDGET else ""
        lines.append(
            f"| {target} within {TARGET_NATS} nats at {frac:.0%}{goal}: share of searches "
            f"[95% CI], met if its lower bound >= {TARGET_SHARE:.0%} | {value} | {met} |"
        )
    lines += _comparisons(results)
    for frac in meta["budgets"]:
        for name, stat in (("median", statistics.median), ("mean", statistics.fmean)):
            low = _lowest(results, frac, stat)
            lines.append(f"| lowest {name} regret at {frac:.0%} | {low} | |")
    if judged:
        lines += [
            "",
            f"Is the regret distribution of {target} different from each other variant's? "
            "Two-sided Mann-Whitney U test over seeds (p < 0.05: a real difference; "
            "larger: indistinguishable at this number of seeds).",
            "",
            f"| {target} against | " + " | ".join(f"p at {f:.0%}" for f in meta["budgets"]) + " |",
            "|---|" + "---|" * len(meta["budgets"]),
        ]
        for variant in all_variants(meta):
            if variant == target:
                continue
            ps = [
                mann_whitney_p(regrets_at(results, target, f), regrets_at(results, variant, f))
                for f in meta["budgets"]
            ]
            lines.append(f"| {label(variant)} | " + " | ".join(f"{p:.3f}" for p in ps) + " |")
    lines += noise_report(meta)
    return "\n".join(lines)


def landscape_noise(
    table: dict[str, dict[int, list[dict[str, Any]]]], means: dict[str, float], top: int = 6
) -> dict[str, Any]:
    """The grid's best points with each seed's value, and what a one-seed exhaustive search finds.

    ``one_seed_winner_regret``: for each seed, the seed-mean regret of the point that is best on
    that seed alone: the regret of trying every configuration once, the floor of a search that
    sees one sample per trial.
    """
    best = min(means.values())
    ranked = sorted(means, key=means.__getitem__)
    seeds = sorted(next(iter(table.values())))
    finals = {k: {s: v[s][-1]["stream_loss"] for s in seeds} for k, v in table.items()}
    winners = {s: min(finals, key=lambda k, s=s: finals[k][s]) for s in seeds}
    return {
        "top": [{"point": k, "mean": means[k], "per_seed": finals[k]} for k in ranked[:top]],
        "one_seed_winner_regret": {str(s): means[k] - best for s, k in winners.items()},
    }


def noise_report(meta: dict[str, Any]) -> list[str]:
    """Markdown: the top seed means with their per-seed spread, and the one-seed floor."""
    noise = meta.get("noise")
    if not noise:
        return []  # a single-seed results file
    names = meta.get("knobs", [])
    seeds = list(noise["top"][0]["per_seed"])
    lines = [
        "",
        "The grid's best points by seed mean "
        f"({meta.get('reference_seeds') or meta['landscape_seeds']} training seeds):",
        "",
        f"| rank | {' | '.join(names)} | seed mean | std | gap to best | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " |",
        "|---|" + "---|" * (len(names) + 3 + len(seeds)),
    ]
    best = noise["top"][0]["mean"]
    for rank, row in enumerate(noise["top"], 1):
        vals = list(row["per_seed"].values())
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        knobs = " | ".join(f"{v:g}" for v in json.loads(row["point"]))
        lines.append(
            f"| {rank} | {knobs} | {row['mean']:.4f} | {std:.4f} | {row['mean'] - best:.4f} | "
            + " | ".join(f"{v:.4f}" for v in vals)
            + " |"
        )
    lines += _seed_agreement(meta)
    return lines


def _seed_agreement(meta: dict[str, Any]) -> list[str]:
    """Markdown: seed spread over the grid, seed-to-seed rank agreement, one-seed winners."""
    from scipy.stats import spearmanr

    finals: dict[str, list[float]] = meta.get("point_finals") or {}
    if not finals or len(next(iter(finals.values()))) < 2:
        return []
    seeds = meta["landscape_seeds"]
    means = {k: statistics.fmean(v) for k, v in finals.items()}
    best = min(means.values())
    stds = sorted(statistics.stdev(v) for v in finals.values())
    keys = list(finals)
    pairs = [(i, j) for i in range(len(seeds)) for j in range(i + 1, len(seeds))]
    rhos = [
        spearmanr([finals[k][i] for k in keys], [finals[k][j] for k in keys]).statistic
        for i, j in pairs
    ]
    lines = [
        "",
        f"Seed std of a point's final stream_loss over the {len(finals)} points: median "
        f"{statistics.median(stds):.4f}, max {stds[-1]:.4f}. Spearman rank correlation of the "
        "grid between seeds: "
        + ", ".join(f"{seeds[i]}-{seeds[j]} {r:.2f}" for (i, j), r in zip(pairs, rhos, strict=True))
        + ".",
        "",
        "Every configuration tried once on one seed (an exhaustive one-sample search):",
        "",
        "| seed | winner (knobs) | its value on that seed | its seed mean | regret |",
        "|---|---|---|---|---|",
    ]
    for i, seed in enumerate(seeds):
        k = min(keys, key=lambda k, i=i: finals[k][i])
        knobs = ", ".join(f"{v:g}" for v in json.loads(k))
        lines.append(
            f"| {seed} | {knobs} | {finals[k][i]:.4f} | {means[k]:.4f} | {means[k] - best:.4f} |"
        )
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    """Median regret (band: quartiles) and the share of seeds within the target, vs compute."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = results["meta"]
    top = max(meta["budgets"])
    xs = [top * i / 250 for i in range(1, 251)]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    for variant in all_variants(meta):
        pts = [(100 * x, regrets_at(results, variant, x)) for x in xs]
        done = [(x, r) for x, r in pts if all(math.isfinite(v) for v in r)]
        kw = {"lw": 2.4 if variant == target_variant(meta) else 1.3, "label": label(variant)}
        (line,) = ax.plot([x for x, _ in done], [np.median(r) for _, r in done], **kw)
        q1 = [np.percentile(r, 25) for _, r in done]
        q3 = [np.percentile(r, 75) for _, r in done]
        ax.fill_between([x for x, _ in done], q1, q3, color=line.get_color(), alpha=0.12)
        share = [100 * np.mean([v <= TARGET_NATS for v in r]) for _, r in pts]
        ax2.plot([x for x, _ in pts], share, color=line.get_color(), lw=kw["lw"])
    ax.axhline(TARGET_NATS, color="grey", ls="--", lw=1)
    ax.annotate(
        f"target {TARGET_NATS} nats",
        (100 * top, TARGET_NATS),
        color="grey",
        fontsize=8,
        ha="right",
        va="bottom",
    )
    for a in (ax, ax2):
        for frac in meta["budgets"]:
            a.axvline(100 * frac, color="grey", ls=":", lw=0.8)
        a.set_xlabel("compute spent (% of the whole grid's trained tokens)")
        a.grid(alpha=0.3, which="both")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("regret: crowned config's seed mean - best seed mean (nats)")
    n_seeds = len(common_seeds(results))
    ax.set_title(f"median regret, quartile band, {n_seeds} search seeds per variant", fontsize=10)
    ax2.set_ylabel(f"searches within {TARGET_NATS} nats of the grid's best (%)")
    ax2.set_ylim(-2, 102)
    n_land = len(meta.get("landscape_seeds", [0]))
    ax2.set_title(
        f"{meta['configs']}-point grid x {n_land} training seeds, best seed mean "
        f"{meta['grid_best']:.4f}",
        fontsize=10,
    )
    ax.legend(fontsize=7.5, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
