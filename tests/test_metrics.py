"""Continual-learning metrics on a hand-written loss matrix, against hand-computed values."""

from __future__ import annotations

import math

import pytest
from adaptune.trainables.metrics import stream_metrics, task_forgetting

# L[i][j-1]: eval loss on task j after training through task i (row 0 = before any training).
L = [
    [5.0, 6.0, 7.0],  # before training
    [2.0, 5.0, 6.8],  # after task 1
    [1.5, 0.8, 6.5],  # after task 2 (task 1 improved further: backward transfer)
    [3.0, 2.0, 0.5],  # after task 3
]

# Hand-computed, k = tasks trained so far.
EXPECTED = {
    1: {
        "stream_loss": 13.8 / 3,  # (2.0 + 5.0 + 6.8) / 3 = 4.6
        "seen_loss": 2.0,  # L[1][1]
        "new_task_loss": 2.0,  # L[1][1]
        "forgetting": 0.0,  # no j < 1: empty mean
        "bwt": 0.0,  # empty mean
        "fwt": 0.0,  # no 2 <= j <= 1: empty mean
    },
    2: {
        "stream_loss": 8.8 / 3,  # (1.5 + 0.8 + 6.5) / 3
        "seen_loss": 1.15,  # (1.5 + 0.8) / 2
        "new_task_loss": 0.8,  # L[2][2]
        # j=1: L[2][1] - min_{l in [1,2)} L[l][1] = 1.5 - 2.0 = -0.5
        "forgetting": -0.5,
        # j=1: L[1][1] - L[2][1] = 2.0 - 1.5 = 0.5
        "bwt": 0.5,
        # j=2: L[0][2] - L[1][2] = 6.0 - 5.0 = 1.0
        "fwt": 1.0,
    },
    3: {
        "stream_loss": 5.5 / 3,  # (3.0 + 2.0 + 0.5) / 3
        "seen_loss": 5.5 / 3,  # all three tasks seen
        "new_task_loss": 0.5,  # L[3][3]
        # j=1: 3.0 - min(L[1][1]=2.0, L[2][1]=1.5) = 1.5   (not 3.0 - L[1][1] = 1.0)
        # j=2: 2.0 - min(L[2][2]=0.8)              = 1.2
        # mean: (1.5 + 1.2) / 2 = 1.35
        "forgetting": 1.35,
        # j=1: 2.0 - 3.0 = -1.0; j=2: 0.8 - 2.0 = -1.2; mean -1.1
        "bwt": -1.1,
        # j=2: L[0][2] - L[1][2] = 6.0 - 5.0 = 1.0; j=3: L[0][3] - L[2][3] = 7.0 - 6.5 = 0.5
        # mean: 0.75
        "fwt": 0.75,
    },
}


@pytest.mark.parametrize("k", [1, 2, 3])
def test_stream_metrics_match_hand_computed_values(k: int) -> None:
    got = stream_metrics(L, k)
    want = EXPECTED[k]
    assert set(got) == {*want, "stream_ppl", "seen_ppl", "new_task_ppl"}
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name
    for loss, ppl in [("stream_loss", "stream_ppl"), ("seen_loss", "seen_ppl"),
                      ("new_task_loss", "new_task_ppl")]:
        assert got[ppl] == pytest.approx(math.exp(want[loss]), rel=1e-12), ppl


def test_perplexities_are_exp_of_losses_by_hand() -> None:
    got = stream_metrics(L, 1)
    assert got["stream_ppl"] == pytest.approx(math.exp(4.6))  # e^4.6 ~ 99.48
    assert got["stream_ppl"] == pytest.approx(99.484315, rel=1e-6)
    assert got["seen_ppl"] == pytest.approx(7.389056, rel=1e-6)  # e^2


@pytest.mark.parametrize(
    ("k", "j", "expected"),
    [
        (1, 1, 0.0),  # j >= k: not yet forgettable
        (2, 1, -0.5),  # 1.5 - min(2.0)
        (2, 2, 0.0),
        (2, 3, 0.0),  # unseen task
        (3, 1, 1.5),  # 3.0 - min(2.0, 1.5)
        (3, 2, 1.2),  # 2.0 - min(0.8)
        (3, 3, 0.0),
    ],
)
def test_task_forgetting_by_hand(k: int, j: int, expected: float) -> None:
    assert task_forgetting(L, k, j) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("k", [2, 3])
def test_forgetting_is_mean_of_task_forgetting(k: int) -> None:
    per_task = [task_forgetting(L, k, j) for j in range(1, k)]
    assert stream_metrics(L, k)["forgetting"] == pytest.approx(sum(per_task) / len(per_task))


@pytest.mark.parametrize("k", [0, -1, 4, 10])
def test_bad_k_raises_value_error(k: int) -> None:
    with pytest.raises(ValueError, match="1 <= k < len"):
        stream_metrics(L, k)


def test_metrics_accept_a_partial_matrix() -> None:
    # During a run only rows 0..k exist: k=1 needs rows 0 and 1 only.
    got = stream_metrics(L[:2], 1)
    assert got["stream_loss"] == pytest.approx(4.6)
    with pytest.raises(ValueError):
        stream_metrics(L[:2], 2)
