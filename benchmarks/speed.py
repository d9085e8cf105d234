"""The trainable's speed against a bare PyTorch loop, component costs and the CPU's own limit.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speed.py [--model tiny|gpt2-small] [--rounds 6]
        [--pair-only | --shares-only]

Pairing. The bare loop (plain PyTorch: AdamW, cross-entropy, clipping, nothing else) and every
trainable variant (naive, replay, EWC, distillation) start from the same initial weights (same
seed, same model builder), train on the same blocks in the same order with the same batch, block
size and threads, take task 1 untimed as warm-up (AdamW's state, the allocator) and are timed on
task 2 between the same clock boundaries: from just before its first step to just after its
last. The trainable's figure is the ``train_tokens_per_s`` it reports for task 2; the bare loop
is timed the same way here.

The runs are interleaved in ABBA order (bare, naive, replay, EWC, distillation; then the same
reversed; ...), so a drift of the machine hits every variant alike and the bare loop and the
naive trainable always run back to back. Each ratio is the median over rounds of the ratio
paired within one round (both runs saw the same machine), which stays usable on a busy machine;
best rounds are printed beside it. Fisher estimation's and evaluation's shares are measured on
the quickstart experiment itself (``experiments/quickstart.yaml``: its task size, eval blocks
and one thread per trial) with EWC switched on, median of ``SHARE_RUNS`` runs, and written with
every run's figures and the load average before and after it to
``benchmarks/results/speed-shares.json`` (``--shares-only`` measures just these). Prints markdown
tables,
writes the per-round figures to ``benchmarks/results/speed-<model>[-pair].json`` and ends with the
line ``naive/bare tokens-per-second ratio: X.XX`` (the paired median). ``--pair-only`` times
just the bare loop and the naive trainable (no component variants, no quickstart shares): the
headline ratio in a fraction of the time, or with more rounds in the same time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from adaptune.search.experiment import load_experiment
from adaptune.trainables.config import RunConfig, parse_run_config
from adaptune.trainables.model import build_model
from adaptune.trainables.run import prepare, run_stream

SHAPES = {
    # the quickstart model
    "tiny": {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 128},
    # GPT-2 small's shape (124M parameters with its 50k vocabulary; here the byte vocabulary)
    "gpt2-small": {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024},
}
VARIANTS: dict[str, dict[str, Any]] = {
    "naive": {},
    "replay 25 %": {"replay": {"buffer_size": 512, "replay_fraction": 0.25}},
    "EWC": {"ewc": {"ewc_lambda": 100.0}},
    "distillation": {"distill": {"distill_alpha": 1.0}},
}
TARGETS = {"naive": "-", "replay 25 %": "<= 1.05x", "EWC": "<= 1.15x", "distillation": "<= 1.45x"}
# 1-based: task 1 is the warm-up, task 2 (where every component is active) is timed.
TIMED_TASK = 2
QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
RESULTS = Path(__file__).resolve().parent / "results"
SHARE_RUNS = 3  # quickstart runs behind the Fisher and evaluation shares (their median)


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-round ratios ``num[i] / den[i]`` of two series measured in the same rounds.

    Raises:
        ValueError: the series are empty or of different lengths.
    """
    if not num or len(num) != len(den):
        raise ValueError(
            f"paired series must be non-empty and of equal length, got {len(num)} and {len(den)}"
        )
    return [n / d for n, d in zip(num, den, strict=True)]


def paired_median(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of the per-round ratios: each ratio compares two runs that saw the same machine,
    so load that slows a whole round cancels, unlike a ratio of separately chosen rounds."""
    return statistics.median(paired_ratios(num, den))


def round_order(names: Sequence[str], index: int) -> list[str]:
    """ABBA order: ``names`` in even rounds, reversed in odd ones, so over two rounds every
    name sits at the same mean position and neighbours stay neighbours."""
    return list(names) if index % 2 == 0 else list(reversed(names))


def run_config(
    shape: dict[str, int], tokens: int, block: int, batch: int, threads: int, **components: Any
) -> RunConfig:
    return parse_run_config(
        {
            "seed": 0,
            "model": {"name": "tiny-gpt", **shape},
            "stream": {
                "block_size": block,
                "max_train_tokens": tokens,
                "max_eval_blocks": 16,
                "tasks": [
                    {"name": "docs", "builtin": "python_docs"},
                    {"name": "code", "builtin": "python_source"},
                ],
            },
            "optim": {"lr": 1e-3, "batch_size": batch, "schedule": "cosine"},
            "components": components,
            "hardware": {"threads": threads, "device": "cpu"},
        }
    )


def trainable_run(cfg: RunConfig, threads: int) -> dict[str, Any]:
    """The trainable through task 2; returns task 2's report (its ``train_tokens_per_s``)."""
    reports: list[dict[str, Any]] = []
    run_stream(
        prepare(cfg),
        report=lambda m, _c: reports.append(m),
        stop_after=TIMED_TASK,
        threads=threads,
    )
    return reports[TIMED_TASK - 1]


def bare_run(cfg: RunConfig, threads: int) -> dict[str, float]:
    """The same model, data, order and warm-up trained by the plainest PyTorch loop.

    Returns:
        Task 2's training tokens/s and step count, timed like the trainable's.
    """
    prep = prepare(cfg)  # the trainable's tokenizer and blocks
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)  # the trainable seeds the same way before building its model
    model = build_model(cfg.model, prep.tokenizer).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    b = cfg.optim.batch_size
    result: dict[str, float] = {}
    for task in prep.tasks[:TIMED_TASK]:
        blocks = task.train  # (N, T)
        n = blocks.shape[0]
        steps = max(1, math.ceil(cfg.optim.epochs * n / b))
        # Full batches in a shuffled order, drawn before the clock starts, as the trainable does.
        order = torch.cat(
            [torch.randperm(n, generator=gen) for _ in range(math.ceil(steps * b / n))]
        )
        start = time.perf_counter()
        for step in range(steps):
            x = blocks[order[step * b : (step + 1) * b]]  # (B, T)
            logits = model(input_ids=x).logits  # (B, T, V)
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            opt.step()
        elapsed = time.perf_counter() - start
        result = {"train_tokens_per_s": steps * b * blocks.shape[1] / elapsed, "steps": steps}
    return result


def matmul_flops(threads: int, n: int = 2048, reps: int = 5) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def quickstart_shares(ewc_lambda: float) -> dict[str, float]:
    """Fisher estimation / task training time and evaluation / run wall time on the quickstart's
    own run (its task size, eval blocks and its trials' one thread), EWC on."""
    exp = load_experiment(QUICKSTART, [f"run.components.ewc.ewc_lambda={ewc_lambda}"])
    threads = max(1, int(exp.resources.cpus_per_trial))
    reports: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    start = time.perf_counter()
    run_stream(prepare(exp.run), report=lambda m, _c: reports.append(m), threads=threads)
    wall = time.perf_counter() - start
    fisher = [r["after_task_time_s"] / r["train_time_s"] for r in reports[:-1]]
    return {
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        # after every task but the last; the first includes the process's one-off set-up
        "fisher_share": max(fisher),
        "fisher_shares": fisher,
        "fisher_s": max(r["after_task_time_s"] for r in reports[:-1]),
        "task_train_s": statistics.median(r["train_time_s"] for r in reports),
        "eval_share": sum(r["eval_time_s"] for r in reports) / wall,
        "wall_s": wall,
        "threads": threads,
        "tasks": len(reports),
    }


def shares(runs: int = SHARE_RUNS) -> dict[str, Any]:
    """The Fisher's and evaluation's shares: ``runs`` quickstart runs, their medians, written
    with every run to ``results/speed-shares.json``."""
    each = []
    for i in range(runs):
        each.append(quickstart_shares(ewc_lambda=100.0))
        print(f"shares run {i + 1}/{runs}: {each[-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    keys = [k for k in each[0] if k not in ("fisher_shares", "loadavg_before", "loadavg_after")]
    q: dict[str, Any] = {k: statistics.median(r[k] for r in each) for k in keys}
    q["fisher_shares"] = [
        statistics.median(r["fisher_shares"][i] for r in each)
        for i in range(len(each[0]["fisher_shares"]))
    ]
    out = RESULTS / "speed-shares.json"
    out.write_text(json.dumps({"median": q, "runs": each, "ewc_lambda": 100.0}, indent=1) + "\n")
    print(
        f"| EWC's after-task work (the Fisher) / task training time (quickstart, EWC, "
        f"{q['threads']:g} "
        f"thread, median of {runs} runs) "
        f"| {q['fisher_share']:.1%} worst task ({q['fisher_s']:.2f} s of "
        f"{q['task_train_s']:.1f} s); per task: "
        f"{', '.join(f'{x:.1%}' for x in q['fisher_shares'])} "
        "| <= 10 % |"
    )
    print(
        f"| evaluation of all tasks / trial wall time (quickstart, {q['tasks']:g} tasks) "
        f"| {q['eval_share']:.1%} of {q['wall_s']:.1f} s | <= 15 % |"
    )
    print(f"\nper-run figures: {out.relative_to(RESULTS.parents[1])}")
    return q


def measure(
    cfgs: dict[str, RunConfig], rounds: int, threads: int
) -> tuple[dict[str, list[float]], list[float], list[list[str]]]:
    """Every variant once per round, in ABBA order; tokens/s on task 2, matmul FLOP/s, orders."""
    names = ["bare", *cfgs]
    tps: dict[str, list[float]] = {k: [] for k in names}
    flops: list[float] = []
    orders: list[list[str]] = []
    for r in range(rounds):
        order = round_order(names, r)
        orders.append(order)
        steps: dict[str, float] = {}
        for name in order:
            if name == "bare":
                out = bare_run(cfgs["naive"], threads)
            else:
                out = trainable_run(cfgs[name], threads)
            tps[name].append(out["train_tokens_per_s"])
            steps[name] = out["steps"]
        if steps["bare"] != steps["naive"]:
            raise RuntimeError(f"bare and naive took different step counts: {steps}")
        flops.append(matmul_flops(threads))
        print(
            f"round {r + 1}/{rounds}: "
            + ", ".join(f"{k} {tps[k][-1]:,.0f}" for k in order)
            + f" tok/s; naive/bare {tps['naive'][-1] / tps['bare'][-1]:.2f}",
            file=sys.stderr,
            flush=True,
        )
    return tps, flops, orders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=list(SHAPES), default="tiny")
    parser.add_argument("--rounds", type=int, default=None, help="default: 6 tiny, 2 gpt2-small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=None, help="train tokens per task")
    parser.add_argument(
        "--pair-only", action="store_true", help="only the bare loop and the naive trainable"
    )
    parser.add_argument(
        "--shares-only",
        action="store_true",
        help="only the Fisher's and evaluation's shares of the quickstart run",
    )
    args = parser.parse_args()
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be >= 1 (got {args.rounds})")
    if args.shares_only:
        print("| figure | value | target |\n|---|---|---|")
        shares()
        return
    shape = SHAPES[args.model]
    tiny = args.model == "tiny"
    block, batch = (128, 16) if tiny else (128, 8)
    tokens = args.tokens or (65536 if tiny else 4096)
    rounds = args.rounds or (6 if tiny else 2)
    variants = ["naive"] if args.pair_only else list(VARIANTS)
    cfgs = {
        k: run_config(shape, tokens, block, batch, args.threads, **VARIANTS[k]) for k in variants
    }
    start = time.perf_counter()
    tps, flops, orders = measure(cfgs, rounds, args.threads)

    best = {k: max(v) for k, v in tps.items()}
    median = {k: statistics.median(v) for k, v in tps.items()}

    def cost(name: str) -> str:
        r = paired_ratios(tps["naive"], tps[name])
        return (
            f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f}) | "
            f"{best['naive'] / best[name]:.2f}x"
        )

    naive = cfgs["naive"]
    params = sum(p.numel() for p in build_model(naive.model, prepare(naive).tokenizer).parameters())
    print(
        f"\n## {args.model}: {params / 1e6:.2f}M parameters, {args.threads} threads, "
        f"block {block}, batch {batch}, {tokens} train tokens per task, {rounds} rounds "
        "(task 1 warm-up, task 2 timed)\n"
    )
    print(
        "| variant | train tokens/s, task 2: best round (median) | cost per token vs naive: "
        "paired median (range) | best rounds | target |"
    )
    print("|---|---|---|---|---|")
    for name in ["bare", *cfgs]:
        label = "bare PyTorch loop" if name == "bare" else name
        print(
            f"| {label} | {best[name]:,.0f} ({median[name]:,.0f}) | {cost(name)} | "
            f"{TARGETS.get(name, '')} |"
        )

    ratios = paired_ratios(tps["naive"], tps["bare"])
    ratio = statistics.median(ratios)
    achieved = 6 * params * best["naive"]
    peak = max(flops)
    print("\n| figure | value | target |\n|---|---|---|")
    if tiny and not args.pair_only:
        shares()
    print(f"| training FLOP/s (6 N tokens/s, naive, best round) | {achieved / 1e9:.2f} GFLOP/s | |")
    print(f"| float32 matmul 2048^2 FLOP/s (best round) | {peak / 1e9:.2f} GFLOP/s | |")
    print(f"| training / matmul FLOP/s | {achieved / peak:.2f} | |")
    print(
        f"| naive / bare loop tokens/s (paired median, range; best rounds) | {ratio:.2f} "
        f"({min(ratios):.2f}-{max(ratios):.2f}; {best['naive'] / best['bare']:.2f}) | >= 0.95 |"
    )
    out = RESULTS / f"speed-{args.model}{'-pair' if args.pair_only else ''}.json"
    out.write_text(
        json.dumps(
            {
                "tokens_per_s": tps,
                "orders": orders,
                "matmul_flops": flops,
                "params": params,
                "threads": args.threads,
                "tokens": tokens,
                "rounds": rounds,
                "timed_task": TIMED_TASK,
                "wall_s": time.perf_counter() - start,
            }
        )
        + "\n"
    )
    print(f"\nper-round figures: {out.relative_to(RESULTS.parents[1])}")
    print(
        f"(best rounds: trainable {best['naive']:,.0f} tok/s, bare {best['bare']:,.0f} tok/s, "
        f"ratio {best['naive'] / best['bare']:.2f})"
    )
    print(f"naive/bare tokens-per-second ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
