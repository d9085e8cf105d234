"""Naive fine-tuning's best stream_loss over the experiment's lr range, beside a search's champion.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/naive_baseline.py experiments/quickstart.yaml \
        [--points 5] [--champion-run-id PARENT_RUN_ID]

Naive = no replay (buffer_size 0), ewc_lambda 0, distill_alpha 0; lr on a log grid over the
space's lr bounds. With ``--champion-run-id`` (or by default the latest parent run of the
experiment in ``runs/mlflow.db``) it also prints the champion's final stream_loss.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from adaptune.search.experiment import apply_overrides, parse_experiment, read_yaml
from adaptune.spaces import Dist
from adaptune.trainables import prepare, run_stream


def champion_value(exp_name: str, metric: str, tracking_uri: str, run_id: str | None) -> Any:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    if run_id is None:
        found = client.get_experiment_by_name(exp_name)
        if found is None:
            return None
        parents = client.search_runs(
            [found.experiment_id],
            filter_string="tags.`adaptune.champion_trial_id` != ''",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not parents:
            return None
        run_id = parents[0].info.run_id
    return client.get_run(run_id).data.metrics.get(f"best/{metric}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("experiment")
    parser.add_argument("--points", type=int, default=5)
    parser.add_argument("--champion-run-id", default=None)
    parser.add_argument("--tracking-uri", default=None)
    args = parser.parse_args()
    raw = read_yaml(args.experiment)
    exp = parse_experiment(raw, args.experiment)
    lr = exp.space.get("lr")
    low, high = lr.values() if isinstance(lr, Dist) else (exp.run.optim.lr, exp.run.optim.lr)
    n = args.points if low != high else 1
    grid = [
        math.exp(math.log(low) + i * (math.log(high) - math.log(low)) / max(1, n - 1))
        for i in range(n)
    ]
    print("| lr | stream_loss | forgetting |\n|---|---|---|")
    best = math.inf
    for value in grid:
        naive = ["buffer_size=0", "ewc_lambda=0", "distill_alpha=0", f"lr={value}"]
        run_exp = parse_experiment(apply_overrides(raw, naive), args.experiment)
        reports: list[dict[str, Any]] = []
        run_stream(prepare(run_exp.run), report=lambda m, _c, out=reports: out.append(m))
        last = reports[-1]
        best = min(best, last["stream_loss"])
        print(f"| {value:.3g} | {last['stream_loss']:.4f} | {last['forgetting']:.4f} |", flush=True)
    print(f"\nnaive fine-tuning, best lr: stream_loss {best:.4f}")
    from adaptune.search.stores import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri or exp.tracking.tracking_uri, create=False)
    name = exp.tracking.experiment_name or exp.name
    champ = champion_value(name, exp.search.metric, uri, args.champion_run_id)
    if champ is not None:
        print(f"search champion:                   stream_loss {champ:.4f}")
        print(f"champion - naive: {champ - best:+.4f} nats/token")


if __name__ == "__main__":
    main()
