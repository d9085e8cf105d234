"""``adaptune export``: a store made by the real MLflow callback fed fake trials, then one real
search -> export -> train round trip that must reproduce the winner's stream_loss."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from adaptune.search import export
from adaptune.search.cli import main
from adaptune.search.experiment import experiment_yaml, load_experiment, parse_experiment
from adaptune.search.tags import CHAMPION_TAG, PARENT_TAG, TRIAL_TAG
from adaptune.search.tracking import MlflowTrackingCallback
from adaptune.spaces.tune import build_param_space
from conftest import tiny_experiment, write_experiment
from mlflow.tracking import MlflowClient

TASKS = ["docs", "code"]


@dataclass
class FakeTrial:
    """The attributes the callback reads from a ``ray.tune.experiment.Trial``."""

    trial_id: str
    config: dict[str, Any]
    last_result: dict[str, Any] = field(default_factory=dict)

    def get_pickled_error(self) -> Exception | None:
        return RuntimeError("boom")


def _experiment(db: Path, name: str, **search: Any) -> Any:
    return parse_experiment(
        tiny_experiment(
            name,
            run={"stream": {"tasks": [{"name": n, "builtin": "python_docs"} for n in TASKS]}},
            space={
                "lr": {"loguniform": [1e-6, 1e-2]},
                "buffer_size": {"int": [0, 64]},
                "ewc_mode": {"choice": ["separate", "online"]},
                "temperature": 3.0,  # fixed: written as is
            },
            search=search,
            tracking={"tracking_uri": f"sqlite:///{db}"},
        )
    )


def _config(exp: Any, lr: float, buffer_size: int, ewc_mode: str = "online") -> dict[str, Any]:
    config = build_param_space(exp)
    config["optim"]["lr"] = lr
    config["components"]["replay"]["buffer_size"] = buffer_size
    config["components"]["ewc"]["ewc_mode"] = ewc_mode
    return config


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MLflow database for the module (creating its tables takes seconds)."""
    return tmp_path_factory.mktemp("mlflow") / "mlruns" / "mlflow.db"


def _search(
    exp: Any, trials: list[tuple[str, dict[str, Any], list[float], str]], **extra: float
) -> MlflowTrackingCallback:
    """Drive the callback like Tune: trials = (id, config, stream_loss per task, outcome)."""
    callback = MlflowTrackingCallback(exp, experiment_yaml=experiment_yaml(exp))
    callback.setup()
    for trial_id, config, losses, outcome in trials:
        trial = FakeTrial(trial_id, config)
        callback.on_trial_start(0, [trial], trial)
        for k, loss in enumerate(losses, start=1):
            trial.last_result = {
                "task_index": k,
                "training_iteration": k,
                "stream_loss": loss,
                "bwt": -loss,
                "loss_matrix": [[5.0, 5.0]] + [[loss, loss]] * k,
                **extra,
            }
            callback.on_trial_result(0, [trial], trial, trial.last_result)
        if outcome == "error":
            callback.on_trial_error(0, [trial], trial)
        else:
            callback.on_trial_complete(0, [trial], trial)  # KILLED when before the last task
    callback.end_parent("FINISHED")
    return callback


def _standard(exp: Any, **extra: float) -> MlflowTrackingCallback:
    return _search(
        exp,
        [
            ("t_00000", _config(exp, 1e-05, 16, "separate"), [3.0, 2.5], "done"),
            ("t_00001", _config(exp, 0.0012345678901234567, 7), [2.9, 2.2], "done"),
            ("t_00002", _config(exp, 3e-4, 0), [1.0], "done"),  # stopped early: KILLED
            ("t_00003", _config(exp, 5e-3, 64), [0.5], "error"),
        ],
        **extra,
    )


def _uri(db: Path) -> str:
    return f"sqlite:///{db}"


def test_exports_the_best_finished_trial_with_typed_values(db: Path, tmp_path: Path, capsys):
    exp = _experiment(db, "best_finished")
    callback = _standard(exp)
    out = tmp_path / "sub" / "best.yaml"
    code = main(["export", exp.name, "-o", str(out), "--tracking-uri", _uri(db)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"wrote {out}: trial t_00001 (best finished trial)" in printed
    assert "lr: 0.0012345678901234567" in printed and "buffer_size: 7" in printed

    text = out.read_text()
    assert text.startswith("# adaptune export: trial t_00001")
    assert callback.parent_run_id in text and "stream_loss (min) = 2.2 after 2 task(s)" in text
    data = yaml.safe_load(text)
    assert data["space"] == {} and data["name"] == "best_finished-best"
    run = data["run"]
    # MLflow holds strings; the schema gives them back their types
    assert run["optim"]["lr"] == 0.0012345678901234567 and type(run["optim"]["lr"]) is float
    assert run["components"]["replay"]["buffer_size"] == 7
    assert type(run["components"]["replay"]["buffer_size"]) is int
    assert run["components"]["ewc"]["ewc_mode"] == "online"
    assert run["components"]["distill"]["temperature"] == 3.0
    # no `threads` metric (an older search): the trial's CPUs; device left as it was
    assert run["hardware"] == {"device": "auto", "bf16": False, "threads": 1}
    # everything else is the search's experiment
    assert data["search"] == exp.search.model_dump(mode="json", exclude_none=True)
    assert data["tracking"]["tracking_uri"] == _uri(db)
    assert data["run"]["stream"] == exp.run.stream.model_dump(mode="json", exclude_none=True)
    loaded = load_experiment(out)
    assert loaded.run.optim.lr == 0.0012345678901234567 and not loaded.space
    assert [p.name for p in out.parent.iterdir()] == ["best.yaml"]  # no temporary file left


def test_prefers_the_champion_and_pins_threads_and_cpu(db: Path, tmp_path: Path) -> None:
    exp = _experiment(db, "champion")
    callback = _standard(exp, threads=2, cuda=0)
    callback.client.set_tag(callback.parent_run_id, CHAMPION_TAG, "t_00000")
    path, winner = export.export_best(
        exp.name, out=tmp_path / "best.yaml", tracking_uri=_uri(db), name="mine"
    )
    assert (winner.trial_id, winner.how, winner.value) == ("t_00000", "champion", 2.5)
    assert winner.params == {
        "lr": 1e-05, "buffer_size": 16, "ewc_mode": "separate", "temperature": 3.0,
    }
    best = load_experiment(path)
    assert best.name == "mine"
    assert best.run.optim.lr == 1e-05  # logged as the string "1e-05"
    assert best.run.hardware.threads == 2 and best.run.hardware.device == "cpu"


def test_maximised_objective(db: Path, tmp_path: Path) -> None:
    exp = _experiment(db, "maximise", metric="bwt", mode="max")
    _standard(exp)
    _, winner = export.export_best(exp.name, out=tmp_path / "b.yaml", tracking_uri=_uri(db))
    assert (winner.trial_id, winner.metric, winner.value) == ("t_00001", "bwt", -2.2)


def test_latest_finished_search_and_run_ids(db: Path, tmp_path: Path) -> None:
    exp = _experiment(db, "by_run_id")
    first = _standard(exp)
    second = _search(exp, [("t_00000", _config(exp, 2e-3, 5), [2.0, 1.5], "done")])
    _, winner = export.export_best(exp.name, out=tmp_path / "a.yaml", tracking_uri=_uri(db))
    assert winner.parent_run_id == second.parent_run_id and winner.params["lr"] == 2e-3

    # a parent run id: that search's winner
    _, winner = export.export_best(
        run_id=first.parent_run_id, out=tmp_path / "b.yaml", tracking_uri=_uri(db)
    )
    assert winner.trial_id == "t_00001"

    # a child run id: that trial, even when it is not the best
    child = first.child_run_id(FakeTrial("t_00000", {}))
    path, winner = export.export_best(
        run_id=child, out=tmp_path / "c.yaml", tracking_uri=_uri(db)
    )
    assert (winner.trial_id, winner.how, winner.run_id) == ("t_00000", "requested trial", child)
    assert load_experiment(path).run.components.replay.buffer_size == 16


def test_cli_accepts_the_experiment_file(db: Path, tmp_path: Path, monkeypatch) -> None:
    exp = _experiment(db, "from_yaml")
    _standard(exp)
    monkeypatch.chdir(tmp_path)
    Path("exp.yaml").write_text(experiment_yaml(exp))
    assert main(["export", "exp.yaml"]) == 0  # its store and MLflow experiment, best.yaml
    assert load_experiment("best.yaml").name == "from_yaml-best"


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and err.startswith("adaptune: error: ")


def test_refusals_are_one_line_and_write_nothing(db: Path, tmp_path: Path, capsys) -> None:
    exp = _experiment(db, "refusals")
    callback = _standard(exp)
    unfinished = _experiment(db, "no_finished_trial")
    _search(
        unfinished,
        [
            ("t_00000", _config(unfinished, 1e-3, 1), [2.0], "done"),  # KILLED
            ("t_00001", _config(unfinished, 1e-3, 1), [2.0], "error"),
        ],
    )
    uri = ["--tracking-uri", _uri(db)]
    out = tmp_path / "best.yaml"
    _refused(capsys, ["export", "nope", "-o", str(out), *uri], "no MLflow experiment named 'nope'")
    _refused(capsys, ["export", "--run-id", "0" * 32, "-o", str(out), *uri], "no MLflow run")
    _refused(
        capsys, ["export", unfinished.name, "-o", str(out), *uri], "has no FINISHED trial"
    )
    killed = callback.child_run_id(FakeTrial("t_00002", {}))
    _refused(
        capsys, ["export", "--run-id", killed, "-o", str(out), *uri],
        "trial t_00002 did not finish (status KILLED, 1 of 2 tasks)",
    )
    _refused(capsys, ["export", "-o", str(out), *uri], "exactly one")
    _refused(
        capsys,
        ["export", "x", "-o", str(out), "--tracking-uri", f"sqlite:///{tmp_path}/none.db"],
        "no MLflow store at",
    )
    assert list(tmp_path.iterdir()) == []
    out.write_text("keep me")
    _refused(capsys, ["export", exp.name, "-o", str(out), *uri], "pass --force")
    assert out.read_text() == "keep me"
    assert main(["export", exp.name, "-o", str(out), "--force", *uri]) == 0
    assert load_experiment(out).name == "refusals-best"


# -- a real search, exported and trained again --------------------------------------------------

TINY = tiny_experiment(
    "rt",
    run={
        "stream": {
            "max_train_tokens": 2048,
            "tasks": [
                {"name": "docs", "builtin": "python_docs"},
                {"name": "unicode", "builtin": "unicode_names"},
            ],
        },
        "optim": {"schedule": "cosine"},
        "components": {"ewc": {"ewc_lambda": 10.0, "fisher_samples": 8}},
    },
    space={"buffer_size": {"choice": [0, 16]}, "seed": {"int": [0, 1000]}},
    search={"num_samples": 3, "seed": 1},
)


@pytest.mark.slow
def test_exported_winner_reproduces_its_stream_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, shared_ray: None
) -> None:
    import torch

    monkeypatch.chdir(tmp_path)
    write_experiment(tmp_path / "rt.yaml", TINY)
    assert main(["search", "rt.yaml"]) == 0, capsys.readouterr().err
    assert main(["export", "rt", "-o", "best.yaml"]) == 0, capsys.readouterr().err
    assert "trial" in capsys.readouterr().out

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("rt").experiment_id])
    parent = next(r for r in runs if PARENT_TAG not in r.data.tags)
    champion = parent.data.tags[CHAMPION_TAG]
    child = next(r for r in runs if r.data.tags.get(TRIAL_TAG) == champion)
    best = load_experiment("best.yaml")
    assert not best.space and best.run.hardware.threads == 1
    assert best.run.seed == int(child.data.params["seed"])

    threads = torch.get_num_threads()
    try:
        assert main(["train", "best.yaml", "--out", "again"]) == 0
    finally:
        torch.set_num_threads(threads)
    last = json.loads((tmp_path / "again" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["task_index"] == 2
    assert abs(last["stream_loss"] - child.data.metrics["stream_loss"]) < 1e-3
    logged = client.download_artifacts(child.info.run_id, "loss_matrix.json", str(tmp_path))
    trial_matrix = json.loads(Path(logged).read_text())["loss_matrix"]
    again = json.loads((tmp_path / "again" / "loss_matrix.json").read_text())["loss_matrix"]
    assert len(again) == len(trial_matrix) == 3  # before, after each task
    for row, trial_row in zip(again, trial_matrix, strict=True):
        assert row == pytest.approx(trial_row, abs=1e-3)
