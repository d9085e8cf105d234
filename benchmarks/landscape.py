"""The search-efficiency landscape: every configuration of a grid, trained once for real.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/landscape.py [--seeds 0,1,2] [--workers 1]

A tabular benchmark in the style of HPO-B / NAS-Bench: a grid over lr x ewc_lambda x
distill_alpha x buffer_size (each knob including 0 = off) is run once per seed with
:func:`trainables.run_stream` as plain function calls on a stream of three real domains from
``../shared/data`` (Shakespeare -> Wikipedia -> Python code), a tiny GPT and short tasks. The
seed sets the model's initialisation and the batch order; the data split is the same for every
seed. For every configuration and seed the per-task reports (``stream_loss`` and the cumulative
``train_tokens`` after each task, plus the loss matrix) go into
``benchmarks/results/landscape.json`` as one record, which ``benchmarks/search_efficiency.py``
replays through Ray Tune. Prints the grid's best configurations by seed-mean ``stream_loss``
(with each seed's value) and each knob's best seed-mean ``stream_loss``.

Resumable: the JSON is rewritten after every configuration, and a rerun runs only the
(configuration, seed) pairs it lacks, so adding seeds never recomputes the old ones.
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
from collections.abc import Iterator
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
# Fixed in advance: every configuration of the grid is trained with each of these seeds.
SEEDS = (0, 1, 2)
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


def _run_one(job: tuple[dict[str, Any], dict[str, Any], int]) -> dict[str, Any]:
    from adaptune.trainables import parse_run_config, run_stream
    from adaptune.trainables.run import Prepared

    base, params, seed = job
    cfg = parse_run_config(with_params(base, params) | {"seed": seed})
    # the stream does not depend on the searched knobs: reuse the worker's tokenized tasks
    prep = Prepared(cfg, _PREP.tokenizer, _PREP.tasks, None)
    reports: list[dict[str, Any]] = []
    start = time.perf_counter()
    run_stream(prep, report=lambda m, _c: reports.append(m))
    wall = time.perf_counter() - start
    keep = ("task_index", "stream_loss", "seen_loss", "forgetting", "train_tokens", "train_loss")
    return {
        "params": params,
        "seed": seed,
        "tasks": [{k: r[k] for k in keep} for r in reports],
        "loss_matrix": reports[-1]["loss_matrix"],
        "wall_s": wall,
    }


def run_grid(
    base: dict[str, Any], jobs: list[tuple[dict[str, Any], int]], workers: int
) -> Iterator[dict[str, Any]]:
    """Train each (configuration, seed) job; yields each record as soon as it is done."""
    work = [(base, params, seed) for params, seed in jobs]
    if workers == 1:
        _init_worker(base)
        for i, job in enumerate(work, 1):
            rec = _run_one(job)
            _progress(i, len(work), rec)
            yield rec
        return
    # spawn: a forked child inherits torch's thread pools and can hang in them
    pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(base,))
    for i, rec in enumerate(pool.imap_unordered(_run_one, work), 1):
        _progress(i, len(work), rec)
        yield rec
    pool.close()
    pool.join()


def _progress(i: int, n: int, rec: dict[str, Any]) -> None:
    final = rec["tasks"][-1]["stream_loss"]
    print(
        f"  [{i}/{n}] seed {rec['seed']} {rec['params']} -> {final:.4f} ({rec['wall_s']:.1f} s)",
        flush=True,
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def point_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def by_point(landscape: dict[str, Any]) -> list[tuple[float, dict[str, Any], dict[int, float]]]:
    """(seed-mean final stream_loss, params, {seed: final stream_loss}) per grid point, best first.

    A record without a ``seed`` is seed 0 (the single-seed format).
    """
    points: dict[str, tuple[dict[str, Any], dict[int, float]]] = {}
    for r in landscape["configs"]:
        _, finals = points.setdefault(point_key(r["params"]), (r["params"], {}))
        finals[int(r.get("seed", 0))] = r["tasks"][-1]["stream_loss"]
    rows = [(statistics.fmean(f.values()), p, f) for p, f in points.values()]
    return sorted(rows, key=lambda x: x[0])


def summary(landscape: dict[str, Any]) -> str:
    """Markdown: the grid's best configurations and each knob's best value on/off (seed means)."""
    rows = by_point(landscape)
    names = list(landscape["meta"]["grid"])
    seeds = sorted({s for _, _, f in rows for s in f})
    lines = [
        f"| rank | mean stream_loss | std | {' | '.join(f'seed {s}' for s in seeds)} | "
        f"{' | '.join(names)} |",
        "|---|---|---|" + "---|" * (len(seeds) + len(names)),
    ]
    for rank, (mean, params, finals) in enumerate(rows[:8], 1):
        std = statistics.stdev(finals.values()) if len(finals) > 1 else 0.0
        per_seed = " | ".join(f"{finals[s]:.4f}" if s in finals else "-" for s in seeds)
        cells = " | ".join(f"{params[n]:g}" for n in names)
        lines.append(f"| {rank} | {mean:.4f} | {std:.4f} | {per_seed} | {cells} |")
    means = [m for m, _, _ in rows]
    naive = min(
        (m for m, p, _ in rows if all(p[n] == 0 for n in names if n != "lr")), default=float("nan")
    )
    lines += [
        "",
        "| figure (seed means) | value |",
        "|---|---|",
        f"| configurations x seeds | {len(rows)} x {len(seeds)} ({seeds}) |",
        f"| grid best stream_loss | {means[0]:.4f} |",
        f"| best naive fine-tuning (all knobs 0, best lr) | {naive:.4f} |",
        f"| median / worst | {statistics.median(means):.4f} / {means[-1]:.4f} |",
        f"| grid compute per seed (trained tokens) | {landscape['meta']['total_tokens']:,} |",
        f"| wall time (all runs) | {landscape['meta']['wall_s']:.0f} s |",
    ]
    for n in names:
        if n == "lr":
            continue
        off = min((m for m, p, _ in rows if p[n] == 0), default=float("nan"))
        on = min((m for m, p, _ in rows if p[n] != 0), default=float("nan"))
        lines.append(f"| best with {n} = 0 / > 0 | {off:.4f} / {on:.4f} |")
    return "\n".join(lines)


def _comparable(base: dict[str, Any]) -> dict[str, Any]:
    """The run config minus what may differ between the sessions that fill one landscape."""
    run = json.loads(json.dumps(base))
    run.pop("seed", None)
    run.pop("hardware", None)
    return run


def load_existing(out: Path, base: dict[str, Any], grid: dict[str, Any]) -> dict[str, Any] | None:
    """The landscape already at ``out`` (to extend), or None; refuses one of another grid/run."""
    if not out.is_file():
        return None
    old = json.loads(out.read_text())
    if old["meta"]["grid"] != grid or _comparable(old["meta"]["base_run"]) != _comparable(base):
        raise SystemExit(f"{out}: another grid or run config; move it away to start afresh")
    for r in old["configs"]:
        r.setdefault("seed", old["meta"]["base_run"].get("seed", 0))
    if "sessions" not in old["meta"]:  # the single-seed format: its one run becomes a session
        meta = old["meta"]
        keys = ("command", "workers", "threads", "wall_s")
        meta["sessions"] = [{"runs": len(old["configs"])} | {k: meta.get(k) for k in keys}]
        for k in ("command", "workers", "threads"):
            meta.pop(k, None)
    return old


def _write(out: Path, landscape: dict[str, Any]) -> None:
    recs = landscape["configs"]
    seeds = sorted({r["seed"] for r in recs})
    meta = landscape["meta"]
    meta["seeds"] = seeds
    # the budget unit of search_efficiency.py: one seed's whole grid (the seeds' mean)
    meta["total_tokens"] = round(sum(r["tasks"][-1]["train_tokens"] for r in recs) / len(seeds))
    meta["configs_per_min"] = 60 * len(recs) / max(meta["wall_s"], 1e-9)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(landscape, indent=1) + "\n")
    tmp.replace(out)  # a reader never sees half a file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data directory")
    parser.add_argument("--out", type=Path, default=None, help="the landscape JSON to extend")
    parser.add_argument(
        "--seeds", default=",".join(map(str, SEEDS)), help="comma-separated training seeds"
    )
    parser.add_argument("--workers", type=int, default=1, help="configurations at once")
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
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    points = grid_points(grid)[: args.limit]
    data = args.data.resolve()
    base = base_run(data, tokens, args.threads)
    # data paths are machine-specific: stored relative to the data directory
    stored = json.loads(json.dumps(base))
    for task in stored["stream"]["tasks"]:
        task["files"] = [str(Path(f).relative_to(data)) for f in task["files"]]
    landscape = load_existing(out, stored, grid) or {
        "meta": {
            "grid": grid,
            "paths": {k: list(v) for k, v in PATHS.items()},
            "base_run": stored,
            "tasks": list(DOMAINS),
            "wall_s": 0.0,
            "machine": {"nproc": os.cpu_count(), "cpu": cpu_model()},
            "sessions": [],
        },
        "configs": [],
    }
    done = {(point_key(r["params"]), r["seed"]) for r in landscape["configs"]}
    jobs = [(p, s) for s in seeds for p in points if (point_key(p), s) not in done]
    print(
        f"landscape: {len(points)} configurations x seeds {seeds}: {len(jobs)} to run "
        f"({len(done)} already in {out.name}), {tokens} train tokens per task, "
        f"{args.workers} worker(s) x {args.threads} thread(s)",
        flush=True,
    )
    session = {
        "command": "benchmarks/landscape.py " + " ".join(sys.argv[1:]),
        "runs": 0,
        "wall_s": 0.0,
        "workers": args.workers,
        "threads": args.threads,
    }
    if jobs:
        landscape["meta"].setdefault("sessions", []).append(session)
    start = time.perf_counter()
    for rec in run_grid(base, jobs, args.workers):
        landscape["configs"].append(rec)
        session["runs"] += 1
        landscape["meta"]["wall_s"] += time.perf_counter() - start - session["wall_s"]
        session["wall_s"] = time.perf_counter() - start
        _write(out, landscape)
    if not landscape["configs"]:
        return
    _write(out, landscape)
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    print(summary(landscape))


if __name__ == "__main__":
    main()
