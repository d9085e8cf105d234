"""ASHA whose rungs survive ``adaptune search --resume``.

Ray Tune (read in Ray 2.60) keeps no scheduler state across ``Tuner.restore``: the experiment
snapshot (``TuneController.save_to_dir``) holds the trials, the searcher and the callbacks' states
and leaves the scheduler out (``TuneController.__getstate__`` drops ``_scheduler_alg``), and
nothing calls ``TrialScheduler.save``/``restore``. A restored Tuner takes its scheduler from
``tuner.pkl``, pickled when the search was created, with empty rungs: a resumed search would
compare its trials only with results reported since the resume, and stop other trials than the
same search run without a break.

:class:`ResumableASHAScheduler` is Ray's ASHA with its state as plain data; :class:`AshaState`,
a Tune callback holding the same scheduler object (``tuner.pkl`` is one pickle, so the restored
callback and scheduler are one object again), puts that state in Tune's experiment snapshot
through ``Callback.get_state``. Tune writes it (``callback-states-<session>.pkl``, atomically) in
the same driver step as the trials' states (``experiment_state-<session>.json``), copies both in
one upload to the search directory (a local path or a URI), and gives the state back
(``set_state``) when a search resumes, before it adds the trials back and before any trial
reports. So the rungs match the trials' states Tune restores: a trial recorded at a rung after
the snapshot is not in the restored rungs and reports that task again. (A driver killed during
that upload can leave the two files from consecutive snapshots; records of trials Tune does not
add back are then dropped.)

What Tune restores can still be behind a trial's reports in one way: a trial resumes from its last
registered checkpoint, which may predate its last recorded result (the driver died while the
checkpoint of that result was being saved, or before the decision made on it took effect). It then
reports those tasks again. Here the first record of a trial at a rung stands, and a repeated
report gets the decision the first one got, computed again from the values recorded before it at
that rung (a rung keeps its records in order); a trial that one of its rungs had stopped is
stopped at its next report without another record. Ray's ASHA answers such a repeated report with
CONTINUE, whatever the rung had decided.
"""

from __future__ import annotations

import itertools
from typing import Any

import pyarrow.fs
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

STATE_KEY = "adaptune-asha-rungs"  # the callback state's key, to find it in Tune's callback file
CALLBACK_STATES = "callback-states-"  # Tune's CallbackList.CKPT_FILE_TMPL, up to the session


class ResumableASHAScheduler(ASHAScheduler):
    """Ray's ``ASHAScheduler`` (same arguments) with :meth:`state_dict`/:meth:`load_state_dict`
    and decisions that a trial reporting a task again cannot change.

    Example:
        >>> asha = ResumableASHAScheduler(max_t=3, grace_period=1, reduction_factor=2)
        >>> [milestone for milestone, _ in asha.state_dict()["rungs"][0]]
        [2, 1]
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._unclaimed: set[str] = set()  # restored records whose trial Tune has not added

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._unclaimed.discard(trial.trial_id)
        if trial.status in (Trial.TERMINATED, Trial.ERROR):
            # a finished trial Tune adds back on resume: it reports nothing more
            self._trial_info.pop(trial.trial_id, None)
            return
        kept = self._trial_info.get(trial.trial_id)
        super().on_trial_add(tune_controller, trial)
        if kept is not None:  # a restored trial stays in its bracket
            self._trial_info[trial.trial_id] = kept

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        self._drop_unclaimed()
        if self._stopped_at_a_rung(trial.trial_id, result):
            self._num_stopped += 1
            return TrialScheduler.STOP
        return str(super().on_trial_result(tune_controller, trial, result))

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        self._drop_unclaimed()
        if self._stopped_at_a_rung(trial.trial_id, result):
            # its results past the rung that stopped it are not ASHA's to record
            self._trial_info.pop(trial.trial_id, None)
            return
        super().on_trial_complete(tune_controller, trial, result)

    def _drop_unclaimed(self) -> None:
        """Forget the restored records of trials Tune did not add back (it adds every trial of
        its snapshot before any reports). Only a driver killed while Tune uploaded one snapshot's
        files leaves such records, of trials started after the trials' snapshot: the searcher
        runs them again under new ids, which would count them twice."""
        for bracket in self._brackets:
            for _, recorded in bracket._rungs:
                for trial_id in self._unclaimed:
                    recorded.pop(trial_id, None)
        for trial_id in self._unclaimed:
            self._trial_info.pop(trial_id, None)
        self._unclaimed.clear()

    def _stopped_at_a_rung(self, trial_id: str, result: dict[str, Any]) -> bool:
        """Whether a rung up to this result's time already recorded ``trial_id`` with the
        decision STOP (only a resumed or retried trial reports past such a rung)."""
        bracket = self._trial_info.get(trial_id)
        now = result.get(self._time_attr)
        if bracket is None or now is None:
            return False
        for milestone, recorded in bracket._rungs:
            if milestone > now or trial_id not in recorded:
                continue
            position = list(recorded).index(trial_id)
            before = dict(itertools.islice(recorded.items(), position))
            cutoff = bracket.cutoff(before)  # the cutoff its first report met
            if cutoff is not None and recorded[trial_id] < cutoff:
                return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """The rungs and trials' brackets as plain data (what :meth:`load_state_dict` takes).

        ``rungs``: per bracket, ``[milestone, {trial_id: value}]`` from the last rung down, the
        values in the order recorded (``value`` is the metric, negated for ``mode: min``);
        ``trials``: ``{trial_id: bracket index}`` for the trials not yet finished;
        ``num_stopped``: how many trials ASHA stopped.
        """
        index = {id(bracket): i for i, bracket in enumerate(self._brackets)}
        return {
            "rungs": [
                [[milestone, dict(recorded)] for milestone, recorded in bracket._rungs]
                for bracket in self._brackets
            ],
            "trials": {trial_id: index[id(b)] for trial_id, b in self._trial_info.items()},
            "num_stopped": self._num_stopped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned.

        Raises:
            ValueError: ``state`` holds other brackets or milestones than this scheduler's
                (``max_t``, ``grace_period``, ``reduction_factor`` or ``brackets`` differ).
        """
        ours = [[milestone for milestone, _ in b._rungs] for b in self._brackets]
        theirs = [[milestone for milestone, _ in rungs] for rungs in state["rungs"]]
        if ours != theirs:
            raise ValueError(
                f"the saved ASHA state has rungs at {theirs}, this scheduler at {ours}"
            )
        for bracket, rungs in zip(self._brackets, state["rungs"], strict=True):
            bracket._rungs = [(milestone, dict(recorded)) for milestone, recorded in rungs]
        self._trial_info = {t: self._brackets[i] for t, i in state["trials"].items()}
        self._num_stopped = int(state["num_stopped"])
        self._unclaimed = {t for b in self._brackets for _, rec in b._rungs for t in rec}


class AshaState(Callback):
    """Keeps ``scheduler``'s state in Tune's experiment snapshot (see the module docstring)."""

    def __init__(self, scheduler: ResumableASHAScheduler) -> None:
        self.scheduler = scheduler

    def get_state(self) -> dict[str, Any]:
        # never empty: Tune writes no callback file for a falsy state, and a resumed session
        # would then restore an older session's file
        return {STATE_KEY: self.scheduler.state_dict()}

    def set_state(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state[STATE_KEY])


def scheduler_callbacks(scheduler: Any) -> list[Callback]:
    """The Tune callbacks that ``scheduler`` needs in ``RunConfig(callbacks=...)`` to survive a
    resume: :class:`AshaState` for ASHA, none for the others."""
    return [AshaState(scheduler)] if isinstance(scheduler, ResumableASHAScheduler) else []


def saved_asha_state(location: str) -> dict[str, Any] | None:
    """ASHA's state in the latest experiment snapshot of the search in ``location`` (a local
    path or a URI), as :meth:`ResumableASHAScheduler.state_dict` returned it; None without one.

    Tune pickles the callbacks' states; read only a search directory you trust.
    """
    import ray.cloudpickle as pickle

    fs, path = pyarrow.fs.FileSystem.from_uri(location)
    found = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    names = [f.base_name for f in found if f.base_name.startswith(CALLBACK_STATES)]
    if not names:
        return None
    with fs.open_input_stream(f"{path}/{max(names)}") as f:  # Tune's choice: the newest name
        states = pickle.loads(f.read())
    return next(
        (s[STATE_KEY] for s in states.values() if isinstance(s, dict) and STATE_KEY in s), None
    )
