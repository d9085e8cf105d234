"""Orchestration overhead: `adaptune search` against the same trials as plain function calls.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/overhead.py [--only side-by-side|one-at-a-time|
        where|wall|memory|startup|floor] [--rounds 2] [--trials 12] [--side-trials 10]
        [--short-trials 100] [--json FILE]

1. Side by side (``--only side-by-side``). ``adaptune search experiments/quickstart.yaml``
   (Ray Tune + OptunaSearch, ASHA off: ``search.scheduler=fifo``; MLflow tracking and per-task
   checkpoints on, champion registered) runs ``--side-trials`` trials one at a time, and the same
   trials run as plain ``prepare`` + ``run_stream`` calls one after another in one Python
   process. Both commands start at the same moment, each pinned to its own core with
   ``taskset`` (the search's driver, Ray's processes and its trial worker share one core), so
   the machine's drift over the minutes moves both alike. The trials are TPE's seeded random
   start-up trials (hence at most 10), the same whatever they score, so a search of tiny trials
   finds them first; the script checks the search proposed the same. The CPU time of every
   process of both commands is sampled from ``/proc``. Rounds swap the cores.
2. One at a time, in turns (``--only one-at-a-time``): the search runs ``--side-trials``
   trials one at a time with 2 CPUs (2 torch threads) each, on both cores; next to it in time,
   the same trials run as plain calls one after another in one process with 2 threads. Timed
   and paired as in 3, in the order S P | P S ...
3. Two at once, in turns (``--only wall``): the search runs ``--trials`` trials (default: the
   quickstart's 12), 2 at a time with 1 CPU each, on both cores; right after it, the same
   trials (read back from Ray's ``params.json``, in the order the search started them) run as
   plain calls, 2 at once in a process pool, with the same threads. Both are timed from
   outside, interpreter start included. ``--rounds`` such pairs, in the order S P | P S ...
   Each round also pairs every trial's own compute in Ray (Tune's ``time_total_s``) with the
   same trial's plain call, both timed to the trial's last report (Tune cannot see the
   trainable's return); the plain call's time to its return is kept beside it. The figure is
   the median of the rounds' wall-time ratios (``--rounds``, default 3), with their range; the
   load average before and after every run is kept with it.
4. Time to the first trial: from the command's launch to Tune starting the first trial (the
   start time of its MLflow child run, which our callback creates in ``on_trial_start``);
   ``--only startup`` times the steps before it one by one.
5. Where the trial runs (``--only where``): one quickstart trial in a plain process's main
   thread and, at the same time on the other core, in a thread (as Tune's function runner runs
   a trainable) or in a Ray actor's thread (a local 1-CPU cluster); each pair twice, the cores
   swapped; user and system CPU and context switches from ``/proc``.
6. Driver memory (``--only memory``): the ``adaptune search`` process's RSS, sampled while it
   runs ``--short-trials`` very short trials (1 task of 2k tokens, tiny model, 2 at once),
   against the number of trials started; growth per trial is the slope of a least-squares line
   over the samples after the 10th trial (read from ``/proc/PID/status``: Linux only).

7. The floor (``--only floor``): the CPU of each process but the trial worker, in % of the
   one core they share (``taskset``), while a trial runs: Ray Tune alone with a function trial
   that only sleeps, first with Ray's defaults and then with the environment ``adaptune search``
   gives a local cluster (``search.local_ray.LOCAL_RAY_ENV``) and Tune's controller waiting for
   events as in ``adaptune search`` (``search.tune_loop``), then ``adaptune search`` itself with
   2 quickstart trials (from the first trial's start to the last one's end).

``--quick`` runs 2 short trials for parts 1 to 3, 10 for part 6 and shorter runs for part 7 (a
smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXPERIMENT = ROOT / "experiments" / "quickstart.yaml"


def search_command(name: str, tmp: Path, overrides: list[str]) -> list[str]:
    sets = [
        "search.scheduler=fifo",
        "search.confirm=null",  # the plain side runs the trials only, not their confirm re-runs
        "search.max_concurrent=2",
        f"storage_path={tmp / 'ray'}",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        f"tracking.experiment_name={name}",
        f"tracking.registered_model_name=overhead-{name}",
        *overrides,
    ]
    cmd = [str(BIN / "adaptune"), "search", str(EXPERIMENT), "--name", name]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run_timed(
    cmd: list[str],
    log: Path,
    sample: Any = None,
    env: dict[str, str] | None = None,
    every: float = 0.2,
) -> tuple[float, float, int]:
    """Run ``cmd`` (output to ``log``; environment ``env``, default this one's, offline);
    returns (launch epoch s, wall s, return code).

    ``sample(pid)`` is called every ``every`` seconds while it runs.
    """
    if env is None:
        env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as out:
        launch = time.time()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            if sample is not None:
                sample(proc.pid)
            time.sleep(every)
        return launch, time.perf_counter() - start, proc.returncode


def trial_configs(results: Path, runs: list[Any]) -> list[dict[str, Any]]:
    """Each trial's config as Ray handed it to the trainable (Tune's ``params.json``), in the
    order the search started them (its MLflow child runs' start times): the plain pool then
    packs the same trials onto its two workers in the same order."""
    order = sorted(runs, key=lambda r: r.info.start_time)
    files = [results / f"trial-{r.data.tags['adaptune.trial_id']}" / "params.json" for r in order]
    return [json.loads(f.read_text()) for f in files]


def child_runs(tracking_uri: str, name: str) -> list[Any]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    return list(
        client.search_runs([exp.experiment_id], filter_string="tags.`adaptune.kind` = 'trial'")
    )


# ---- the plain baseline (runs in its own interpreter: `overhead.py --plain FILE`) ----------


def _plain_one(config: dict[str, Any], threads: int = 1) -> tuple[float, float, float, float]:
    """(start, after the imports, last report, return) of one trial as a plain call, epoch
    seconds. The last report is the end point the search's trials are timed to as well."""
    begin = time.time()
    from adaptune.trainables import parse_run_config, prepare, run_stream  # once per worker process

    imported = time.time()
    reported: list[float] = []
    cfg = parse_run_config(config)
    run_stream(prepare(cfg), report=lambda _m, _c: reported.append(time.time()), threads=threads)
    return begin, imported, reported[-1], time.time()


def plain(configs_file: Path, workers: int, threads: int = 1) -> None:
    """The trials as plain calls with ``threads`` torch threads each: ``workers`` 1 runs them
    one after another in this process, more run them in a process pool, that many at once."""
    import functools
    import multiprocessing as mp

    configs = json.loads(configs_file.read_text())
    one = functools.partial(_plain_one, threads=threads)
    if workers == 1:
        spans = [one(c) for c in configs]
    else:
        with mp.get_context("spawn").Pool(workers) as pool:
            spans = pool.map(one, configs, chunksize=1)
    first, last = min(s[0] for s in spans), max(s[-1] for s in spans)
    print(json.dumps({"first_start": first, "last_end": last, "spans": spans}))


# ---- the three measurements ------------------------------------------------------------------


def speed_probe() -> float:
    """This machine's speed now: seconds for a fixed single-thread float32 matmul workload
    (the same kind of work as a trial), run in a fresh interpreter so nothing is warm."""
    code = (
        "import time, torch; torch.set_num_threads(1); a = torch.randn(256, 256); "
        "[a @ a for _ in range(50)]; t = time.perf_counter(); "
        "[a @ a for _ in range(2000)]; print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def run_search(tmp: Path, name: str, trials: int, overrides: list[str]) -> dict[str, Any]:
    """One ``adaptune search`` from outside: wall time, its trials' configs and timings."""
    cmd = search_command(name, tmp, [f"search.num_samples={trials}", *overrides])
    probe = speed_probe()
    log = tmp / f"{name}.log"
    load_before = os.getloadavg()
    launch, wall, rc = run_timed(cmd, log)
    if rc != 0:
        raise SystemExit(f"adaptune search failed (rc {rc}); see {log}")
    load = {"loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    return _search_figures(tmp, name, trials, launch, wall) | {"probe_s": probe} | load


def _search_figures(
    tmp: Path, name: str, trials: int, launch: float, wall: float
) -> dict[str, Any]:
    runs = sorted(
        child_runs(f"sqlite:///{tmp / 'mlflow.db'}", name), key=lambda r: r.info.start_time
    )
    configs = trial_configs(tmp / "ray" / name, runs)
    if len(configs) != trials:
        raise SystemExit(f"expected {trials} trial configs, found {len(configs)}")
    first_start = runs[0].info.start_time / 1000
    last_end = max(r.info.end_time for r in runs) / 1000
    return {
        "name": name,
        "wall_s": wall,
        "configs": configs,
        "first_trial_s": first_start - launch,
        "between_s": last_end - first_start,
        "after_last_trial_s": launch + wall - last_end,
        "trial_s": statistics.median((r.info.end_time - r.info.start_time) / 1000 for r in runs),
        # each trial's own compute: Tune's time_total_s, from the first call into the trainable
        # to its last report (checkpoint persisted, result handed to Tune), without the waits
        # for the driver between reports; the trainable's return is not visible to Tune
        "compute_s": [r.data.metrics["time_total_s"] for r in runs],
    }


def run_plain(
    tmp: Path, name: str, configs: list[dict[str, Any]], workers: int = 2, threads: int = 1
) -> dict[str, Any]:
    """The same trials as plain calls (``workers`` at once, ``threads`` each), from outside."""
    configs_file = tmp / f"{name}.json"
    configs_file.write_text(json.dumps(configs))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--plain", str(configs_file)]
    cmd += ["--workers", str(workers), "--threads", str(threads)]
    probe = speed_probe()
    log = tmp / f"{name}.log"
    load_before = os.getloadavg()
    launch, wall, rc = run_timed(cmd, log)
    if rc != 0:
        raise SystemExit(f"plain baseline failed (rc {rc}); see {log}")
    load = {"loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    return _plain_figures(log, configs, launch, wall) | {"name": name, "probe_s": probe} | load


def _plain_figures(
    log: Path, configs: list[dict[str, Any]], launch: float, wall: float
) -> dict[str, Any]:
    spans = json.loads(log.read_text().strip().splitlines()[-1])
    return {
        "wall_s": wall,
        "configs": configs,
        "first_trial_s": spans["first_start"] - launch,
        "between_s": spans["last_end"] - spans["first_start"],
        "after_last_trial_s": launch + wall - spans["last_end"],
        "trial_s": statistics.median(e - b for b, *_, e in spans["spans"]),
        # after the imports to the last report, as Tune's time_total_s times the search's
        "compute_s": [last - imported for _, imported, last, _ in spans["spans"]],
        "compute_to_return_s": [e - imported for _, imported, _, e in spans["spans"]],
    }


def wall_rounds(
    tmp: Path,
    trials: int,
    overrides: list[str],
    rounds: int,
    workers: int = 2,
    threads: int = 1,
    tag: str = "wall",
    save: Any = None,
) -> list[dict[str, Any]]:
    """``rounds`` pairs of (search, plain), in the order S P | P S | S P ...: a machine that
    speeds up or slows down over the minutes favours neither side. The searches use the
    same seed, so TPE proposes the same trials each time, except where a trial after its
    random start-up depends on which trials finished first: that round's search is then
    paired with a plain run of its own trials after it. The plain calls run ``workers`` at
    once with ``threads`` each, as the search's ``overrides`` run them; ``save(rounds)``, if
    given, is called after every round, so a cut-short run keeps its rounds."""
    out: list[dict[str, Any]] = []
    configs: list[dict[str, Any]] | None = None
    for r in range(1, rounds + 1):
        if r % 2 == 1 or configs is None:
            s = run_search(tmp, f"overhead-{tag}-{r}", trials, overrides)
            configs = s["configs"]
            p = run_plain(tmp, f"plain-{tag}-{r}", configs, workers, threads)
        else:
            p = run_plain(tmp, f"plain-{tag}-{r}", configs, workers, threads)
            s = run_search(tmp, f"overhead-{tag}-{r}", trials, overrides)
        order = "search, plain" if r % 2 == 1 else "plain, search"
        if s["configs"] != p["configs"]:
            # TPE's first 10 trials are its seeded random start-up and always match; later ones
            # depend on which trials finished first. Pair the search with its own trials.
            p = run_plain(tmp, f"plain-{tag}-{r}b", s["configs"], workers, threads)
            order = "plain, search, plain (the search proposed other trials)"
        paired = [a / b for a, b in zip(s["compute_s"], p["compute_s"], strict=True)]
        out.append(
            {
                "round": r,
                "order": order,
                "trials": trials,
                "ratio": s["wall_s"] / p["wall_s"],
                "trial_compute_ratio_median": statistics.median(paired),
                "trial_compute_ratio_range": [min(paired), max(paired)],
                "search": {k: v for k, v in s.items() if k != "configs"},
                "plain": {k: v for k, v in p.items() if k != "configs"},
            }
        )
        if save is not None:
            save(out)
    return out


def write_parts(path: Path | None, parts: dict[str, Any]) -> None:
    """Replace ``parts`` (and their summaries) in the results file ``path``, if one is given."""
    if path is None:
        return
    for key in ("side_by_side", "one_at_a_time", "two_at_once"):
        if key in parts:
            parts[f"{key}_summary"] = ratio_summary(parts[key])
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(old | parts, indent=1) + "\n")


# ---- side by side: the search and the plain calls at once, each on its own core -------------

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(stat_file: str | Path) -> list[str]:
    """The fields of a ``/proc/PID/stat`` file after the command name (field 3 on): state,
    parent pid, ... user time at index 11, system time at 12 (clock ticks)."""
    stat = Path(stat_file).read_text()
    return stat[stat.rindex(")") + 2 :].split()


def proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user + system CPU seconds so far) of every process (Linux ``/proc``)."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(Path(entry.path, "stat"))
        except OSError:
            continue
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK)
    return table


def process_tree(root: int, table: dict[int, tuple[int, float]]) -> list[int]:
    """``root`` and every process under it in ``table`` (from :func:`proc_table`)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        if pid in table:
            found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def _title(pid: int) -> str:
    """A process's title (Ray workers set theirs: ``ray::ImplicitFunc``, ``ray::IDLE``)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return ""


class CpuTree:
    """CPU seconds of a process and of every process under it, sampled from ``/proc`` (what a
    process uses in its last sampling interval before it exits is missed), in three parts: the
    root (the driver), the Ray workers that ran trials (``ray::ImplicitFunc``) and the rest
    (Ray's own processes, idle workers)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.cpu: dict[int, float] = {}
        self.trial_worker: set[int] = set()

    def sample(self, table: dict[int, tuple[int, float]]) -> None:
        for pid in process_tree(self.root, table):
            self.cpu[pid] = table[pid][1]
            if pid not in self.trial_worker and pid != self.root:
                if _title(pid).startswith("ray::ImplicitFunc"):
                    self.trial_worker.add(pid)

    def parts(self) -> dict[str, float]:
        trial = sum(self.cpu[p] for p in self.trial_worker)
        root = self.cpu.get(self.root, 0.0)
        return {
            "total": sum(self.cpu.values()),
            "root": root,
            "trial_workers": trial,
            "rest": sum(self.cpu.values()) - root - trial,
        }


def run_together(
    cmds: dict[str, list[str]], logs: dict[str, Path]
) -> dict[str, tuple[float, float, int, dict[str, float]]]:
    """Start every command at once; returns name -> (launch epoch s, wall s, return code, CPU
    parts of its process tree), sampling the trees once a second."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs, trees, launch, start, wall = {}, {}, {}, {}, {}
    outs = {name: logs[name].open("w") for name in cmds}
    try:
        for name, cmd in cmds.items():
            launch[name], start[name] = time.time(), time.perf_counter()
            procs[name] = subprocess.Popen(
                cmd, cwd=ROOT, stdout=outs[name], stderr=subprocess.STDOUT, env=env
            )
            trees[name] = CpuTree(procs[name].pid)
        tick = 0
        while len(wall) < len(procs):
            table = proc_table() if tick % 5 == 0 else None  # CPU once a second, exits 5 times
            for name, proc in procs.items():
                if name in wall:
                    continue
                if table is not None:
                    trees[name].sample(table)
                if proc.poll() is not None:
                    wall[name] = time.perf_counter() - start[name]
            tick += 1
            time.sleep(0.2)
    finally:
        for out in outs.values():
            out.close()
    return {
        name: (launch[name], wall[name], procs[name].returncode, trees[name].parts())
        for name in cmds
    }


def discover_configs(tmp: Path, trials: int, overrides: list[str]) -> list[dict[str, Any]]:
    """The trials a search of ``trials`` <= 10 proposes: they are TPE's seeded random start-up
    trials, the same whatever the trials score, so a search of tiny trials (1k tokens per
    task) finds them in a minute; their task length is then set back to the real one."""
    from adaptune.search.experiment import load_experiment

    name = "overhead-discover"
    real = load_experiment(EXPERIMENT, overrides).run.stream.max_train_tokens
    sets = [
        f"search.num_samples={trials}",
        "search.max_concurrent=1",
        *overrides,
        "run.stream.max_train_tokens=1024",
    ]
    log = tmp / f"{name}.log"
    _, _, rc = run_timed(search_command(name, tmp, sets), log)
    if rc != 0:
        raise SystemExit(f"adaptune search failed (rc {rc}); see {log}")
    configs = trial_configs(tmp / "ray" / name, child_runs(f"sqlite:///{tmp / 'mlflow.db'}", name))
    for c in configs:
        c["stream"]["max_train_tokens"] = real
    return configs


def side_by_side(tmp: Path, trials: int, overrides: list[str], rounds: int) -> list[dict[str, Any]]:
    """``adaptune search`` (1 trial at a time, with ASHA off and MLflow on, as in the two-at-once
    figure) and the same trials as plain calls one after another in one Python process, started
    at the same moment, each pinned to its own core with ``taskset`` (the search's driver, Ray's
    processes and its trial worker all share one core). Both see the same machine at the same
    time, so a machine that speeds up or slows down over the minutes moves both. Rounds swap
    the cores."""
    if trials > 10:
        raise SystemExit("--side-by-side takes at most 10 trials (TPE's random start-up)")
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("--side-by-side needs 2 cores")
    configs = discover_configs(tmp, trials, overrides)
    configs_file = tmp / "side-by-side.json"
    configs_file.write_text(json.dumps(configs))
    cores = sorted(os.sched_getaffinity(0))[:2]
    out = []
    for r in range(1, rounds + 1):
        search_core, plain_core = (cores[0], cores[1]) if r % 2 else (cores[1], cores[0])
        name = f"overhead-sbs-{r}"
        sets = [f"search.num_samples={trials}", "search.max_concurrent=1", *overrides]
        cmds = {
            "search": ["taskset", "-c", str(search_core), *search_command(name, tmp, sets)],
            "plain": [
                "taskset",
                "-c",
                str(plain_core),
                sys.executable,
                str(Path(__file__).resolve()),
                "--plain",
                str(configs_file),
                "--workers",
                "1",
            ],
        }
        logs = {"search": tmp / f"{name}.log", "plain": tmp / f"plain-sbs-{r}.log"}
        load_before = os.getloadavg()
        done = run_together(cmds, logs)
        load = {"loadavg_before": load_before, "loadavg_after": os.getloadavg()}
        for side, (_, _, rc, _) in done.items():
            if rc != 0:
                raise SystemExit(f"{side} failed (rc {rc}); see {logs[side]}")
        s = _search_figures(tmp, name, trials, *done["search"][:2])
        p = _plain_figures(logs["plain"], configs, *done["plain"][:2])
        if s["configs"] != configs:
            raise SystemExit("the search proposed other trials than the discovery search")
        paired = [a / b for a, b in zip(s["compute_s"], p["compute_s"], strict=True)]
        out.append(
            {
                "round": r,
                "cores": {"search": search_core, "plain": plain_core},
                "trials": trials,
                "ratio": s["wall_s"] / p["wall_s"],
                "trial_compute_ratio_median": statistics.median(paired),
                "trial_compute_ratio_range": [min(paired), max(paired)],
                "cpu_s": {"search": done["search"][3], "plain": done["plain"][3]},
                **load,
                "search": {k: v for k, v in s.items() if k != "configs"},
                "plain": {k: v for k, v in p.items() if k != "configs"},
            }
        )
    return out


# ---- the floor: Ray's and Tune's own CPU while a trial computes nothing --------------------

FLOOR_CLASSES = (  # (what the command line holds, the name in the table); first match wins
    ("ray::ImplicitFunc", "trial worker"),
    ("ray::IDLE", "idle workers"),
    ("gcs_server", "GCS"),
    ("raylet", "raylet"),
    ("log_monitor.py", "log monitor"),
    ("DashboardAgent", "dashboard agent"),
    ("RuntimeEnvAgent", "runtime-env agent"),
    ("dashboard.py", "dashboard head (API server)"),
    ("monitor.py", "autoscaler monitor"),
)


def _floor_tune(marks: Path, seconds: float, storage: Path, patient: bool = False) -> None:
    """Ray Tune alone (``overhead.py --floor-tune MARKS``): a local 1-CPU cluster started as
    ``adaptune search`` starts one, and one function trial that sleeps ``seconds`` before each
    of its 3 reports (appending the time of each to ``marks``); ``patient``: Tune's controller
    waits for events as in ``adaptune search`` (:func:`search.tune_loop.patient_controller`)."""
    import contextlib

    import ray
    from adaptune.search.tune_loop import patient_controller
    from ray import tune

    def sleeper(config: dict[str, Any]) -> None:
        for i in range(3):
            time.sleep(seconds)
            with open(marks, "a") as f:
                f.write(f"{time.time()}\n")
            tune.report({"i": i})

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    tuner = tune.Tuner(
        sleeper, run_config=tune.RunConfig(name="floor", storage_path=str(storage), verbose=0)
    )
    with patient_controller() if patient else contextlib.nullcontext():
        tuner.fit()


class CpuSeries:
    """Every process under a command's (the root's), each time :meth:`sample` is called:
    (time, pid -> (class, CPU s))."""

    def __init__(self) -> None:
        self.root: int | None = None
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []

    def _class(self, pid: int) -> str:
        if pid == self.root:
            return "driver"
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return "other"
        return next((name for key, name in FLOOR_CLASSES if key in cmd), "other")

    def sample(self, root: int) -> None:
        self.root = root
        table = proc_table()
        now = time.time()
        self.samples.append(
            (now, {p: (self._class(p), table[p][1]) for p in process_tree(self.root, table)})
        )

    def share(self, start: float, end: float) -> dict[str, float]:
        """Per class, CPU seconds between the samples nearest ``start`` and ``end`` over the
        wall seconds between them, in % of one core; ``window_s`` that wall time."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        (t0, a), (t1, b) = inside[0], inside[-1]
        out: dict[str, float] = {}
        for pid, (cls, cpu) in b.items():
            out[cls] = out.get(cls, 0.0) + cpu - (a[pid][1] if pid in a else 0.0)
        return {k: 100 * v / (t1 - t0) for k, v in out.items()} | {"window_s": t1 - t0}


def _run_sampled(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[CpuSeries, int]:
    series = CpuSeries()
    _, _, rc = run_timed(cmd, log, series.sample, env=env, every=1.0)
    return series, rc


def floor(tmp: Path, seconds: float, trials: int, overrides: list[str]) -> dict[str, Any]:
    """Ray's and Tune's background CPU, each command pinned to one core: (1) Ray Tune alone
    with a sleeping trial, Ray's defaults; (2) the same with the environment ``adaptune search``
    gives a local cluster (``search.local_ray.LOCAL_RAY_ENV``) and its patient controller loop
    (``search.tune_loop``); (3) ``adaptune search`` itself with
    ``trials`` quickstart trials, everything but the trial worker between the first trial's
    start and the last one's end."""
    from adaptune.search.local_ray import LOCAL_RAY_ENV

    core = str(sorted(os.sched_getaffinity(0))[0])
    base = {k: v for k, v in os.environ.items() if k not in LOCAL_RAY_ENV}
    base |= {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out: dict[str, Any] = {}
    variants = (
        ("tune_defaults", base, []),
        ("tune_adaptune_env", base | LOCAL_RAY_ENV, ["--floor-patient"]),
    )
    for name, env, extra in variants:
        marks = tmp / f"floor-{name}.marks"
        marks.unlink(missing_ok=True)
        cmd = ["taskset", "-c", core, sys.executable, str(Path(__file__).resolve())]
        cmd += ["--floor-tune", str(marks), "--floor-seconds", str(seconds), *extra]
        series, rc = _run_sampled(cmd, tmp / f"floor-{name}.log", env)
        if rc != 0:
            raise SystemExit(f"the Tune floor run failed (rc {rc}); see {tmp}/floor-{name}.log")
        times = [float(t) for t in marks.read_text().split()]
        out[name] = series.share(times[0] + 1, times[-1] - 1)  # the trial between reports
    name = "overhead-floor"
    sets = [f"search.num_samples={trials}", "search.max_concurrent=1", *overrides]
    cmd = ["taskset", "-c", core, *search_command(name, tmp, sets)]
    series, rc = _run_sampled(cmd, tmp / f"{name}.log", base)
    if rc != 0:
        raise SystemExit(f"adaptune search failed (rc {rc}); see {tmp}/{name}.log")
    runs = child_runs(f"sqlite:///{tmp / 'mlflow.db'}", name)
    start = min(r.info.start_time for r in runs) / 1000
    end = max(r.info.end_time for r in runs) / 1000
    out["adaptune_search"] = series.share(start + 1, end - 1)
    return out


def print_floor(f: dict[str, Any]) -> None:
    cols = ("tune_defaults", "tune_adaptune_env", "adaptune_search")
    rows = ["driver", *(n for _, n in FLOOR_CLASSES if n != "trial worker"), "other"]
    print(
        "\n## The floor: CPU of each process, % of the one core, while the trial runs\n\n"
        "| process | Ray Tune alone, sleeping trial, Ray's defaults | the same, adaptune's "
        "local-cluster environment and controller wait | adaptune search, quickstart trials "
        "|\n|---|---|---|---|"
    )
    for n in rows:
        if any(f[c].get(n, 0.0) >= 0.005 for c in cols):
            print(f"| {n} | " + " | ".join(f"{f[c].get(n, 0.0):.2f} %" for c in cols) + " |")
    skip = ("trial worker", "window_s")
    rest = [sum(v for k, v in f[c].items() if k not in skip) for c in cols]
    print("| **all but the trial worker** | " + " | ".join(f"**{r:.2f} %**" for r in rest) + " |")
    print(
        "| the sleeping trial's worker | "
        + " | ".join(f"{f[c].get('trial worker', 0.0):.2f} %" for c in cols[:2])
        + " | (computing) |"
    )
    print("| window | " + " | ".join(f"{f[c]['window_s']:.0f} s" for c in cols) + " |")


# ---- where the trial runs: a plain process's main thread, a thread, a Ray actor's thread -------

_WHERE = r"""
import json, os, sys, threading
sys.path.insert(0, sys.argv[3])
configs = json.load(open(sys.argv[2]))

def go():
    from adaptune.trainables import parse_run_config, prepare, run_stream
    for c in configs:
        run_stream(prepare(parse_run_config(c)), report=lambda m, c: None, threads=1)

def in_thread():
    th = threading.Thread(target=go)
    th.start()
    th.join()

if sys.argv[1] == "main":
    go()
elif sys.argv[1] == "thread":
    in_thread()
else:  # a Ray actor's thread, as Tune's function trainable runs (a local 1-CPU cluster)
    import ray
    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    ray.get(ray.remote(num_cpus=1)(type("Trial", (), {"run": lambda self: in_thread()}))
            .remote().run.remote())
"""


def where_check(tmp: Path, trials: int) -> list[dict[str, Any]]:
    """The same trials run in a plain process's main thread and, at the same time on the other
    core, in a thread (as Tune's function runner runs a trainable) or in a Ray actor's thread;
    each pair twice, the cores swapped. User and system CPU time and context switches of the
    processes (a Ray actor's: its worker's) come from ``/proc``."""
    from adaptune.search.experiment import load_experiment

    configs = [load_experiment(EXPERIMENT).run.model_dump(mode="json")] * trials
    configs_file = tmp / "where.json"
    configs_file.write_text(json.dumps(configs))
    cores = sorted(os.sched_getaffinity(0))[:2]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = []
    for other in ("thread", "ray actor thread"):
        for swap in (False, True):
            main_core, other_core = (cores[1], cores[0]) if swap else (cores[0], cores[1])
            procs = {
                mode: subprocess.Popen(
                    [
                        "taskset",
                        "-c",
                        str(core),
                        sys.executable,
                        "-c",
                        _WHERE,
                        mode.split()[0],
                        str(configs_file),
                        str(ROOT),
                    ],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for mode, core in (("main", main_core), (other, other_core))
            }
            seen: dict[str, dict[str, float]] = {}
            while any(p.poll() is None for p in procs.values()):
                for mode, proc in procs.items():
                    pids = [proc.pid]
                    if mode.startswith("ray"):
                        tree = process_tree(proc.pid, proc_table())
                        pids = [q for q in tree if _title(q).startswith("ray::Trial")]
                    for pid in pids:
                        figures = _cpu_and_switches(pid)
                        if figures:
                            seen[mode] = figures
                time.sleep(0.5)
            out.append(
                {
                    "pair": ["main", other],
                    "cores": {"main": main_core, other: other_core},
                    "figures": seen,
                }
            )
    return out


def _cpu_and_switches(pid: int) -> dict[str, float] | None:
    try:
        fields = _stat_fields(f"/proc/{pid}/stat")
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        switches = {"voluntary": 0, "involuntary": 0}
        for task in tasks:
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches"):
                    switches["voluntary"] += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    switches["involuntary"] += int(line.split()[1])
    except OSError:
        return None
    return {"user_s": int(fields[11]) / TICK, "system_s": int(fields[12]) / TICK, **switches}


def print_where(pairs: list[dict[str, Any]]) -> None:
    print(
        "\n## Where the trial runs: the same trials, two processes at once, one core each\n\n"
        "| pair (cores) | where | user CPU | system CPU | context switches (voluntary / "
        "involuntary) | user CPU vs main thread |\n|---|---|---|---|---|---|"
    )
    for w in pairs:
        main, other = w["pair"]
        cores = ", ".join(f"{k} {v}" for k, v in w["cores"].items())
        base = w["figures"][main]["user_s"]
        for mode in (main, other):
            f = w["figures"][mode]
            print(
                f"| {main} vs {other} ({cores}) | {mode} | {f['user_s']:.1f} s | "
                f"{f['system_s']:.1f} s | {f['voluntary']:.0f} / {f['involuntary']:.0f} | "
                f"{f['user_s'] / base:.3f} |"
            )


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` from ``/proc`` (Linux), None once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def driver_memory(tmp: Path, trials: int) -> dict[str, Any]:
    name = "overhead-memory"
    results = tmp / "ray" / name
    overrides = [
        f"search.num_samples={trials}",
        "run.stream.tasks=[{name: docs, builtin: python_docs}]",
        "run.stream.max_train_tokens=2048",
        "run.stream.max_eval_blocks=4",
        "run.stream.block_size=64",
        "run.model.n_embd=32",
        "run.model.n_positions=64",
        "space={lr: {loguniform: [1.0e-4, 1.0e-2]}}",
    ]
    samples: list[tuple[float, int, int]] = []  # (epoch s, trials started, driver RSS bytes)

    def sample(pid: int) -> None:
        rss = rss_bytes(pid)
        if rss is not None:
            samples.append((time.time(), len(list(results.glob("trial-*"))), rss))

    cmd = search_command(name, tmp, overrides)
    launch, wall, rc = run_timed(cmd, tmp / "memory.log", sample)
    if rc != 0:
        raise SystemExit(f"adaptune search failed (rc {rc}); see {tmp / 'memory.log'}")
    runs = child_runs(f"sqlite:///{tmp / 'mlflow.db'}", name)
    last_end = max(r.info.end_time for r in runs) / 1000
    during = [(n, rss) for t, n, rss in samples if t <= last_end]  # the summary phase left out
    skip = min(10, trials)
    fit = [(n, rss) for n, rss in during if n >= skip]
    xs, ys = [n for n, _ in fit], [rss for _, rss in fit]
    slope = statistics.linear_regression(xs, ys).slope if len(set(xs)) > 1 else 0.0

    def rss_when(n: int) -> float:  # MiB, when the n-th trial had started
        return next((rss for k, rss in during if k >= n), float("nan")) / 2**20

    marks = sorted({1, skip, trials // 2, trials})
    return {
        "trials": trials,
        "wall_s": wall,
        "trials_s": last_end - min(r.info.start_time for r in runs) / 1000,
        "rss_mib": {n: rss_when(n) for n in marks},
        "after_last_trial_mib": during[-1][1] / 2**20,
        "peak_mib": max(rss for _, _, rss in samples) / 2**20,
        "growth_kib_per_trial": slope / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=12, help="trials of the wall-time figure")
    parser.add_argument("--short-trials", type=int, default=100, help="trials for memory")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="(search, plain) pairs for the wall-time figures, in the order SP PS SP ...; the "
        "figure is the median of the per-round ratios",
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="write the wall-time rounds here (the parts run replace theirs in an existing file)",
    )
    parser.add_argument("--set", action="append", default=[], help="extra override, KEY=VALUE")
    parser.add_argument("--quick", action="store_true", help="tiny trials, a smoke test")
    parser.add_argument("--workdir", type=Path, help="keep logs, Ray results and MLflow here")
    parser.add_argument(
        "--only",
        choices=["side-by-side", "one-at-a-time", "wall", "memory", "startup", "where", "floor"],
        help="run one part (one-at-a-time: 2 CPUs per trial, in turns; wall: two at once, in "
        "turns; startup: its steps; floor: Ray's and Tune's own CPU while a trial runs)",
    )
    parser.add_argument(
        "--side-trials",
        type=int,
        default=10,
        help="trials of the side-by-side and one-at-a-time figures",
    )
    parser.add_argument(
        "--side-tokens",
        type=int,
        help="training tokens per task in the side-by-side figure (default: the quickstart's)",
    )
    parser.add_argument(
        "--floor-seconds", type=float, default=30.0, help="the floor's sleeping trial: s per report"
    )
    parser.add_argument("--plain", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--floor-tune", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--floor-patient", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain is not None:
        plain(args.plain, args.workers, args.threads)
        return
    if args.floor_tune is not None:
        _floor_tune(
            args.floor_tune,
            args.floor_seconds,
            args.floor_tune.parent / "floor-ray",
            patient=args.floor_patient,
        )
        return
    trials, short = args.trials, args.short_trials
    overrides = list(args.set)
    if args.quick:
        trials, short = 2, 10
        overrides = ["run.stream.max_train_tokens=8192", *overrides]
    with tempfile.TemporaryDirectory(prefix="adaptune-overhead-") as tmp_name:
        tmp = args.workdir or Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        if args.only == "startup":
            startup_steps(tmp)
            return
        parts: dict[str, Any] = {}
        if args.only in (None, "side-by-side"):
            side_trials, side_sets = args.side_trials, list(overrides)
            if args.side_tokens:
                side_sets.insert(0, f"run.stream.max_train_tokens={args.side_tokens}")
            if args.quick:
                side_trials, side_sets = 2, overrides
            parts["side_by_side"] = side_by_side(tmp, side_trials, side_sets, args.rounds)
            print_side_by_side(parts["side_by_side"])
        if args.only in (None, "one-at-a-time"):
            one_trials = 2 if args.quick else args.side_trials
            sets = ["search.max_concurrent=1", "resources.cpus_per_trial=2", *overrides]
            parts["one_at_a_time"] = wall_rounds(
                tmp, one_trials, sets, args.rounds, workers=1, threads=2, tag="one"
            )
            print_wall(parts["one_at_a_time"], "one at a time, 2 CPUs (2 threads) each")
        if args.only in (None, "floor"):
            floor_trials, floor_s = (1, 5.0) if args.quick else (2, args.floor_seconds)
            parts["floor"] = floor(tmp, floor_s, floor_trials, overrides)
            print_floor(parts["floor"])
        if args.only in (None, "where"):
            parts["where"] = where_check(tmp, 1)
            print_where(parts["where"])
        if args.only in (None, "wall"):
            parts["two_at_once"] = wall_rounds(
                tmp,
                trials,
                overrides,
                args.rounds,
                save=lambda rounds: write_parts(args.json, parts | {"two_at_once": rounds}),
            )
            print_wall(parts["two_at_once"])
        write_parts(args.json, parts)
        if args.only in (None, "memory"):
            print_memory(driver_memory(tmp, short))


def startup_steps(tmp: Path) -> None:
    """Time, in this process, the steps ``adaptune search`` takes before Tune starts a trial."""
    laps: list[tuple[str, float]] = []
    t = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal t
        now = time.perf_counter()
        laps.append((step, now - t))
        t = now

    import adaptune.search.cli  # noqa: F401  (what the `adaptune` entry point imports)

    lap("import the CLI (search, pydantic, yaml)")
    from adaptune.search.checks import check_search
    from adaptune.search.experiment import load_experiment

    exp = load_experiment(
        EXPERIMENT,
        [f"storage_path={tmp / 'ray'}", f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}"],
    )
    check_search(exp)
    lap("load and check the experiment")
    from adaptune.trainables.run import prepare

    prepare(exp.run)
    lap("prepare: tokenizer, model check, tokenize the stream")
    import mlflow

    mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").search_experiments()
    lap("MLflow: create the sqlite store (first search only)")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    lap("ray.init (local cluster)")
    ray.shutdown()
    print("\n| step before the first trial | seconds |\n|---|---|")
    for step, seconds in laps:
        print(f"| {step} | {seconds:.1f} |")
    print(f"| total | {sum(s for _, s in laps):.1f} |")


def _timing_rows(r: str, w: dict[str, Any]) -> str:
    """The rows both wall-time tables share: wall time and where it went."""
    s, p = w["search"], w["plain"]
    return (
        f"| {r} | wall time | {s['wall_s']:.1f} s | {p['wall_s']:.1f} s | "
        f"**{w['ratio']:.3f}** |\n"
        f"| {r} | command launch -> first trial start | {s['first_trial_s']:.1f} s | "
        f"{p['first_trial_s']:.1f} s | |\n"
        f"| {r} | first trial start -> last trial end | {s['between_s']:.1f} s | "
        f"{p['between_s']:.1f} s | {s['between_s'] / p['between_s']:.3f} |\n"
        f"| {r} | last trial end -> command exit | {s['after_last_trial_s']:.1f} s | "
        f"{p['after_last_trial_s']:.1f} s | |"
    )


def ratio_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The wall-time ratio's statistic, fixed before any run: the median of the per-round
    ratios, with their range; all rounds' wall times together beside it."""
    ratios = [w["ratio"] for w in rounds]
    total = sum(w["search"]["wall_s"] for w in rounds) / sum(w["plain"]["wall_s"] for w in rounds)
    compute = [w["trial_compute_ratio_median"] for w in rounds]
    return {
        "rounds": len(rounds),
        "per_round": ratios,
        "median": statistics.median(ratios),
        "range": [min(ratios), max(ratios)],
        "all_rounds_together": total,
        "trial_compute_ratio_median_of_rounds": statistics.median(compute),
        "target": 1.10,
        "target_met": statistics.median(ratios) <= 1.10,
    }


def _ratios(rounds: list[dict[str, Any]]) -> str:
    """Each round's wall-time ratio, their median and range, and all rounds' together."""
    s = ratio_summary(rounds)
    per_round = ", ".join(f"{r:.3f}" for r in s["per_round"])
    lo, hi = s["range"]
    return (
        f"median of {s['rounds']} rounds {s['median']:.3f} (range {lo:.3f}-{hi:.3f}; per round "
        f"{per_round}); all rounds together {s['all_rounds_together']:.3f}"
    )


def print_wall(rounds: list[dict[str, Any]], how: str = "2 at once, 1 CPU each") -> None:
    print(
        f"\n## Orchestration overhead: {rounds[0]['trials']} quickstart trials, {how}, "
        f"{len(rounds)} round(s)\n\n"
        "| round (order) | figure | adaptune search | plain calls | ratio |\n|---|---|---|---|---|",
        flush=True,
    )
    for w in rounds:
        r, s, p = f"{w['round']} ({w['order']})", w["search"], w["plain"]
        lo, hi = w["trial_compute_ratio_range"]
        print(
            f"{_timing_rows(r, w)}\n"
            f"| {r} | median trial duration | {s['trial_s']:.1f} s | {p['trial_s']:.1f} s | |\n"
            f"| {r} | same trial's compute, search / plain: median (range) | | | "
            f"{w['trial_compute_ratio_median']:.3f} ({lo:.2f}-{hi:.2f}) |\n"
            f"| {r} | speed probe just before (s, lower = faster machine) | {s['probe_s']:.2f} | "
            f"{p['probe_s']:.2f} | |",
            flush=True,
        )
    fixed = [
        w["search"]["first_trial_s"]
        + w["search"]["after_last_trial_s"]
        - w["plain"]["first_trial_s"]
        - w["plain"]["after_last_trial_s"]
        for w in rounds
    ]
    print(
        f"\nwall-time ratio (target <= 1.10): {_ratios(rounds)}\n"
        f"fixed cost of the search (before the first and after the last trial, beyond the plain "
        f"calls'): {', '.join(f'{x:.1f} s' for x in fixed)}",
        flush=True,
    )


def print_side_by_side(rounds: list[dict[str, Any]]) -> None:
    print(
        f"\n## Orchestration overhead, side by side: {rounds[0]['trials']} trials one at a time, "
        "search and plain calls at once, each on its own core\n\n"
        "| round (cores) | figure | adaptune search | plain calls | ratio |\n|---|---|---|---|---|",
        flush=True,
    )
    for w in rounds:
        r = f"{w['round']} (search {w['cores']['search']}, plain {w['cores']['plain']})"
        cs, cp = w["cpu_s"]["search"], w["cpu_s"]["plain"]
        lo, hi = w["trial_compute_ratio_range"]
        print(
            f"{_timing_rows(r, w)}\n"
            f"| {r} | same trial's compute, search / plain: median (range) | | | "
            f"{w['trial_compute_ratio_median']:.3f} ({lo:.2f}-{hi:.2f}) |\n"
            f"| {r} | CPU time, all processes | {cs['total']:.1f} s | {cp['total']:.1f} s | "
            f"{cs['total'] / cp['total']:.3f} |\n"
            f"| {r} | CPU time: driver / trial worker / Ray's other processes | "
            f"{cs['root']:.1f} / {cs['trial_workers']:.1f} / {cs['rest']:.1f} s | "
            f"{cp['root']:.1f} s (one process) | |",
            flush=True,
        )
    print(f"\nside-by-side wall-time ratio (target <= 1.10): {_ratios(rounds)}", flush=True)


def print_memory(m: dict[str, Any]) -> None:
    print(
        f"\n## Driver memory: {m['trials']} short trials (1 task, 2 at once); the trials took "
        f"{m['trials_s']:.0f} s ({m['trials_s'] / m['trials']:.2f} s per trial), the command "
        f"{m['wall_s']:.0f} s\n\n| trials started | driver RSS (MiB) |\n|---|---|"
    )
    for n, mib in m["rss_mib"].items():
        print(f"| {n} | {mib:.0f} |")
    print(
        f"\n| figure | value |\n|---|---|\n"
        f"| driver RSS after the last trial | {m['after_last_trial_mib']:.0f} MiB |\n"
        f"| peak driver RSS (champion registration included) | {m['peak_mib']:.0f} MiB |\n"
        f"| growth per trial (least squares, trials {min(10, m['trials'])}-{m['trials']}) | "
        f"{m['growth_kib_per_trial']:.1f} KiB |",
        flush=True,
    )


if __name__ == "__main__":
    main()
