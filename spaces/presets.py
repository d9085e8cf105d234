"""Named search spaces with literature ranges: ``space: {preset: replay}`` in an experiment.

Explicit keys next to ``preset`` override the preset's entries, e.g.
``space: {preset: all, lr: {loguniform: [1.0e-4, 1.0e-3]}}``.
"""

from __future__ import annotations

from typing import Any

# Literature ranges (see docs: DESIGN.md "Hyperparameter ranges"). Each preset searches the
# learning rate, the first-order knob for forgetting, plus one method's knobs; "all" combines them.
_LR: dict[str, Any] = {"lr": {"loguniform": [1e-5, 3e-3]}}
_REPLAY: dict[str, Any] = {
    "buffer_size": {"int": [0, 5000]},  # blocks; 0 = replay off
    "replay_fraction": {"uniform": [0.005, 0.5]},  # 0.5 %-50 % of each batch
}
_EWC: dict[str, Any] = {
    # published λ spans 0.7..1e10 depending on the Fisher estimator; ours is the per-sequence
    # empirical Fisher in float32, where useful values sit inside these eight decades.
    "ewc_lambda": {"loguniform": [1e-2, 1e6]},
}
_DISTILL: dict[str, Any] = {
    "distill_alpha": {"loguniform": [0.5, 10.0]},  # LwF α
    "temperature": {"uniform": [1.0, 4.0]},  # ≈ 2 in LwF
}

PRESETS: dict[str, dict[str, Any]] = {
    "replay": {**_LR, **_REPLAY},
    "ewc": {**_LR, **_EWC},
    "distill": {**_LR, **_DISTILL},
    "all": {**_LR, **_REPLAY, **_EWC, **_DISTILL},
}
