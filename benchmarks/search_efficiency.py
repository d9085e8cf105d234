"""Search efficiency: regret of adaptune's search against its variants, at equal compute.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/search_efficiency.py [--seeds 50] [--quick]

A tabular benchmark: ``benchmarks/landscape.py`` trained every configuration of a grid once
(lr x ewc_lambda x distill_alpha x buffer_size) and recorded its per-task reports. Here each
search runs through the real machinery (``ray.tune.Tuner``, our ``ContinualOptunaSearch`` or
the stock ``OptunaSearch``, ``ASHAScheduler`` as :func:`search.tuner.build_scheduler` builds
it) over a space of ``choice`` over the grid's values, with a lookup trainable that reports the
recorded results with ``tune.report``, one per task, so ASHA stops trials at its real rungs.

Compute is counted in trained tokens, as recorded (a trial ASHA stopped after task 1 costs its
task-1 tokens; replay makes a task cost more). A budget stopper ends a search once it has spent
the largest budget (``--budgets``, a fraction of the whole grid's tokens). Trials run one at a
time (``--concurrency 1``), so a search never depends on timing and nothing it does depends on
the budget: the result at a smaller budget is read off the same trajectory, exactly what a
search stopped there would have found. "Found" is what ``adaptune search`` registers as the
champion: the best final ``stream_loss`` of a trial that ran every task within the budget.
Regret = found - the grid's best (nats).

Variants (TPE and random are Optuna's samplers, seeded, as :func:`search.searcher.build_searcher`
makes them; ASHA with adaptune's defaults, grace_period 1, reduction_factor 2):

- ``default``: adaptune's default, TPE + ASHA, stopped trials told to Optuna as PRUNED;
- ``tpe``: TPE without ASHA (every trial runs every task);
- ``random+asha`` / ``random``: random search with and without ASHA;
- ``tpe+asha/complete``: TPE + ASHA through the stock ``OptunaSearch``, which tells ASHA-stopped
  trials COMPLETE with their early score (the tools' default behaviour).

Prints one table per budget (median, mean and min-max regret over seeds), writes the trajectories to
``benchmarks/results/search_efficiency.json`` and the plot to ``docs/img/regret_vs_compute.png``.
``--quick`` replays ``runs/bench/landscape-quick.json`` (from ``landscape.py --quick``) with one
seed (a smoke test; writes nothing).

``--metric seen_loss`` searches on the mean loss over the tasks seen so far instead: the same
value as ``stream_loss`` after the last task (so regret is measured alike), but optimistic at
ASHA's early rungs, where it leaves out the tasks not yet learnt. It shows what telling
ASHA-stopped trials COMPLETE does when their early scores look better than final ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUICK = ROOT / "runs" / "bench"  # smoke-test output, not committed
PLOT = ROOT / "docs" / "img" / "regret_vs_compute.png"

# name -> (sampler, scheduler, how ASHA-stopped trials reach Optuna)
VARIANTS: dict[str, tuple[str, str, str]] = {
    "default": ("tpe", "asha", "pruned"),
    "tpe": ("tpe", "fifo", "pruned"),
    "random+asha": ("random", "asha", "pruned"),
    "random": ("random", "fifo", "pruned"),
    "tpe+asha/complete": ("tpe", "asha", "complete"),
}
LABELS = {
    "default": "adaptune default: TPE + ASHA, stopped = PRUNED",
    "tpe": "TPE, no ASHA",
    "random+asha": "random + ASHA",
    "random": "random, no ASHA",
    "tpe+asha/complete": "TPE + ASHA, stopped = COMPLETE (stock OptunaSearch)",
}
TARGET_NATS = 0.01
TARGET_BUDGET = 0.25


def key_of(params: dict[str, Any], names: list[str]) -> str:
    return json.dumps([float(params[n]) for n in names])


def experiment_for(landscape: dict[str, Any], data: Path, scheduler: str, metric: str) -> Any:
    """The landscape's run as an adaptune Experiment whose space is ``choice`` over the grid."""
    from adaptune.search.experiment import parse_experiment

    run = json.loads(json.dumps(landscape["meta"]["base_run"]))
    for task in run["stream"]["tasks"]:
        task["files"] = [str(data / f) for f in task["files"]]
    space = {name: {"choice": values} for name, values in landscape["meta"]["grid"].items()}
    return parse_experiment(
        {
            "name": "search-efficiency",
            "run": run,
            "space": space,
            "search": {"scheduler": scheduler, "metric": metric, "mode": "min"},
        }
    )


def lookup_trainable(config: dict[str, Any], table: dict[str, Any], paths: dict[str, Any]) -> None:
    """Report the recorded results of ``config``'s grid point, one ``tune.report`` per task."""
    from ray import tune

    params = {}
    for name, path in paths.items():
        node = config
        for part in path:
            node = node[part]
        params[name] = node
    tasks = table[key_of(params, list(paths))]
    for rec in tasks:
        done = {"done": True} if rec["task_index"] == len(tasks) else {}
        tune.report(dict(rec) | done)


# Filled on the driver by _Recorder, read after fit(): (trial_id, task_index, stream_loss, tokens).
_EVENTS: list[tuple[str, int, float, int]] = []


def _callbacks_and_stopper(budget_tokens: float) -> tuple[Any, Any]:
    from ray.tune import Callback
    from ray.tune.stopper import Stopper

    class Recorder(Callback):
        def on_trial_result(self, iteration: int, trials: Any, trial: Any, result: Any) -> None:
            _EVENTS.append(
                (
                    trial.trial_id,
                    int(result["task_index"]),
                    float(result["stream_loss"]),
                    int(result["train_tokens"]),
                )
            )

    class BudgetStopper(Stopper):
        """Ends the search once its trials have trained ``budget_tokens`` tokens in all."""

        def __init__(self) -> None:
            self.spent: dict[str, int] = {}

        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            self.spent[trial_id] = int(result["train_tokens"])
            return False

        def stop_all(self) -> bool:
            return sum(self.spent.values()) >= budget_tokens

    return Recorder(), BudgetStopper()


def run_search(
    variant: str,
    seed: int,
    *,
    landscape: dict[str, Any],
    data: Path,
    budget_tokens: float,
    concurrency: int,
    storage: Path,
    metric: str = "stream_loss",
) -> dict[str, Any]:
    """One search until ``budget_tokens`` are spent; returns its trajectory."""
    import optuna
    from adaptune.search.searcher import ContinualOptunaSearch
    from adaptune.search.tuner import build_scheduler
    from adaptune.spaces.tune import build_param_space
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    sampler_name, scheduler, told = VARIANTS[variant]
    exp = experiment_for(landscape, data, scheduler, metric)
    T = len(landscape["meta"]["tasks"])
    sampler: optuna.samplers.BaseSampler = (  # as search.searcher.build_searcher makes them
        optuna.samplers.RandomSampler(seed=seed)
        if sampler_name == "random"
        else optuna.samplers.TPESampler(seed=seed)
    )
    kwargs = {"metric": metric, "mode": "min", "sampler": sampler}
    searcher = (
        OptunaSearch(**kwargs) if told == "complete" else ContinualOptunaSearch(max_t=T, **kwargs)  # type: ignore[arg-type]
    )
    paths = {name: tuple(path) for name, path in landscape["meta"]["paths"].items()}
    table = {key_of(r["params"], list(paths)): r["tasks"] for r in landscape["configs"]}
    recorder, stopper = _callbacks_and_stopper(budget_tokens)
    tuner = tune.Tuner(
        tune.with_parameters(lookup_trainable, table=table, paths=paths),
        param_space=build_param_space(exp),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode="min",
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrency),
            scheduler=build_scheduler(exp),
            num_samples=100_000,  # the budget stopper ends the search
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"{variant.replace('/', '-').replace('+', '-')}-seed{seed}",
            storage_path=str(storage),
            stop=stopper,
            callbacks=[recorder],
            verbose=0,
        ),
    )
    del _EVENTS[:]
    start = time.perf_counter()
    tuner.fit()
    wall = time.perf_counter() - start
    return {"variant": variant, "seed": seed, "wall_s": wall, "events": list(_EVENTS)}


def anytime(events: list[list[Any]], T: int) -> list[tuple[int, float | None]]:
    """(cumulative tokens after each result, best final stream_loss of a finished trial so far)."""
    last: dict[str, int] = {}
    spent, best = 0, math.inf
    curve = []
    for trial_id, task, loss, tokens in events:
        spent += tokens - last.get(trial_id, 0)
        last[trial_id] = tokens
        if task == T:
            best = min(best, loss)
        curve.append((spent, best if math.isfinite(best) else None))
    return curve


def found_at(curve: list[tuple[int, float | None]], budget_tokens: float) -> float | None:
    found = None
    for spent, best in curve:
        if spent > budget_tokens:
            break
        found = best
    return found


def trials_at(events: list[list[Any]], budget_tokens: float) -> int:
    last: dict[str, int] = {}
    spent = 0
    for trial_id, _task, _loss, tokens in events:
        spent += tokens - last.get(trial_id, 0)
        if spent > budget_tokens:
            break
        last[trial_id] = tokens
    return len(last)


def regrets_at(results: dict[str, Any], variant: str, frac: float) -> list[float]:
    """Each seed's regret at ``frac`` of the grid's compute (inf: no trial finished yet)."""
    meta = results["meta"]
    runs = [r for r in results["runs"] if r["variant"] == variant]
    found = [
        found_at(anytime(r["events"], meta["tasks"]), frac * meta["grid_tokens"]) for r in runs
    ]
    return [math.inf if f is None else f - meta["grid_best"] for f in found]


def _nats(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "none yet"


def report(results: dict[str, Any]) -> str:
    """Markdown tables: one per budget, one row per variant; then the targets."""
    meta = results["meta"]
    total = meta["grid_tokens"]
    lines = []
    stats: dict[tuple[str, float], tuple[float, float]] = {}  # (median, mean)
    for frac in meta["budgets"]:
        lines += [
            f"\n### {frac:.0%} of the grid's compute ({frac * total:,.0f} trained tokens)\n",
            f"| variant | median regret (nats) | mean | min - max | seeds within "
            f"{TARGET_NATS} nats | trials (median) |",
            "|---|---|---|---|---|---|",
        ]
        for variant in meta["variants"]:
            reg = regrets_at(results, variant, frac)
            med, mean = statistics.median(reg), statistics.fmean(reg)
            stats[(variant, frac)] = (med, mean)
            hits = sum(r <= TARGET_NATS for r in reg)
            runs = [r for r in results["runs"] if r["variant"] == variant]
            trials = statistics.median(trials_at(r["events"], frac * total) for r in runs)
            lines.append(
                f"| {LABELS[variant]} | {_nats(med)} | {_nats(mean)} | {_nats(min(reg))} - "
                f"{_nats(max(reg))} | {hits}/{len(reg)} | {trials:g} |"
            )

    lines += ["", "| target | value | met |", "|---|---|---|"]
    if "default" in meta["variants"] and TARGET_BUDGET in meta["budgets"]:
        v = stats[("default", TARGET_BUDGET)][0]
        met = "yes" if v <= TARGET_NATS else "no"
        lines.append(
            f"| default within {TARGET_NATS} nats of the grid's best at "
            f"{TARGET_BUDGET:.0%} (median regret) | {_nats(v)} | {met} |"
        )
    for rnd in ("random", "random+asha"):
        if "default" not in meta["variants"] or rnd not in meta["variants"]:
            continue
        for frac in meta["budgets"]:
            (d, dm), (r, rm) = stats[("default", frac)], stats[(rnd, frac)]
            lines.append(
                f"| default no worse than {LABELS[rnd]} at {frac:.0%} (median; mean) | "
                f"{_nats(d)} vs {_nats(r)}; {_nats(dm)} vs {_nats(rm)} | "
                f"{'yes' if d <= r else 'no'} |"
            )
    for frac in meta["budgets"]:
        best = min(meta["variants"], key=lambda v, f=frac: (*stats[(v, f)], v != "default"))
        lines.append(f"| lowest regret at {frac:.0%} (median, then mean) | {LABELS[best]} | |")
    if "default" in meta["variants"]:
        lines += [
            "",
            "Is the default's regret distribution different from each other variant's? "
            "Two-sided Mann-Whitney U test over seeds (p < 0.05: a real difference; "
            "larger: indistinguishable at this number of seeds).",
            "",
            "| default against | " + " | ".join(f"p at {f:.0%}" for f in meta["budgets"]) + " |",
            "|---|" + "---|" * len(meta["budgets"]),
        ]
        for variant in meta["variants"]:
            if variant == "default":
                continue
            ps = [
                mann_whitney_p(regrets_at(results, "default", f), regrets_at(results, variant, f))
                for f in meta["budgets"]
            ]
            lines.append(f"| {LABELS[variant]} | " + " | ".join(f"{p:.3f}" for p in ps) + " |")
    return "\n".join(lines)


def mann_whitney_p(a: list[float], b: list[float]) -> float:
    """Two-sided Mann-Whitney U p-value (scipy; seeds without a finished trial count as worst)."""
    from scipy.stats import mannwhitneyu

    if len(set(a) | set(b)) == 1:
        return 1.0
    big = 1e9  # mannwhitneyu ranks; inf would make it return nan
    return float(mannwhitneyu([min(x, big) for x in a], [min(x, big) for x in b]).pvalue)


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
    for variant in meta["variants"]:
        pts = [(100 * x, regrets_at(results, variant, x)) for x in xs]
        done = [(x, r) for x, r in pts if all(math.isfinite(v) for v in r)]
        kw = {"lw": 2.4 if variant == "default" else 1.3, "label": LABELS[variant]}
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
    ax.set_ylabel("regret: found - grid best stream_loss (nats)")
    counts = sorted({sum(r["variant"] == v for r in results["runs"]) for v in meta["variants"]})
    n_seeds = f"{counts[0]}-{counts[-1]}" if counts[0] != counts[-1] else f"{counts[0]}"
    ax.set_title(f"median regret, quartile band, {n_seeds} seeds per variant", fontsize=10)
    ax2.set_ylabel(f"seeds within {TARGET_NATS} nats of the grid's best (%)")
    ax2.set_ylim(-2, 102)
    ax2.set_title(
        f"{meta['configs']}-point grid, best stream_loss {meta['grid_best']:.4f}", fontsize=10
    )
    ax.legend(fontsize=7.5, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--landscape", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--seeds", type=int, default=50, help="seeds 0..N-1 per variant")
    parser.add_argument(
        "--first-seed", type=int, default=0, help="seeds FIRST..FIRST+N-1 (to add seeds)"
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="add these searches to the results JSON (--out) instead of replacing it",
    )
    parser.add_argument("--budgets", default="0.1,0.25,0.5", help="fractions of the grid")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--concurrency", type=int, default=1, help="trials at once")
    parser.add_argument(
        "--metric",
        choices=["stream_loss", "seen_loss"],
        default="stream_loss",
        help="the objective ASHA and Optuna see (both equal stream_loss after the last task)",
    )
    parser.add_argument("--out", type=Path, default=None, help="trajectories (JSON)")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="landscape-quick.json, 1 seed")
    parser.add_argument(
        "--report", type=Path, default=None, help="print the tables of a results JSON and exit"
    )
    args = parser.parse_args()
    if args.report is not None:
        print(report(json.loads(args.report.read_text())))
        return
    landscape_path = args.landscape or (
        QUICK / "landscape-quick.json" if args.quick else RESULTS / "landscape.json"
    )
    if not landscape_path.is_file():
        quick = " --quick" if args.quick else ""
        print(f"skipped: no landscape at {landscape_path}; run benchmarks/landscape.py{quick}")
        return
    landscape = json.loads(landscape_path.read_text())
    seeds = 1 if args.quick else args.seeds
    budgets = sorted(float(b) for b in args.budgets.split(","))
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; valid values: {', '.join(VARIANTS)}")
    T = len(landscape["meta"]["tasks"])
    grid_tokens = landscape["meta"]["total_tokens"]
    grid_best = min(r["tasks"][-1]["stream_loss"] for r in landscape["configs"])

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # no per-trial CSV/JSON/TB files
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import optuna
    import ray

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    runs = []
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="adaptune-search-eff-") as tmp:
            for seed in range(args.first_seed, args.first_seed + seeds):
                for variant in variants:
                    run = run_search(
                        variant,
                        seed,
                        landscape=landscape,
                        data=args.data.resolve(),
                        budget_tokens=max(budgets) * grid_tokens,
                        concurrency=args.concurrency,
                        storage=Path(tmp),
                        metric=args.metric,
                    )
                    n = len({e[0] for e in run["events"]})
                    print(
                        f"  {variant:<18} seed {seed}: {n} trials, {run['wall_s']:.1f} s "
                        f"({run['wall_s'] / max(n, 1):.2f} s per trial)",
                        flush=True,
                    )
                    runs.append(run)
    finally:
        ray.shutdown()
    wall = time.perf_counter() - start
    results = {
        "meta": {
            "landscape": str(landscape_path.relative_to(ROOT))
            if landscape_path.is_relative_to(ROOT)
            else str(landscape_path),
            "configs": len(landscape["configs"]),
            "tasks": T,
            "grid_tokens": grid_tokens,
            "grid_best": grid_best,
            "budgets": budgets,
            "variants": variants,
            "seeds": seeds,
            "concurrency": args.concurrency,
            "metric": args.metric,
            "wall_s": wall,
        },
        "runs": runs,
    }
    trials = sum(len({e[0] for e in r["events"]}) for r in runs)
    print(
        f"\n## Search efficiency: {len(landscape['configs'])}-point grid, best stream_loss "
        f"{grid_best:.4f}, {grid_tokens:,} trained tokens; {seeds} seed(s) per variant; "
        f"objective {args.metric}; {len(runs)} searches, {trials} Ray Tune trials in {wall:.0f} s "
        f"({wall / max(trials, 1):.2f} s per trial)"
    )
    print(report(results))
    if args.quick and args.out is None and args.plot is None:
        return
    out = args.out or RESULTS / "search_efficiency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and out.is_file():
        old = json.loads(out.read_text())
        if (
            old["meta"].get("metric", "stream_loss") != args.metric
            or old["meta"]["grid_best"] != grid_best
        ):
            raise SystemExit(f"{out}: other metric or landscape; not appending")
        seen = {(r["variant"], r["seed"]) for r in old["runs"]}
        runs = [*old["runs"], *(r for r in runs if (r["variant"], r["seed"]) not in seen)]
        old["runs"] = runs
        old["meta"]["variants"] = list(dict.fromkeys([*old["meta"]["variants"], *variants]))
        old["meta"]["seeds"] = len({r["seed"] for r in runs})
        old["meta"]["wall_s"] = old["meta"].get("wall_s", 0) + wall
        results = old
        print(report(results))
    out.write_text(json.dumps(results) + "\n")
    plot(results, args.plot or PLOT)
    print(f"\nwrote {out} and {args.plot or PLOT}")


if __name__ == "__main__":
    main()
