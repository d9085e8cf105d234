"""Ray's PBT and PB2 schedulers with their own seeded random stream (``search.seed``).

Ray's schedulers draw the donor a trial copies, each perturbation and each value drawn afresh
from the driver's global ``random`` and ``numpy.random``, which nothing seeds and anything in
the driver may consume. Here each draw happens inside :meth:`_SeededDraws._own_stream`, which
swaps in the scheduler's own state (seeded from ``search.seed``) and swaps the global one back,
so the global generators see no change and, as synchronous PBT ranks a whole population at
once in a fixed order, the same seed makes the same exploits (the trials train
deterministically on one machine).

Imported only to build a search's scheduler: it loads Ray.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
from ray.tune.schedulers import PopulationBasedTraining
from ray.tune.schedulers.pb2 import PB2


class _SeededDraws:
    """Mixin for a PBT scheduler: its draws come from a stream seeded by :meth:`seed`."""

    _py_state: Any = None
    _np_state: Any = None

    def seed(self, seed: int) -> None:
        """Start the scheduler's own stream at ``seed``."""
        self._py_state = random.Random(seed).getstate()
        self._np_state = np.random.RandomState(seed).get_state()

    @contextlib.contextmanager
    def _own_stream(self) -> Iterator[None]:
        """Draw from the scheduler's stream inside the block; the global state is restored."""
        if self._py_state is None:  # never seeded: Ray's behaviour
            yield
            return
        saved = random.getstate(), np.random.get_state()
        random.setstate(self._py_state)
        np.random.set_state(self._np_state)
        try:
            yield
        finally:
            self._py_state, self._np_state = random.getstate(), np.random.get_state()
            random.setstate(saved[0])
            np.random.set_state(saved[1])

    # Ray's PBT draws only here: the donor (random.choice) and, through _exploit, the new config
    def _checkpoint_or_exploit(self, *args: Any, **kwargs: Any) -> Any:
        with self._own_stream():
            return super()._checkpoint_or_exploit(*args, **kwargs)  # type: ignore[misc]


class SeededPBT(_SeededDraws, PopulationBasedTraining):
    """Ray's ``PopulationBasedTraining`` drawing from its own seeded stream."""


class SeededPB2(_SeededDraws, PB2):
    """Ray's ``PB2`` drawing from its own seeded stream (its GP's acquisition starts too)."""
