"""The search-efficiency benchmark's statistics: seed means, per-trial draws, regret, verdicts."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
from conftest import load_benchmark

NAMES = ["lr", "ewc_lambda"]


@pytest.fixture(scope="module")
def se() -> ModuleType:
    return load_benchmark("search_efficiency_stats")


def _rec(lr: float, final: float, seed: int | None) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "params": {"lr": lr, "ewc_lambda": 0.0},
        "tasks": [{"task_index": 1, "stream_loss": 9.0, "train_tokens": 10}]
        + [{"task_index": 2, "stream_loss": final, "train_tokens": 20}],
    }
    if seed is not None:
        rec["seed"] = seed
    return rec


def _landscape(records: list[dict[str, Any]]) -> dict[str, Any]:
    paths = {"lr": ["optim", "lr"], "ewc_lambda": ["components", "ewc", "ewc_lambda"]}
    return {"meta": {"paths": paths, "tasks": ["a", "b"]}, "configs": records}


def test_seed_means_use_only_the_seeds_every_point_has(se) -> None:
    # Point 0.1 lacks seed 2 (a landscape still being extended): seed 2 is left out everywhere.
    recs = [_rec(0.1, 3.0, None), _rec(0.1, 3.2, 1), _rec(0.2, 3.1, 0), _rec(0.2, 3.3, 1)]
    recs.append(_rec(0.2, 9.9, 2))
    table, seeds, means = se.landscape_samples(_landscape(recs))
    assert seeds == [0, 1]  # a record without a seed is seed 0
    a, b = (
        se.key_of({"lr": 0.1, "ewc_lambda": 0}, NAMES),
        se.key_of({"lr": 0.2, "ewc_lambda": 0}, NAMES),
    )
    assert means[a] == pytest.approx(3.1) and means[b] == pytest.approx(3.2)
    assert set(table[b]) == {0, 1}


def test_each_trial_draws_one_seed_from_the_search_seeds_rng_alike_for_every_variant(se) -> None:
    first = se.sample_seed_drawer(7, [0, 1, 2])
    again = se.sample_seed_drawer(7, [0, 1, 2])
    draws = [first() for _ in range(60)]
    assert draws == [again() for _ in range(60)]
    assert set(draws) == {0, 1, 2}
    other = se.sample_seed_drawer(8, [0, 1, 2])
    assert [other() for _ in range(60)] != draws


def test_found_is_the_seed_mean_of_the_config_crowned_on_its_noisy_sample(se) -> None:
    # Trial "x" saw a lucky sample (3.00) of a point whose seed mean is 3.20; trial "y" saw
    # 3.05 of the grid's best point (seed mean 3.10). The search crowns x: regret 0.10.
    means = {"A": 3.20, "B": 3.10}
    events = [["x", 1, 9.0, 10, "A"], ["x", 2, 3.00, 20, "A"], ["y", 1, 9.0, 10, "B"]]
    events.append(["y", 2, 3.05, 20, "B"])
    curve = se.anytime(events, 2, means)
    assert [c[1] for c in curve] == [None, 3.20, 3.20, 3.20]
    assert se.found_at(curve, 20) == 3.20 and se.found_at(curve, 19) is None
    results = {
        "meta": {"tasks": 2, "grid_tokens": 40, "grid_best": 3.10, "point_means": means},
        "runs": [{"variant": "default", "seed": 0, "events": events}],
    }
    results["meta"]["variants"] = ["default"]
    assert se.regrets_at(results, "default", 1.0) == [pytest.approx(0.10)]
    # A single-seed results file (four-field events, no seed means): the observed value counts.
    assert se.anytime([e[:4] for e in events], 2)[-1][1] == 3.00


def test_lowest_regret_reports_ties_as_ties_and_only_common_seeds_count(se) -> None:
    events = [["t", 2, 3.0, 20, "B"]]
    runs = [
        {"variant": v, "seed": s, "events": events} for v in ("default", "random") for s in (0, 1)
    ]
    runs.append({"variant": "default", "seed": 2, "events": [["t", 2, 3.0, 20, "A"]]})
    meta = {"tasks": 2, "grid_tokens": 40, "grid_best": 3.1, "point_means": {"A": 3.5, "B": 3.1}}
    results = {"meta": meta | {"variants": ["random", "default"]}, "runs": runs}
    assert se.common_seeds(results) == [0, 1]  # seed 2 only the default ran: left out
    low = se._lowest(results, 1.0, lambda r: sum(r) / len(r))
    assert low.startswith("tie: ") and "random" in low and "default" in low


@pytest.mark.parametrize(("hits", "met"), [(30, "yes"), (0, "no"), (16, "not shown")])
def test_target_is_judged_on_the_share_of_searches_and_its_binomial_interval(se, hits, met) -> None:
    regrets = [0.0] * hits + [0.05] * (30 - hits)
    value, verdict = se.target_verdict(regrets)
    assert verdict == met
    assert value.startswith(f"{hits}/30")


def test_held_out_reference_seeds_must_be_complete_and_are_kept_apart(se) -> None:
    recs = [_rec(0.1, 3.0 + s / 10, s) for s in range(4)] + [_rec(0.2, 3.5, s) for s in range(3)]
    _, seeds, means = se.landscape_samples(_landscape(recs), [0, 1])
    assert seeds == [0, 1]
    assert means[se.key_of({"lr": 0.1, "ewc_lambda": 0}, NAMES)] == pytest.approx(3.05)
    with pytest.raises(ValueError, match="complete"):
        se.landscape_samples(_landscape(recs), [3])  # point 0.2 has no seed 3


def _confirm_meta() -> dict[str, Any]:
    # Point A: drawn seeds 0, 1, 2 gave 3.00 (lucky), 3.40, 3.40; point B: 3.10 on every seed.
    # The held-out truth: B (3.10) is the best, A is 3.30.
    return {
        "tasks": 2,
        "grid_tokens": 200,
        "grid_best": 3.10,
        "point_means": {"A": 3.30, "B": 3.10},
        "landscape_seeds": [0, 1, 2],
        "point_finals": {"A": [3.00, 3.40, 3.40], "B": [3.10, 3.10, 3.10]},
        "run_tokens_max": 20,
        "variants": ["default"],
        "confirm": [[2, 2], [1, 2]],
    }


def test_confirmation_reruns_the_top_k_on_the_other_seeds_and_crowns_the_best_mean(se) -> None:
    events = [["x", 2, 3.00, 20, "A", 0], ["y", 2, 3.10, 20, "B", 2]]
    meta = _confirm_meta()
    # Without confirmation the lucky A wins; top 2 re-run on 2 more seeds: A's mean 3.27 loses
    # to B's 3.10. Each search stops at budget - top_k x seeds x 20 tokens: 40 + 80 = 120.
    assert se.confirmed_found_at(events, meta, 120, (2, 2)) == 3.10
    assert se.confirmed_found_at(events, meta, 119, (2, 2)) == 3.30  # only x fits: top 1 of 1
    assert se.confirmed_found_at(events, meta, 99, (2, 2)) is None
    assert se.confirmed_found_at(events, meta, 200, (1, 2)) == 3.30  # top 1: only x re-run
    results = {"meta": meta, "runs": [{"variant": "default", "seed": 0, "events": events}]}
    assert se.all_variants(meta) == ["default", "default+confirm2x2", "default+confirm1x2"]
    assert se.regrets_at(results, "default", 1.0) == [pytest.approx(0.20)]
    assert se.regrets_at(results, "default+confirm2x2", 1.0) == [pytest.approx(0.0)]
    assert "confirm (top 2, 2 more seeds)" in se.label("default+confirm2x2")


def test_confirmation_seeds_follow_the_trials_own_seed_in_the_drawn_order(se) -> None:
    # x drew seed 2: its one confirmation run is seed 0 (2 + 1, wrapping), not seed 1.
    meta = _confirm_meta() | {"point_finals": {"A": [3.50, 3.00, 3.00], "B": [3.1] * 3}}
    events = [["x", 2, 3.00, 20, "A", 2], ["y", 2, 3.10, 20, "B", 0]]
    assert se.confirmed_found_at(events, meta, 200, (2, 1)) == 3.10  # A: (3.00 + 3.50) / 2
    meta["point_finals"]["A"] = [3.00, 3.50, 3.00]
    assert se.confirmed_found_at(events, meta, 200, (2, 1)) == 3.30  # A: (3.00 + 3.00) / 2
