"""Forgetting on the quickstart stream: naive fine-tuning against each component, same lr.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 10 \\
        .venv/bin/python benchmarks/forgetting.py [--experiment FILE] [--set k=v] [--fresh]

Every variant runs with the seeds in ``SEEDS`` (fixed before any run, the same for every
variant; ``run.seed`` sets the initial weights, the batch order and every component's draws),
one torch thread, each run one ``adaptune train``-equivalent job in this process. Writes every
run (final metrics, loss matrix, per-task training, after-task and evaluation times, load
average before and after) to
``benchmarks/results/forgetting.json`` as it goes; a rerun with the same settings skips the
(variant, seed) pairs already there (``--fresh`` starts over). Prints a markdown table of the
mean ± sample standard deviation over seeds (final stream_loss, forgetting, forgetting of the
first task, bwt) and the loss matrices averaged over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from adaptune.search.experiment import apply_overrides, parse_experiment, read_yaml
from adaptune.trainables import prepare, run_stream

RESULTS = Path(__file__).resolve().parent / "results" / "forgetting.json"
SEEDS = (0, 1, 2)
THREADS = 1
VARIANTS: dict[str, list[str]] = {
    "naive": [],
    "replay (1024 blocks, 25 %)": ["buffer_size=1024", "replay_fraction=0.25"],
    "EWC (λ = 100)": ["ewc_lambda=100"],
    "distillation (α = 1, T = 2)": ["distill_alpha=1.0"],
    "replay + EWC + distillation": [
        "buffer_size=1024",
        "replay_fraction=0.25",
        "ewc_lambda=100",
        "distill_alpha=1.0",
    ],
}
FIGURES = ("stream_loss", "forgetting", "forgetting/first", "bwt")


def one_run(base: dict[str, Any], source: str, overrides: list[str], seed: int) -> dict[str, Any]:
    """One variant with one seed through the whole stream; its last report's figures."""
    exp = parse_experiment(apply_overrides(base, [*overrides, f"seed={seed}"]), source)
    first = exp.run.stream.tasks[0].name
    load_before = os.getloadavg()
    start = time.perf_counter()
    reports: list[dict[str, Any]] = []
    run_stream(prepare(exp.run), report=lambda m, _c: reports.append(m), threads=THREADS)
    wall = time.perf_counter() - start
    last = reports[-1]
    return {
        "seed": seed,
        "stream_loss": last["stream_loss"],
        "forgetting": last["forgetting"],
        "forgetting/first": last[f"forgetting/{first}"],
        "bwt": last["bwt"],
        "loss_matrix": last["loss_matrix"],
        "train_tokens_per_s": statistics.mean(r["train_tokens_per_s"] for r in reports),
        # per task: training, after_task (EWC's Fisher, buffer updates), evaluating every task
        "train_time_s": [r["train_time_s"] for r in reports],
        "after_task_time_s": [r["after_task_time_s"] for r in reports],
        "eval_time_s": [r["eval_time_s"] for r in reports],
        "wall_s": wall,
        "loadavg_1m_before": load_before[0],
        "loadavg_1m_after": os.getloadavg()[0],
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per figure: [mean, sample std] over the runs (std 0 for a single run)."""
    out = {}
    for key in FIGURES:
        vals = [r[key] for r in runs]
        out[key] = [statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0]
    return out


def time_shares(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over runs of the after-task work's share of the task's training time (worst task,
    and per task but the last, after which the stream's last Fisher is skipped) and of
    evaluation's share of the run's wall time (``prepare`` included, as a trial's)."""
    timed = [r for r in runs if "train_time_s" in r]
    per_task = [
        [a / t for a, t in zip(r["after_task_time_s"][:-1], r["train_time_s"][:-1], strict=True)]
        for r in timed
    ]
    return {
        "runs": len(timed),
        "after_task_share_worst": statistics.median(max(x) for x in per_task),
        "after_task_share_per_task": [statistics.median(c) for c in zip(*per_task, strict=True)],
        "eval_share": statistics.median(sum(r["eval_time_s"]) / r["wall_s"] for r in timed),
        "wall_s": statistics.median(r["wall_s"] for r in timed),
    }


def mean_matrix(runs: list[dict[str, Any]]) -> list[list[float]]:
    mats = [r["loss_matrix"] for r in runs]
    return [
        [statistics.mean(m[i][j] for m in mats) for j in range(len(mats[0][0]))]
        for i in range(len(mats[0]))
    ]


def print_report(data: dict[str, Any]) -> None:
    first = data["tasks"][0]
    print(
        f"\n| variant | stream_loss | forgetting | forgetting/{first} | bwt |\n"
        "|---|---|---|---|---|"
    )
    for label, v in data["variants"].items():
        s = summary(v["runs"])
        cells = " | ".join(f"{s[k][0]:.3f} ± {s[k][1]:.3f}" for k in FIGURES)
        print(f"| {label} | {cells} |")
    for label, v in data["variants"].items():
        if "time_shares" in v:
            t = v["time_shares"]
            print(
                f"{label}: after-task work / task training time, median of {t['runs']} runs: "
                f"{t['after_task_share_worst']:.1%} worst task (per task "
                f"{', '.join(f'{x:.1%}' for x in t['after_task_share_per_task'])}); "
                f"evaluation / wall time {t['eval_share']:.1%} of {t['wall_s']:.0f} s"
            )
    print(f"\nmean ± sample std over seeds {list(data['seeds'])}; loss matrices, mean over seeds:")
    for label, v in data["variants"].items():
        print(f"\n{label}" + "".join(f"{t:>10}" for t in data["tasks"]))
        names = ["before", *(f"after {t}" for t in data["tasks"])]
        for name, row in zip(names, mean_matrix(v["runs"]), strict=True):
            print(f"{name:<16}" + "".join(f"{x:10.4f}" for x in row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="experiments/quickstart.yaml")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--fresh", action="store_true", help="ignore an existing results file")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    base = apply_overrides(read_yaml(args.experiment), args.set)
    settings = {"experiment": args.experiment, "set": args.set, "threads": THREADS}
    data: dict[str, Any] = {}
    if args.json.exists() and not args.fresh:
        data = json.loads(args.json.read_text())
    if data.get("settings") != settings:
        data = {"settings": settings, "seeds": list(SEEDS), "variants": {}}
    data["tasks"] = [t["name"] for t in base["run"]["stream"]["tasks"]]
    for label, overrides in VARIANTS.items():
        entry = data["variants"].setdefault(label, {"overrides": overrides, "runs": []})
        done = {r["seed"] for r in entry["runs"]}
        for seed in SEEDS:
            if seed in done:
                continue
            run = one_run(base, args.experiment, overrides, seed)
            entry["runs"].append(run)
            entry["summary"] = summary(entry["runs"])
            if any("train_time_s" in r for r in entry["runs"]):
                entry["time_shares"] = time_shares(entry["runs"])
            args.json.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
            print(
                f"{label}, seed {seed}: stream_loss {run['stream_loss']:.3f}, forgetting "
                f"{run['forgetting']:.3f}, {run['wall_s']:.0f} s, load "
                f"{run['loadavg_1m_before']:.2f}",
                flush=True,
            )
    print_report(data)


if __name__ == "__main__":
    main()
