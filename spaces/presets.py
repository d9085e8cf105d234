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
    # published λ spans 0.7..1e10 depending on the Fisher estimator. With the default one (the
    # per-sequence empirical Fisher, penalty in the loss) λ acts through λ·F̄ (F̄: the report's
    # ewc/fisher_mean): ~1e-2 is already felt and ~1e2 freezes the model (tiny GPT, F̄ ≈ 2e-5,
    # docs/continual-learning.md). F̄ is the squared gradient norm spread over the
    # parameters, so it shrinks as models grow: the range reaches above the tiny model's.
    "ewc_lambda": {"loguniform": [1e1, 1e8]},
}
_DISTILL: dict[str, Any] = {
    "distill_alpha": {"loguniform": [0.5, 10.0]},  # LwF α
    "temperature": {"uniform": [1.0, 4.0]},  # ≈ 2 in LwF
}

_SELF_UPDATE: dict[str, Any] = {
    "self_fraction": {"uniform": [0.05, 0.5]},  # like replay's share, of self-written blocks
    "gen_temperature": {"uniform": [0.7, 1.2]},  # below 1: safer, less diverse samples
    "gen_samples": {"int": [32, 256]},  # samples written before each task
}

# Online mode (stream.mode: online): the chunk size, when to train, and the rehearsal buffer.
# The chunks are powers of two (multiples of every power-of-two block_size up to 1024); the
# threshold is Page-Hinkley's λ in nats (drift_detector page_hinkley, the default): a step of
# s nats is caught after about λ / s chunks, so 0.25 fires on noise and 8 only on a new domain.
_ONLINE: dict[str, Any] = {
    "chunk_tokens": {"choice": [1024, 2048, 4096]},
    "update_policy": {"choice": ["every", "interval", "drift"]},
    "update_interval": {"int": [2, 16]},  # chunks
    "drift_threshold": {"loguniform": [0.25, 8.0]},
    "drift_update_chunks": {"int": [1, 8]},
    "buffer_size": {"int": [16, 4096]},  # blocks; a buffer always (the online stream rehearses)
    "replay_fraction": {"uniform": [0.005, 0.5]},
}

PRESETS: dict[str, dict[str, Any]] = {
    "replay": {**_LR, **_REPLAY},
    "ewc": {**_LR, **_EWC},
    "distill": {**_LR, **_DISTILL},
    "all": {**_LR, **_REPLAY, **_EWC, **_DISTILL},
    "online": {**_LR, **_ONLINE},  # stream.mode: online
    "self_update": {**_LR, **_SELF_UPDATE},  # rehearsal without stored data
}
