"""Scale: how the search machinery's own costs grow over 1,000 trials.

    HF_HUB_OFFLINE=1 nice -n 5 .venv/bin/python benchmarks/scale.py [--trials 1000]
        [--concurrency 2] [--label NAME] [--append] [--out FILE] [--profile FILE]

One search of ``--trials`` trials of a lookup trainable, through the same pieces and in the
same order as ``adaptune search`` (:func:`adaptune.search.tuner.run_search`): a local Ray
started by :func:`~adaptune.search.local_ray.start_ray`, :func:`~adaptune.search.searcher.
experiment_searcher` (seeded TPE, the study in sqlite beside Ray's results), ASHA as
:func:`~adaptune.search.tuner.build_scheduler` builds it, our
:class:`~adaptune.search.tracking.MlflowTrackingCallback` (parent run, one child run per trial,
a sqlite store as the default tracking URI), :func:`~adaptune.search.tuner.build_tuner` (its
checkpoint settings, trial resources and ``reuse_actors``), Tune's loop inside
:func:`~adaptune.search.tune_loop.patient_controller`, and after ``fit()`` the steps of
``_finish_search`` up to the champion (summary rows, the interrupted check, dangling Optuna
trials, the summary on the parent run). The champion's registration is left out: the lookup
trainable has no model, and it is one upload whatever the number of trials.

The trainable trains nothing: over a stream of 3 tasks it reports, task by task, what the real
trainable reports (the objective and CL metrics, per-task losses, the loss matrix, the training
and cost figures, the settings it ran with), computed from its config by a smooth made-up
function of the five searched values (the quickstart's space), with a tiny checkpoint per task.
So every second the search spends is the machinery's: Ray Tune, Optuna, ASHA, MLflow.

Measured on the driver: wall time and RSS at every trial's end; every call of the searcher's
``suggest`` (Optuna's ask and TPE's sampling), of our MLflow callback's hooks, of the scheduler
and of Tune's experiment snapshot (``TuneController.checkpoint``), each with the number of
trials ended so far; at the end the sizes on disk of the MLflow store (database and artifacts),
the Optuna study and Ray's results. Reported per window of 100 trials (``--trials`` below 1,000:
windows of a tenth) and at trials 100, 500 and 1,000. ``--profile FILE`` writes a cProfile of
the driver's ``fit()`` (it slows the driver: not for the timings).

Results go to ``benchmarks/results/scale.json`` for the full 1,000 trials (``--append`` adds
this run, under ``--label``, beside the ones already there), else to ``runs/bench/``.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
QUICK = ROOT / "runs" / "bench"  # quick runs' output, not committed
MARKS = (100, 500, 1000)

EXPERIMENT_YAML = """\
name: scale
run:
  model: {name: tiny-gpt, n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64}
  stream:
    block_size: 32
    max_train_tokens: 1024
    tasks:
      - {name: docs, builtin: python_docs}
      - {name: code, builtin: python_source}
      - {name: unicode, builtin: unicode_names}
space:
  lr: {loguniform: [3.0e-4, 3.0e-3]}
  buffer_size: {choice: [0, 256, 1024]}
  replay_fraction: {uniform: [0.1, 0.5]}
  ewc_lambda: {loguniform: [1.0, 1.0e5]}
  distill_alpha: {uniform: [0.0, 2.0]}
search:
  num_samples: 1000
  max_concurrent: 2
  scheduler: asha
  grace_period: 1
  reduction_factor: 2
  metric: stream_loss
  mode: min
  seed: 0
resources: {cpus_per_trial: 1, gpus_per_trial: 0}
"""


# ---- the trainable (runs in Ray's workers) --------------------------------------------------


def loss_matrix(hp: dict[str, float], tasks: int) -> list[list[float]]:
    """A made-up but smooth L[i][j] (row 0 before training): lr near 1e-3 learns most and
    forgets most; replay, EWC and distillation cut forgetting and cost a little learning."""
    learn = math.exp(-(((math.log10(hp["lr"]) + 3.0) / 0.6) ** 2))
    keep = (
        (1 + 4 * hp["replay_fraction"] * hp["buffer_size"] / 1024)
        * (1 + math.log10(hp["ewc_lambda"]) / 3)
        * (1 + hp["distill_alpha"])
    )
    drop = 1.2 * learn / (1 + 0.05 * math.log(keep))
    rows = [[3.0 + 0.1 * j for j in range(tasks)]]
    for i in range(tasks):
        prev = rows[-1]
        row = [
            prev[j] - drop
            if j == i
            else prev[j] + 0.6 * learn / keep
            if j < i
            else prev[j] - 0.05 * learn
            for j in range(tasks)
        ]
        rows.append(row)
    return rows


def lookup_trainable(config: dict[str, Any], names: tuple[str, ...], tasks: list[str]) -> None:
    """Report one result and one tiny checkpoint per task, as ``continual_trainable`` does."""
    import logging

    import ray
    from adaptune.spaces.paths import get_hp
    from adaptune.trainables.metrics import stream_metrics, task_forgetting
    from ray import tune

    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # as the real one
    hp = {name: float(get_hp(config, name)) for name in names}
    L = loss_matrix(hp, len(tasks))
    node_id = ray.get_runtime_context().get_node_id()
    for k in range(1, len(tasks) + 1):
        metrics: dict[str, Any] = {"task_index": k, **stream_metrics(L, k)}
        for j, name in enumerate(tasks, start=1):
            metrics[f"loss/{name}"] = L[k][j - 1]
            metrics[f"ppl/{name}"] = math.exp(L[k][j - 1])
            metrics[f"forgetting/{name}"] = task_forgetting(L, k, j)
        metrics["loss_matrix"] = [list(r) for r in L[: k + 1]]
        metrics |= {
            "train_loss": L[k][k - 1],
            "train_tokens": 1024 * k,
            "train_tokens_per_s": 5000.0,
            "train_time_s": 0.2,
            "after_task_time_s": 0.0,
            "eval_time_s": 0.1,
            "steps": 4,
            "params_trainable": 13_000,
            "params_total": 13_000,
            "peak_rss_mb": 600.0,
            "threads": 1,
            "cuda": 0,
            "node_id": node_id,
        }
        if k == len(tasks):
            metrics["done"] = True
        with tempfile.TemporaryDirectory(prefix="scale-ckpt-") as tmp:
            (Path(tmp) / "progress.json").write_text(json.dumps({"tasks_done": k, "L": L}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def make_trainable(names: tuple[str, ...], tasks: list[str]) -> Callable[[dict[str, Any]], None]:
    """:func:`lookup_trainable` as a function of the config alone, as Tune takes it."""

    def trainable(config: dict[str, Any]) -> None:
        lookup_trainable(config, names, tasks)

    return trainable


# ---- timers on the driver ---------------------------------------------------------------------


class Probe:
    """Every timed call on the driver: (name, trials ended so far, wall seconds, CPU seconds of
    the calling thread: the part that load on the machine does not stretch); trial ends."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, float, float]] = []
        # per trial end: perf_counter, driver RSS (MiB), driver CPU (s), 1-min load average
        self.ends: list[tuple[float, float, float, float]] = []
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()

    def wrap(self, owner: Any, attr: str, name: str) -> Callable[[], None]:
        """Time ``owner.attr`` (a class's method); returns the function that undoes it."""
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
                self.calls.append((name, len(self.ends), wall, cpu))

        setattr(owner, attr, timed)
        return lambda: setattr(owner, attr, original)

    def trial_ended(self) -> None:
        self.ends.append((time.perf_counter(), rss_mib(), time.process_time(), os.getloadavg()[0]))


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def du_mib(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def install_timers(probe: Probe) -> list[Callable[[], None]]:
    from adaptune.search.searcher import ContinualOptunaSearch
    from adaptune.search.tracking import MlflowTrackingCallback
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.schedulers import ASHAScheduler

    undo = [
        probe.wrap(ContinualOptunaSearch, "suggest", "suggest"),
        probe.wrap(ContinualOptunaSearch, "on_trial_result", "searcher.on_trial_result"),
        probe.wrap(ContinualOptunaSearch, "on_trial_complete", "searcher.on_trial_complete"),
        probe.wrap(ASHAScheduler, "on_trial_result", "asha.on_trial_result"),
        probe.wrap(TuneController, "checkpoint", "tune.checkpoint"),
        probe.wrap(TuneController, "save_to_dir", "tune.save_to_dir"),
    ]
    for hook in ("on_trial_start", "on_trial_result", "on_checkpoint", "on_experiment_end"):
        undo.append(probe.wrap(MlflowTrackingCallback, hook, f"mlflow.{hook}"))
    original = MlflowTrackingCallback.on_trial_complete

    def on_trial_complete(self: Any, *args: Any, **kwargs: Any) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        original(self, *args, **kwargs)
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        probe.calls.append(("mlflow.on_trial_complete", len(probe.ends), wall, cpu))
        probe.trial_ended()

    def on_trial_error(self: Any, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the lookup trainable failed; see Ray's error.txt")

    MlflowTrackingCallback.on_trial_complete = on_trial_complete  # type: ignore[method-assign]
    MlflowTrackingCallback.on_trial_error = on_trial_error  # type: ignore[method-assign]
    undo.append(lambda: setattr(MlflowTrackingCallback, "on_trial_complete", original))
    return undo


# ---- the search ---------------------------------------------------------------------------------


def run(trials: int, concurrency: int, work: Path, profile: Path | None) -> dict[str, Any]:
    """One search as ``adaptune search`` runs it; returns the raw measurements."""
    import ray
    import yaml
    from adaptune.search.checks import check_search
    from adaptune.search.experiment import experiment_yaml, parse_experiment
    from adaptune.search.local_ray import start_ray
    from adaptune.search.locations import optuna_storage_file, search_location
    from adaptune.search.searcher import experiment_searcher
    from adaptune.search.stores import resolve_tracking_uri
    from adaptune.search.summary import log_summary, trial_rows
    from adaptune.search.tracking import MlflowTrackingCallback
    from adaptune.search.tune_loop import patient_controller
    from adaptune.search.tuner import (
        build_tuner,
        close_dangling_trials,
        search_interrupted,
    )

    data = yaml.safe_load(EXPERIMENT_YAML)
    data["search"] |= {"num_samples": trials, "max_concurrent": concurrency}
    data["storage_path"] = str(work / "ray")
    data["tracking"] = {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}"}
    exp = parse_experiment(data)
    check_search(exp)
    tasks = [t.name for t in exp.run.stream.tasks]
    trainable = make_trainable(tuple(exp.space), tasks)

    probe = Probe()
    undo = install_timers(probe)
    post: dict[str, float] = {}
    started = start_ray(None, resolve_tracking_uri(exp.tracking.tracking_uri, create=False))
    try:
        searcher = experiment_searcher(exp, len(tasks))
        callback = MlflowTrackingCallback(exp, experiment_yaml=experiment_yaml(exp))
        callback.start_parent()
        tuner = build_tuner(
            exp, callback=callback, searcher=searcher, trainable=trainable, quiet=True
        )
        profiler = cProfile.Profile() if profile else None
        probe.start = t0 = time.perf_counter()
        probe.cpu_start = time.process_time()
        with patient_controller():
            if profiler is not None:
                profiler.enable()
            results = tuner.fit()
            if profiler is not None:
                profiler.disable()
        post["fit"] = time.perf_counter() - t0
        if profiler is not None and profile is not None:
            profile.parent.mkdir(parents=True, exist_ok=True)
            profiler.dump_stats(str(profile))
        for name, step in (
            ("trial_rows", lambda: trial_rows(exp, results)),
            ("search_interrupted", lambda: search_interrupted(exp)),
            ("close_dangling_trials", lambda: close_dangling_trials(searcher.study)),
        ):
            t = time.perf_counter()
            out = step()
            post[name] = time.perf_counter() - t
            if name == "trial_rows":
                rows = out
            if name == "search_interrupted" and out:
                raise RuntimeError("the search stopped before every trial ended")
        t = time.perf_counter()
        log_summary(callback, exp, rows, searcher.study, [])
        callback.end_parent("FINISHED")
        post["log_summary"] = time.perf_counter() - t
        rss_end = rss_mib()
    finally:
        for u in undo:
            u()
        if started:
            ray.shutdown()
    states: dict[str, int] = {}
    for t in searcher.study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    location = Path(search_location(exp))
    return {
        "ends": probe.ends,
        "start": probe.start,
        "cpu_start": probe.cpu_start,
        "calls": probe.calls,
        "post": post,
        "rss_end_mib": rss_end,
        "optuna_states": states,
        "disk_mib": {
            "mlflow_db": du_mib(work / "mlflow.db"),
            "mlflow_artifacts": du_mib(work / "mlartifacts"),
            "optuna_db": du_mib(optuna_storage_file(exp)),
            "ray_results": du_mib(location) - du_mib(optuna_storage_file(exp)),
        },
    }


# ---- the report ---------------------------------------------------------------------------------


def windows(n: int) -> list[tuple[int, int]]:
    size = 100 if n >= 1000 else max(1, n // 10)
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(raw: dict[str, Any], trials: int) -> dict[str, Any]:
    """Per window of trials: wall and driver CPU per trial, RSS at its end, the load average,
    each timed call's median and its total per trial."""
    ends, calls = raw["ends"], raw["calls"]
    times = [raw["start"]] + [e[0] for e in ends]
    cpu = [raw["cpu_start"]] + [e[2] for e in ends]
    names = sorted({c[0] for c in calls})
    rows = []
    for lo, hi in windows(len(ends)):
        row: dict[str, Any] = {
            "trials": f"{lo + 1}-{hi}",
            "wall_per_trial_s": (times[hi] - times[lo]) / (hi - lo),
            "driver_cpu_per_trial_s": (cpu[hi] - cpu[lo]) / (hi - lo),
            "rss_mib": ends[hi - 1][1],
            "load_avg": statistics.fmean(e[3] for e in ends[lo:hi]),
        }
        for name in names:
            timed = [(d, c) for n, done, d, c in calls if n == name and lo <= done < hi]
            walls, cpus = [d for d, _ in timed], [c for _, c in timed]
            row[name] = {
                "calls": len(timed),
                "median_ms": 1000 * (_median(walls) or 0.0),
                "per_trial_ms": 1000 * sum(walls) / (hi - lo),
                "median_cpu_ms": 1000 * (_median(cpus) or 0.0),
                "cpu_per_trial_ms": 1000 * sum(cpus) / (hi - lo),
            }
        rows.append(row)
    at_end: dict[str, float] = {}  # calls after the last trial ended (on_experiment_end)
    for name, done, d, _cpu in calls:
        if done >= len(ends):
            at_end[name] = at_end.get(name, 0.0) + d
    marks = {
        str(m): {
            "elapsed_s": times[m] - times[0],
            "driver_cpu_s": cpu[m] - cpu[0],
            "rss_mib": ends[m - 1][1],
        }
        for m in (*MARKS, len(ends))
        if m <= len(ends)
    }
    disk = raw["disk_mib"]
    return {
        "windows": rows,
        "marks": marks,
        "at_end_s": at_end,
        "post_fit_s": raw["post"],
        # every trial's end: seconds since fit() began, driver RSS (MiB), driver CPU (s), load
        "ends": [
            [round(t - raw["start"], 3), round(rss, 1), round(c - raw["cpu_start"], 3), load]
            for t, rss, c, load in ends
        ],
        "rss_end_mib": raw["rss_end_mib"],
        "optuna_states": raw["optuna_states"],
        "disk_mib": disk,
        "mlflow_kib_per_trial": 1024 * (disk["mlflow_db"] + disk["mlflow_artifacts"]) / trials,
    }


SHOWN = (
    ("suggest", "suggest"),
    ("mlflow", "mlflow.*"),
    ("snapshot", "tune.checkpoint"),
    ("asha", "asha.on_trial_result"),
)


def table(summary: dict[str, Any]) -> str:
    head = (
        "| trials | wall per trial (s) | driver CPU per trial (s) | driver RSS (MiB) | "
        "suggest median (ms) | MLflow hooks per trial (ms) | Tune snapshot per trial (ms) | "
        "ASHA per trial (ms) | load avg |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for row in summary["windows"]:
        mlflow = sum(v["per_trial_ms"] for k, v in row.items() if k.startswith("mlflow."))
        snap = row.get("tune.checkpoint", {}).get("per_trial_ms", 0.0)
        asha = row.get("asha.on_trial_result", {}).get("per_trial_ms", 0.0)
        suggest = row.get("suggest", {}).get("median_ms", 0.0)
        lines.append(
            f"| {row['trials']} | {row['wall_per_trial_s']:.3f} | "
            f"{row['driver_cpu_per_trial_s']:.3f} | {row['rss_mib']:.0f} | "
            f"{suggest:.1f} | {mlflow:.0f} | {snap:.0f} | {asha:.2f} | {row['load_avg']:.1f} |"
        )
    return "\n".join(lines)


def hooks_table(summary: dict[str, Any]) -> str:
    """Each timed call, first window against the last: its total per trial and its median
    call, wall time and (where measured) the calling thread's CPU time."""
    first, last = summary["windows"][0], summary["windows"][-1]
    names = sorted(
        {k for row in (first, last) for k, v in row.items() if isinstance(v, dict) and v["calls"]}
    )
    span = f"trials {first['trials']} -> {last['trials']}"
    lines = [
        f"| call | per trial, {span} (ms) | median call (ms) | median call, CPU (ms) |",
        "|---|---|---|---|",
    ]

    def pair(key: str, name: str) -> str:
        a, b = first.get(name, {}).get(key), last.get(name, {}).get(key)
        return "-" if a is None or b is None else f"{a:.1f} -> {b:.1f}"

    for name in names:
        lines.append(
            f"| {name} | {pair('per_trial_ms', name)} | {pair('median_ms', name)} | "
            f"{pair('median_cpu_ms', name)} |"
        )
    return "\n".join(lines)


def report(entry: dict[str, Any]) -> str:
    s, meta = entry["summary"], entry["meta"]
    disk = s["disk_mib"]
    marks = ", ".join(
        f"{m}: {v['elapsed_s']:.0f} s ({v['driver_cpu_s']:.0f} s driver CPU), "
        f"{v['rss_mib']:.0f} MiB"
        for m, v in s["marks"].items()
    )
    post = ", ".join(
        f"{k} {v:.1f} s" for k, v in {**s.get("at_end_s", {}), **s["post_fit_s"]}.items()
    )
    return "\n".join(
        [
            f"## {meta['label']}: {meta['trials']} trials, {meta['concurrency']} at once, "
            f"{meta['wall_s']:.0f} s in all",
            "",
            table(s),
            "",
            hooks_table(s),
            "",
            f"at trials {marks}",
            f"after fit: {post}",
            f"Optuna: {s['optuna_states']}",
            f"disk: MLflow db {disk['mlflow_db']:.1f} MiB + artifacts "
            f"{disk['mlflow_artifacts']:.1f} MiB ({s['mlflow_kib_per_trial']:.1f} KiB per "
            f"trial); Optuna {disk['optuna_db']:.1f} MiB; "
            f"Ray results {disk['ray_results']:.1f} MiB",
        ]
    )


def _env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import logging

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.ERROR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=2, help="trials at once")
    parser.add_argument("--label", default="current", help="this run's name in the results")
    parser.add_argument("--out", type=Path, default=None, help="results JSON")
    parser.add_argument("--append", action="store_true", help="keep the runs already in --out")
    parser.add_argument("--profile", type=Path, default=None, help="cProfile of the driver")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it")
    parser.add_argument("--report", type=Path, default=None, help="print a results JSON")
    args = parser.parse_args()
    if args.report is not None:
        print("\n\n".join(report(e) for e in json.loads(args.report.read_text())["runs"]))
        return
    _env()
    work = args.keep or Path(tempfile.mkdtemp(prefix="adaptune-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        raw = run(args.trials, args.concurrency, work.resolve(), args.profile)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    entry = {
        "meta": {
            "label": args.label,
            "trials": args.trials,
            "concurrency": args.concurrency,
            "wall_s": time.perf_counter() - start,
            "cpus": len(os.sched_getaffinity(0)),
            "date": time.strftime("%Y-%m-%d %H:%M"),
        },
        "summary": summarize(raw, args.trials),
    }
    print(report(entry))
    out = args.out or (RESULTS if args.trials >= 1000 else QUICK / f"scale-{args.trials}.json")
    runs = []
    if args.append and out.is_file():
        runs = [r for r in json.loads(out.read_text())["runs"] if r["meta"]["label"] != args.label]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": [*runs, entry]}, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
