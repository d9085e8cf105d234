"""Resuming an interrupted search: the refusals, the searcher and callback reconciliation, and a
search whose driver is SIGKILLed mid-trial and then resumed with ``--resume``."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytest
from adaptune.search.cli import main
from adaptune.search.experiment import experiment_yaml, parse_experiment
from adaptune.search.records import experiment_hash
from adaptune.search.resume import SEARCH_FILE
from adaptune.search.searcher import build_searcher
from adaptune.search.tags import ERROR_TAG, LOST_TAG, PARENT_TAG, PID_TAG, STARTS_TAG, TRIAL_TAG
from adaptune.search.tracking import MlflowTrackingCallback
from adaptune.search.tuner import close_dangling_trials
from adaptune.spaces.tune import build_param_space
from conftest import tiny_experiment, write_experiment
from mlflow.tracking import MlflowClient
from ray import tune

ROOT = Path(__file__).resolve().parents[1]
T = 3  # tasks in the stream

EXPERIMENT = tiny_experiment(
    "resume",
    # short tasks: the kill point freezes a trial midway, so it needs no slow machine
    run={"stream": {"max_train_tokens": 16384}},
    space={"lr": {"loguniform": [1.0e-4, 2.0e-2]}, "buffer_size": {"choice": [0, 32]}},
    search={"num_samples": 4, "seed": 5},
)


# -- refusals: what the search directory holds -------------------------------------------------
def _search_dir(tmp_path: Path, info: dict[str, Any] | None = None) -> Path:
    path = tmp_path / "runs" / "ray" / "resume"
    path.mkdir(parents=True)
    (path / "tuner.pkl").write_bytes(b"")
    if info is not None:
        (path / SEARCH_FILE).write_text(json.dumps(info))
    return path


def _refusal(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    write_experiment(tmp_path / "exp.yaml", EXPERIMENT)
    assert main(["search", "exp.yaml", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    return err


def test_interrupted_search_is_refused_without_resume(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    _search_dir(tmp_path, {"state": "running"})
    err = _refusal(tmp_path, capsys)
    assert "holds an interrupted search named 'resume'" in err
    assert "continue it with --resume" in err and "--name NEW_NAME" in err


def test_finished_search_is_refused_with_and_without_resume(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    _search_dir(tmp_path, {"state": "finished", "parent_run_id": "abc"})
    err = _refusal(tmp_path, capsys)
    assert "already holds a finished search named 'resume'" in err
    assert "--name NEW_NAME" in err and "--resume only continues an interrupted search" in err
    err = _refusal(tmp_path, capsys, "--resume")
    assert "already finished; nothing to resume; pass --name NEW_NAME" in err


def test_resume_refuses_nothing_unknown_or_a_changed_experiment(
    tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    err = _refusal(tmp_path, capsys, "--resume")
    assert "--resume: no search named 'resume' to resume" in err
    assert "run without --resume to start it" in err
    assert not (tmp_path / "runs").exists()  # refused before anything was written

    stray = tmp_path / "runs" / "ray" / "resume"
    stray.mkdir(parents=True)
    (stray / "notes.txt").write_text("mine")
    assert "holds files but no search Ray can resume" in _refusal(tmp_path, capsys)
    (stray / "notes.txt").unlink()

    exp = parse_experiment(EXPERIMENT)
    old = experiment_hash(experiment_yaml(exp))
    (stray / "tuner.pkl").write_bytes(b"")
    (stray / SEARCH_FILE).write_text(json.dumps({"state": "running", "experiment_hash": old}))
    assert "has no adaptune-search.json" in _refusal(tmp_path, capsys, "--resume")
    info = {"state": "running", "experiment_hash": old, "parent_run_id": "abc"}
    (stray / SEARCH_FILE).write_text(json.dumps(info))
    err = _refusal(tmp_path, capsys, "--resume", "--set", "lr=1e-3")
    assert "this experiment differs from the one the search 'resume' started with" in err


# -- the searcher: Tune's snapshot is behind the study ------------------------------------------
PARAM_SPACE = {
    "optim": {"lr": tune.loguniform(1e-4, 1e-2)},
    "components": {"replay": {"buffer_size": tune.randint(0, 65)}},
}


def _searcher(db: Path) -> Any:
    return build_searcher(
        study_name="demo", storage_file=db, metric="stream_loss", mode="min", max_t=T, seed=1
    )


def _result(task: int, loss: float) -> dict[str, Any]:
    return {"stream_loss": loss, "task_index": task, "training_iteration": task}


def test_restored_searcher_adopts_orphans_and_tells_nothing_twice(tmp_path: Path) -> None:
    db = tmp_path / "optuna.db"
    searcher = _searcher(db)  # what tuner.pkl holds: no space yet
    live = pickle.loads(pickle.dumps(searcher))
    assert live.set_search_properties("stream_loss", "min", PARAM_SPACE)
    live.suggest("a")
    live.suggest("b")
    live.on_trial_result("a", _result(1, 3.0))
    live.on_trial_result("b", _result(1, 3.5))
    snapshot = tmp_path / "searcher-state.pkl"
    live.save(str(snapshot))  # Tune's experiment snapshot
    # after the snapshot: a finishes, c is asked for and starts, the study sees it all; then
    # the driver is killed
    live.on_trial_complete("a", result=_result(T, 2.0))
    lost = live.suggest("c")
    live.on_trial_result("c", _result(1, 4.0))

    searcher.restore(str(snapshot))  # Tuner.restore: the snapshot, then reconciliation
    searcher.on_trial_complete("a", result=_result(T, 2.0))  # Tune finishes `a` again
    adopted = searcher.suggest("d")  # Tune's restored counter asks once more
    assert adopted == lost
    fresh = searcher.suggest("e")  # a new trial: not the orphan's parameters drawn again
    assert fresh != lost
    searcher.on_trial_complete("e", error=True)
    for trial_id in ("b", "d"):
        searcher.on_trial_result(trial_id, _result(1, 3.0))
        searcher.on_trial_complete(trial_id, result=_result(T, 2.5))

    study = optuna.load_study(study_name="demo", storage=f"sqlite:///{db}")
    assert len(study.trials) == 4  # a, b, c re-run as d, e: no extra trial
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3 + ["FAIL"]
    assert [t.user_attrs["ray_trial_id"] for t in study.trials] == ["a", "b", "d", "e"]
    assert study.trials[2].user_attrs["adaptune.lost_ray_trial_id"] == "c"
    assert study.trials[0].value == 2.0 and study.trials[2].value == 2.5


def test_orphan_without_parameters_is_failed_and_dangling_trials_are_pruned(
    tmp_path: Path,
) -> None:
    db = tmp_path / "optuna.db"
    searcher = _searcher(db)
    live = pickle.loads(pickle.dumps(searcher))
    assert live.set_search_properties("stream_loss", "min", PARAM_SPACE)
    live.suggest("a")
    snapshot = tmp_path / "searcher-state.pkl"
    live.save(str(snapshot))
    live.study.ask()  # the driver died inside ask(): a trial without parameters
    live.suggest("b")  # ... or after it, and no resumed trial adopts it (time budget)

    searcher.restore(str(snapshot))
    study = optuna.load_study(study_name="demo", storage=f"sqlite:///{db}")
    states = [t.state for t in study.trials]
    assert states[1] == optuna.trial.TrialState.FAIL  # never ran
    assert states[2] == optuna.trial.TrialState.RUNNING  # kept for adoption
    searcher.on_trial_complete("a", result=_result(T, 2.0))
    assert close_dangling_trials(study) == 1
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "FAIL", "PRUNED"]


# -- the MLflow callback: lost runs and starts --------------------------------------------------
@dataclass
class FakeTrial:
    trial_id: str
    config: dict[str, Any]
    last_result: dict[str, Any] = field(default_factory=dict)


def test_lost_run_is_adopted_once_and_unadopted_ones_end_killed(tmp_path: Path) -> None:
    exp = parse_experiment(
        EXPERIMENT | {"tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    )
    callback = MlflowTrackingCallback(exp, experiment_yaml=experiment_yaml(exp))
    callback.setup()

    def trial(trial_id: str, lr: float) -> FakeTrial:
        config = build_param_space(exp)
        config["optim"]["lr"], config["components"]["replay"]["buffer_size"] = lr, 32
        return FakeTrial(trial_id, config)

    done, lost, stray = trial("t_0", 1e-3), trial("t_2", 2e-3), trial("t_3", 3e-3)
    for t in (done, lost, stray):
        callback.on_trial_start(0, [done, lost, stray], t)
    done.last_result = {"task_index": T}
    callback.on_trial_complete(0, [], done)

    # the driver dies; Ray's snapshot knows t_0 only; the resumed searcher hands t_2's Optuna
    # trial (same parameters) to a new Ray trial t_5
    resumed = pickle.loads(pickle.dumps(callback))
    resumed._children.clear()
    rerun = trial("t_5", 2e-3)
    resumed.on_trial_start(0, [done, rerun], rerun)
    resumed.on_experiment_end([done, rerun])

    client = callback.client
    runs = client.search_runs(
        [callback.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{callback.parent_run_id}'"
    )
    by_trial = {r.data.tags[TRIAL_TAG]: r for r in runs}
    assert sorted(by_trial) == ["t_0", "t_3", "t_5"]  # t_2's run became t_5's
    assert by_trial["t_5"].data.tags[LOST_TAG] == "t_2"
    assert by_trial["t_5"].data.tags[STARTS_TAG] == "2"
    assert by_trial["t_5"].info.run_name == "t02-t_5"  # t_2's place, the new trial id
    assert by_trial["t_0"].data.tags[STARTS_TAG] == "1"
    assert by_trial["t_0"].info.status == "FINISHED"
    assert by_trial["t_3"].info.status == "KILLED"  # lost and never re-run
    assert by_trial["t_3"].data.tags[ERROR_TAG].startswith("lost:")


# -- the kill test --------------------------------------------------------------------------------
def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, process group, state) for every process on this machine."""
    procs = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        procs[int(stat.parent.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return procs


def _tree(root: int) -> set[int]:
    """``root``, its descendants and the members of its process group (Ray's local cluster
    and workers, started by the driver)."""
    procs = _processes()
    found = {root} | {pid for pid, (_, pgid, _) in procs.items() if pgid == root}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _, _) in procs.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    return found


def _alive(pids: set[int]) -> set[int]:
    procs = _processes()
    return {pid for pid in pids if pid in procs and procs[pid][2] != "Z"}


def _freeze_workers(proc: subprocess.Popen[bytes], quiet_s: float = 2.0) -> None:
    """SIGSTOP every trial worker of the search, then give the driver ``quiet_s`` to handle
    what they reported before. Ray deletes a trial's superseded checkpoint when it registers
    the new one and writes the experiment snapshot naming the new one a controller step later;
    a SIGKILL between the two leaves a snapshot naming a deleted checkpoint, and that trial
    cannot be restored. The kill is meant to hit a driver whose snapshot is current."""
    for pid in _tree(proc.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"ImplicitFunc" in cmdline or b"continual_trainable" in cmdline:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
    time.sleep(quiet_s)


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the driver's process group and every process it started, and wait for them."""
    pids = _tree(proc.pid)
    groups = {_processes().get(pid, (0, 0, ""))[1] for pid in pids}
    os.killpg(proc.pid, signal.SIGKILL)
    for pgid in groups - {0, os.getpgrp()}:
        if pgid in pids:  # only groups led by a process of this tree
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for pid in _alive(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pids), f"processes of the killed search still alive: {_alive(pids)}"


def _children(client: MlflowClient) -> list[Any]:
    experiment = client.get_experiment_by_name("resume")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id])
    return [r for r in runs if PARENT_TAG in r.data.tags]


def _wait_for_kill_point(
    client: MlflowClient, proc: subprocess.Popen[bytes], log: Path
) -> set[str]:
    """The run ids frozen between tasks, once one trial has finished and another is between
    tasks 1 and T (MLflow's view), both seen so far >= `settle` seconds: MLflow hears of a
    result or an end a moment before Tune's experiment snapshot records it, and the test is
    about the snapshot's view.

    On a fast machine a task lasts less than `settle`, so a trial seen between tasks 1 and T for
    `pause` seconds is frozen there: SIGSTOP to its worker, named by the run's
    ``PID_TAG``. Not at once: Tune registers a reported checkpoint only after a ``save``
    call on the trial's worker, which a stopped worker would never answer. The SIGKILL that
    follows reaches a stopped process as well."""
    settle, pause, deadline = 1.0, 0.5, time.monotonic() + 240
    seen: dict[tuple[str, str, int], float] = {}
    between_since: dict[str, float] = {}
    frozen: dict[str, int] = {}  # run id -> pid stopped
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"search ended before the kill:\n{log.read_text()[-3000:]}"
        try:
            runs = _children(client)
        except Exception:  # noqa: BLE001 - the database may not exist yet
            runs = []
        now = time.monotonic()
        finished, midway = False, False
        for r in runs:
            run_id, task = r.info.run_id, int(r.data.metrics.get("task_index", 0))
            since = seen.setdefault((run_id, r.info.status, task), now)
            settled = now - since >= settle
            between = r.info.status == "RUNNING" and 1 <= task < T
            pid = r.data.tags.get(PID_TAG)
            if not between:
                between_since.pop(run_id, None)
                if run_id in frozen:  # it got to the end before the stop
                    os.kill(frozen.pop(run_id), signal.SIGCONT)
            elif not frozen and pid and now - between_since.setdefault(run_id, now) >= pause:
                os.kill(int(pid), signal.SIGSTOP)
                frozen[run_id] = int(pid)
            finished |= r.info.status == "FINISHED" and settled
            midway |= between and settled and run_id in frozen
        if finished and midway:
            return set(frozen)
        time.sleep(0.05)
    raise AssertionError(f"no kill point within 240 s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_sigkilled_search_resumes_without_rerunning_or_duplicating(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    shared_ray: None,  # for the resumed search; the killed driver runs its own cluster
) -> None:
    write_experiment(tmp_path / "exp.yaml", EXPERIMENT)
    db = tmp_path / "runs" / "mlflow.db"
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath}
    log = tmp_path / "search.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "adaptune.search.cli", "search", "exp.yaml"],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        client = MlflowClient(f"sqlite:///{db}")
        frozen = _wait_for_kill_point(client, proc, log)
        _freeze_workers(proc)
    finally:
        _kill_tree(proc)
    at_kill = {r.data.tags[TRIAL_TAG]: r for r in _children(client)}
    finished_at_kill = {t for t, r in at_kill.items() if r.info.status == "FINISHED"}
    midway_at_kill = {
        t: int(r.data.metrics["task_index"]) for t, r in at_kill.items()
        if r.info.status == "RUNNING" and "task_index" in r.data.metrics
    }
    assert finished_at_kill and midway_at_kill

    # a plain start refuses, naming --resume; --resume completes the search
    monkeypatch.chdir(tmp_path)
    assert main(["search", "exp.yaml"]) == 2
    assert "interrupted search named 'resume'; continue it with --resume" in capsys.readouterr().err
    assert main(["search", "exp.yaml", "--resume"]) == 0, log.read_text()[-3000:]
    out = capsys.readouterr().out
    assert "resuming (" in out and "champion: models:/adaptune-resume@champion" in out

    # Optuna: exactly num_samples trials, each once, all finished
    study = optuna.load_study(
        study_name="resume", storage=f"sqlite:///{tmp_path / 'runs/ray/resume/optuna.db'}"
    )
    assert len(study.trials) == EXPERIMENT["search"]["num_samples"]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    ray_ids = [t.user_attrs["ray_trial_id"] for t in study.trials]
    assert len(set(ray_ids)) == len(ray_ids)
    assert all(sorted(t.intermediate_values) == [1, 2, 3] for t in study.trials)

    # MLflow: one parent (the same one), exactly one child per trial, all FINISHED (FIFO)
    experiment = client.get_experiment_by_name("resume")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["adaptune.resumes"] == "1"
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    assert {r.data.tags[PARENT_TAG] for r in children} == {parents[0].info.run_id}
    by_trial = {r.data.tags[TRIAL_TAG]: r for r in children}
    assert len(by_trial) == len(children) == len(study.trials)
    assert set(by_trial) == set(ray_ids)
    assert all(r.info.status == "FINISHED" for r in children)

    # finished trials were not run again; unfinished ones resumed from their last checkpoint
    starts = {t: int(r.data.tags[STARTS_TAG]) for t, r in by_trial.items()}
    assert all(starts[t] == 1 for t in finished_at_kill), starts
    checked = []
    for trial_id, task in midway_at_kill.items():
        if trial_id not in by_trial:  # lost with the driver and adopted under a new id
            continue
        assert starts[trial_id] == 2, starts
        run = by_trial[trial_id]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "task_index")]
        assert sorted(set(steps)) == [1, 2, 3]
        if run.info.run_id not in frozen:
            # a trial whose last report came after Tune's last snapshot restarts from the
            # checkpoint that snapshot names, maybe none: MLflow may hold its task 1 twice
            continue
        assert steps.count(1) == 1, (trial_id, task, steps)  # task 1 was not trained again
        checked.append(trial_id)
    # the kill point froze a trial between tasks long enough for Tune's snapshot to hold it, so
    # that one resumed under its own id from its checkpoint
    assert checked, (midway_at_kill, frozen, sorted(by_trial))

    # and the search directory now holds a finished search
    info = json.loads((tmp_path / "runs/ray/resume" / SEARCH_FILE).read_text())
    assert info["state"] == "finished" and info["parent_run_id"] == parents[0].info.run_id
    assert main(["search", "exp.yaml"]) == 2
    assert "already holds a finished search" in capsys.readouterr().err
