"""Search efficiency: regret of adaptune's search against its variants, at equal compute.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/search_efficiency.py [--seeds 30] [--quick]

A tabular benchmark: ``benchmarks/landscape.py`` trained every configuration of a grid
(lr x ewc_lambda x distill_alpha x buffer_size) with several training seeds and recorded each
run's per-task reports. Here each search runs through the real machinery (``ray.tune.Tuner``,
our ``ContinualOptunaSearch`` or the stock ``OptunaSearch``, ``ASHAScheduler`` as
:func:`search.tuner.build_scheduler` builds it) over a space of ``choice`` over the grid's
values, with a lookup trainable that reports recorded results with ``tune.report``, one per
task, so ASHA stops trials at its real rungs.

The objective is noisy, as in reality: each trial sees ONE training seed's reports, drawn for it
from the search seed's RNG. A search crowns the finished trial with the best observed final
``stream_loss`` (what ``adaptune search`` registers as the champion); "found" is the crowned
configuration's seed mean (mean final ``stream_loss`` over the training seeds) and regret =
found - the grid's best seed mean (nats); see ``search_efficiency_stats.py``.

Compute is counted in trained tokens, as recorded (a trial ASHA stopped after task 1 costs its
task-1 tokens; replay makes a task cost more). A budget stopper ends a search once it has spent
the largest budget (``--budgets``, a fraction of one seed's whole grid). Trials run one at a
time (``--concurrency 1``), so a search never depends on timing and nothing it does depends on
the budget: the result at a smaller budget is read off the same trajectory.

Every variant runs the same search seeds, 0..N-1 (``--seeds N``; N is fixed in ``SEEDS`` before
any result is seen); reports use only seeds every variant ran. Variants (TPE and random are
Optuna's samplers, seeded, as :func:`search.searcher.build_searcher` makes them; ASHA with
adaptune's defaults, grace_period 1, reduction_factor 2):

- ``default``: adaptune's default, TPE + ASHA, stopped trials told to Optuna as PRUNED;
- ``tpe``: TPE without ASHA (every trial runs every task);
- ``random+asha`` / ``random``: random search with and without ASHA;
- ``tpe+asha/complete``: TPE + ASHA through the stock ``OptunaSearch``, which tells ASHA-stopped
  trials COMPLETE with their early score (the tools' default behaviour).

Prints one table per budget and the targets, writes the trajectories to
``benchmarks/results/search_efficiency.json`` after every search (``--resume`` keeps the
searches already there with the same settings) and the plot to
``docs/img/regret_vs_compute.png``. ``--report FILE`` prints the tables of a results JSON.
``--quick`` replays ``runs/bench/landscape-quick.json`` (from ``landscape.py --quick``) with
one seed (a smoke test; writes nothing).

``--metric seen_loss`` searches on the mean loss over the tasks seen so far instead: the same
value as ``stream_loss`` after the last task (so regret is measured alike), but optimistic at
ASHA's early rungs, where it leaves out the tasks not yet learnt.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_efficiency_stats import (  # noqa: E402
    all_variants,
    key_of,
    landscape_noise,
    landscape_samples,
    plot,
    report,
    sample_seed_drawer,
)

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
SEEDS = 30  # search seeds 0..SEEDS-1, the same for every variant
SAMPLE_KEY = "landscape_seed"  # the config key that carries a trial's drawn training seed


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
    """Report one seed's recorded results of ``config``'s grid point, one report per task."""
    from ray import tune

    params = {}
    for name, path in paths.items():
        node = config
        for part in path:
            node = node[part]
        params[name] = node
    point = key_of(params, list(paths))
    tasks = table[point][config[SAMPLE_KEY]]
    for rec in tasks:
        done = {"done": True} if rec["task_index"] == len(tasks) else {}
        tune.report(dict(rec) | {"point": point, SAMPLE_KEY: config[SAMPLE_KEY]} | done)


# Filled on the driver by the recorder, read after fit():
# (trial_id, task_index, observed objective, cumulative tokens, grid point, drawn seed).
_EVENTS: list[tuple[str, int, float, int, str, int]] = []


def _callbacks_and_stopper(budget_tokens: float, metric: str) -> tuple[Any, Any]:
    from ray.tune import Callback
    from ray.tune.stopper import Stopper

    class Recorder(Callback):
        def on_trial_result(self, iteration: int, trials: Any, trial: Any, result: Any) -> None:
            _EVENTS.append(
                (
                    trial.trial_id,
                    int(result["task_index"]),
                    float(result[metric]),
                    int(result["train_tokens"]),
                    str(result["point"]),
                    int(result[SAMPLE_KEY]),
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


def _drawing_limiter(searcher: Any, concurrency: int, draw: Any) -> Any:
    """A ConcurrencyLimiter that adds each new trial's drawn training seed to its config."""
    from ray.tune.search import ConcurrencyLimiter, Searcher

    class DrawingLimiter(ConcurrencyLimiter):
        def suggest(self, trial_id: str) -> dict[str, Any] | None:
            config = super().suggest(trial_id)
            if config is None or config == Searcher.FINISHED:
                return config
            # outside the searched space: Optuna never sees it, the trainable reads it
            return config | {SAMPLE_KEY: draw()}

    return DrawingLimiter(searcher, max_concurrent=concurrency)


def run_search(
    variant: str,
    seed: int,
    *,
    landscape: dict[str, Any],
    table: dict[str, Any],
    sample_seeds: list[int],
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
    recorder, stopper = _callbacks_and_stopper(budget_tokens, metric)
    tuner = tune.Tuner(
        tune.with_parameters(lookup_trainable, table=table, paths=paths),
        param_space=build_param_space(exp),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode="min",
            search_alg=_drawing_limiter(
                searcher, concurrency, sample_seed_drawer(seed, sample_seeds)
            ),
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


def results_meta(
    landscape: dict[str, Any], landscape_path: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Everything the report needs besides the trajectories, incl. the seed means.

    Trials draw from ``--draw-seeds``; a configuration's true value (``point_means``, what
    regret is measured on) is its mean over ``--reference-seeds`` (default: the drawn ones).
    """
    table, sample_seeds, _ = landscape_samples(landscape, _seeds(args.draw_seeds))
    ref_table, ref_seeds, means = landscape_samples(
        landscape, _seeds(args.reference_seeds or args.draw_seeds)
    )
    finals = {k: [v[s][-1]["stream_loss"] for s in sample_seeds] for k, v in table.items()}
    confirm = [[int(x) for x in c.split("x")] for c in args.confirm.split(",") if c]
    if any(not 1 <= s < len(sample_seeds) for _, s in confirm):
        raise SystemExit(
            f"--confirm: seeds must be 1..{len(sample_seeds) - 1}, the other drawn seeds"
        )
    return {
        "landscape": str(landscape_path.relative_to(ROOT))
        if landscape_path.is_relative_to(ROOT)
        else str(landscape_path),
        "configs": len(table),
        "knobs": list(landscape["meta"]["paths"]),
        "tasks": len(landscape["meta"]["tasks"]),
        "landscape_seeds": sample_seeds,
        "reference_seeds": ref_seeds,
        "run_tokens_max": max(v[s][-1]["train_tokens"] for v in table.values() for s in v),
        "confirm": confirm,
        "target": args.target,
        "grid_tokens": landscape["meta"]["total_tokens"],
        "grid_best": min(means.values()),
        "grid_worst_regret": max(means.values()) - min(means.values()),
        "point_means": means,
        "point_finals": finals,
        "noise": landscape_noise(ref_table, means),
        "budgets": sorted(float(b) for b in args.budgets.split(",")),
        "variants": [v for v in args.variants.split(",") if v],
        "seeds": list(range(args.first_seed, args.first_seed + (1 if args.quick else args.seeds))),
        "concurrency": args.concurrency,
        "metric": args.metric,
        "wall_s": 0.0,
    }


def _seeds(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _same_settings(old: dict[str, Any], new: dict[str, Any]) -> bool:
    # what the searches saw; the reference seeds, confirm and target are read off the same
    # searches afterwards, so a resume may change them
    keys = ("landscape_seeds", "grid_tokens", "point_finals", "budgets", "concurrency", "metric")
    return all(old.get(k) == new[k] for k in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--landscape", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--seeds", type=int, default=SEEDS, help="search seeds per variant")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds S..S+N-1 for every variant: a replication on seeds no earlier run used",
    )
    parser.add_argument("--budgets", default="0.1,0.25,0.5", help="fractions of the grid")
    parser.add_argument(
        "--draw-seeds", default="0,1,2", help="the training seeds a trial draws from"
    )
    parser.add_argument(
        "--reference-seeds",
        default="",
        help="the training seeds a configuration's true value is the mean over (held out: "
        "none of --draw-seeds); default: the drawn ones",
    )
    parser.add_argument(
        "--confirm",
        default="",
        help="KxS[,KxS]: also read every variant followed by search.confirm {top_k: K, seeds: S}",
    )
    parser.add_argument(
        "--target",
        default="default",
        help="the variant the goal is judged on, e.g. default+confirm3x2",
    )
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
    parser.add_argument(
        "--resume", action="store_true", help="keep the searches already in --out (same settings)"
    )
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
    meta = results_meta(landscape, landscape_path, args)
    unknown = set(meta["variants"]) - set(VARIANTS)
    if meta["target"] not in all_variants(meta):
        parser.error(f"--target {meta['target']}: not among {', '.join(all_variants(meta))}")
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; valid values: {', '.join(VARIANTS)}")
    writes = not (args.quick and args.out is None and args.plot is None)
    out = args.out or RESULTS / "search_efficiency.json"
    results = {"meta": meta, "runs": []}
    if args.resume and out.is_file():
        old = json.loads(out.read_text())
        if not _same_settings(old["meta"], meta):
            raise SystemExit(f"{out}: other landscape, budgets or metric; not resuming")
        results["runs"] = [r for r in old["runs"] if r["variant"] in meta["variants"]]
        meta["wall_s"] = old["meta"].get("wall_s", 0.0)
    _search_all(results, landscape, args, out if writes else None)
    runs = results["runs"]
    trials = sum(len({e[0] for e in r["events"]}) for r in runs)
    print(
        f"\n## Search efficiency: {meta['configs']}-point grid x training seeds "
        f"{meta['landscape_seeds']}, best seed mean {meta['grid_best']:.4f}, "
        f"{meta['grid_tokens']:,} trained tokens; search seeds {meta['seeds'][0]}.."
        f"{meta['seeds'][-1]} per "
        f"variant; objective {args.metric}; {len(runs)} searches, {trials} Ray Tune trials in "
        f"{meta['wall_s']:.0f} s"
    )
    print(report(results))
    if writes:
        plot(results, args.plot or PLOT)
        print(f"\nwrote {out} and {args.plot or PLOT}")


def _search_all(
    results: dict[str, Any], landscape: dict[str, Any], args: argparse.Namespace, out: Path | None
) -> None:
    """Run every (seed, variant) search not yet in ``results``, seed by seed, saving each."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # no per-trial CSV/JSON/TB files
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import optuna
    import ray

    meta = results["meta"]
    table, sample_seeds, _ = landscape_samples(landscape, meta["landscape_seeds"])
    done = {(r["variant"], r["seed"]) for r in results["runs"]}
    todo = [(s, v) for s in meta["seeds"] for v in meta["variants"] if (v, s) not in done]
    if not todo:
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        with tempfile.TemporaryDirectory(prefix="adaptune-search-eff-") as tmp:
            for seed, variant in todo:
                run = run_search(
                    variant,
                    seed,
                    landscape=landscape,
                    table=table,
                    sample_seeds=sample_seeds,
                    data=args.data.resolve(),
                    budget_tokens=max(meta["budgets"]) * meta["grid_tokens"],
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
                results["runs"].append(run)
                meta["wall_s"] += run["wall_s"]
                if out is not None:  # after every search: a cut run is usable and resumable
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps(results) + "\n")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
