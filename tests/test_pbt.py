"""Population Based Training along the task stream (``search.algorithm: pbt``/``pb2``): the
refusals, the scheduler Ray gets, and one real PBT search (tiny GPT, 3 tasks, a population of 4
where the bottom half copies the top half after tasks 1 and 2) read back from its checkpoints,
MLflow and ``adaptune export`` -> ``adaptune train``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from adaptune.search.checks import check_search
from adaptune.search.cli import main
from adaptune.search.experiment import load_experiment, parse_experiment
from adaptune.search.pbt import (
    KeepInSpace,
    build_population_scheduler,
    checkpoints_to_keep,
    hp_metrics,
    lineage_tags,
)
from adaptune.search.tags import DONORS_TAG, LINEAGE_TAG, PARENT_TAG, TRIAL_TAG
from adaptune.trainables.errors import ConfigError
from conftest import tiny_experiment, write_experiment
from mlflow.tracking import MlflowClient

PBT = {
    "algorithm": "pbt",
    "num_samples": 4,
    "max_concurrent": 4,
    "seed": 0,
    "pbt": {"perturbation_interval": 1, "quantile_fraction": 0.5},
}
# lr over three decades: the ranking after each task is clear, so the bottom half copies
EXPERIMENT = tiny_experiment(
    "pbt",
    space={"lr": {"loguniform": [1.0e-5, 2.0e-2]}, "buffer_size": {"choice": [0, 16]}},
    search=PBT,
    resources={"cpus_per_trial": 0.5},  # the population runs at once on two cores
)


def _exp(**changes: Any) -> Any:
    """The tiny PBT search with ``changes`` (``search`` and ``search.pbt`` merged key by key)."""
    search = {**PBT, **changes.pop("search", {})}
    search["pbt"] = {**PBT["pbt"], **search["pbt"]}
    return parse_experiment(tiny_experiment("bad", search=search, **changes))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"space": None}, "space: pbt changes hyperparameters between tasks"),
        ({"space": {"lr": 1e-3}}, "(nothing searched)"),
        ({"space": {"lr": None, "buffer_size": {"int": [0, 16]}}}, "(searched: buffer_size)"),
        ({"search": {"pbt": {"mutate": ["weight_decay"]}}}, "search.pbt.mutate: must name"),
        ({"search": {"pbt": {"mutate": ["buffer_size"]}},
          "space": {"buffer_size": {"int": [0, 16]}}}, "valid values: lr (got ['buffer_size'])"),
        ({"run": {"stream": {"mode": "online", "chunk_tokens": 256}}},
         "run.stream.mode: pbt needs mode 'tasks'"),
        ({"search": {"metric": ["stream_loss", "forgetting"]}},
         "search.metric: pbt ranks its population by one metric"),
        ({"search": {"algorithm": "pb2"}, "space": {"lr": {"loguniform": None,
                                                           "choice": [1e-3, 2e-3]}}},
         "space.lr: pb2 models numeric ranges only"),
        ({"search": {"num_samples": 1}}, "search.num_samples: pbt needs a population of at"),
        ({"search": {"pbt": {"perturbation_interval": 3}}},
         "search.pbt.perturbation_interval: must be < the number of tasks (3)"),
        ({"run": {"schedule": {"lr": [1e-3, 1e-3, 1e-3]}}}, "run.schedule: lr is mutated by pbt"),
    ],
)
def test_refusals_are_one_line(changes: dict[str, Any], message: str, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        check_search(_exp(**changes))
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    if "nothing searched" in message or "searched:" in message:
        assert "valid names: " in str(err.value) and "lr" in str(err.value)


def test_cli_refuses_before_ray_and_writes_nothing(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    write_experiment(tmp_path / "bad.yaml", tiny_experiment("bad", search=PBT, space=None))
    assert main(["search", "bad.yaml"]) == 2
    assert "space: pbt changes hyperparameters" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_scheduler_mutates_only_what_may_change(tmp_path, monkeypatch, capsys) -> None:
    from ray.tune.schedulers.pb2 import PB2
    from ray.tune.search.sample import Float

    exp = parse_experiment(EXPERIMENT)
    pbt = build_population_scheduler(exp)
    # nested like the trial config; buffer_size (a buffer's capacity) is never mutated
    assert set(pbt._hyperparam_mutations) == {"optim"}
    assert isinstance(pbt._hyperparam_mutations["optim"]["lr"], Float)
    assert pbt._synch and pbt._time_attr == "task_index" and pbt._quantile_fraction == 0.5
    assert checkpoints_to_keep(exp) == 3
    # a choice mutates as a list (Ray moves to a neighbour), never multiplied like a number
    choice = _exp(space={"lr": None, "temperature": {"choice": [1.0, 2.0, 4.0]}})
    assert build_population_scheduler(choice)._hyperparam_mutations == {
        "components": {"distill": {"temperature": [1.0, 2.0, 4.0]}}
    }
    pb2 = build_population_scheduler(_exp(search={"algorithm": "pb2"}))
    assert isinstance(pb2, PB2) and pb2._hyperparam_bounds == {"optim": {"lr": [1e-4, 1e-2]}}
    # Ray's x1.2 would leave the range; the explore function puts values back inside
    keep = KeepInSpace({"lr": ("loguniform", 1e-4, 1e-2), "buffer_size": ("int", 0, 10)})
    config = {"optim": {"lr": 1.2e-2}, "components": {"replay": {"buffer_size": 12.4}}}
    assert keep(config) == {"optim": {"lr": 1e-2}, "components": {"replay": {"buffer_size": 10}}}

    monkeypatch.chdir(tmp_path)
    write_experiment(tmp_path / "pbt.yaml", {**EXPERIMENT, "search": {**PBT, "scheduler": "asha"}})
    assert main(["search", "pbt.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pbt, which replaces search.scheduler (asha): after task 1, 2" in out
    assert "mutated:  lr" in out and "fixed:    buffer_size" in out and "optuna:     none" in out


def test_draws_come_from_the_search_seed_not_the_global_stream() -> None:
    import random

    from ray.tune.schedulers.pbt import _explore

    def draws(search: dict[str, Any]) -> list[Any]:
        pbt = build_population_scheduler(parse_experiment({**EXPERIMENT, "search": search}))
        with pbt._own_stream():  # where Ray's scheduler draws the donor and the new values
            new = [_explore({"optim": {"lr": 1e-3}}, pbt._hyperparam_mutations, 0.5, (1.2, 0.8),
                            None)[0]["optim"]["lr"] for _ in range(8)]
            return [*new, random.random()]

    random.seed(123)
    before = random.getstate()
    first = draws(PBT)
    assert random.getstate() == before  # the driver's global stream is left as it was
    assert draws(PBT) == first
    assert draws({**PBT, "seed": 1}) != first


def test_hp_metrics_and_lineage_tags() -> None:
    exp = parse_experiment(EXPERIMENT)
    config = {"optim": {"lr": 3e-3}, "components": {"replay": {"buffer_size": 16}}}
    assert hp_metrics(exp, {}, config) == {"hp/lr": 3e-3, "hp/buffer_size": 16.0}
    assert hp_metrics(exp, {"hp/lr": 1e-3}, config) == {"hp/buffer_size": 16.0}  # a schedule's
    assert lineage_tags({"lineage": "b7,b7,a1"}, "a1") == {
        LINEAGE_TAG: "b7,b7,a1", DONORS_TAG: "1:b7,2:b7"
    }
    assert lineage_tags({"lineage": "a1,a1"}, "a1") == {LINEAGE_TAG: "a1,a1"}


# -- one real search ---------------------------------------------------------------------------
def _checkpoints(search_dir: Path) -> dict[str, list[Path]]:
    """trial id -> its checkpoint folders."""
    return {
        trial.name.removeprefix("trial-"): sorted(trial.glob("checkpoint_*"))
        for trial in search_dir.glob("trial-*")
    }


def _progress(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "progress.json").read_text())


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The search above, run once through the CLI; returns its folder."""
    import os

    root = tmp_path_factory.mktemp("pbt")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        write_experiment(root / "pbt.yaml", EXPERIMENT)
        assert main(["search", "pbt.yaml"]) == 0
    finally:
        os.chdir(cwd)
    return root


@pytest.mark.slow
def test_an_exploit_copies_the_donor_and_applies_the_new_lr(searched: Path) -> None:
    import torch

    search_dir = searched / "runs" / "ray" / "pbt"
    assert (search_dir / "pbt_global.txt").is_file()  # Ray's exploit log
    ckpts = _checkpoints(search_dir)
    assert len(ckpts) == 4 and all(len(c) == 3 for c in ckpts.values())  # num_to_keep 3
    copies = mutated = 0
    for trial, folders in ckpts.items():
        for ckpt in folders:
            progress = _progress(ckpt)
            t, history = progress["tasks_done"], progress["history"]
            assert [h["task"] for h in history] == list(range(1, t + 1))
            assert history[-1]["trial"] == trial
            # the optimizer trains with the lr of the config in force, not the restored one
            groups = torch.load(ckpt / "optimizer.pt", weights_only=True)["param_groups"]
            assert groups[0]["initial_lr"] == pytest.approx(history[-1]["hp"]["lr"], rel=1e-12)
            donor = history[-2]["trial"] if t >= 2 else trial
            if donor == trial:
                continue
            copies += 1
            # restored from the donor's checkpoint after task t-1: the same rows and history
            theirs = next(_progress(c) for c in ckpts[donor] if _progress(c)["tasks_done"] == t - 1)
            assert progress["loss_matrix"][:t] == theirs["loss_matrix"]
            assert history[:-1] == theirs["history"]
            mutated += history[-1]["hp"]["lr"] != theirs["history"][-1]["hp"]["lr"]
    assert copies >= 2  # the bottom half after task 1 (and after task 2)
    assert mutated  # x0.8, x1.2 or drawn afresh (the same only when clipped at a bound)


@pytest.mark.slow
def test_mlflow_has_per_task_values_and_lineage(searched: Path) -> None:
    client = MlflowClient(f"sqlite:///{searched / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pbt").experiment_id])
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    parent = next(r for r in runs if PARENT_TAG not in r.data.tags)
    assert len(children) == 4 and parent.info.status == "FINISHED"
    assert "pbt_global.txt" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    final = {
        t: _progress(c[-1]) for t, c in _checkpoints(searched / "runs/ray/pbt").items()
    }
    donated = 0
    for run in children:
        trial = run.data.tags[TRIAL_TAG]
        series = client.get_metric_history(run.info.run_id, "hp/lr")
        assert sorted(m.step for m in series) == [1, 2, 3]
        by_step = {m.step: m.value for m in series}
        history = final[trial]["history"]
        assert run.data.tags[LINEAGE_TAG] == ",".join(h["trial"] for h in history)
        # each task this trial trained itself ran with the value its hp/lr shows
        for k, h in enumerate(history, start=1):
            if h["trial"] == trial:
                assert by_step[k] == pytest.approx(h["hp"]["lr"], rel=1e-12)
        donated += DONORS_TAG in run.data.tags
        lineage = json.loads(
            Path(client.download_artifacts(run.info.run_id, "lineage.json")).read_text()
        )
        assert lineage["history"] == history
    assert donated >= 2


@pytest.mark.slow
def test_export_writes_the_lineage_and_train_reproduces_it(
    searched: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import torch

    monkeypatch.chdir(searched)
    client = MlflowClient(f"sqlite:///{searched / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pbt").experiment_id])
    # the champion: its schedule is its lineage's values
    assert main(["export", "pbt", "-o", "best.yaml"]) == 0, capsys.readouterr().err
    parent = next(r for r in runs if PARENT_TAG not in r.data.tags)
    champion = parent.data.tags["adaptune.champion_trial_id"]
    final = {t: _progress(c[-1]) for t, c in _checkpoints(searched / "runs/ray/pbt").items()}
    best = load_experiment("best.yaml")
    assert best.run.schedule["lr"] == [h["hp"]["lr"] for h in final[champion]["history"]]
    assert "buffer_size" not in best.run.schedule  # not mutable: a fixed value
    assert best.run.components.replay.buffer_size == final[champion]["config"]["components"][
        "replay"]["buffer_size"]

    # a trial that copied a donor, replayed by `adaptune train` from its exported schedule
    copied = next(
        r for r in runs if PARENT_TAG in r.data.tags and DONORS_TAG in r.data.tags
        and len({h["hp"]["lr"] for h in final[r.data.tags[TRIAL_TAG]]["history"]}) > 1
    )
    assert main(["export", "--run-id", copied.info.run_id, "-o", "copy.yaml"]) == 0
    text = (searched / "copy.yaml").read_text()
    assert "# run.schedule: the value of each task" in text
    history = final[copied.data.tags[TRIAL_TAG]]["history"]
    assert yaml.safe_load(text)["run"]["schedule"]["lr"] == [h["hp"]["lr"] for h in history]
    threads = torch.get_num_threads()
    try:
        assert main(["train", "copy.yaml", "--out", "again"]) == 0
    finally:
        torch.set_num_threads(threads)
    last = json.loads((searched / "again" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["task_index"] == 3
    assert abs(last["stream_loss"] - copied.data.metrics["stream_loss"]) < 1e-4
