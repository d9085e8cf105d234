"""The online update policies side by side on experiments/online.yaml: drift, every, interval.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/online_policies.py [--workers 2]

Each policy runs with seeds 0, 1 and 2 (model initialisation and batch order; the stream and its
chunks are the same for all), one torch thread per run, ``--workers`` runs at once. Everything
else is the experiment's ``run`` section. ``interval`` trains on every second chunk, as many
updates as ``drift`` makes when its detector finds the two domain shifts and nothing else (the
first 4 chunks, then 4 from each detection): the two are at equal compute by design, and
``every`` trains on every chunk, twice that. Trained tokens are reported beside the losses so the
compute each one spent is in the table.

Writes ``benchmarks/results/online_policies.json`` (every run's final report, less the lists,
plus its chunk scores, updates and detections) and prints a markdown table: mean and min-max
over the seeds of ``prequential_loss``, ``train_tokens``, ``updates`` and the final
``stream_loss``.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

EXPERIMENT = "experiments/online.yaml"
OUT = Path("benchmarks/results/online_policies.json")
SEEDS = (0, 1, 2)
POLICIES: dict[str, list[str]] = {
    "drift": ["update_policy=drift"],  # Page-Hinkley λ = 1 nat, 4 chunks per detection
    "every": ["update_policy=every"],
    "interval": ["update_policy=interval", "update_interval=2"],
}
COLUMNS = ("prequential_loss", "train_tokens", "updates", "stream_loss")
LISTS = ("chunk_nll", "chunk_updates", "chunk_detections", "chunk_boundaries")


def one(policy: str, seed: int) -> dict[str, Any]:
    """One run's final report (the loss matrix and chunk lists kept apart) and its wall time."""
    from adaptune.search.experiment import apply_overrides, parse_experiment, read_yaml
    from adaptune.trainables import prepare, run_stream

    overrides = [*POLICIES[policy], f"seed={seed}", "run.hardware.threads=1"]
    exp = parse_experiment(apply_overrides(read_yaml(EXPERIMENT), overrides), EXPERIMENT)
    reports: list[dict[str, Any]] = []
    start = time.perf_counter()
    run_stream(prepare(exp.run), report=lambda m, _c: reports.append(m))
    last = reports[-1]
    scalars = {k: v for k, v in last.items() if isinstance(v, int | float)}
    return {
        "policy": policy,
        "seed": seed,
        "wall_s": time.perf_counter() - start,
        "metrics": scalars,
        **{k: last[k] for k in LISTS},
        "loss_matrix": last["loss_matrix"],
    }


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown: per policy, mean (min-max) of :data:`COLUMNS` over the seeds."""
    head = "| policy | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 1) + "|"]
    for policy in POLICIES:
        cells = []
        for col in COLUMNS:
            xs = [r["metrics"][col] for r in runs if r["policy"] == policy]
            if col in ("train_tokens", "updates"):
                cells.append(f"{sum(xs) / len(xs):,.0f} ({min(xs):,.0f}–{max(xs):,.0f})")
            else:
                cells.append(f"{sum(xs) / len(xs):.3f} ({min(xs):.3f}–{max(xs):.3f})")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    jobs = [(p, s) for p in POLICIES for s in SEEDS]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        runs = list(pool.map(one, *zip(*jobs, strict=True)))
    for r in runs:
        m = r["metrics"]
        print(f"{r['policy']:<9} seed {r['seed']}  prequential_loss {m['prequential_loss']:.3f}  "
              f"train_tokens {m['train_tokens']:,}  updates {m['updates']}  "
              f"detections {r['chunk_detections']}  {r['wall_s']:.0f}s")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"experiment": EXPERIMENT, "seeds": list(SEEDS),
                               "policies": POLICIES, "runs": runs}, indent=1))
    print(f"\n{table(runs)}\n\n{len(runs)} runs in {time.perf_counter() - start:.0f}s -> {OUT}")


if __name__ == "__main__":
    main()
