"""Multi-objective search: the Pareto set, the selection rule, the searcher's states, one real
search through the command line, and the refusals of bad input."""

from __future__ import annotations

import math
import pickle
import random
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from adaptune.search.checks import search_problems
from adaptune.search.cli import main
from adaptune.search.experiment import parse_experiment
from adaptune.search.pareto import dominates, mark_pareto, pareto_front
from adaptune.search.searcher import build_searcher
from adaptune.search.select import (
    GRAMMAR,
    Condition,
    Rule,
    champion_row,
    choose,
    parse_rule,
    search_rule,
)
from adaptune.search.summary import TrialRow, format_table
from adaptune.search.tags import PARENT_TAG, PARETO_TAG, PARETO_TRIALS_TAG, SELECT_TAG, TRIAL_TAG
from conftest import tiny_experiment, write_experiment
from mlflow.tracking import MlflowClient
from ray import tune

METRICS = ["new_task_loss", "forgetting"]
RULE = "min new_task_loss where forgetting <= 0"


# -- the Pareto set -----------------------------------------------------------------------------
def test_pareto_front_min_max_ties_and_duplicates() -> None:
    pts = {"a": [1.0, 5.0], "b": [2.0, 2.0], "c": [3.0, 3.0], "d": [5.0, 1.0]}
    assert pareto_front(pts, ["min", "min"]) == ["a", "b", "d"]
    # maximising the second objective turns the order around: c beats b, a beats everything
    assert pareto_front(pts, ["min", "max"]) == ["a"]
    # equal on every objective: neither dominates the other, both stay (or both go)
    assert pareto_front({"x": [1, 1], "y": [1, 1], "z": [2, 0]}, ["min", "min"]) == ["x", "y", "z"]
    assert pareto_front({"x": [2, 2], "y": [2, 2], "z": [1, 1]}, ["min", "min"]) == ["z"]
    # equal on one objective, better on the other: dominated
    assert pareto_front({"x": [1, 2], "y": [1, 3]}, ["min", "min"]) == ["x"]
    assert pareto_front({"only": [3.0, 3.0]}, ["min", "min"]) == ["only"]
    assert pareto_front({}, ["min", "min"]) == []
    three = {"a": [1, 9, 9], "b": [9, 1, 9], "c": [9, 9, 1], "d": [9, 9, 9]}
    assert pareto_front(three, ["min"] * 3) == ["a", "b", "c"]
    assert not dominates([1, 1], [1, 1], ["min", "min"])


def _row(trial: str, status: str = "complete", **metrics: float) -> TrialRow:
    return TrialRow(trial_id=trial, value=metrics.get("new_task_loss"), tasks_done=2,
                    status=status, params={"lr": 1e-3}, metrics=dict(metrics))


def test_only_finished_trials_with_every_value_compete() -> None:
    rows = [
        _row("a", new_task_loss=2.0, forgetting=0.3),
        _row("b", new_task_loss=3.0, forgetting=0.1),
        _row("stopped", "stopped", new_task_loss=1.0, forgetting=0.0),  # no final values
        _row("nan", new_task_loss=1.0, forgetting=math.nan),
        _row("half", new_task_loss=0.5),
    ]
    mark_pareto(rows, METRICS, ["min", "min"])
    assert [r.trial_id for r in rows if r.pareto] == ["a", "b"]
    table = format_table(rows, METRICS).splitlines()
    assert table[0].split()[2:5] == ["new_task_loss", "forgetting", "pareto"]
    assert [line.split()[1] for line in table[1:] if " * " in line] == ["a", "b"]


# -- the rule -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("min stream_loss", Rule("min", "stream_loss")),
        ("MAX bwt", Rule("max", "bwt")),
        (RULE, Rule("min", "new_task_loss", (Condition("forgetting", "<=", 0.0),))),
        ("min loss/code where forgetting<0.1 and retain_forgetting >= -1e-3",
         Rule("min", "loss/code", (Condition("forgetting", "<", 0.1),
                                   Condition("retain_forgetting", ">=", -0.001)))),
        ("  min seen_loss   where bwt > .5 ",
         Rule("min", "seen_loss", (Condition("bwt", ">", 0.5),))),
    ],
)
def test_rule_parses_and_round_trips(text: str, rule: Rule) -> None:
    assert parse_rule(text) == rule
    assert parse_rule(str(rule)) == rule


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "expected 'min' or 'max', got nothing"),
        ("lowest stream_loss", "expected 'min' or 'max', got 'lowest'"),
        ("min", "expected a metric, got nothing"),
        ("min 3", "expected a metric, got '3'"),
        ("min x y", "expected 'where', got 'y'"),
        ("min x wher y < 1", "expected 'where', got 'wher'"),
        ("min x where y == 1", "unexpected '== 1'"),
        ("min x where y <= abc", "expected a number, got 'abc'"),
        ("min x where y <= 1 and", "expected a metric, got nothing"),
        ("min x where y <= 1 or z < 2", "expected 'and', got 'or'"),
        ("min x where y <= 0.1abc", "unexpected '0.1abc'"),
        ("min x where y <= __import__('os')", "unexpected"),
    ],
)
def test_bad_rules_say_what_was_expected_and_the_grammar(text: str, why: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_rule(text)
    message = str(err.value)
    assert why in message and GRAMMAR in message and "\n" not in message


def test_choose_filters_ranks_and_breaks_ties() -> None:
    trials = {
        "a": {"new_task_loss": 2.0, "forgetting": 0.3},
        "b": {"new_task_loss": 2.5, "forgetting": -0.1},
        "c": {"new_task_loss": 2.5, "forgetting": -0.2},  # ties b on the rule's metric
        "d": {"new_task_loss": 1.0},  # no forgetting: cannot meet a condition on it
        "e": {"new_task_loss": math.nan, "forgetting": -1.0},
    }
    order = [("new_task_loss", "min"), ("forgetting", "min")]
    assert choose(trials, parse_rule("min new_task_loss"), order) == "d"
    assert choose(trials, parse_rule(RULE), order) == "c"  # the tie goes to less forgetting
    assert choose(trials, parse_rule(RULE)) == "b"  # no order: the smaller trial id
    assert choose(trials, parse_rule("max forgetting where new_task_loss < 3"), order) == "a"
    assert choose(trials, parse_rule("min new_task_loss where forgetting < -5")) is None


def test_champion_row_default_and_no_match_note() -> None:
    rows = [_row("a", new_task_loss=2.0, forgetting=0.3), _row("b", new_task_loss=2.5,
                                                             forgetting=-0.1)]
    multi = parse_experiment(tiny_experiment(search={"metric": METRICS})).search
    assert str(search_rule(multi)) == "min new_task_loss"  # documented default: first objective
    notes: list[str] = []
    assert champion_row(multi, rows, notes).trial_id == "a" and not notes
    strict = parse_experiment(
        tiny_experiment(search={"metric": METRICS, "select": "min new_task_loss where "
                                                             "forgetting <= -1"})
    ).search
    assert champion_row(strict, rows, notes) is None
    assert "none of the 2 trial(s) that ran every task meets" in notes[0]
    assert "forgetting from -0.1 to 0.3" in notes[0]
    # a single-objective search with a constraint
    single = parse_experiment(tiny_experiment(
        search={"metric": "new_task_loss", "select": "min new_task_loss where forgetting < 0"}
    )).search
    assert champion_row(single, rows, []).trial_id == "b"


# -- the settings' refusals ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"metric": METRICS, "mode": "min"}, "search.mode: give one mode per metric"),
        ({"metric": METRICS, "mode": ["min", "max"]},
         "search.mode: forgetting is better when lower, so its mode must be 'min'"),
        ({"metric": ["new_task_loss", "new_task_loss", "bwt"]}, "appears twice"),
        ({"metric": ["new_task_loss", "forgeting"]}, "did you mean 'forgetting'?"),
        ({"metric": ["forgetting", "new_task_loss"], "scheduler": "asha"},
         "search.prune_metric: ASHA cannot stop trials on forgetting"),
        ({"metric": METRICS, "prune_metric": "stream_loss"},
         "search.prune_metric: 'stream_loss' must be one of search.metric"),
        ({"metric": METRICS, "select": "min new_task_loss wher forgetting < 0"}, GRAMMAR),
        ({"select": "min stream_loss where retain_forgetting <= 0.2"},
         "search.select: 'retain_forgetting' is not a metric the trainable reports; valid "
         "values: stream_loss"),
        ({"metric": METRICS, "select": "max new_task_loss"}, "the rule must start with 'min'"),
    ],
    ids=["one mode", "mode against direction", "twice", "typo", "asha on forgetting",
         "prune metric not an objective", "rule does not parse", "rule metric not reported",
         "rule mode against direction"],
)
def test_search_settings_are_refused_one_line_each(search: dict, message: str) -> None:
    problems = search_problems(parse_experiment(tiny_experiment(search=search)))
    assert len(problems) == 1 and message in problems[0], problems


def test_accepted_settings() -> None:
    for search in (
        {"metric": METRICS},
        {"metric": ["forgetting", "new_task_loss"], "scheduler": "fifo"},
        {"metric": METRICS, "prune_metric": "new_task_loss", "scheduler": "asha",
         "select": RULE},
        {"metric": "stream_loss", "select": "min stream_loss where forgetting <= 0.2"},
    ):
        assert search_problems(parse_experiment(tiny_experiment(search=search))) == []


# -- the searcher -------------------------------------------------------------------------------
SPACE = {"optim": {"lr": tune.loguniform(1e-4, 1e-2)}}


def _result(task: int, ntl: float, forgetting: float) -> dict[str, Any]:
    return {"new_task_loss": ntl, "forgetting": forgetting, "task_index": task,
            "training_iteration": task}


def test_searcher_multi_objective_states_and_resume(tmp_path: Path) -> None:
    db = tmp_path / "optuna.db"
    searcher = build_searcher(study_name="mo", storage_file=db, metric=METRICS,
                              mode=["min", "min"], max_t=2, seed=1)
    # Tune hands over its one (primary) metric with the space: the study keeps both
    live = pickle.loads(pickle.dumps(searcher))
    assert live.set_search_properties("new_task_loss", "min", SPACE)
    assert len(live.study.directions) == 2
    for t in ("done", "stopped", "crashed", "nan"):
        live.suggest(t)
    live.on_trial_result("done", _result(1, 3.0, 0.0))  # no intermediate value for Optuna
    live.on_trial_complete("stopped", result=_result(1, 3.5, 0.0))  # ASHA stopped it
    live.on_trial_complete("crashed", error=True)
    live.on_trial_complete("nan", result=_result(2, math.nan, 0.1))
    snapshot = tmp_path / "searcher-state.pkl"
    live.save(str(snapshot))  # Tune's snapshot, then `done` finishes and the driver dies
    live.on_trial_complete("done", result=_result(2, 2.0, 0.25))

    searcher.restore(str(snapshot))
    searcher.on_trial_complete("done", result=_result(2, 9.0, 9.0))  # told again: ignored
    study = optuna.load_study(study_name="mo", storage=f"sqlite:///{db}")
    states = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    assert states["done"].state.name == "COMPLETE" and states["done"].values == [2.0, 0.25]
    assert states["stopped"].state.name == "PRUNED" and states["stopped"].values is None
    assert states["crashed"].state.name == "FAIL"
    assert states["nan"].state.name == "PRUNED"
    assert all(not t.intermediate_values for t in study.trials)


# -- one real search ----------------------------------------------------------------------------
def _texts(folder: Path) -> list[str]:
    """Two domains a tiny model learns fast and then trades off: a high learning rate fits the
    second and forgets the first (forgetting > 0), a low one forgets nothing but learns less."""
    rng = random.Random(0)
    words = "the cat sat on the mat and the dog ran to the park".split()
    lines = {
        "words.txt": [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)],
        "numbers.txt": [" ".join(str(rng.randint(0, 999)) for _ in range(12)) for _ in range(400)],
    }
    for name, text in lines.items():
        (folder / name).write_text("\n".join(text))
    return [str(folder / name) for name in lines]


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 4-trial, 2-task FIFO search of [new_task_loss, forgetting] with a selection rule."""
    root = tmp_path_factory.mktemp("multi-objective")
    words, numbers = _texts(root)
    data = tiny_experiment(
        "mo",
        run={"stream": {"tasks": [{"name": "words", "files": [words]},
                                  {"name": "numbers", "files": [numbers]}]}},
        space={"lr": {"loguniform": [1e-3, 5e-2]}},
        search={"num_samples": 4, "seed": 1, "metric": METRICS, "select": RULE},
        tracking={"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
        storage_path=str(root / "ray"),
    )
    path = write_experiment(root / "mo.yaml", data)
    return {"root": root, "path": path, "data": data}


def test_multi_objective_search_end_to_end(
    searched: dict[str, Any], capsys: pytest.CaptureFixture[str], shared_ray: None
) -> None:
    root, path = searched["root"], searched["path"]
    assert main(["search", str(path), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "pruning:    FIFO: every trial runs every task" in dry
    assert f"select:     {RULE} (search.select)" in dry

    assert main(["search", str(path)]) == 0
    out = capsys.readouterr().out
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mo").experiment_id])
    (parent,) = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = {r.data.tags[TRIAL_TAG]: r for r in runs if PARENT_TAG in r.data.tags}
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children.values())
    final = {t: (r.data.metrics["new_task_loss"], r.data.metrics["forgetting"])
             for t, r in children.items()}

    # the tagged runs are exactly the non-dominated ones, recomputed from the runs' metrics
    front = {t for t, (n, f) in final.items()
             if not any(n2 <= n and f2 <= f and (n2, f2) != (n, f) for n2, f2 in final.values())}
    tagged = {t for t, r in children.items() if r.data.tags.get(PARETO_TAG) == "true"}
    assert tagged == front and len(front) >= 2, final  # the two objectives trade off
    assert set(parent.data.tags[PARETO_TRIALS_TAG].split(",")) == front
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto.md", "pareto.csv", "pareto_front.png", "param_importances.json"} <= artifacts
    assert {"importance/new_task_loss/lr", "importance/forgetting/lr"} <= set(parent.data.metrics)
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "trial"])
    table = lines[head + 1 : head + 5]  # the printed table marks the front
    assert {line.split()[1] for line in table if " * " in line} == front

    # Optuna: one multi-objective study, each trial COMPLETE with both final values
    study = optuna.load_study(study_name="mo", storage=f"sqlite:///{root / 'ray/mo/optuna.db'}")
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    for trial in study.trials:
        assert trial.state.name == "COMPLETE"
        assert trial.values == pytest.approx(list(final[trial.user_attrs["ray_trial_id"]]))

    # the champion is the rule's pick; the rule is on the parent run
    meets = {t: v for t, v in final.items() if v[1] <= 0}
    expected = min(meets, key=lambda t: meets[t][0])
    assert parent.data.tags[SELECT_TAG] == RULE and parent.data.params["search.select"] == RULE
    assert parent.data.params["search.metric"] == "new_task_loss,forgetting"
    version = client.get_model_version_by_alias("adaptune-mo", "champion")
    assert version.tags[TRIAL_TAG] == expected
    assert f"trial {expected}; {RULE})" in out

    # export picks the same trial by the same rule, and another by another rule
    uri = ["--tracking-uri", f"sqlite:///{root / 'mlflow.db'}"]
    least_forgetting = min(final, key=lambda t: final[t][1])
    for rule, winner in ((RULE, expected), ("min forgetting", least_forgetting)):
        out_file = root / f"best-{len(rule)}.yaml"
        assert main(["export", "mo", *uri, "--select", rule, "-o", str(out_file)]) == 0
        assert f"trial {winner} (selected by '{rule}')" in capsys.readouterr().out
        assert out_file.is_file()

    # bad rules for export: one line, exit 2, nothing written
    for rule, message in (
        ("min new_task_loss wher forgetting < 0", GRAMMAR),
        ("min nope", "'nope' is not a metric the trainable reports; valid values: stream_loss"),
        ("min new_task_loss where forgetting < -100", "none of the 4 trial(s) that ran every"),
    ):
        assert main(["export", "mo", *uri, "--select", rule, "-o", str(root / "x.yaml")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("adaptune: error: --select: ")
        assert message in err[0] and not (root / "x.yaml").exists()


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"metric": METRICS, "select": "min new_task_loss wher forgetting <= 0.1"}, GRAMMAR),
        ({"metric": ["new_task_loss", "retain_forgetting"]},
         "search.metric: 'retain_forgetting' is not an objective the trainable reports"),
        ({"metric": METRICS, "mode": ["min"]}, "search.mode: give one mode per metric"),
    ],
    ids=["rule does not parse", "metric not reported", "modes and metrics differ in length"],
)
def test_cli_refuses_bad_input_before_writing(search, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_experiment(tmp_path / "bad.yaml", tiny_experiment("bad", search=search))
    assert main(["search", "bad.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_asha_choice_is_stated_in_the_dry_run(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    data = tiny_experiment("asha", search={"metric": ["forgetting", "new_task_loss"],
                                           "scheduler": "asha", "prune_metric": "new_task_loss"})
    write_experiment(tmp_path / "asha.yaml", data)
    assert main(["search", "asha.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pruning:    ASHA stops trials on new_task_loss only" in out
    assert "select:     min forgetting (the first objective" in out
    assert yaml.safe_load((tmp_path / "asha.yaml").read_text()) == data
