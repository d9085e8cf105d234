"""Per-task hyperparameter values: a resume (a PBT exploit) trains with the current config's
values, not the restored optimizer's; ``run.schedule`` equals the same run stopped and resumed
with each task's values; the history and lineage; refusals."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from adaptune.search.api import train
from adaptune.search.cli import main
from adaptune.search.experiment import parse_experiment
from adaptune.trainables import ConfigError, parse_run_config, prepare, run_stream
from adaptune.trainables.checkpoint import load_optimizer_state, load_progress
from adaptune.trainables.schedule import MUTABLE, config_for_task, schedule_values
from conftest import tiny_experiment, write_experiment
from safetensors.torch import load_file

# tiny_experiment: 3 tasks of 32 blocks of 32 tokens; batch 8, so 4 steps a task (epochs 1)


def tiny_run(**run: Any) -> dict[str, Any]:
    """Every component with state on (replay buffer, EWC Fisher) plus distillation."""
    return tiny_experiment(run={
        "components": {
            "replay": {"buffer_size": 16, "replay_fraction": 0.25},
            "ewc": {"ewc_lambda": 10.0, "fisher_samples": 4},
            "distill": {"distill_alpha": 0.5},
        },
        "hardware": {"threads": 1},
        **run,
    })["run"]


def with_values(data: dict[str, Any], **values: Any) -> dict[str, Any]:
    """``data`` with hyperparameters set by name (lr, ewc_lambda, replay_fraction, ...)."""
    from adaptune.trainables.config import HYPERPARAMETERS

    data = copy.deepcopy(data)
    for name, value in values.items():
        *parents, leaf = HYPERPARAMETERS[name]
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


def run(data: dict[str, Any], ckpts: Path | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    """Run (or resume) the stream; keep each task's report and its checkpoint in ckpts/task-<k>."""
    reports: list[dict[str, Any]] = []

    def report(metrics: dict[str, Any], path: Path) -> None:
        reports.append(metrics)
        if ckpts is not None:
            shutil.copytree(path, ckpts / f"task-{metrics['task_index']}", dirs_exist_ok=True)

    run_stream(prepare(parse_run_config(data)), report=report, **kwargs)
    return reports


def initial_lr(ckpt: Path) -> float:
    return float(load_optimizer_state(ckpt)["param_groups"][0]["initial_lr"])


def test_a_resume_trains_with_the_current_values_not_the_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import adaptune.trainables.run as run_module

    old = with_values(tiny_run(), lr=1e-3, weight_decay=0.01)
    run(old, tmp_path, stop_after=1, trial_id="a1")
    saved = tmp_path / "task-1"
    assert initial_lr(saved) == pytest.approx(1e-3)

    seen: dict[str, Any] = {}
    real = run_module.train_blocks

    def spy(cfg, model, params, opt, comps, ctx, autocast, where):  # noqa: ANN001, ANN202
        if not seen:  # the state the resumed run starts training task 2 with
            seen["groups"] = [dict(g, params=None) for g in opt.param_groups]
            seen["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            seen["comps"] = comps
            seen["buffer"] = len(comps["replay"].buffer)
            seen["fisher"] = len(comps["ewc"].precision)
        return real(cfg, model, params, opt, comps, ctx, autocast, where)

    monkeypatch.setattr(run_module, "train_blocks", spy)
    new = with_values(old, lr=5e-3, weight_decay=0.1, ewc_lambda=50.0, replay_fraction=0.5)
    reports = run(new, tmp_path, resume_from=saved, stop_after=2, trial_id="b7")

    for group in seen["groups"]:  # the perturbed values, not the checkpoint's 1e-3 / 0.01
        assert group["lr"] == group["initial_lr"] == pytest.approx(5e-3)
        assert group["weight_decay"] == pytest.approx(0.1)
    assert seen["comps"]["ewc"].ewc_lambda == 50.0
    assert seen["comps"]["replay"].replay_fraction == 0.5
    assert seen["buffer"] == 16 and seen["fisher"] > 0  # their state came along
    stored = load_file(saved / "model" / "model.safetensors")
    assert stored.keys() <= seen["weights"].keys()
    for key, value in stored.items():
        assert torch.equal(seen["weights"][key], value), key

    after = tmp_path / "task-2"
    state = load_optimizer_state(after)
    assert initial_lr(after) == pytest.approx(5e-3)
    assert state["param_groups"][0]["weight_decay"] == pytest.approx(0.1)
    progress = load_progress(after)
    assert progress.config["optim"]["lr"] == pytest.approx(5e-3)
    assert [(h["task"], h["trial"], h["hp"]["lr"]) for h in progress.history] == [
        (1, "a1", pytest.approx(1e-3)), (2, "b7", pytest.approx(5e-3))
    ]
    assert reports[0]["lineage"] == "a1,b7"
    assert not any(k.startswith("hp/") for k in reports[0])  # no schedule: nothing scheduled


SCHEDULE = {
    "lr": [3e-3, 1e-3, 5e-4],
    "weight_decay": [0.01, 0.1, 0.0],
    "ewc_lambda": [0.0, 100.0, 20.0],  # off for task 1: EWC starts afresh at task 2
    "replay_fraction": [0.25, 0.5, 0.125],
    "epochs": [1.0, 2.0, 1.0],
}


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    ckpts = tmp_path_factory.mktemp("scheduled")
    return run(tiny_run(schedule=SCHEDULE), ckpts, trial_id="s1"), ckpts


def test_a_schedule_equals_stopping_and_resuming_with_each_tasks_values(
    scheduled: tuple[list[dict[str, Any]], Path], tmp_path: Path
) -> None:
    reports, ckpts = scheduled
    base = tiny_run()
    resume_from = None
    for k in (1, 2, 3):  # what a PBT lineage does: each task from the last checkpoint
        values = {name: v[k - 1] for name, v in SCHEDULE.items()}
        run(with_values(base, **values), tmp_path, resume_from=resume_from, stop_after=k)
        resume_from = tmp_path / f"task-{k}"
    stepwise = [x for row in load_progress(tmp_path / "task-3").loss_matrix for x in row]
    scheduled_matrix = [x for row in reports[-1]["loss_matrix"] for x in row]
    assert scheduled_matrix == pytest.approx(stepwise, abs=1e-5)

    for k in (1, 2, 3):  # every task trained at its own lr, steps and weight decay
        ckpt = ckpts / f"task-{k}"
        assert initial_lr(ckpt) == pytest.approx(SCHEDULE["lr"][k - 1])
        wd = load_optimizer_state(ckpt)["param_groups"][0]["weight_decay"]
        assert wd == pytest.approx(SCHEDULE["weight_decay"][k - 1])
        assert reports[k - 1]["hp/lr"] == pytest.approx(SCHEDULE["lr"][k - 1])
        assert reports[k - 1]["hp/ewc_lambda"] == SCHEDULE["ewc_lambda"][k - 1]
    # 8-row batches: task 2 draws 4 current rows (replay_fraction 0.5) over 2 epochs, task 3 7
    assert [r["steps"] for r in reports] == [4, 16, 5]


def test_a_schedule_records_its_history_and_lineage(
    scheduled: tuple[list[dict[str, Any]], Path],
) -> None:
    reports, ckpts = scheduled
    assert [r["lineage"] for r in reports] == ["s1", "s1,s1", "s1,s1,s1"]
    progress = load_progress(ckpts / "task-3")
    assert [h["task"] for h in progress.history] == [1, 2, 3]
    assert [h["hp"]["lr"] for h in progress.history] == pytest.approx(SCHEDULE["lr"])
    assert set(progress.history[0]["hp"]) == MUTABLE
    assert progress.config["optim"]["lr"] == pytest.approx(5e-4)  # the config in force
    assert progress.config["schedule"]["lr"] == pytest.approx(SCHEDULE["lr"])
    cfg = parse_run_config(progress.config)
    assert schedule_values(config_for_task(cfg, 2))["epochs"] == 2.0


def test_a_checkpoint_without_history_loads(tmp_path: Path) -> None:
    (tmp_path / "progress.json").write_text(json.dumps({"tasks_done": 1, "config": {}}))
    assert load_progress(tmp_path).history == []


def test_config_for_task_applies_the_tasks_values_and_only_them() -> None:
    cfg = parse_run_config(tiny_run(schedule={"lr": ["1e-3", 5e-4, 2e-4]}))  # YAML's "1e-3"
    assert cfg.schedule == {"lr": [1e-3, 5e-4, 2e-4]}  # each in its field's type
    second = config_for_task(cfg, 2)
    assert second.optim.lr == 5e-4
    assert second.model_dump(exclude={"optim"}) == cfg.model_dump(exclude={"optim"})
    plain = parse_run_config(tiny_run())
    assert config_for_task(plain, 3) is plain
    with pytest.raises(ValueError, match="k=4"):
        config_for_task(cfg, 4)


@pytest.mark.parametrize(
    ("schedule", "run_changes", "expected"),
    [
        ({"lrr": [1e-3] * 3}, {}, "'lrr' is not a hyperparameter (did you mean 'lr'?); valid"),
        ({"buffer_size": [8] * 3}, {}, "'buffer_size' cannot change between tasks"),
        ({"lr": [1e-3, 1e-3]}, {}, "lr: must hold one value per task, 3 (docs, code, unicode)"),
        ({"lr": [1e-3, 2.0, 1e-3]}, {}, "lr[1] (task 2, 'code'): the value 2.0 is out of range:"
                                        " run.optim.lr: Input should be less than or equal to 1"),
        ({"replay_fraction": [0.25, 0.5, 1.5]}, {}, "replay_fraction[2] (task 3, 'unicode')"),
        ({"self_fraction": [0.0, 0.5, 0.0], "replay_fraction": [0.25, 0.5, 0.25]},
         {"components": {"self_replay": {"gen_max_tokens": 16}, "replay": {"buffer_size": 8}}},
         "task 2 ('code'): its values together break a rule"),
        ({"lr": [1e-3] * 3}, {"stream": {"mode": "online", "chunk_tokens": 256}},
         "per-task values need run.stream.mode `tasks`"),
    ],
)
def test_a_bad_schedule_is_one_line_naming_it(
    schedule: dict[str, Any], run_changes: dict[str, Any], expected: str
) -> None:
    data = tiny_experiment(run={**run_changes, "schedule": schedule})["run"]
    with pytest.raises(ConfigError) as err:
        parse_run_config(data)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("run.schedule: ") and expected in message, message


def test_every_bad_schedule_entry_gets_its_own_line() -> None:
    data = tiny_experiment(run={"schedule": {"lr": [1e-3, 2.0, 3.0], "epochs": [1, 0, 1]}})
    with pytest.raises(ConfigError) as err:
        parse_experiment(data, source="x.yaml")
    lines = str(err.value).splitlines()
    assert [ln.split(" (task")[0] for ln in lines] == [
        "x.yaml: run.schedule: lr[1]", "x.yaml: run.schedule: lr[2]",
        "x.yaml: run.schedule: epochs[1]",
    ], lines


def test_train_refuses_a_bad_schedule_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    write_experiment("x.yaml", tiny_experiment("x", run={"schedule": {"lr": [1e-3, 2.0, 1e-3]}}))
    assert main(["train", "x.yaml", "--no-tracking"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "x.yaml: run.schedule: lr[1] (task 2, 'code'): the value 2.0 is out of range" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.yaml"]  # nothing written


@pytest.mark.parametrize(
    ("search", "flagged"),
    [
        ({}, True),  # TPE samples lr, the schedule replaces it at every task
        ({"algorithm": "pbt", "num_samples": 2, "pbt": {"mutate": ["ewc_lambda"]}}, True),
        # PBT mutating lr: search.pbt's own line names run.schedule, once
        ({"algorithm": "pbt", "num_samples": 2}, False),
    ],
)
def test_a_searched_and_scheduled_hyperparameter_is_refused_once(
    search: dict[str, Any], flagged: bool
) -> None:
    from adaptune.search.checks import search_problems

    data = tiny_experiment(
        run={"schedule": {"lr": [1e-3, 5e-4, 2e-4]}},
        space={"ewc_lambda": {"uniform": [0.0, 100.0]}},
        search=search,
    )
    problems = search_problems(parse_experiment(data))
    assert len(problems) == 1, problems  # lr once; ewc_lambda is searched, not scheduled
    line = problems[0]
    assert line.startswith("space.lr: searched, but run.schedule.lr also sets it") == flagged
    assert "would vary nothing" in line if flagged else "mutated by pbt" in line


def test_train_replays_a_schedule(tmp_path: Path) -> None:
    data = tiny_experiment("sched", run={"schedule": {"lr": [3e-3, 1e-3, 5e-4]},
                                         "hardware": {"threads": 1}})
    result = train(write_experiment(tmp_path / "x.yaml", data), out=tmp_path / "out",
                   tracking=False, quiet=True)
    lrs = [initial_lr(result.out / "checkpoints" / f"task-{k}") for k in (1, 2, 3)]
    assert lrs == pytest.approx([3e-3, 1e-3, 5e-4])
    assert [m["hp/lr"] for m in result.task_metrics] == pytest.approx(lrs)
    assert "lineage" not in result.metrics  # no Ray trial: no lineage


def test_online_resume_trains_with_the_current_lr(tmp_path: Path) -> None:
    data = tiny_experiment(run={"stream": {"mode": "online", "chunk_tokens": 256},
                                "optim": {"lr": 1e-2}, "hardware": {"threads": 1}})["run"]
    run(data, tmp_path, stop_after=1, trial_id="a1")
    assert initial_lr(tmp_path / "task-1") == pytest.approx(1e-2)
    reports = run(with_values(data, lr=2e-3, weight_decay=0.2), tmp_path,
                  resume_from=tmp_path / "task-1", stop_after=2, trial_id="b7")
    state = load_optimizer_state(tmp_path / "task-2")
    assert state["param_groups"][0]["initial_lr"] == pytest.approx(2e-3)
    assert state["param_groups"][0]["weight_decay"] == pytest.approx(0.2)
    assert reports[0]["lineage"] == "a1,b7"
