"""``adaptune search --dry-run``: the resolved search, as text, with nothing started or written."""

from __future__ import annotations

import math
from typing import Any

from adaptune.search.confirm import describe_confirm
from adaptune.search.experiment import Experiment
from adaptune.search.locations import (
    CHAMPION_ALIAS,
    optuna_storage_url,
    registered_model_name,
    search_location,
)
from adaptune.search.pbt import describe_population, is_population
from adaptune.search.select import objective_text, search_rule
from adaptune.search.stores import resolve_tracking_uri
from adaptune.search.warm import describe_warm_start, load_warm_start
from adaptune.spaces import Dist
from adaptune.spaces.paths import get_hp
from adaptune.trainables.config import HYPERPARAMETERS


def asha_rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """The tasks after which ASHA may stop a trial (its rungs below ``max_t``).

    Ray's ASHA bracket has milestones ``grace_period * reduction_factor**k`` for
    ``k < int(log(max_t / grace_period) / log(reduction_factor) + 1)``; a trial meets a
    milestone at the first task index >= it. The trial ends at ``max_t`` anyway, so a rung
    there stops nothing.
    """
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    milestones = (grace_period * reduction_factor**k for k in range(count))
    return sorted({math.ceil(m) for m in milestones if math.ceil(m) < max_t})


def _describe_spec(spec: Any) -> str:
    if isinstance(spec, Dist):
        values = spec.values()
        if spec.kind == "choice":
            return f"choice {list(values)}"
        bounds = "inclusive" if spec.kind == "int" else ""
        return f"{spec.kind} [{values[0]}, {values[1]}]{' ' + bounds if bounds else ''}"
    return repr(spec)


def describe_search(exp: Experiment, prep: Any) -> str:
    """The resolved search, as ``adaptune search --dry-run`` prints it.

    Args:
        exp: a checked experiment (:func:`search.checks.check_search` passed).
        prep: its prepared run (:func:`trainables.run.prepare`): tasks and their sizes.
    """
    s, T = exp.search, len(prep.tasks)
    searched = {n: v for n, v in exp.space.items() if isinstance(v, Dist)}
    run = exp.run.model_dump(mode="json")
    width = max(len(n) for n in HYPERPARAMETERS)
    lines = [f"adaptune search {exp.name} (dry run: nothing started, nothing written)", ""]
    lines.append(f"model:      {exp.run.model.name}")
    lines.append(f"tasks:      {T}")
    for t in prep.tasks:
        lines.append(
            f"  {t.name:<{width}}  {t.train.shape[0]} train blocks ({t.train_tokens:,} tokens), "
            f"{t.eval.shape[0]} eval blocks of {exp.run.stream.block_size} tokens"
        )
    if prep.retain:
        lines.append(f"retain:     {len(prep.retain)} (evaluated, never trained on)")
        lines += [
            f"  {r.name:<{width}}  {r.eval.shape[0]} eval blocks of "
            f"{exp.run.stream.block_size} tokens"
            for r in prep.retain
        ]
    if exp.run.stream.mode == "online":
        lines += describe_online(exp.run.stream, prep.tasks, width)
    lines.append(f"objective:  {objective_text(s)}" + (
        ": multi-objective, the Pareto front goes on the parent run" if s.multi_objective else ""
    ))
    lines.append(f"searched:   {len(searched)} hyperparameters")
    lines += [f"  {n:<{width}}  {_describe_spec(v)}" for n, v in searched.items()]
    lines.append("fixed:      (from `space` where given there, else from `run`)")
    for name in HYPERPARAMETERS:
        if name in searched:
            continue
        value = exp.space[name] if name in exp.space else get_hp(run, name)
        lines.append(f"  {name:<{width}}  {value!r}")
    lines.append(_describe_sampler(exp))
    warm = describe_warm_start(load_warm_start(exp))  # reads the earlier search, writes nothing
    if warm is not None:
        lines.append(warm)
    lines.append(_describe_scheduler(exp, T))
    lines += describe_selection(exp)
    lines += describe_confirm(exp, T)  # search.confirm: the runs after the trials
    budget = f"{s.time_budget_s:g} s" if s.time_budget_s is not None else "none"
    lines.append(
        f"trials:     {s.num_samples} ({_at_once(exp)}), time budget {budget}, "
        f"retries per failed trial {s.max_failures}"
    )
    r = exp.resources
    lines.append(f"resources:  {r.cpus_per_trial:g} CPU, {r.gpus_per_trial:g} GPU per trial")
    lines.append(f"results:    {search_location(exp)} (Ray Tune trials and checkpoints)")
    lines.append(
        f"optuna:     {optuna_storage_url(exp)} (study {exp.name!r})"
        if not is_population(exp)
        else f"optuna:     none ({s.algorithm} has no study)"
    )
    lines.append(
        f"mlflow:     {resolve_tracking_uri(exp.tracking.tracking_uri, create=False)} "
        f"(experiment {exp.tracking.experiment_name or exp.name!r}, "
        f"champion models:/{registered_model_name(exp)}@{CHAMPION_ALIAS})"
    )
    return "\n".join(lines)


def describe_online(stream: Any, tasks: list[Any], width: int = 0) -> list[str]:
    """An online stream's chunks per segment and its update policy, as the dry run prints them.

    Args:
        stream: the run's :class:`trainables.config.StreamConfig` (``mode: online``).
        tasks: the prepared tasks (the segments), with their training blocks.
        width: the column the segment names are padded to.
    """
    from adaptune.trainables.online import plan_chunks, segment_bounds

    per = stream.chunk_tokens // stream.block_size
    chunks = plan_chunks(tasks, per)
    bounds = segment_bounds(chunks, len(tasks))
    lines = [
        f"online:     {len(chunks)} chunks of {stream.chunk_tokens:,} tokens ({per} blocks), each "
        f"scored before any update on it; one report per segment (= task)"
    ]
    for k, t in enumerate(tasks, start=1):
        n, last = bounds[k] - bounds[k - 1], chunks[bounds[k] - 1].blocks
        tail = "" if last == per else f" (the last of {last} blocks)"
        lines.append(
            f"  {t.name:<{width}}  segment {k}: {n} chunks{tail}, {t.train_tokens:,} tokens"
        )
    n = len(chunks)
    if stream.update_policy == "every":
        policy = f"every: trains on every chunk ({n} updates)"
    elif stream.update_policy == "interval":
        m = stream.update_interval
        policy = (
            f"interval: trains on chunks 1, {1 + m}, {1 + 2 * m}, ... "
            f"({math.ceil(n / m)} updates)"
        )
    else:
        what = "λ" if stream.drift_detector == "page_hinkley" else "δ"
        policy = (
            f"drift: {stream.drift_detector} ({what} = {stream.drift_threshold:g}, after "
            f"{stream.drift_min_chunks} scores of the unchanged model); trains on the first "
            f"{stream.drift_update_chunks} chunks and on {stream.drift_update_chunks} from each "
            f"detection"
        )
    return [*lines, f"policy:     {policy}"]


def describe_selection(exp: Experiment) -> list[str]:
    """What stops trials in a multi-objective search, and the rule the champion is picked by."""
    s, lines = exp.search, []
    if s.multi_objective:  # (PBT takes one objective)
        lines.append(
            "pruning:    FIFO: every trial runs every task"
            if s.scheduler == "fifo"
            else f"pruning:    ASHA stops trials on {s.primary_metric} only"
        )
    how = "search.select" if s.select else "the first objective; set search.select to choose"
    lines.append(
        f"select:     {search_rule(s)} ({how}): the champion among the trials that ran every task"
    )
    return lines


def _describe_sampler(exp: Experiment) -> str:
    s = exp.search
    if is_population(exp):
        return describe_population(exp, len(exp.run.stream.tasks))[0]
    return f"sampler:    {s.algorithm} (seed {s.seed})"


def _at_once(exp: Experiment) -> str:
    # a population exists whole from the start; resources bound how much of it runs together
    if is_population(exp):
        return "as many at once as resources allow, the rest wait their turn"
    return f"{exp.search.max_concurrent} at once"


def _describe_scheduler(exp: Experiment, T: int) -> str:
    s = exp.search
    if is_population(exp):  # PBT/PB2 replace ASHA and FIFO
        return "\n".join(describe_population(exp, T)[1:])
    if s.scheduler != "asha":
        return f"scheduler:  fifo (every trial runs all {T} tasks)"
    rungs = asha_rungs(s.grace_period, s.reduction_factor, T)
    where = (
        f"rungs after task {', '.join(str(r) for r in rungs)}, each keeping the best "
        f"1/{s.reduction_factor:g} of the trials that reach it"
        if rungs
        else "no rung below the last task: every trial runs all tasks"
    )
    return (
        f"scheduler:  asha (max_t {T} tasks, grace_period {s.grace_period}, "
        f"reduction_factor {s.reduction_factor:g}): {where}"
    )
