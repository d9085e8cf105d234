"""Tune's controller loop, made to wait for events instead of polling ten times a second.

Ray Tune's ``TuneController.step`` (read in Ray 2.60) waits at most 0.1 s for the next event
(``self._actor_manager.next(timeout=0.1)``, a literal in its source, no setting) and then runs
its whole step again: the searcher and scheduler checks, the experiment-snapshot clock, the
callbacks' ``on_step_begin``/``on_step_end``. While trials compute, nothing happens in most of
those passes, yet each one wakes the driver and several of Ray's threads, which preempt the
trials on a busy machine (docs/benchmarks.md, "The floor": ``benchmarks/overhead.py --only
floor``).

An event still ends the wait at once (``ray.wait`` returns on the first ready future: a result,
a checkpoint, an actor that started or stopped, a placement group that became ready), so a
longer wait delays nothing that Tune reacts to; only what Tune checks on a clock rather than on
an event comes up to :data:`EVENT_WAIT_S` later: ``time_budget_s``, a Ctrl-C, the periodic
experiment snapshot, the progress table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

# The longest the controller waits for an event before it runs its step again (Tune's: 0.1 s).
EVENT_WAIT_S = 1.0
# The literal wait of TuneController.step that this replaces; other waits (Tune's 1 s waits
# while actors stop) are left alone.
TUNE_STEP_WAIT_S = 0.1


@contextlib.contextmanager
def patient_controller(wait_s: float = EVENT_WAIT_S) -> Iterator[bool]:
    """While in the block, Tune's controller waits up to ``wait_s`` for an event per step.

    Yields:
        True if Ray's actor manager was found and its wait replaced; False (nothing changed)
        for a Ray that moved it.
    """
    try:
        from ray.air.execution._internal.actor_manager import RayActorManager
    except ImportError:
        yield False
        return
    original = RayActorManager.next

    def next_event(self: Any, timeout: float | None = None) -> bool:
        if timeout == TUNE_STEP_WAIT_S:
            timeout = wait_s
        return original(self, timeout)

    RayActorManager.next = next_event  # type: ignore[method-assign]
    try:
        yield True
    finally:
        RayActorManager.next = original  # type: ignore[method-assign]
