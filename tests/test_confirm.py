"""``search.confirm``: the best configurations re-run with more seeds, the champion the best mean.

The selection on given numbers (a best single trial that is not the best mean), the plans'
seeds, the refusals and the dry run; then one real search through the command line whose
confirmation runs, champion and export are checked against what MLflow recorded.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest
from adaptune.search import export
from adaptune.search.cli import main
from adaptune.search.confirm import (
    ConfirmStats,
    confirm_plans,
    confirmed_winner,
    top_configurations,
)
from adaptune.search.experiment import parse_experiment
from adaptune.search.select import Rule, parse_rule
from adaptune.search.summary import TrialRow, format_table
from adaptune.search.tags import (
    CHAMPION_TAG,
    CONFIRM_OF_TAG,
    CONFIRM_TAG,
    CONFIRMED_TAG,
    KIND_CONFIRM,
    KIND_TAG,
    PARENT_TAG,
    SEED_TAG,
    TRIAL_TAG,
)
from adaptune.spaces.tune import build_param_space
from conftest import tiny_experiment, write_experiment
from mlflow.tracking import MlflowClient

TWO_TASKS = [
    {"name": "docs", "builtin": "python_docs"},
    {"name": "code", "builtin": "python_source"},
]


def _stats(trial: str, *losses: float, failed: tuple[int, ...] = ()) -> ConfirmStats:
    runs = tuple({"stream_loss": v, "forgetting": 0.1 * i} for i, v in enumerate(losses))
    return ConfirmStats(trial, "stream_loss", "min", tuple(range(len(losses))), runs, failed)


# -- the rule on given numbers ----------------------------------------------------------------
def test_the_best_mean_wins_over_the_best_single_trial() -> None:
    rule = Rule("min", "stream_loss")
    lucky = _stats("a", 2.00, 2.60, 2.50)  # best original run, mean 2.3667
    steady = _stats("b", 2.10, 2.15, 2.20)  # mean 2.15
    assert confirmed_winner({"a": lucky, "b": steady}, rule) == "b"
    assert statistics.fmean([2.10, 2.15, 2.20]) == pytest.approx(steady.mean())
    assert steady.std() == pytest.approx(statistics.stdev([2.10, 2.15, 2.20]))
    assert steady.text() == "2.1500±0.0500 (3)"
    # a max objective takes the highest mean
    up = ConfirmStats("a", "bwt", "max", (0, 1), ({"bwt": 0.5}, {"bwt": -0.5}))
    flat = ConfirmStats("b", "bwt", "max", (0, 1), ({"bwt": 0.2}, {"bwt": 0.1}))
    assert confirmed_winner({"a": up, "b": flat}, Rule("max", "bwt")) == "b"


def test_a_failed_confirmation_run_ranks_last_and_conditions_hold_on_means() -> None:
    rule = Rule("min", "stream_loss")
    failing = _stats("a", 1.0, 1.0, failed=(2,))
    assert confirmed_winner({"a": failing, "b": _stats("b", 2.0, 2.0)}, rule) == "b"
    assert confirmed_winner({"a": failing}, rule) == "a"  # the only one: still chosen
    # forgetting over the runs is 0, 0.1, 0.2: mean 0.1
    where = parse_rule("min stream_loss where forgetting <= 0.05")
    assert confirmed_winner({"a": _stats("a", 1.0, 1.0, 1.0)}, where) is None
    assert confirmed_winner({"a": _stats("a", 1.0, 1.0)}, where) == "a"  # mean 0.05
    assert confirmed_winner({"a": _stats("a", 1.0)}, where) == "a"  # 0.0 <= 0.05


def _row(trial: str, loss: float, status: str = "complete", **metrics: float) -> TrialRow:
    return TrialRow(trial, loss, 2 if status == "complete" else 1, status, {"lr": 1e-3},
                    metrics={"stream_loss": loss, **metrics})


def test_top_configurations_follow_the_selection_rule() -> None:
    rows = [_row("a", 1.0), _row("b", 1.5), _row("c", 1.2), _row("d", 0.5, "stopped")]
    exp = parse_experiment(tiny_experiment("k", search={"confirm": {"top_k": 2, "seeds": 1}}))
    assert top_configurations(exp.search, rows, 2) == ["a", "c"]  # never the stopped d
    assert top_configurations(exp.search, rows, 9) == ["a", "c", "b"]
    rows = [_row("a", 1.0, forgetting=0.3), _row("b", 1.5, forgetting=0.0),
            _row("c", 1.2, forgetting=0.1)]
    picky = parse_experiment(tiny_experiment(
        "k", search={"select": "min stream_loss where forgetting <= 0.2"}))
    assert top_configurations(picky.search, rows, 3) == ["c", "b"]
    # several objectives: the rule's picks (its first objective, ties by the next)
    rows = [_row("a", 1.0, new_task_loss=2.0, forgetting=0.1),
            _row("b", 1.1, new_task_loss=1.5, forgetting=0.2),
            _row("c", 1.2, new_task_loss=1.5, forgetting=0.0)]
    multi = parse_experiment(tiny_experiment(
        "k", search={"metric": ["new_task_loss", "forgetting"]}))
    assert top_configurations(multi.search, rows, 2) == ["c", "b"]


def test_plans_offset_the_trial_s_own_seed() -> None:
    exp = parse_experiment(tiny_experiment("p", run={"seed": 7}))
    a, b = build_param_space(exp), build_param_space(exp)
    a["optim"]["lr"], b["optim"]["lr"], b["seed"] = 1e-3, 2e-3, 40  # b's seed was searched
    plans = confirm_plans(["b", "a"], {"a": a, "b": b}, 2)
    assert [(p.trial_id, p.seed) for p in plans] == [("b", 41), ("b", 42), ("a", 8), ("a", 9)]
    for p in plans:
        base = {"a": a, "b": b}[p.trial_id]
        assert p.config["seed"] == p.seed
        assert {**p.config, "seed": base["seed"]} == base  # nothing else changes
    assert a["seed"] == 7 and b["seed"] == 40  # the trials' configs stay as they ran


def test_the_table_shows_mean_std_and_n_for_confirmed_rows() -> None:
    rows = [_row("a", 1.0), _row("b", 1.5)]
    rows[0].confirmed = _stats("a", 1.0, 1.2, 1.4)
    head, first, second = format_table(rows, "stream_loss").splitlines()
    assert "mean±std (n)" in head
    assert "1.2000±0.2000 (3)" in first and second.split()[3] == "-"


# -- refusals and the dry run -----------------------------------------------------------------
PBT = {"algorithm": "pbt", "num_samples": 2, "pbt": {"perturbation_interval": 1}}


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"confirm": {"top_k": 0}}, "search.confirm.top_k"),
        ({"confirm": {"seeds": 0}}, "search.confirm.seeds"),
        ({"confirm": {"top_k": 5}}, "search.confirm.top_k: must be <= search.num_samples (4)"),
        ({**PBT, "confirm": {"top_k": 1}}, "search.confirm: pbt trials copy other trials"),
    ],
)
def test_bad_confirm_settings_exit_2_before_anything_is_written(
    search: dict[str, Any], message: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    write_experiment(tmp_path / "x.yaml", tiny_experiment("x", search=search))
    assert main(["search", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_dry_run_states_the_plan(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    data = tiny_experiment("d", search={"confirm": {"top_k": 2, "seeds": 3}})
    write_experiment(tmp_path / "d.yaml", data)
    assert main(["search", "d.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    block = out[out.index("\nconfirm:") :].split("\ntrials:")[0]
    assert "the best 2 configuration(s) by min stream_loss, each re-run with 3 more" in block
    assert "2 x 3 = 6 runs of all 3 tasks after the trials: 18 task trainings more" in block
    assert "the best mean over 4 runs" in block


# -- a real search ----------------------------------------------------------------------------
@pytest.mark.slow
def test_search_confirms_the_top_configurations(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    data = tiny_experiment(
        "conf",
        run={"seed": 3, "stream": {"tasks": TWO_TASKS, "max_train_tokens": 512}},
        search={"num_samples": 3, "confirm": {"top_k": 2, "seeds": 2}},
    )
    write_experiment(tmp_path / "conf.yaml", data)
    assert main(["search", "conf.yaml"]) == 0
    out = capsys.readouterr().out
    assert "mean±std (n)" in out and "note: confirmed over seeds: trial" in out

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("conf").experiment_id])
    parent = next(r for r in runs if PARENT_TAG not in r.data.tags)
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id]
    trials = {r.data.tags[TRIAL_TAG]: r for r in children if CONFIRM_TAG not in r.data.tags}
    confirms = [r for r in children if r.data.tags.get(CONFIRM_TAG) == "true"]
    assert len(trials) == 3 and len(confirms) == 4
    assert all(r.info.status == "FINISHED" for r in children)

    # the top two trials by stream_loss, each re-run with seeds 4 and 5, values otherwise equal
    loss = {t: r.data.metrics["stream_loss"] for t, r in trials.items()}
    top = sorted(loss, key=lambda t: (loss[t], t))[:2]
    seen: dict[str, list[int]] = {}
    for r in confirms:
        tags = r.data.tags
        assert tags[KIND_TAG] == KIND_CONFIRM
        of = tags[CONFIRM_OF_TAG]
        seen.setdefault(of, []).append(int(tags[SEED_TAG]))
        assert r.data.params["seed"] == tags[SEED_TAG]
        original = trials[of].data.params  # (the champion's run has its model's params too)
        same = {k: original[k] for k in r.data.params}
        assert {**r.data.params, "seed": original["seed"]} == same and len(same) > 40
    assert sorted(seen) == sorted(top)
    assert all(sorted(seeds) == [4, 5] for seeds in seen.values())

    # the champion is the best mean over each configuration's three runs, recomputed here
    values = {t: [loss[t]] + [r.data.metrics["stream_loss"] for r in confirms
                              if r.data.tags[CONFIRM_OF_TAG] == t] for t in top}
    means = {t: statistics.fmean(v) for t, v in values.items()}
    winner = min(means, key=lambda t: (means[t], t))
    tags, metrics = parent.data.tags, parent.data.metrics
    assert tags[CONFIRMED_TAG] == winner and tags[CHAMPION_TAG] == winner
    assert metrics["best/stream_loss_mean"] == pytest.approx(means[winner])
    assert metrics["best/stream_loss_std"] == pytest.approx(statistics.stdev(values[winner]))
    assert metrics["best/stream_loss"] == pytest.approx(loss[winner])  # the original trial
    version = client.get_model_version_by_alias("adaptune-conf", "champion")
    assert version.tags[TRIAL_TAG] == winner  # the original trial's checkpoint
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"confirm.md", "trials.csv"} <= artifacts
    csv = Path(client.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path)))
    assert "stream_loss_mean,stream_loss_std,stream_loss_n" in csv.read_text().splitlines()[0]

    # export follows the confirmed tag, never a confirmation run
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    _, won = export.export_best("conf", out=tmp_path / "best.yaml", tracking_uri=uri)
    assert (won.trial_id, won.how) == (winner, "champion, best mean over seeds")
    other = next(t for t in top if t != winner)
    client.set_tag(parent.info.run_id, CONFIRMED_TAG, other)
    _, won = export.export_best("conf", out=tmp_path / "b2.yaml", tracking_uri=uri)
    assert won.trial_id == other
    _, won = export.export_best(
        "conf", out=tmp_path / "b3.yaml", tracking_uri=uri, select="min stream_loss"
    )
    assert won.trial_id == min(loss, key=lambda t: (loss[t], t))  # among the trials only
