"""The search-efficiency landscape: every configuration of a grid, trained once for real.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/landscape.py [--workers 2] [--threads 1]

A tabular benchmark in the style of HPO-B / NAS-Bench: a grid over lr x ewc_lambda x
distill_alpha x buffer_size (each knob including 0 = off) is run once with
:func:`trainables.run_stream` as plain function calls on a stream of three real domains from
``../shared/data`` (Shakespeare -> Wikipedia -> Python code), a tiny GPT and short tasks. For
every configuration the per-task reports (``stream_loss`` and the cumulative ``train_tokens``
after each task, plus the loss matrix) go into ``benchmarks/results/landscape.json``, which
``benchmarks/search_efficiency.py`` replays through Ray Tune. Prints the grid's best
configurations and each knob's best ``stream_loss``.

Configurations run ``--workers`` at a time in separate processes with ``--threads`` torch
threads each; every worker tokenizes the stream once and reuses it. ``--quick`` runs a
16-point grid on 4k-token tasks (a smoke test; writes ``runs/bench/landscape-quick.json``).
Skips (exit 0) when the shared data directory is absent.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
QUICK = ROOT / "runs" / "bench"  # smoke-test output, not committed

# task name -> file under the data directory (see its SOURCES.md)
DOMAINS = {
    "shakespeare": "shakespeare/tinyshakespeare_input.txt",
    "wikipedia": "wikipedia/wikitext2_raw_test.txt",
    "code": "code_python/python_code_text.txt",
}
# Each continual-learning knob includes 0 (off), so the grid holds naive fine-tuning and every
# combination. Tasks are 512 blocks of 64 tokens; buffer sizes are in blocks.
GRID: dict[str, list[Any]] = {
    "lr": [1e-3, 2e-3, 4e-3, 8e-3],
    "ewc_lambda": [0.0, 100.0, 1000.0],
    "distill_alpha": [0.0, 0.5, 2.0],
    "buffer_size": [0, 64, 256],
}
QUICK_GRID: dict[str, list[Any]] = {
    "lr": [2e-3, 8e-3],
    "ewc_lambda": [0.0, 100.0],
    "distill_alpha": [0.0, 1.0],
    "buffer_size": [0, 32],
}
# where each grid knob sits in the run config
PATHS = {
    "lr": ("optim", "lr"),
    "ewc_lambda": ("components", "ewc", "ewc_lambda"),
    "distill_alpha": ("components", "distill", "distill_alpha"),
    "buffer_size": ("components", "replay", "buffer_size"),
}


def base_run(data: Path, tokens_per_task: int, threads: int) -> dict[str, Any]:
    """The fixed part of every run: tiny GPT (2 x 64, byte tokenizer), 64-token blocks."""
    return {
        "seed": 0,
        "model": {"name": "tiny-gpt", "n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 64},
        "stream": {
            "block_size": 64,
            "max_train_tokens": tokens_per_task,
            "max_eval_blocks": 32,
            "tasks": [
                {"name": name, "source": "files", "files": [str(data / rel)]}
                for name, rel in DOMAINS.items()
            ],
        },
        "optim": {"lr": 1e-3, "batch_size": 16, "epochs": 1, "schedule": "cosine"},
        "components": {
            "replay": {"buffer_size": 0, "replay_fraction": 0.25},
            "ewc": {"ewc_lambda": 0.0},
            "distill": {"distill_alpha": 0.0, "temperature": 2.0},
        },
        "hardware": {"device": "cpu", "threads": threads},
    }


def with_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    run = json.loads(json.dumps(base))
    for name, value in params.items():
        *parents, leaf = PATHS[name]
        node = run
        for part in parents:
            node = node[part]
        node[leaf] = value
    return run


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


# ---- one worker: tokenize once, then run configurations ------------------------------------

_PREP: Any = None


def _init_worker(base: dict[str, Any]) -> None:
    global _PREP
    from adaptune.trainables import parse_run_config, prepare

    _PREP = prepare(parse_run_config(base))


def _run_one(job: tuple[dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
    from adaptune.trainables import parse_run_config, run_stream
    from adaptune.trainables.run import Prepared

    base, params = job
    cfg = parse_run_config(with_params(base, params))
    # the stream does not depend on the searched knobs: reuse the worker's tokenized tasks
    prep = Prepared(cfg, _PREP.tokenizer, _PREP.tasks, None)
    reports: list[dict[str, Any]] = []
    start = time.perf_counter()
    run_stream(prep, report=lambda m, _c: reports.append(m))
    wall = time.perf_counter() - start
    keep = ("task_index", "stream_loss", "seen_loss", "forgetting", "train_tokens", "train_loss")
    return {
        "params": params,
        "tasks": [{k: r[k] for k in keep} for r in reports],
        "loss_matrix": reports[-1]["loss_matrix"],
        "wall_s": wall,
    }


def run_grid(
    base: dict[str, Any], points: list[dict[str, Any]], workers: int
) -> list[dict[str, Any]]:
    jobs = [(base, p) for p in points]
    out: list[dict[str, Any]] = []
    if workers == 1:
        _init_worker(base)
        for i, job in enumerate(jobs, 1):
            out.append(_run_one(job))
            _progress(i, len(jobs), out[-1])
        return out
    # spawn: a forked child inherits torch's thread pools and can hang in them
    pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(base,))
    for i, rec in enumerate(pool.imap_unordered(_run_one, jobs), 1):
        out.append(rec)
        _progress(i, len(jobs), rec)
    pool.close()
    pool.join()
    order = {json.dumps(p, sort_keys=True): i for i, p in enumerate(points)}
    return sorted(out, key=lambda r: order[json.dumps(r["params"], sort_keys=True)])


def _progress(i: int, n: int, rec: dict[str, Any]) -> None:
    final = rec["tasks"][-1]["stream_loss"]
    print(f"  [{i}/{n}] {rec['params']} -> {final:.4f} ({rec['wall_s']:.1f} s)", flush=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def summary(landscape: dict[str, Any]) -> str:
    """Markdown: the grid's best configurations and each knob's best value on/off."""
    recs = landscape["configs"]
    final = [(r["tasks"][-1]["stream_loss"], r) for r in recs]
    final.sort(key=lambda x: x[0])
    names = list(landscape["meta"]["grid"])
    lines = [
        f"| rank | stream_loss | {' | '.join(names)} | train tokens |",
        "|---|---|" + "---|" * len(names) + "---|",
    ]
    for rank, (value, r) in enumerate(final[:5], 1):
        cells = " | ".join(f"{r['params'][n]:g}" for n in names)
        lines.append(f"| {rank} | {value:.4f} | {cells} | {r['tasks'][-1]['train_tokens']:,} |")
    worst = final[-1][0]
    naive = min(v for v, r in final if all(r["params"][n] == 0 for n in names if n != "lr"))
    lines += [
        "",
        "| figure | value |",
        "|---|---|",
        f"| configurations | {len(recs)} |",
        f"| grid best stream_loss | {final[0][0]:.4f} |",
        f"| best naive fine-tuning (all knobs 0, best lr) | {naive:.4f} |",
        f"| median / worst | {statistics.median(v for v, _ in final):.4f} / {worst:.4f} |",
        f"| grid compute (trained tokens) | {landscape['meta']['total_tokens']:,} |",
        f"| wall time | {landscape['meta']['wall_s']:.0f} s |",
    ]
    for n in names:
        if n == "lr":
            continue
        off = min(v for v, r in final if r["params"][n] == 0)
        on = min(v for v, r in final if r["params"][n] != 0)
        lines.append(f"| best with {n} = 0 / > 0 | {off:.4f} / {on:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data directory")
    parser.add_argument("--out", type=Path, default=None, help="the landscape JSON to write")
    parser.add_argument("--workers", type=int, default=2, help="configurations at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--tokens", type=int, default=None, help="train tokens per task")
    parser.add_argument("--limit", type=int, default=None, help="run only the first N points")
    parser.add_argument("--quick", action="store_true", help="16-point grid, 4k-token tasks")
    args = parser.parse_args()
    missing = [rel for rel in DOMAINS.values() if not (args.data / rel).is_file()]
    if missing:
        print(f"skipped: the shared data is absent ({args.data}/{missing[0]} not found)")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    grid = QUICK_GRID if args.quick else GRID
    tokens = args.tokens or (4096 if args.quick else 32768)
    out = args.out or (QUICK / "landscape-quick.json" if args.quick else RESULTS / "landscape.json")
    points = grid_points(grid)[: args.limit]
    base = base_run(args.data.resolve(), tokens, args.threads)
    print(
        f"landscape: {len(points)} configurations, {tokens} train tokens per task, "
        f"{args.workers} worker(s) x {args.threads} thread(s)",
        flush=True,
    )
    start = time.perf_counter()
    configs = run_grid(base, points, args.workers)
    wall = time.perf_counter() - start
    # data paths are machine-specific: store them relative to the data directory
    for task in base["stream"]["tasks"]:
        task["files"] = [str(Path(f).relative_to(args.data.resolve())) for f in task["files"]]
    landscape = {
        "meta": {
            "command": "benchmarks/landscape.py " + " ".join(sys.argv[1:]),
            "grid": grid,
            "paths": {k: list(v) for k, v in PATHS.items()},
            "base_run": base,
            "tasks": list(DOMAINS),
            "total_tokens": sum(r["tasks"][-1]["train_tokens"] for r in configs),
            "wall_s": wall,
            "workers": args.workers,
            "threads": args.threads,
            "machine": {"nproc": os.cpu_count(), "cpu": cpu_model()},
            "configs_per_min": 60 * len(configs) / wall,
        },
        "configs": configs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(landscape, indent=1) + "\n")
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    print(f"{60 * len(configs) / wall:.2f} configurations per minute\n")
    print(summary(landscape))


if __name__ == "__main__":
    main()
