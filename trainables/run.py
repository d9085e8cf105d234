"""One continual-learning run over a stream of tasks, top to bottom.

``prepare(cfg)`` does everything that can fail on user input (tokenizer, model, data) and
nothing else; ``run_stream(prepared, report=...)`` trains task after task and calls ``report``
once per task with the metrics and a checkpoint directory. The Ray Tune trainable and the
standalone ``adaptune train`` differ only in ``report``. What is measured after each task is in
:mod:`trainables.evaluation`; how a checkpoint is written and restored, in
:mod:`trainables.state`.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from adaptune.trainables.checkpoint import Progress, load_progress
from adaptune.trainables.components import (
    Component,
    TaskContext,
    build_components,
    component_metrics,
)
from adaptune.trainables.config import RunConfig
from adaptune.trainables.cost import CostMeter
from adaptune.trainables.data import TaskData, build_retain, build_stream, build_task
from adaptune.trainables.errors import ConfigError, TrainingDivergedError
from adaptune.trainables.evaluation import _evaluate_row, _task_metrics
from adaptune.trainables.model import (
    TINY,
    build_model,
    check_model_loadable,
    check_tokenizer,
    context_length,
    load_tokenizer,
    next_token_loss,
    pretrain_dir,
)
from adaptune.trainables.schedule import (
    carry_components,
    config_for_task,
    history_metrics,
    record_task,
    set_optimizer_values,
)
from adaptune.trainables.state import _checkpoint, _restore
from adaptune.trainables.update import (
    apply_update,
    check_update,
    load_adapters,
    merge_adapter,
)
from torch import Tensor, nn

# (metrics, checkpoint dir) -> None; called once per task.
Reporter = Callable[[dict[str, Any], Path], None]


@dataclass(frozen=True)
class Prepared:
    cfg: RunConfig
    tokenizer: Any
    tasks: list[TaskData]
    base: TaskData | None  # the pretrain domain, evaluated as an extra column
    retain: list[TaskData] = field(default_factory=list)  # eval-only domains, extra columns


def prepare(cfg: RunConfig) -> Prepared:
    """Load the tokenizer, check the model, build the stream. Fails here, before training.

    Raises:
        ConfigError: naming the field, the rule and the valid values.
    """
    config = check_model_loadable(cfg.model)  # before the tokenizer: a bad name is the model
    tokenizer = load_tokenizer(cfg.model)
    check_tokenizer(cfg.model, tokenizer, config)  # a degenerate one would train on noise
    check_update(cfg, config, tokenizer)  # freeze_layers, LoRA target modules
    limit = cfg.model.n_positions if config is None else context_length(config)
    if limit is not None and cfg.stream.block_size > limit:
        where = "run.model.n_positions" if config is None else f"the context of {cfg.model.name}"
        raise ConfigError(
            f"run.stream.block_size: must be <= {where} ({limit}) (got {cfg.stream.block_size})"
        )
    tasks = build_stream(cfg.stream, tokenizer)
    if cfg.stream.mode == "online":
        from adaptune.trainables.online import check_online  # it imports this module

        check_online(cfg, tasks)
    base = None
    if cfg.model.pretrain is not None:
        base = build_task(
            cfg.model.pretrain.domain, cfg.stream, tokenizer, "run.model.pretrain.domain"
        )
    return Prepared(cfg, tokenizer, tasks, base, build_retain(cfg.stream, tokenizer))


def pick_device(cfg: RunConfig) -> torch.device:
    if cfg.hardware.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.hardware.device: 'cuda' requested but no CUDA device is visible")
    if cfg.hardware.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.hardware.device)


def _lr_lambda(cfg: RunConfig, steps: int) -> Callable[[int], float]:
    warmup = int(cfg.optim.warmup_frac * steps)

    def factor(step: int) -> float:
        if cfg.optim.schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def pretrained_model(prep: Prepared, device: torch.device) -> nn.Module:
    """The base model after the optional pretrain stage, cached on disk and shared by trials."""
    import transformers
    from filelock import FileLock

    cfg = prep.cfg
    if cfg.model.pretrain is None or prep.base is None:
        return build_model(cfg.model, prep.tokenizer)
    out = pretrain_dir(cfg.model, cfg.stream)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "model.safetensors").exists():
            p = cfg.model.pretrain
            torch.manual_seed(0)
            model = build_model(cfg.model, prep.tokenizer).to(device).train()
            opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=0.01)
            gen = torch.Generator().manual_seed(0)
            for _ in range(p.steps):
                idx = torch.randint(0, prep.base.train.shape[0], (p.batch_size,), generator=gen)
                x = prep.base.train[idx].to(device)
                loss = next_token_loss(model(input_ids=x).logits, x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
            tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".pretrain-"))
            model.save_pretrained(tmp, safe_serialization=True)
            tmp.rename(out)
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)


def base_model(prep: Prepared, device: torch.device) -> nn.Module:
    """The model the stream starts from, before its update mode: the same weights at every
    call (a built model is initialised from the run's seed), which a LoRA checkpoint, holding
    no base weights, is rebuilt on."""
    torch.manual_seed(prep.cfg.seed)
    return pretrained_model(prep, device)


def run_stream(  # noqa: C901 - the task loop plus the online dispatch
    prep: Prepared,
    *,
    report: Reporter,
    resume_from: Path | None = None,
    stop_after: int | None = None,
    threads: int | None = None,
    trial_id: str | None = None,
) -> Progress:
    """Train through the stream, evaluating every task after each one.

    Args:
        prep: from :func:`prepare`.
        report: called after each task with the metrics and a checkpoint directory.
        resume_from: a checkpoint directory written by an earlier call.
        stop_after: stop once this many tasks are done (for tests and partial runs).
        threads: torch CPU threads (``hardware.threads`` wins when set).
        trial_id: the Ray Tune trial running this, for the history (``lineage``).

    Returns:
        The final progress: loss matrix, token counts, the per-task history.

    Raises:
        TrainingDivergedError: a NaN or infinite loss, with the task and step.
    """
    if prep.cfg.stream.mode == "online":  # docs/online.md
        from adaptune.trainables.online import run_online

        return run_online(prep, report=report, resume_from=resume_from,
                          stop_after=stop_after, threads=threads, trial_id=trial_id)
    cfg, tasks = prep.cfg, prep.tasks
    torch.set_num_threads(cfg.hardware.threads or threads or os.cpu_count() or 1)
    device = pick_device(cfg)
    cost = CostMeter(device)  # peak memory from here on
    autocast = _autocast(cfg, device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)  # batch order and every component's draws
    model, progress = _start(prep, device, resume_from)
    now = config_for_task(cfg, min(progress.tasks_done + 1, len(tasks)))  # the next task's
    comps = build_components(now.components)  # the active ones, in registry order
    params, opt = _optimizer(now, model)
    if resume_from is not None:
        _restore(resume_from, now, comps, opt, gen)
    else:
        _evaluate_row(prep, model, device, progress)  # row 0: before any training

    last = len(tasks) if stop_after is None else min(len(tasks), stop_after)
    for k in range(progress.tasks_done + 1, last + 1):  # k: 1-based task index
        task = tasks[k - 1]
        before, now = now, config_for_task(cfg, k)  # the schedule's values for this task
        set_optimizer_values(opt, now)
        comps = carry_components(comps, before, now)
        ctx = _task_context(prep, model, gen, device, k, now)  # what every component hook sees
        t0 = time.perf_counter()
        tokens, steps, loss_sum = train_blocks(
            now, model, params, opt, comps, ctx, autocast, f"task {k} ({task.name!r})"
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        model, params, opt, ctx = _task_boundary(prep, model, params, opt, ctx)
        for comp in comps.values():
            comp.after_task(ctx)
        t2 = time.perf_counter()
        _evaluate_row(prep, model, device, progress)
        t3 = time.perf_counter()
        progress.tasks_done = k
        progress.trained_tokens += tokens
        record_task(progress, now, k, trial_id)

        metrics = _task_metrics(prep, progress, k) | history_metrics(progress, now, trial_id) | {
            "train_loss": loss_sum / steps,
            "train_tokens": progress.trained_tokens,
            "train_tokens_per_s": tokens / (t1 - t0),
            "train_time_s": t1 - t0,
            "after_task_time_s": t2 - t1,
            "eval_time_s": t3 - t2,
            "steps": steps,
        } | cost.measure(model) | component_metrics(comps)
        with tempfile.TemporaryDirectory(prefix="adaptune-ckpt-") as tmp:
            report(metrics, _checkpoint(Path(tmp), prep, model, opt, comps, gen, progress))
    return progress


def train_blocks(
    cfg: RunConfig,
    model: nn.Module,
    params: list[nn.Parameter],
    opt: torch.optim.Optimizer,
    comps: dict[str, Component],
    ctx: TaskContext,
    autocast: AbstractContextManager[Any],
    where: str,
) -> tuple[int, int, float]:
    """Train on ``ctx.train_blocks`` (a task, or an online update's chunk): the components'
    ``before_task``, then ``epochs`` passes in a drawn order with a fresh per-task learning-rate
    schedule, each step with the components' rows and penalties. ``after_task`` is the caller's.

    Args:
        where: what is being trained (``task 2 ('code')``), for the divergence error.

    Returns:
        The tokens trained (the components' rows included), the steps, and the sum of the
        steps' cross-entropies.

    Raises:
        TrainingDivergedError: a NaN or infinite loss, with ``where`` and the step.
    """
    for comp in comps.values():
        comp.before_task(ctx)
    n_cur = cfg.optim.batch_size - sum(comp.rows(ctx) for comp in comps.values())
    blocks = ctx.train_blocks
    steps, order = _batch_order(cfg, blocks.shape[0], n_cur, ctx.generator)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, steps))
    tokens, loss_sum = 0, 0.0
    for step in range(steps):
        batch = blocks[order[step * n_cur : (step + 1) * n_cur]]
        n, ce = _train_step(cfg, model, params, opt, comps, ctx, batch, autocast,
                            f"{where}, step {step + 1}/{steps}")
        sched.step()
        tokens += n
        loss_sum += ce
    return tokens, steps, loss_sum


def _train_step(
    cfg: RunConfig,
    model: nn.Module,
    params: list[nn.Parameter],
    opt: torch.optim.Optimizer,
    comps: dict[str, Component],
    ctx: TaskContext,
    batch: Tensor,
    autocast: AbstractContextManager[Any],
    where: str,
) -> tuple[int, float]:
    """One optimizer step (the scheduler is the caller's) on ``batch``, the current rows on the
    CPU, with every component's rows and penalty; returns the tokens and the cross-entropy."""
    for comp in comps.values():
        batch = comp.compose(batch, ctx)
    batch = batch.to(ctx.device, non_blocking=True)  # (B, T)
    with autocast:
        logits = model(input_ids=batch).logits  # (B, T, V)
        ce = next_token_loss(logits, batch)
        terms = [comp.penalty(ctx, batch, logits) for comp in comps.values()]
        loss = sum((t for t in terms if t is not None), ce)  # ce + t1 + t2 + ...
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainingDivergedError(f"non-finite loss {value} at {where}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
    opt.step()
    for comp in comps.values():
        comp.after_step(ctx, opt)
    return batch.numel(), float(ce.detach())


def _task_context(
    prep: Prepared,
    model: nn.Module,
    gen: torch.Generator,
    device: torch.device,
    k: int,
    cfg: RunConfig | None = None,
) -> TaskContext:
    """What the hooks of task ``k`` see; ``cfg``: the task's config (the run's by default)."""
    cfg = prep.cfg if cfg is None else cfg
    return TaskContext(
        model=model,
        train_blocks=prep.tasks[k - 1].train,
        generator=gen,
        device=device,
        k=k,
        n_tasks=len(prep.tasks),
        batch_size=cfg.optim.batch_size,
        pretrained=cfg.model.name != TINY or cfg.model.pretrain is not None,
        tokenizer=prep.tokenizer,
    )


def _autocast(cfg: RunConfig, device: torch.device) -> AbstractContextManager[Any]:
    if cfg.hardware.bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _start(
    prep: Prepared, device: torch.device, resume_from: Path | None
) -> tuple[nn.Module, Progress]:
    """The model to train (in training mode, on ``device``, in the run's update mode) and the
    progress so far."""
    cfg = prep.cfg
    if resume_from is None:
        progress = Progress(config=cfg.model_dump(mode="json"))
        model = apply_update(base_model(prep, device), cfg.update)
    elif not (resume_from / "model").is_dir():  # LoRA: adapters only, on the same base
        progress = load_progress(resume_from)
        model = load_adapters(base_model(prep, device).to(device), resume_from)
    else:
        import transformers

        progress = load_progress(resume_from)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            resume_from / "model", dtype=getattr(torch, cfg.model.dtype)
        )
        model = apply_update(model, cfg.update)
    return model.to(device).train(), progress


def _optimizer(
    cfg: RunConfig, model: nn.Module
) -> tuple[list[nn.Parameter], torch.optim.Optimizer]:
    """AdamW over the trainable parameters, in the model's order (a checkpoint's optimizer
    state maps onto them by position)."""
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one pass over each tensor instead of one per arithmetic step (CPU and CUDA)
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return params, torch.optim.AdamW(
        params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=fused
    )


def _task_boundary(
    prep: Prepared,
    model: nn.Module,
    params: list[nn.Parameter],
    opt: torch.optim.Optimizer,
    ctx: TaskContext,
) -> tuple[nn.Module, list[nn.Parameter], torch.optim.Optimizer, TaskContext]:
    """After training task ``ctx.k``, before the components' ``after_task``: with
    ``lora_merge_each_task`` (and a task still to come) the adapter is merged and a fresh one,
    with a fresh optimizer, trains next; EWC's Fisher is then taken over the fresh adapter.
    Otherwise everything is returned as it is."""
    u = prep.cfg.update
    if u.mode != "lora" or not u.lora_merge_each_task or ctx.k == ctx.n_tasks:
        return model, params, opt, ctx
    model = merge_adapter(model)
    params, opt = _optimizer(prep.cfg, model)
    return model, params, opt, replace(ctx, model=model)


def _batch_order(
    cfg: RunConfig, n_train: int, n_cur: int, gen: torch.Generator
) -> tuple[int, Tensor]:
    """Steps of one task and the order its blocks are drawn in, ``n_cur`` per step: whole
    permutations, as many as the steps need (more than one when ``epochs`` > 1)."""
    steps = max(1, math.ceil(cfg.optim.epochs * n_train / n_cur))
    perms = math.ceil(steps * n_cur / n_train)
    return steps, torch.cat([torch.randperm(n_train, generator=gen) for _ in range(perms)])
