"""Search algorithms on a real stream: PBT against TPE + ASHA, warm-started against cold TPE.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/search_algorithms.py [--seeds 0 1 2] [--quick]

The stream: the tiny GPT of experiments/quickstart.yaml on three domains of ``../shared/data``
(Shakespeare -> AG News -> medical abstracts), 16,384 training tokens per task; a 4th domain
(WikiText-2) for the warm-start part. The space is the quickstart's (lr, buffer_size,
replay_fraction, ewc_lambda, distill_alpha); PBT mutates the four of them that may change between
tasks and samples ``buffer_size`` once per trial. Every search runs through ``adaptune search``'s
Python API (Ray Tune, Optuna, ASHA or PBT, MLflow), two trials at once, one CPU each.

Fixed before any run, the same for every variant:

- seeds 0, 1 and 2; a seed is both the searcher's seed and the runs' seed (``run.seed``);
- **PBT vs TPE + ASHA at equal trained tokens.** PBT: a population of 8, perturbation after every
  task, quantile 0.25. Its compute is what its trials trained (tokens of every task each trial
  ran, replayed rows included; a trial that copied a donor does not count the donor's tokens).
  TPE + ASHA (adaptune's default: grace 1, reduction factor 2) runs 20 trials; it is read at
  PBT's compute of the same seed: the best final ``stream_loss`` among its trials that ran every
  task and had finished when the search's cumulative trained tokens (trials in the order they
  finished) first reached that budget. Statistic: per seed, ``best(PBT) - best(TPE+ASHA)``;
  "PBT better" only when all three paired differences are negative, "worse" when all are
  positive, "no difference shown" otherwise.
- **Warm vs cold TPE on the extended stream** (the 3 domains + WikiText). Cold: TPE + ASHA, 20
  trials. Warm: the same, warm-started from that seed's 3-domain TPE + ASHA search above
  (``search.warm_start``, its best 2 configurations enqueued first). Target: within 0.01 nats of
  the cold search's best final ``stream_loss``; compute to target: the cumulative trained tokens
  (finish order) when a trial that ran every task first comes within it; "not reached" if none
  does. Statistic: per seed, warm's compute to target divided by cold's.

Writes ``benchmarks/results/search_algorithms.json`` (every trial's final metrics, finish time
and own trained tokens) and prints the tables for docs/benchmarks.md. ``--quick``: one seed,
small populations, 8,192 tokens per task (a smoke test; writes under runs/bench only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks" / "results" / "search_algorithms.json"
QUICK_OUT = ROOT / "runs" / "bench" / "search_algorithms-quick.json"
TARGET_NATS = 0.01
DOMAINS = {
    "shakespeare": "shakespeare/tinyshakespeare_input.txt",
    "news": "news_agnews/agnews_test_text.txt",
    "medical": "biomed_medical_abstracts/medical_abstracts_text.txt",
    "wiki": "wikipedia/wikitext2_raw_test.txt",
}


def experiment(name: str, domains: list[str], tokens: int, search: dict[str, Any],
               seed: int, root: Path) -> dict[str, Any]:
    """The experiment mapping for one search (all searches share one MLflow store)."""
    return {
        "name": name,
        "run": {
            "seed": seed,
            "model": {"name": "tiny-gpt", "n_layer": 2, "n_embd": 128, "n_head": 4,
                      "n_positions": 128},
            "stream": {
                "block_size": 128, "max_train_tokens": tokens, "max_eval_blocks": 16,
                "tasks": [{"name": d, "files": str(DATA / DOMAINS[d])} for d in domains],
            },
            "optim": {"lr": 2e-3, "batch_size": 16, "epochs": 1, "schedule": "cosine"},
            "components": {
                "replay": {"buffer_size": 0, "replay_fraction": 0.25},
                "ewc": {"ewc_lambda": 0.0},
                "distill": {"distill_alpha": 0.0, "temperature": 2.0},
            },
        },
        "space": {
            "lr": {"loguniform": [3e-4, 3e-3]},
            "buffer_size": {"choice": [0, 256, 1024]},
            "replay_fraction": {"uniform": [0.1, 0.5]},
            "ewc_lambda": {"loguniform": [1.0, 1e5]},
            "distill_alpha": {"uniform": [0.0, 2.0]},
        },
        "search": {"max_concurrent": 2, "seed": seed, "metric": "stream_loss", **search},
        "resources": {"cpus_per_trial": 1},
        "tracking": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
                     "experiment_name": "search-algorithms"},
        "storage_path": str(root / "ray"),
    }


def own_tokens(result: Any) -> float:
    """Tokens this trial trained itself: per report, tokens/s x seconds of that task (a PBT trial's
    cumulative ``train_tokens`` includes its donors')."""
    df = result.metrics_dataframe
    if df is None or df.empty:
        return 0.0
    return float((df["train_tokens_per_s"] * df["train_time_s"]).sum())


def run_one(exp: dict[str, Any], root: Path) -> list[dict[str, Any]]:
    """Run one search; one record per trial: final stream_loss, tasks, finish time, own tokens."""
    from adaptune.search import search

    path = root / f"{exp['name']}.yaml"
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    t0 = time.perf_counter()
    res = search(path, quiet=True)
    wall = time.perf_counter() - t0
    T = len(exp["run"]["stream"]["tasks"])
    trials = []
    for r in res.result_grid:
        m = r.metrics or {}
        trials.append({
            "trial_id": m.get("trial_id"),
            "stream_loss": m.get("stream_loss"),
            "tasks_done": int(m.get("task_index", 0)),
            "complete": int(m.get("task_index", 0)) >= T,
            "finished_at": m.get("timestamp"),
            "own_tokens": own_tokens(r),
        })
    trials.sort(key=lambda t: t["finished_at"] or 0)
    print(f"  {exp['name']}: {len(trials)} trials, {wall:.0f} s, "
          f"{sum(t['own_tokens'] for t in trials):,.0f} tokens", flush=True)
    return trials


def best_within(trials: list[dict[str, Any]], budget: float) -> float | None:
    """Best final stream_loss of a complete trial finished before the cumulative tokens (finish
    order) passed ``budget``."""
    spent, best = 0.0, None
    for t in trials:
        spent += t["own_tokens"]
        if spent > budget * (1 + 1e-9):
            break
        if t["complete"] and t["stream_loss"] is not None:
            best = t["stream_loss"] if best is None else min(best, t["stream_loss"])
    return best


def tokens_to(trials: list[dict[str, Any]], target: float) -> float | None:
    """Cumulative tokens (finish order) when a complete trial first reaches ``target``."""
    spent = 0.0
    for t in trials:
        spent += t["own_tokens"]
        if t["complete"] and t["stream_loss"] is not None and t["stream_loss"] <= target:
            return spent
    return None


def best(trials: list[dict[str, Any]]) -> float | None:
    values = [t["stream_loss"] for t in trials if t["complete"] and t["stream_loss"] is not None]
    return min(values) if values else None


def run_seed(seed: int, root: Path, quick: bool) -> dict[str, Any]:
    tokens = 8192 if quick else 16384
    pop, n = (4, 6) if quick else (8, 20)
    three = ["shakespeare", "news", "medical"]
    four = [*three, "wiki"]
    pbt = {"algorithm": "pbt", "num_samples": pop,
           "pbt": {"perturbation_interval": 1, "quantile_fraction": 0.25}}
    tpe = {"algorithm": "tpe", "num_samples": n, "scheduler": "asha"}
    out: dict[str, Any] = {"seed": seed}
    out["pbt"] = run_one(experiment(f"pbt-s{seed}", three, tokens, pbt, seed, root), root)
    out["tpe"] = run_one(experiment(f"tpe-s{seed}", three, tokens, tpe, seed, root), root)
    out["cold4"] = run_one(experiment(f"cold4-s{seed}", four, tokens, tpe, seed, root), root)
    warm = {**tpe, "warm_start": f"tpe-s{seed}", "warm_start_enqueue": 2}
    out["warm4"] = run_one(experiment(f"warm4-s{seed}", four, tokens, warm, seed, root), root)
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per seed: the PBT/TPE comparison at PBT's compute, and warm/cold compute to target."""
    rows = []
    for r in runs:
        budget = sum(t["own_tokens"] for t in r["pbt"])
        b_pbt, b_tpe = best(r["pbt"]), best_within(r["tpe"], budget)
        target = None if best(r["cold4"]) is None else best(r["cold4"]) + TARGET_NATS
        cold = None if target is None else tokens_to(r["cold4"], target)
        warm = None if target is None else tokens_to(r["warm4"], target)
        rows.append({
            "seed": r["seed"], "budget_tokens": budget, "pbt_best": b_pbt, "tpe_asha_best": b_tpe,
            "pbt_minus_tpe": None if None in (b_pbt, b_tpe) else b_pbt - b_tpe,
            "tpe_asha_all_tokens": sum(t["own_tokens"] for t in r["tpe"]),
            "tpe_asha_best_all": best(r["tpe"]),
            "cold_best": best(r["cold4"]), "warm_best": best(r["warm4"]),
            "cold_tokens_to_target": cold, "warm_tokens_to_target": warm,
            "warm_over_cold": None if None in (cold, warm) else warm / cold,
        })
    diffs = [r["pbt_minus_tpe"] for r in rows if r["pbt_minus_tpe"] is not None]
    verdict = ("PBT better" if diffs and all(d < 0 for d in diffs) and len(diffs) == len(rows)
               else "PBT worse" if diffs and all(d > 0 for d in diffs) and len(diffs) == len(rows)
               else "no difference shown")
    return {"rows": rows, "pbt_verdict": verdict}


def _f(v: Any, spec: str = ".4f") -> str:
    return "—" if v is None else format(v, spec)


def table(summary: dict[str, Any]) -> str:
    lines = [
        "| seed | budget (tokens) | PBT best | TPE+ASHA best at budget | PBT − TPE+ASHA | "
        "TPE+ASHA best, all trials (tokens) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['seed']} | {r['budget_tokens']:,.0f} | {_f(r['pbt_best'])} | "
            f"{_f(r['tpe_asha_best'])} | {_f(r['pbt_minus_tpe'], '+.4f')} | "
            f"{_f(r['tpe_asha_best_all'])} ({r['tpe_asha_all_tokens']:,.0f}) |"
        )
    lines.append(f"\nverdict (all three paired differences of one sign): {summary['pbt_verdict']}")
    lines += [
        "",
        "| seed | cold best | target | cold tokens to target | warm tokens to target | "
        "warm / cold | warm best |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary["rows"]:
        target = None if r["cold_best"] is None else r["cold_best"] + TARGET_NATS
        lines.append(
            f"| {r['seed']} | {_f(r['cold_best'])} | {_f(target)} | "
            f"{_f(r['cold_tokens_to_target'], ',.0f')} | "
            f"{_f(r['warm_tokens_to_target'], ',.0f')} | {_f(r['warm_over_cold'], '.2f')} | "
            f"{_f(r['warm_best'])} |"
        )
    ratios = [r["warm_over_cold"] for r in summary["rows"] if r["warm_over_cold"] is not None]
    if ratios:
        lines.append(f"\nwarm / cold: median {statistics.median(ratios):.2f}, "
                     f"min {min(ratios):.2f}, max {max(ratios):.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: this benchmark reads the shared corpora")
    seeds = args.seeds[:1] if args.quick else args.seeds
    runs = []
    with tempfile.TemporaryDirectory(prefix="adaptune-bench-search-") as tmp:
        for seed in seeds:
            print(f"seed {seed}", flush=True)
            runs.append(run_seed(seed, Path(tmp), args.quick))
    summary = summarize(runs)
    out = QUICK_OUT if args.quick else OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs, **summary}, indent=1))
    print(table(summary))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
