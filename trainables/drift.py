"""Drift detection on an online stream's chunk losses, through the ``river`` package.

The detector watches the prequential NLL of a model that is not changing: the online loop feeds
it the scores of chunks that arrive while no update runs, and starts it afresh after each
update, so its reference is the model as it now stands. With the model fixed, a change of its
loss is a change of the text, so a rise and a fall both count (a shift to text the model finds
easier is still new text to learn):

- ``page_hinkley``: river's ``PageHinkley``, two-sided; ``drift_threshold`` is its λ, in nats:
  the cumulative departure of the loss from its running mean (less a tolerance δ = 0.005 nats
  per chunk) that sets it off. A step of ``s`` nats is caught after about ``λ / s`` chunks.
- ``adwin``: river's ``ADWIN`` checked at every chunk (``clock=1``); ``drift_threshold`` is its
  confidence δ in (0, 1): smaller fires less often and later. It needs more chunks than
  Page-Hinkley to confirm a step (it compares the means of two sub-windows).

``drift_min_chunks`` is the number of scores a fresh detector must see before it may fire
(Page-Hinkley's ``min_instances``, ADWIN's ``grace_period`` and ``min_window_length``).

A detector's state is the list of scores it has seen since it started (``history``): feeding
them again to a fresh detector rebuilds it exactly, so a checkpoint stores plain numbers, never
a pickle (which would run code when loaded).
"""

from __future__ import annotations

from typing import Any

from adaptune.trainables.errors import ConfigError

DETECTORS = ("page_hinkley", "adwin")
INSTALL = "pip install 'adaptune[online]'"


def check_river(field: str = "run.stream.drift_detector") -> None:
    """Refuse the drift policy when ``river`` is not installed.

    Raises:
        ConfigError: one line naming ``field`` and the command that installs it.
    """
    try:
        import river.drift  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"{field}: the drift policy needs the `river` package, which is not installed; "
            f"install it with: {INSTALL}"
        ) from None


class DriftDetector:
    """One river detector fed chunk losses; :meth:`update` says whether it fired.

    Args:
        kind: ``page_hinkley`` or ``adwin``.
        threshold: Page-Hinkley's λ (nats) or ADWIN's δ (in (0, 1)).
        min_chunks: scores seen before it may fire.
        history: scores a previous detector with these settings saw; fed again in order.

    Example:
        >>> det = DriftDetector("page_hinkley", threshold=1.0, min_chunks=3)
        >>> [det.update(x) for x in [2.0, 2.0, 2.0, 3.5]]
        [False, False, False, True]
    """

    def __init__(
        self, kind: str, *, threshold: float, min_chunks: int, history: list[float] | None = None
    ) -> None:
        if kind not in DETECTORS:
            raise ValueError(f"`kind` must be one of {DETECTORS}, but got {kind!r}")
        self.kind, self.threshold, self.min_chunks = kind, threshold, min_chunks
        self.history: list[float] = []
        self._det = self._build()
        for x in history or []:
            self.update(x)

    def _build(self) -> Any:
        from river import drift

        if self.kind == "page_hinkley":
            return drift.PageHinkley(
                min_instances=self.min_chunks, delta=0.005, threshold=self.threshold, mode="both"
            )
        return drift.ADWIN(
            delta=self.threshold,
            clock=1,
            grace_period=self.min_chunks,
            min_window_length=self.min_chunks,
        )

    def update(self, nll: float) -> bool:
        """Feed one chunk's loss; True when it sets the detector off."""
        self.history.append(float(nll))
        self._det.update(float(nll))
        return bool(self._det.drift_detected)

    def reset(self) -> None:
        """Start afresh: what follows is measured against what comes next."""
        self.history = []
        self._det = self._build()
