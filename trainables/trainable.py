"""The Ray Tune function trainable: one config dict in, one report per task out.

Uses only ``ray.tune.report / Checkpoint / get_checkpoint / get_context``: ``ray.train.*`` inside
a Tune function fails under Ray Train V2.

Each trial starts with ``gc.freeze()``: what the worker holds by then (Ray, torch,
transformers and their modules, about half a million objects) moves to the collector's permanent
generation, so the collection when the trial ends walks only the trial's own objects (0.18 s a
trial before, on the quickstart). Frozen objects are still freed by reference counting; only
cycles among them would outlive the process, and at a trial's start the previous trial's cycles
have been collected.

Each report also carries the settings the trial ran with, ``threads`` (torch CPU threads) and
``cuda`` (1 on a CUDA device, else 0), and ``node_id``, the Ray node it ran on: numbers or not,
none is a measurement, so MLflow gets them as the child run's tags ``adaptune.threads``,
``adaptune.cuda`` and ``adaptune.node_id`` (``search.tracking``), not as metrics.

When the trial ends, however it ends, its GPU memory is handed back (``torch.cuda.empty_cache``),
so the next trial on that GPU finds it free even in a worker process that lives on (Tune's
``reuse_actors``).
"""

from __future__ import annotations

import gc
import traceback
from pathlib import Path
from typing import Any

from adaptune.trainables.config import parse_run_config
from adaptune.trainables.run import pick_device, prepare, run_stream


def continual_trainable(config: dict[str, Any]) -> None:
    """Run (or resume) the continual-learning stream described by ``config``.

    ``config`` is a plain nested dict in the shape of :class:`trainables.config.RunConfig`;
    it is validated again here with the same schema as the experiment file.
    """
    import logging

    import ray
    from ray import tune

    # One "Checkpoint successfully created" INFO line per task and trial drowns the progress
    # table on the driver; checkpoint errors are still logged at WARNING and above.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    gc.freeze()
    cfg = parse_run_config(config)
    node_id = ray.get_runtime_context().get_node_id()
    resources = tune.get_context().get_trial_resources().required_resources
    if cfg.hardware.device == "auto" and not resources.get("GPU", 0):
        # a trial that reserved no GPU must not use one: Ray (since ray-project/ray#54868) no
        # longer hides the GPUs from zero-GPU workers, so "auto" would take one given to others
        hardware = cfg.hardware.model_copy(update={"device": "cpu"})
        cfg = cfg.model_copy(update={"hardware": hardware})
    prep = prepare(cfg)
    cpus = resources.get("CPU", 1)

    def report(metrics: dict[str, Any], ckpt_dir: Path) -> None:
        import torch

        # settings, tags in MLflow; float results depend on threads and device, so `adaptune
        # export` pins them to reproduce the trial
        used = {"threads": torch.get_num_threads(), "cuda": int(pick_device(cfg).type == "cuda")}
        used["node_id"] = node_id
        # `done` on the last task makes Tune stop the trial in the same step that records its
        # checkpoint, so the experiment snapshot never shows a finished trial as running (which
        # a resumed search would start again).
        done = {"done": True} if metrics["task_index"] == len(prep.tasks) else {}
        tune.report(
            metrics | used | done, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir))
        )

    checkpoint = tune.get_checkpoint()
    # a PBT exploit hands this trial another trial's checkpoint: the history records who
    # trained which task (the `lineage` each report carries)
    trial_id, threads = tune.get_context().get_trial_id(), max(1, int(cpus))
    try:
        if checkpoint is None:
            run_stream(prep, report=report, threads=threads, trial_id=trial_id)
            return
        with checkpoint.as_directory() as path:
            run_stream(prep, report=report, resume_from=Path(path), threads=threads,
                       trial_id=trial_id)
    except BaseException as err:  # its traceback's frames would keep the model alive
        traceback.clear_frames(err.__traceback__)
        raise
    finally:
        release_accelerator_memory()


def release_accelerator_memory() -> None:
    """Free what the finished run left: its model, optimizer, teacher and Fisher tensors become
    garbage when ``run_stream`` returns; collect them (reference cycles included) and give
    PyTorch's cached CUDA blocks back to the device so the next trial on this GPU can use them."""
    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()

