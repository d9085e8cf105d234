"""The speed benchmark's pairing statistics: per-round ratios, their median, the ABBA order."""

from __future__ import annotations

import statistics
from types import ModuleType

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def speed() -> ModuleType:
    return load_benchmark("speed")


def test_paired_median_pairs_rounds_instead_of_comparing_best_or_medians(speed) -> None:
    # Round 3 was fast for both (an idle machine); per round the trainable is 2x, 1x, 2.5x.
    trainable = [2.0, 3.0, 10.0]
    bare = [1.0, 3.0, 4.0]
    assert speed.paired_ratios(trainable, bare) == [2.0, 1.0, 2.5]
    assert speed.paired_median(trainable, bare) == 2.0
    # The unpaired statistics tell other stories: this is what pairing is for.
    assert statistics.median(trainable) / statistics.median(bare) == 1.0
    assert max(trainable) / max(bare) == 2.5


def test_paired_median_of_an_even_count_averages_the_middle_ratios(speed) -> None:
    assert speed.paired_median([1.0, 2.0, 3.0, 8.0], [1.0, 1.0, 1.0, 1.0]) == 2.5


@pytest.mark.parametrize(("num", "den"), [([], []), ([1.0, 2.0], [1.0])])
def test_paired_ratios_reject_empty_or_unequal_series(speed, num, den) -> None:
    with pytest.raises(ValueError, match="equal length"):
        speed.paired_ratios(num, den)


def test_round_order_alternates_so_every_name_has_the_same_mean_position(speed) -> None:
    names = ["bare", "naive", "replay", "ewc"]
    assert speed.round_order(names, 0) == names
    assert speed.round_order(names, 1) == ["ewc", "replay", "naive", "bare"]
    assert speed.round_order(names, 2) == names
    positions = {
        n: statistics.mean(speed.round_order(names, r).index(n) for r in range(4)) for n in names
    }
    assert set(positions.values()) == {1.5}
    # The bare loop and the naive trainable always run back to back.
    for r in range(4):
        order = speed.round_order(names, r)
        assert abs(order.index("bare") - order.index("naive")) == 1
