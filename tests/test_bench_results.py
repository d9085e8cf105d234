"""What the benchmark scripts time and save: like-for-like end points, the stated statistics."""

from __future__ import annotations

import json
from types import ModuleType

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def overhead() -> ModuleType:
    return load_benchmark("overhead")


def test_plain_trials_are_timed_to_their_last_report_as_tunes_time_total_s(
    overhead, tmp_path
) -> None:
    # (start, after imports, last report, return): 1 s between the last report and the return
    spans = [[100.0, 102.0, 130.0, 131.0], [100.0, 102.0, 150.0, 151.0]]
    log = tmp_path / "plain.log"
    log.write_text(
        "noise\n" + json.dumps({"first_start": 100.0, "last_end": 151.0, "spans": spans}) + "\n"
    )
    fig = overhead._plain_figures(log, [{}, {}], launch=99.0, wall=53.0)
    assert fig["compute_s"] == [28.0, 48.0]
    assert fig["compute_to_return_s"] == [29.0, 49.0]
    assert fig["between_s"] == 51.0
    assert fig["after_last_trial_s"] == pytest.approx(1.0)


def test_wall_ratio_statistic_is_the_median_of_the_rounds_with_its_range(overhead) -> None:
    def rnd(search: float, plain: float) -> dict:
        return {
            "ratio": search / plain,
            "trial_compute_ratio_median": 1.0,
            "search": {"wall_s": search},
            "plain": {"wall_s": plain},
        }

    s = overhead.ratio_summary([rnd(105, 100), rnd(150, 100), rnd(108, 100)])
    assert s["median"] == pytest.approx(1.08)
    assert s["range"] == pytest.approx([1.05, 1.50])
    assert s["all_rounds_together"] == pytest.approx(363 / 300)
    assert s["target_met"] is True  # the median, not the pooled 1.21, is the stated statistic


def test_speed_saves_the_fisher_and_evaluation_shares_it_prints(tmp_path, monkeypatch) -> None:
    speed = load_benchmark("speed")
    runs = iter(
        {
            "loadavg_before": (1.0, 1.0, 1.0),
            "loadavg_after": (2.0, 1.0, 1.0),
            "fisher_share": f,
            "fisher_shares": [f, f / 2],
            "fisher_s": 1.0,
            "task_train_s": 10.0,
            "eval_share": e,
            "wall_s": 30.0,
            "threads": 1,
            "tasks": 3,
        }
        for f, e in [(0.08, 0.03), (0.12, 0.05), (0.10, 0.04)]
    )
    monkeypatch.setattr(speed, "quickstart_shares", lambda ewc_lambda: next(runs))
    monkeypatch.setattr(speed, "RESULTS", tmp_path / "benchmarks" / "results")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    q = speed.shares(runs=3)
    saved = json.loads((tmp_path / "benchmarks" / "results" / "speed-shares.json").read_text())
    assert q["fisher_share"] == pytest.approx(0.10) == saved["median"]["fisher_share"]
    assert saved["median"]["fisher_shares"] == pytest.approx([0.10, 0.05])
    assert saved["median"]["eval_share"] == pytest.approx(0.04)
    assert [r["fisher_share"] for r in saved["runs"]] == [0.08, 0.12, 0.10]


def test_forgetting_summary_is_mean_and_sample_std_over_seeds() -> None:
    forgetting = load_benchmark("forgetting")
    assert forgetting.SEEDS == (0, 1, 2)
    runs = [dict.fromkeys(forgetting.FIGURES, v) for v in (1.0, 2.0, 3.0)]
    s = forgetting.summary(runs)
    assert s["forgetting"] == pytest.approx([2.0, 1.0])
    timed = {"train_time_s": [10, 10, 10], "after_task_time_s": [1, 2, 0.5],
             "eval_time_s": [1, 1, 1], "wall_s": 60.0}
    shares = forgetting.time_shares([timed, {"seed": 1}])
    assert shares["runs"] == 1
    assert shares["after_task_share_worst"] == pytest.approx(0.2)  # the last task's is left out
    assert shares["eval_share"] == pytest.approx(0.05)
