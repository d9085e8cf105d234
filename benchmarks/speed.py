"""The trainable's speed against a bare PyTorch loop, component costs and the CPU's own limit.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speed.py [--model tiny|gpt2-small] [--rounds 3]

Everything is measured side by side in one process, same model shape, data and threads. The
variants run interleaved, in a fresh random order every round, so slow drifts of the machine hit
all of them alike; interference only ever slows a run down, so a variant's speed is its best
round (as ``timeit`` advises) and ratios are of best rounds; the median and range of the ratios
paired within each round are printed beside them. Fisher estimation's and evaluation's shares
are measured on the quickstart experiment itself (``experiments/quickstart.yaml``: its task size,
eval blocks and one thread per trial) with EWC switched on, median of 3 runs. Prints markdown
tables, writes the per-round figures to ``benchmarks/results/speed-<model>.json`` and ends with
the line ``naive/bare tokens-per-second ratio: X.XX``.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from adaptune.search.experiment import load_experiment
from adaptune.trainables import parse_run_config, prepare, run_stream
from adaptune.trainables.components.ewc import next_token_loss
from adaptune.trainables.model import build_model

SHAPES = {
    # the quickstart model
    "tiny": {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 128},
    # GPT-2 small's shape (124M parameters with its 50k vocabulary; here the byte vocabulary)
    "gpt2-small": {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024},
}


def run_config(
    shape: dict[str, int], tokens: int, block: int, batch: int, threads: int, **components: Any
) -> Any:
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


def trainable_task2(cfg: Any) -> dict[str, Any]:
    """Run the 2-task stream; return task 2's report (components are active there)."""
    reports: list[dict[str, Any]] = []
    start = time.perf_counter()
    run_stream(prepare(cfg), report=lambda m, _c: reports.append(m))
    wall = time.perf_counter() - start
    last = dict(reports[-1])
    last["wall_s"] = wall
    last["eval_total_s"] = sum(r["eval_time_s"] for r in reports)
    return last


def bare_loop(cfg: Any, blocks: torch.Tensor, steps: int) -> float:
    """The same model trained by the plainest loop: tokens/s."""
    torch.manual_seed(cfg.seed)
    prep = prepare(cfg)
    model = build_model(cfg.model, prep.tokenizer).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=0.01)
    b = cfg.optim.batch_size
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    tokens = 0
    for _ in range(steps):
        x = blocks[torch.randint(0, blocks.shape[0], (b,), generator=gen)]
        loss = next_token_loss(model(input_ids=x).logits, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += x.numel()
    return tokens / (time.perf_counter() - start)


def matmul_flops(threads: int, n: int = 2048, reps: int = 5) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
RESULTS = Path(__file__).resolve().parent / "results"


def quickstart_shares(ewc_lambda: float) -> dict[str, float]:
    """Fisher estimation / task training time and evaluation / run wall time on the quickstart's
    own run (its task size, eval blocks and its trials' one thread), EWC on."""
    exp = load_experiment(QUICKSTART, [f"run.components.ewc.ewc_lambda={ewc_lambda}"])
    threads = max(1, int(exp.resources.cpus_per_trial))
    reports: list[dict[str, Any]] = []
    start = time.perf_counter()
    run_stream(prepare(exp.run), report=lambda m, _c: reports.append(m), threads=threads)
    wall = time.perf_counter() - start
    fisher = [r["after_task_time_s"] / r["train_time_s"] for r in reports[:-1]]
    return {
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=list(SHAPES), default="tiny")
    parser.add_argument("--rounds", type=int, default=None, help="default: 7 tiny, 2 gpt2-small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=None, help="train tokens per task")
    args = parser.parse_args()
    shape = SHAPES[args.model]
    tiny = args.model == "tiny"
    block, batch = (128, 16) if tiny else (128, 8)
    tokens = args.tokens or (32768 if tiny else 4096)
    rounds = args.rounds or (7 if tiny else 2)
    variants = {
        "naive": {},
        "replay 25 %": {"replay": {"buffer_size": 512, "replay_fraction": 0.25}},
        "EWC": {"ewc": {"ewc_lambda": 100.0}},
        "distillation": {"distill": {"distill_alpha": 1.0}},
    }
    cfgs = {
        k: run_config(shape, tokens, block, batch, args.threads, **v) for k, v in variants.items()
    }
    naive_cfg = cfgs["naive"]
    blocks = prepare(naive_cfg).tasks[1].train
    steps = max(1, blocks.shape[0] // batch)
    torch.set_num_threads(args.threads)

    rng = random.Random(0)
    tps: dict[str, list[float]] = {k: [] for k in ["bare", *variants]}
    flops: list[float] = []
    for _ in range(rounds):
        order = ["bare", *variants]
        rng.shuffle(order)
        for name in order:
            if name == "bare":
                tps["bare"].append(bare_loop(copy.deepcopy(naive_cfg), blocks, steps))
            else:
                tps[name].append(trainable_task2(cfgs[name])["train_tokens_per_s"])
        flops.append(matmul_flops(args.threads))

    # Interference from the rest of the machine only ever slows a run down, so each variant's
    # speed is its best round (as ``timeit`` advises); the paired per-round ratios' median and
    # range are printed beside it to show how noisy the machine was.
    best = {k: max(v) for k, v in tps.items()}

    def cost(name: str) -> str:
        r = [n / v for n, v in zip(tps["naive"], tps[name], strict=True)]
        return (
            f"{best['naive'] / best[name]:.2f}x | "
            f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})"
        )

    params = sum(
        p.numel() for p in build_model(naive_cfg.model, prepare(naive_cfg).tokenizer).parameters()
    )
    print(
        f"\n## {args.model}: {params / 1e6:.2f}M parameters, {args.threads} threads, "
        f"block {block}, batch {batch}, {tokens} train tokens per task, {rounds} rounds\n"
    )
    print(
        "| variant | train tokens/s (task 2, best round) | cost per token vs naive (best "
        "rounds) | paired per-round ratio: median (range) | target |"
    )
    print("|---|---|---|---|---|")
    print(f"| bare PyTorch loop | {best['bare']:,.0f} | {cost('bare')} | |")
    targets = {
        "naive": "-",
        "replay 25 %": "<= 1.05x",
        "EWC": "<= 1.15x",
        "distillation": "<= 1.45x",
    }
    for name in variants:
        print(f"| {name} | {best[name]:,.0f} | {cost(name)} | {targets[name]} |")

    ratios = [n / b for n, b in zip(tps["naive"], tps["bare"], strict=True)]
    ratio = best["naive"] / best["bare"]
    achieved = 6 * params * best["naive"]
    peak = max(flops)
    print("\n| figure | value | target |\n|---|---|---|")
    if tiny:
        runs = [quickstart_shares(ewc_lambda=100.0) for _ in range(3)]
        q = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "fisher_shares"}
        q["fisher_shares"] = [
            statistics.median(r["fisher_shares"][i] for r in runs)
            for i in range(len(runs[0]["fisher_shares"]))
        ]
        print(
            f"| Fisher estimation / task training time (quickstart, EWC, {q['threads']:g} "
            "thread, median of 3 runs) "
            f"| {q['fisher_share']:.1%} worst task ({q['fisher_s']:.2f} s of "
            f"{q['task_train_s']:.1f} s); per task: "
            f"{', '.join(f'{x:.1%}' for x in q['fisher_shares'])} "
            "| <= 10 % |"
        )
        print(
            f"| evaluation of all tasks / trial wall time (quickstart, {q['tasks']:g} tasks) "
            f"| {q['eval_share']:.1%} of {q['wall_s']:.1f} s | <= 15 % |"
        )
    print(f"| training FLOP/s (6 N tokens/s, naive) | {achieved / 1e9:.2f} GFLOP/s | |")
    print(f"| float32 matmul 2048^2 FLOP/s | {peak / 1e9:.2f} GFLOP/s | |")
    print(f"| training / matmul FLOP/s | {achieved / peak:.2f} | |")
    print(
        f"| naive / bare loop tokens/s (best rounds; paired median, range) | {ratio:.2f} "
        f"({statistics.median(ratios):.2f}; {min(ratios):.2f}-{max(ratios):.2f}) | >= 0.95 |"
    )
    out = RESULTS / f"speed-{args.model}.json"
    out.write_text(
        json.dumps(
            {
                "tokens_per_s": tps,
                "matmul_flops": flops,
                "params": params,
                "threads": args.threads,
                "tokens": tokens,
                "rounds": rounds,
            }
        )
        + "\n"
    )
    print(f"\nper-round figures: {out.relative_to(RESULTS.parents[1])}")
    print(f"\nnaive/bare tokens-per-second ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
