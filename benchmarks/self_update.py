"""Self-generated rehearsal against real replay and naive fine-tuning on stories260K.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/self_update.py [--seeds 0 1 2] [--threads 1]
        [--experiment experiments/self-update.yaml] [--set KEY=VALUE ...]

Runs ``experiments/self-update.yaml`` (stories260K learns Shakespeare, news and medical
abstracts; a retain domain of its own stories) once per variant and seed, with the experiment's
settings otherwise (lr 3e-3, cosine, batch 16, full fine-tuning):

- ``naive``: no rehearsal (``self_fraction=0``, ``buffer_size=0``);
- ``replay``: real replay of the stream's past blocks, 4 of every 16 rows (``buffer_size=256``,
  one task's worth of blocks, ``replay_fraction=0.25``);
- ``self``: self-generated rehearsal, the same 4 of 16 rows (``self_fraction=0.25``, the
  experiment's generation settings and filters: samples start from the BOS token, the model's
  own document start);
- ``self (eos prompt)``: the same, samples start from the EOS token, the separator the stream's
  text is packed with (what follows it in training is the start of a task's document);
- ``self + replay``: both (BOS prompt), 8 of 16 rows.

Reports, after the last task, ``retain_forgetting`` (retain loss now minus before the first
task), the stream's ``forgetting`` (mean over the first two tasks of their loss now minus their
best), ``stream_loss`` and ``retain_loss``: the mean and min-max over seeds, and the share of
naive forgetting each variant removes, ``1 - variant / naive`` (of the seed means), and each
against replay, ``(naive - variant) / (naive - replay)``: the share of what real replay removes.
Writes ``benchmarks/results/self_update.json``; ``--tabulate FILE`` prints the tables of an
earlier file again without running anything.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from adaptune.search.experiment import load_experiment
from adaptune.trainables import prepare, run_stream

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "self_update.json"
VARIANTS: dict[str, list[str]] = {
    "naive": ["self_fraction=0", "buffer_size=0"],
    "replay": ["self_fraction=0", "buffer_size=256", "replay_fraction=0.25"],
    "self": ["self_fraction=0.25", "buffer_size=0"],
    "self (eos prompt)": ["self_fraction=0.25", "buffer_size=0", "gen_prompt=eos"],
    "self + replay": ["self_fraction=0.25", "buffer_size=256", "replay_fraction=0.25"],
}
MEASURES = ("retain_forgetting", "forgetting", "stream_loss", "retain_loss")


def run_one(experiment: str, overrides: list[str]) -> dict[str, Any]:
    """One run of the stream; the last report's measures, per-task self-replay numbers, time."""
    exp = load_experiment(experiment, overrides)
    prep = prepare(exp.run)
    reports: list[dict[str, Any]] = []
    start = time.perf_counter()
    run_stream(prep, report=lambda m, _c: reports.append(m))
    last = reports[-1]
    out: dict[str, Any] = {m: last[m] for m in MEASURES}
    out["wall_s"] = time.perf_counter() - start
    out["forgetting_by_task"] = {
        t.name: last[f"forgetting/{t.name}"] for t in exp.run.stream.tasks
    }
    out["self_replay"] = [
        {k: r[k] for k in r if k.startswith("self_")} for r in reports if "self_generated" in r
    ]
    return out


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def tabulate(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean and min-max over seeds per variant and measure; the share of naive forgetting
    each variant removes, and that share against real replay's."""
    table = {v: {m: summary([r[m] for r in rs]) for m in MEASURES} for v, rs in runs.items()}
    removed: dict[str, dict[str, float]] = {}
    against: dict[str, dict[str, float]] = {}
    for m in ("retain_forgetting", "forgetting"):
        naive = table["naive"][m]["mean"]
        real = naive - table["replay"][m]["mean"]
        others = [v for v in runs if v != "naive"]
        removed[m] = {v: 1 - table[v][m]["mean"] / naive for v in others}
        against[m] = {v: (naive - table[v][m]["mean"]) / real for v in others if v != "replay"}
    return {"summary": table, "removed_share": removed, "vs_replay": against}


def show(record: dict[str, Any]) -> None:
    print(f"\n| variant | {' | '.join(MEASURES)} |\n|---|{'---|' * len(MEASURES)}")
    for v, row in record["summary"].items():
        cells = [f"{s['mean']:.4f} ({s['min']:.4f}–{s['max']:.4f})" for s in row.values()]
        print(f"| {v} | {' | '.join(cells)} |")
    for key in ("removed_share", "vs_replay"):
        for m, shares in record[key].items():
            print(f"{key} {m}: " + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=str(ROOT / "experiments" / "self-update.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE, every run")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--tabulate", metavar="FILE", help="print FILE's tables; run nothing")
    args = parser.parse_args()
    if args.tabulate:
        show(json.loads(Path(args.tabulate).read_text()))
        return

    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for seed in args.seeds:
        for variant, overrides in VARIANTS.items():
            sets = [*args.set, *overrides, f"seed={seed}", f"run.hardware.threads={args.threads}"]
            result = run_one(args.experiment, sets) | {"seed": seed}
            runs[variant].append(result)
            print(
                f"seed {seed} {variant:<18} retain_forgetting {result['retain_forgetting']:.4f}  "
                f"forgetting {result['forgetting']:.4f}  stream_loss {result['stream_loss']:.4f}  "
                f"[{result['wall_s']:.0f}s]",
                flush=True,
            )

    record = {
        "experiment": str(Path(args.experiment).resolve().relative_to(ROOT)),
        "overrides": args.set,
        "variants": VARIANTS,
        "seeds": args.seeds,
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        **tabulate(runs),
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    show(record)
    print(f"\n{args.out}")


if __name__ == "__main__":
    main()
