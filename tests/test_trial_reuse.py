"""Trials that share one Ray worker (Tune's ``reuse_actors``) leave nothing of theirs behind.

The trainable freezes what the worker holds when a trial starts (``gc.freeze()``: the imported
libraries) so the collection when the trial ends only walks the trial's own objects. Frozen
objects are never collected as cycles, so this checks, with the real stack (Ray Tune, Optuna,
MLflow), that every trial's model and teacher are gone when it ends, in the same worker process.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
from adaptune.search import tuner
from adaptune.search.cli import main
from conftest import tiny_experiment, write_experiment

REUSE = tiny_experiment(
    "reuse",
    run={
        "model": {"n_positions": 32},
        "stream": {
            "max_eval_blocks": 2,
            "tasks": [
                {"name": "docs", "builtin": "python_docs"},
                {"name": "names", "builtin": "unicode_names"},
            ],
        },
        "components": {"ewc": {"fisher_samples": 4}, "distill": {"distill_alpha": 0.5}},
        "hardware": {"threads": 1},
    },
    space={"lr": None, "seed": {"choice": [0, 1, 2]}},
    search={"num_samples": 3, "max_concurrent": 1, "algorithm": "random"},
)


def counting_trainable(out_dir: Path) -> Any:
    """``continual_trainable``, then a count of the models (``PreTrainedModel``) and weights
    (``nn.Parameter``) the worker still tracks (library-level modules, such as transformers'
    activation instances, have no weights).
    Defined in a function so Ray's cloudpickle ships it by value to the workers."""
    from adaptune.trainables.trainable import continual_trainable

    def trainable(config: dict[str, Any]) -> None:
        import gc
        import os

        import torch
        from ray import tune

        trial_id = tune.get_context().get_trial_id()
        try:
            continual_trainable(config)
        finally:  # Tune ends the trial inside its last report (SystemExit): count here
            from transformers import PreTrainedModel

            live = gc.get_objects()  # generations 0-2: what the trial made, not the frozen
            models = sum(isinstance(o, PreTrainedModel) for o in live)
            weights = sum(isinstance(o, torch.nn.Parameter) for o in live)
            counts = {"models": models, "weights": weights, "frozen": gc.get_freeze_count()}
            (out_dir / f"{trial_id}.json").write_text(json.dumps({"pid": os.getpid(), **counts}))

    return trainable


@pytest.mark.slow
def test_trials_in_one_worker_free_their_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_ray: None
) -> None:
    monkeypatch.chdir(tmp_path)
    write_experiment(tmp_path / "reuse.yaml", REUSE)
    out = tmp_path / "counts"
    out.mkdir()
    counting = functools.partial(tuner.run_search, trainable=counting_trainable(out))
    monkeypatch.setattr(tuner, "run_search", counting)

    assert main(["search", "reuse.yaml"]) == 0
    counts = [json.loads(f.read_text()) for f in sorted(out.glob("*.json"))]
    assert len(counts) == 3
    assert len({c["pid"] for c in counts}) == 1, counts  # one worker ran every trial
    # the libraries were frozen (hundreds of thousands of objects) ...
    assert all(c["frozen"] > 100_000 for c in counts), counts
    # ... and no model, teacher or weight of any trial outlived it
    assert [(c["models"], c["weights"]) for c in counts] == [(0, 0)] * 3, counts
