"""The trainable's speed against a bare PyTorch loop, component costs and the CPU's own limit.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speed.py [--model tiny|gpt2-small] [--rounds 3]

Everything is measured side by side in one process, same model shape, data and threads, with
the variants interleaved round by round so slow drifts of the machine hit all of them alike;
each figure is the median over rounds. Prints markdown tables and ends with the line
``naive/bare tokens-per-second ratio: X.XX``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch

from trainables import parse_run_config, prepare, run_stream
from trainables.components.ewc import next_token_loss
from trainables.model import build_model

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=list(SHAPES), default="tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=None, help="train tokens per task")
    args = parser.parse_args()
    shape = SHAPES[args.model]
    block, batch = (128, 16) if args.model == "tiny" else (128, 8)
    tokens = args.tokens or (65536 if args.model == "tiny" else 8192)
    variants = {
        "naive": {},
        "replay 25 %": {"replay": {"buffer_size": 512, "replay_fraction": 0.25}},
        "EWC": {"ewc": {"ewc_lambda": 100.0, "fisher_samples": 64}},
        "distillation": {"distill": {"distill_alpha": 1.0}},
    }
    cfgs = {
        k: run_config(shape, tokens, block, batch, args.threads, **v) for k, v in variants.items()
    }
    naive_cfg = cfgs["naive"]
    blocks = prepare(naive_cfg).tasks[1].train
    steps = max(1, blocks.shape[0] // batch)
    torch.set_num_threads(args.threads)

    results: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
    bare: list[float] = []
    flops: list[float] = []
    for _ in range(args.rounds):
        bare.append(bare_loop(copy.deepcopy(naive_cfg), blocks, steps))
        for name, cfg in cfgs.items():
            results[name].append(trainable_task2(cfg))
        flops.append(matmul_flops(args.threads))

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    params = sum(
        p.numel() for p in build_model(naive_cfg.model, prepare(naive_cfg).tokenizer).parameters()
    )
    naive_tps = med("naive", "train_tokens_per_s")
    bare_tps = statistics.median(bare)
    print(
        f"\n## {args.model}: {params / 1e6:.2f}M parameters, {args.threads} threads, "
        f"block {block}, batch {batch}, {tokens} train tokens per task, {args.rounds} rounds\n"
    )
    print("| variant | train tokens/s (task 2) | cost per token vs naive | target |")
    print("|---|---|---|---|")
    print(f"| bare PyTorch loop | {bare_tps:,.0f} | {bare_tps / naive_tps:.2f}x | |")
    targets = {
        "naive": "-",
        "replay 25 %": "<= 1.05x",
        "EWC": "<= 1.15x",
        "distillation": "<= 1.45x",
    }
    for name in variants:
        tps = med(name, "train_tokens_per_s")
        print(f"| {name} | {tps:,.0f} | {naive_tps / tps:.2f}x | {targets[name]} |")
    ewc_fisher = statistics.median(
        r["after_task_time_s"] / r["train_time_s"] for r in results["EWC"]
    )
    eval_share = statistics.median(r["eval_total_s"] / r["wall_s"] for r in results["naive"])
    achieved = 6 * params * naive_tps
    peak = statistics.median(flops)
    print("\n| figure | value | target |\n|---|---|---|")
    print(f"| Fisher estimation / task training time (EWC) | {ewc_fisher:.1%} | <= 10 % |")
    print(f"| evaluation of all tasks / run wall time (naive) | {eval_share:.1%} | <= 15 % |")
    print(f"| training FLOP/s (6 N tokens/s) | {achieved / 1e9:.2f} GFLOP/s | |")
    print(f"| float32 matmul 2048^2 FLOP/s | {peak / 1e9:.2f} GFLOP/s | |")
    print(f"| training / matmul FLOP/s | {achieved / peak:.2f} | |")
    print(f"\nnaive/bare tokens-per-second ratio: {naive_tps / bare_tps:.2f}")


if __name__ == "__main__":
    main()
