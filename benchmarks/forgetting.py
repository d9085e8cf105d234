"""Forgetting on the quickstart stream: naive fine-tuning against each component, same lr.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/forgetting.py [--experiment FILE] [--set k=v]

Prints a markdown table (final stream_loss, forgetting, forgetting of the first task, bwt,
tokens/s, wall time) for naive, replay, EWC, distillation and all three together.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from adaptune.search.experiment import apply_overrides, parse_experiment, read_yaml
from adaptune.trainables import prepare, run_stream

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experiment", default="experiments/quickstart.yaml")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    base = apply_overrides(read_yaml(args.experiment), args.set)
    first_task = base["run"]["stream"]["tasks"][0]["name"]
    rows = []
    for label, overrides in VARIANTS.items():
        exp = parse_experiment(apply_overrides(base, overrides), args.experiment)
        prep = prepare(exp.run)
        reports: list[dict[str, Any]] = []
        start = time.perf_counter()
        run_stream(prep, report=lambda m, _c, out=reports: out.append(m))
        wall = time.perf_counter() - start
        last = reports[-1]
        speed = sum(r["train_tokens_per_s"] for r in reports) / len(reports)
        rows.append(
            f"| {label} | {last['stream_loss']:.3f} | {last['forgetting']:.3f} | "
            f"{last[f'forgetting/{first_task}']:.3f} | {last['bwt']:.3f} | {speed:,.0f} | "
            f"{wall:.0f} |"
        )
        print(rows[-1], flush=True)
    print(
        f"\n| variant | stream_loss | forgetting | forgetting/{first_task} | bwt | "
        "train tok/s | wall s |\n|---|---|---|---|---|---|---|"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
