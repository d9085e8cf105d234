"""The Ray Tune function trainable: one config dict in, one report per task out.

Uses only ``ray.tune.report / Checkpoint / get_checkpoint / get_context``: ``ray.train.*`` inside
a Tune function fails under Ray Train V2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainables.config import parse_run_config
from trainables.run import pick_device, prepare, run_stream


def continual_trainable(config: dict[str, Any]) -> None:
    """Run (or resume) the continual-learning stream described by ``config``.

    ``config`` is a plain nested dict in the shape of :class:`trainables.config.RunConfig`;
    it is validated again here with the same schema as the experiment file.
    """
    from ray import tune

    cfg = parse_run_config(config)
    prep = prepare(cfg)
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)

    def report(metrics: dict[str, Any], ckpt_dir: Path) -> None:
        import torch

        # float results depend on both: `adaptune export` pins them to reproduce the trial
        used = {"threads": torch.get_num_threads(), "cuda": int(pick_device(cfg).type == "cuda")}
        # `done` on the last task makes Tune stop the trial in the same step that records its
        # checkpoint, so the experiment snapshot never shows a finished trial as running (which
        # a resumed search would start again).
        done = {"done": True} if metrics["task_index"] == len(prep.tasks) else {}
        tune.report(
            metrics | used | done, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir))
        )

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        run_stream(prep, report=report, threads=max(1, int(cpus)))
        return
    with checkpoint.as_directory() as path:
        run_stream(prep, report=report, resume_from=Path(path), threads=max(1, int(cpus)))
