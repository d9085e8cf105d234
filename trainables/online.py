"""Online stream mode: text keeps arriving, and the model is scored on each chunk of it before
it may learn from it (prequential, test-then-train; Dawid 1984).

The stream is the tasks' training blocks in order: task k is segment k, and the boundaries
between segments are the stream's known shift points. Each segment is cut into chunks of
``chunk_tokens`` (whole blocks; a segment's last chunk holds what is left, so no chunk
straddles a shift point). For each chunk, in order:

1. score: its mean next-token loss under the current model, in eval mode without gradients;
   nothing has trained on the chunk yet;
2. decide: the update policy says whether to train on it (:class:`Policy`);
3. update: ``epochs`` passes over the chunk's blocks at ``batch_size``, the components' rows
   and penalties included, exactly as a task trains in tasks mode.

After a segment's last chunk every task's held-out blocks are evaluated (row k of the loss
matrix) and the run reports once, with a checkpoint: one report per segment, as tasks mode
reports once per task, so ASHA's rungs and MLflow's steps stay segments.

Components see one update as one task: their hooks run once per update with
``ctx.train_blocks`` = the chunk's blocks, ``ctx.k`` = the chunk's 1-based place in the whole
stream and ``ctx.n_tasks`` = the stream's number of chunks, so ``k > 1`` means the model has
trained before (every policy trains on the first chunk) and ``k == n_tasks`` means nothing
trains after this update.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from adaptune.trainables.checkpoint import Progress
from adaptune.trainables.components import (
    Component,
    TaskContext,
    build_components,
    component_metrics,
)
from adaptune.trainables.config import RunConfig, StreamConfig
from adaptune.trainables.cost import CostMeter
from adaptune.trainables.data import TaskData
from adaptune.trainables.drift import DriftDetector, check_river
from adaptune.trainables.errors import ConfigError
from adaptune.trainables.evaluation import _evaluate_row, _task_metrics, evaluate
from adaptune.trainables.metrics import drift_metrics, prequential_metrics
from adaptune.trainables.run import (
    Prepared,
    Reporter,
    _autocast,
    _optimizer,
    _start,
    _task_context,
    pick_device,
    train_blocks,
)
from adaptune.trainables.schedule import history_metrics, record_task
from adaptune.trainables.state import _checkpoint, _restore
from torch import nn

STATE_FILE = "online.json"  # in each checkpoint: the scores, updates and detector so far
# A detection up to this many chunks after a known shift point is that shift's; any other is a
# false alarm. A fresh detector needs drift_min_chunks scores first, so keep it well below.
DETECTION_WINDOW_CHUNKS = 8


@dataclass(frozen=True)
class Chunk:
    segment: int  # 1-based task index
    start: int  # first block, in the task's training blocks
    stop: int  # one past the last block

    @property
    def blocks(self) -> int:
        return self.stop - self.start


def plan_chunks(tasks: list[TaskData], chunk_blocks: int) -> list[Chunk]:
    """The stream's chunks, in order: each task's training blocks cut ``chunk_blocks`` at a
    time, the last chunk of a task holding what is left."""
    return [
        Chunk(k, i, min(i + chunk_blocks, t.train.shape[0]))
        for k, t in enumerate(tasks, start=1)
        for i in range(0, t.train.shape[0], chunk_blocks)
    ]


def segment_bounds(chunks: list[Chunk], n_segments: int) -> list[int]:
    """``b`` with segment k's chunks at indices ``b[k-1] .. b[k]-1`` (0-based); ``b[0] = 0``."""
    return [sum(1 for c in chunks if c.segment <= k) for k in range(n_segments + 1)]


def check_online(cfg: RunConfig, tasks: list[TaskData]) -> None:
    """What online mode refuses once the stream is built (the schema checks the rest).

    Raises:
        ConfigError: one line naming the field, the rule and the valid values.
    """
    s = cfg.stream
    total = sum(t.train_tokens for t in tasks)
    if s.chunk_tokens > total:
        raise ConfigError(
            f"run.stream.chunk_tokens: must be <= the stream's training tokens ({total}, every "
            f"task's together) (got {s.chunk_tokens})"
        )
    if cfg.update.mode == "lora" and cfg.update.lora_merge_each_task:
        raise ConfigError(
            "run.update.lora_merge_each_task: merges an adapter at each task boundary, which "
            "online mode's updates do not have; must be false with run.stream.mode `online`"
        )
    if s.update_policy == "drift":
        check_river()


@dataclass
class OnlineState:
    """What the loop knows of the stream so far; a checkpoint holds it as ``online.json``."""

    chunk_nll: list[float] = field(default_factory=list)  # each chunk's score, in order
    updates: list[int] = field(default_factory=list)  # 0-based chunks trained on
    detections: list[int] = field(default_factory=list)  # 0-based chunks that set off drift
    update_seconds: float = 0.0  # wall seconds of every update so far
    burst_left: int = 0  # drift: chunks still to train on from the last detection (or start)
    detector: list[float] = field(default_factory=list)  # drift: the detector's history

    def save(self, path: Path) -> None:
        (path / STATE_FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> OnlineState:
        return cls(**json.loads((path / STATE_FILE).read_text()))


class Policy:
    """Which chunks the model trains on (``stream.update_policy``).

    - ``every``: every chunk.
    - ``interval``: chunks 1, 1 + n, 1 + 2n, ... (n = ``update_interval``).
    - ``drift``: the first ``drift_update_chunks`` chunks (the start of the stream is a shift:
      the model has seen none of it), then, whenever the detector fires on a chunk's score,
      that chunk and the ``drift_update_chunks - 1`` after it. The detector is fed only while
      no update runs and starts afresh when a burst of updates ends (:mod:`trainables.drift`).
    """

    def __init__(self, stream: StreamConfig, state: OnlineState) -> None:
        self.stream, self.state = stream, state
        self.detector = None
        if stream.update_policy == "drift":
            self.detector = DriftDetector(
                stream.drift_detector,
                threshold=stream.drift_threshold,
                min_chunks=stream.drift_min_chunks,
                history=state.detector,
            )

    def decide(self, i: int, nll: float) -> bool:
        """Whether to train on chunk ``i`` (0-based), whose score was ``nll``."""
        s, st = self.stream, self.state
        if s.update_policy == "every":
            return True
        if s.update_policy == "interval":
            return i % s.update_interval == 0
        assert self.detector is not None
        if st.burst_left == 0 and self.detector.update(nll):
            st.detections.append(i)
            st.burst_left = s.drift_update_chunks
        st.detector = self.detector.history
        if st.burst_left == 0:
            return False
        st.burst_left -= 1
        if st.burst_left == 0:  # the model changes on this chunk for the last time for now
            self.detector.reset()
            st.detector = self.detector.history
        return True


def run_online(
    prep: Prepared,
    *,
    report: Reporter,
    resume_from: Path | None = None,
    stop_after: int | None = None,
    threads: int | None = None,
    trial_id: str | None = None,
) -> Progress:
    """Score, decide and train chunk after chunk; report once per segment.

    Args and returns as :func:`trainables.run.run_stream`, which calls this in online mode;
    ``stop_after`` counts segments.

    Raises:
        TrainingDivergedError: a NaN or infinite loss, with the chunk and step.
    """
    cfg, tasks = prep.cfg, prep.tasks
    if resume_from is not None and not (resume_from / STATE_FILE).is_file():
        raise ConfigError(
            f"run.stream.mode: the checkpoint {resume_from} was written in tasks mode (it has no "
            f"{STATE_FILE}); resume it with mode `tasks`"
        )
    torch.set_num_threads(cfg.hardware.threads or threads or os.cpu_count() or 1)
    device = pick_device(cfg)
    cost = CostMeter(device)
    autocast = _autocast(cfg, device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    comps = build_components(cfg.components)
    model, progress = _start(prep, device, resume_from)
    params, opt = _optimizer(cfg, model)
    chunks = plan_chunks(tasks, cfg.stream.chunk_tokens // cfg.stream.block_size)
    bounds = segment_bounds(chunks, len(tasks))
    if resume_from is not None:
        _restore(resume_from, cfg, comps, opt, gen)  # cfg's lr wins over the checkpoint's
        state = OnlineState.load(resume_from)
    else:
        _evaluate_row(prep, model, device, progress)  # row 0: before any training
        drift = cfg.stream.update_policy == "drift"
        state = OnlineState(burst_left=cfg.stream.drift_update_chunks if drift else 0)
    policy = Policy(cfg.stream, state)

    last = len(tasks) if stop_after is None else min(len(tasks), stop_after)
    for k in range(progress.tasks_done + 1, last + 1):
        tokens, steps, loss_sum, train_s, score_s = 0, 0, 0.0, 0.0, 0.0
        for i in range(bounds[k - 1], bounds[k]):
            c = chunks[i]
            blocks = tasks[k - 1].train[c.start : c.stop]  # (n, T), on the CPU
            t0 = time.perf_counter()
            nll = evaluate(model, blocks, cfg.eval_batch_size, device)  # before any update on it
            score_s += time.perf_counter() - t0
            state.chunk_nll.append(nll)
            if not policy.decide(i, nll):
                continue
            t0 = time.perf_counter()
            ctx = replace(
                _task_context(prep, model, gen, device, k),
                train_blocks=blocks, k=i + 1, n_tasks=len(chunks),
            )
            n_tok, n_steps, ce_sum = _update(cfg, model, params, opt, comps, ctx, autocast)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            state.updates.append(i)
            state.update_seconds += seconds
            tokens, steps, loss_sum, train_s = (
                tokens + n_tok, steps + n_steps, loss_sum + ce_sum, train_s + seconds
            )
        t0 = time.perf_counter()
        _evaluate_row(prep, model, device, progress)
        eval_s = time.perf_counter() - t0
        progress.tasks_done = k
        progress.trained_tokens += tokens
        record_task(progress, cfg, k, trial_id)

        metrics = (
            _task_metrics(prep, progress, k)
            | history_metrics(progress, cfg, trial_id)
            | _online_metrics(cfg, state, chunks, bounds, k)
            | {
                "train_tokens": progress.trained_tokens,
                "train_tokens_per_s": tokens / train_s if train_s else 0.0,
                "train_time_s": train_s,
                "score_time_s": score_s,
                "eval_time_s": eval_s,
                "steps": steps,
            }
            | ({"train_loss": loss_sum / steps} if steps else {})
            | cost.measure(model)
            | component_metrics(comps)
        )
        with tempfile.TemporaryDirectory(prefix="adaptune-ckpt-") as tmp:
            path = _checkpoint(Path(tmp), prep, model, opt, comps, gen, progress)
            state.save(path)
            report(metrics, path)
    return progress


def _update(
    cfg: RunConfig,
    model: nn.Module,
    params: list[nn.Parameter],
    opt: torch.optim.Optimizer,
    comps: dict[str, Component],
    ctx: TaskContext,
    autocast: AbstractContextManager[Any],
) -> tuple[int, int, float]:
    """Train on one chunk (``ctx.train_blocks``) with every component's hooks; returns the
    tokens trained (replayed rows included), the steps and the sum of their cross-entropies."""
    tokens, steps, loss_sum = train_blocks(
        cfg, model, params, opt, comps, ctx, autocast, f"chunk {ctx.k}/{ctx.n_tasks}"
    )
    for comp in comps.values():
        comp.after_task(ctx)
    return tokens, steps, loss_sum


def _online_metrics(
    cfg: RunConfig, state: OnlineState, chunks: list[Chunk], bounds: list[int], k: int
) -> dict[str, Any]:
    """The online part of segment ``k``'s report: the prequential loss, the updates, the
    detector against the known shift points, and the per-chunk series (lists, as the loss
    matrix is passed) that the trackers log as ``chunk_nll`` and draw as ``prequential.png``."""
    T = cfg.stream.block_size
    sizes = [c.blocks for c in chunks]
    ends = [0]  # token position after each chunk
    for n in sizes:
        ends.append(ends[-1] + n * T)
    seen = len(state.chunk_nll)
    metrics: dict[str, Any] = prequential_metrics(state.chunk_nll, sizes)
    n = len(state.updates)
    metrics |= {
        "chunks": seen,
        "updates": n,
        "update_seconds": state.update_seconds / n if n else 0.0,
    }
    if cfg.stream.update_policy == "drift":
        shifts = [ends[b] for b in bounds[1:k]]  # where segments 2..k begin
        detected = [ends[i + 1] for i in state.detections]
        window = DETECTION_WINDOW_CHUNKS * cfg.stream.chunk_tokens
        metrics |= drift_metrics(detected, shifts, ends[seen], window=window)
    metrics |= {
        "chunk_nll": list(state.chunk_nll),
        "chunk_boundaries": list(bounds),
        "chunk_updates": list(state.updates),
        "chunk_detections": list(state.detections),
    }
    return metrics
