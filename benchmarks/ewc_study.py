"""Does EWC reduce forgetting, and in which form? Seeds fixed in advance, paired against naive.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 nice -n 10 \\
        .venv/bin/python benchmarks/ewc_study.py

Stream: three real domains from ``../shared/data`` (Shakespeare -> WikiText-2 -> Python code,
as ``benchmarks/landscape.py``), the tiny GPT (2 layers, 64 wide, byte tokenizer), 64-token
blocks, the default optimizer (AdamW lr 1e-3, per-task warmup + cosine, weight decay 0.01,
gradient clipping 1.0). Every point runs the seeds in :data:`SEEDS` (the same list for every
variant, naive included) through :func:`trainables.run_stream` in-process, one thread.

λ is set per estimator from its own Fisher scale: a calibration run (seed 0, task 1 only)
measures ``ewc/fisher_mean`` F̄ of each estimator, and a point's λ is ``s / F̄`` for a strength
``s`` of :data:`STRENGTHS` (decoupled: ``lr·s`` is the mean per-step pull factor). The
statistic, fixed before any run: per point, mean ± std and a 95 % t-interval of each measure
over the seeds, and of its paired difference against naive with the same seed and the same
optimizer settings; "EWC reduces forgetting" means the 95 % CI of the paired difference in
first-domain forgetting lies below 0.

Results go to ``benchmarks/results/ewc_study.json`` after every run (a rerun skips the runs
already there, so an interrupted study resumes). ``--time-one`` times a naive and an EWC run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks" / "results" / "ewc_study.json"

DOMAINS = {  # task name -> file under the data directory (see its SOURCES.md)
    "shakespeare": "shakespeare/tinyshakespeare_input.txt",
    "wikipedia": "wikipedia/wikitext2_raw_test.txt",
    "code": "code_python/python_code_text.txt",
}
SEEDS = (0, 1, 2, 3, 4)  # every point, naive included
TOKENS = 65536  # train tokens per task (sized to the compute budget; see --time-one)
EVAL_BLOCKS = 16
# λ·F̄, weak .. frozen (a seed-0 pilot placed the ends); decoupled: lr·λ·F̄ = 1e-3 .. 10
STRENGTHS = {"loss": (1e-2, 1e-1, 1e0, 1e2), "decoupled": (1e0, 1e1, 1e2, 1e4)}
ONE_STRENGTH = {"loss": 1e-1, "decoupled": 1e2}  # the optimizer variants, fisher_samples
ESTIMATOR_APPLY = "loss"  # the estimator sweeps change one thing from the default variant
ESTIMATORS = {  # name -> (fisher_estimator, fisher_unit); the first is the main sweeps'
    "empirical/sequence": ("empirical", "sequence"),
    "sampled/sequence": ("sampled", "sequence"),
    "empirical/batch": ("empirical", "batch"),
}
OPTIM_VARIANTS = {  # name -> optimizer overrides; each gets its own naive baseline
    "default": {},
    "constant lr": {"schedule": "constant"},
    "no clipping": {"grad_clip": 0.0},
    "weight decay 0": {"weight_decay": 0.0},
}


def base_run(data: Path, seed: int) -> dict[str, Any]:
    return {
        "seed": seed,
        "model": {"name": "tiny-gpt", "n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 64},
        "stream": {
            "block_size": 64,
            "max_train_tokens": TOKENS,
            "max_eval_blocks": EVAL_BLOCKS,
            "tasks": [
                {"name": name, "source": "files", "files": [str(data / rel)]}
                for name, rel in DOMAINS.items()
            ],
        },
        "optim": {},
        "components": {"ewc": {"ewc_lambda": 0.0}},
        "hardware": {"device": "cpu", "threads": 1},
    }


def points(fbar: dict[str, float]) -> list[dict[str, Any]]:
    """Every grid point (without seeds): name, group, ewc settings, optimizer overrides."""
    out: list[dict[str, Any]] = []

    def add(group: str, optim: str, ewc: dict[str, Any], seeds: tuple[int, ...], s: float) -> None:
        est = f"{ewc.get('fisher_estimator', 'empirical')}/{ewc.get('fisher_unit', 'sequence')}"
        ewc = {**ewc, "ewc_lambda": float(f"{s / fbar[est]:.3g}") if s else 0.0}
        n = ewc.get("fisher_samples", 64)
        name = f"{group} | {optim} | {ewc.get('ewc_apply', '-')} {est} n={n} s={s:g}"
        out.append({"name": name, "group": group, "optim": optim, "strength": s, "ewc": ewc,
                    "seeds": list(seeds)})

    for optim in OPTIM_VARIANTS:
        add("naive", optim, {}, SEEDS, 0.0)
    for apply in STRENGTHS:
        for s in STRENGTHS[apply]:
            add(f"{apply} empirical/sequence", "default", {"ewc_apply": apply}, SEEDS, s)
    for optim in list(OPTIM_VARIANTS)[1:]:
        for apply, s in ONE_STRENGTH.items():
            add("optimizer", optim, {"ewc_apply": apply}, SEEDS, s)
    for est, (estimator, unit) in list(ESTIMATORS.items())[1:]:
        for s in STRENGTHS[ESTIMATOR_APPLY]:
            ewc = {"ewc_apply": ESTIMATOR_APPLY, "fisher_estimator": estimator, "fisher_unit": unit}
            add(f"{ESTIMATOR_APPLY} {est}", "default", ewc, SEEDS, s)
    for n in (16, 256):  # 64 is the main sweeps'
        ewc = {"ewc_apply": ESTIMATOR_APPLY, "fisher_samples": n}
        add("fisher_samples", "default", ewc, SEEDS, ONE_STRENGTH[ESTIMATOR_APPLY])
    return out


class Runner:
    """Tokenizes the stream once; runs one configuration per call."""

    def __init__(self, data: Path) -> None:
        from adaptune.trainables import parse_run_config, prepare

        self.data = data
        self.prep = prepare(parse_run_config(base_run(data, 0)))

    def run(self, seed: int, optim: dict[str, Any], ewc: dict[str, Any],
            stop_after: int | None = None) -> dict[str, Any]:
        from adaptune.trainables import parse_run_config, run_stream
        from adaptune.trainables.run import Prepared

        run = base_run(self.data, seed)
        run["optim"] = optim
        run["components"]["ewc"] = ewc
        prep = Prepared(parse_run_config(run), self.prep.tokenizer, self.prep.tasks, None)
        reports: list[dict[str, Any]] = []
        cpu0 = time.process_time()
        run_stream(prep, report=lambda m, _c: reports.append(m), stop_after=stop_after)
        return {"reports": reports, "cpu_s": time.process_time() - cpu0}


def measures(reports: list[dict[str, Any]]) -> dict[str, Any]:
    last = reports[-1]
    first = next(iter(DOMAINS))
    out = {
        "forgetting_first": last[f"forgetting/{first}"],
        "forgetting": last["forgetting"],
        "new_task_loss": last["new_task_loss"],
        "stream_loss": last["stream_loss"],
        "loss_matrix": last["loss_matrix"],
    }
    for key in ("ewc/fisher_mean", "ewc/penalty", "ewc/penalty_share"):
        if key in last:
            out[key] = [r[key] for r in reports]
    return out


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}


def describe(values: list[float]) -> dict[str, Any]:
    """Mean, std and the 95 % t-interval of the mean over ``values`` (one per seed)."""
    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else float("nan")
    half = T975[n - 1] * std / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "n": n,
            "values": values}


MEASURES = ("forgetting_first", "forgetting", "new_task_loss", "stream_loss")


def summarize(point: dict[str, Any], naive: dict[str, Any]) -> dict[str, Any]:
    """Per measure: its description and that of the paired difference against naive."""
    runs, base = point["runs"], naive["runs"]
    seeds = [s for s in point["seeds"] if str(s) in runs and str(s) in base]
    out: dict[str, Any] = {"seeds": seeds}
    for m in MEASURES:
        out[m] = describe([runs[str(s)][m] for s in seeds])
        out[f"{m}_minus_naive"] = describe([runs[str(s)][m] - base[str(s)][m] for s in seeds])
    diff = out["forgetting_first_minus_naive"]["ci95"]
    out["reduces_forgetting"] = bool(len(seeds) > 1 and diff[1] < 0)
    return out


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def save(path: Path, result: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def calibrate(runner: Runner, result: dict[str, Any], path: Path) -> dict[str, float]:
    """F̄ of each estimator after task 1 (seed 0), and for 16/256 samples of the default."""
    fbar = result.setdefault("meta", {}).setdefault("fisher_mean", {})
    for est, (estimator, unit) in ESTIMATORS.items():
        if est not in fbar:
            ewc = {"ewc_lambda": 1.0, "fisher_estimator": estimator, "fisher_unit": unit}
            fbar[est] = runner.run(0, {}, ewc, stop_after=1)["reports"][0]["ewc/fisher_mean"]
            save(path, result)
    return fbar


def main() -> None:  # noqa: C901 - argument handling, calibration, the grid, the summary
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--time-one", action="store_true", help="time one naive run and exit")
    parser.add_argument("--report", action="store_true",
                        help="print the tables of the results file, run nothing")
    args = parser.parse_args()
    if args.report:
        print(table(finish(load(args.out))))
        return
    if any(not (args.data / rel).is_file() for rel in DOMAINS.values()):
        print(f"skipped: the shared data is absent ({args.data})")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    runner = Runner(args.data.resolve())
    if args.time_one:
        for ewc in ({"ewc_lambda": 0.0}, {"ewc_lambda": 1.0, "ewc_apply": "decoupled"}):
            rec = runner.run(0, {}, ewc)
            print(f"{ewc}: {rec['cpu_s']:.1f} s CPU, {measures(rec['reports'])}")
        return
    result = load(args.out)
    fbar = calibrate(runner, result, args.out)
    grid = points(fbar)
    result["meta"] |= {
        "command": "benchmarks/ewc_study.py " + " ".join(sys.argv[1:]),
        "seeds": list(SEEDS), "tokens_per_task": TOKENS,
        "eval_blocks": EVAL_BLOCKS, "tasks": list(DOMAINS), "strengths": STRENGTHS,
        "one_strength": ONE_STRENGTH, "estimator_apply": ESTIMATOR_APPLY,
        "optim_variants": OPTIM_VARIANTS,
        "base_run": base_run(Path("<data>"), 0),
        "statistic": "95% t-interval of the paired (same seed) difference against naive; "
                     "EWC reduces forgetting iff its upper end in first-domain forgetting < 0",
    }
    stored = result.setdefault("points", {})
    cpu = result["meta"].setdefault("cpu_s", 0.0)
    for p in grid:
        rec = stored.setdefault(p["name"], {**p, "runs": {}})
        rec["seeds"] = p["seeds"]
        for seed in p["seeds"]:
            if str(seed) in rec["runs"]:
                continue
            out = runner.run(seed, OPTIM_VARIANTS[p["optim"]], p["ewc"])
            rec["runs"][str(seed)] = measures(out["reports"]) | {"cpu_s": out["cpu_s"]}
            cpu += out["cpu_s"]
            result["meta"]["cpu_s"] = cpu
            save(args.out, result)
            m = rec["runs"][str(seed)]
            print(f"{p['name']} seed {seed}: forgetting/first {m['forgetting_first']:.3f} "
                  f"new {m['new_task_loss']:.3f} ({out['cpu_s']:.1f} s; total {cpu:.0f} s)",
                  flush=True)
    save(args.out, finish(result))
    print(table(result))


def finish(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with each point's summary against the naive point of its optimizer."""
    stored = result["points"]
    naive = {p["optim"]: p for p in stored.values() if p["group"] == "naive"}
    for p in stored.values():
        if p["runs"] and p["optim"] in naive:
            p["summary"] = summarize(p, naive[p["optim"]])
    return result


def table(result: dict[str, Any]) -> str:
    """Markdown: one row per point, mean ± std over the seeds and the paired difference
    against naive (same seed) with its 95 % t-interval."""
    def cell(d: dict[str, Any]) -> str:
        return f"{d['mean']:.3f} ± {d['std']:.3f}"

    def diff(d: dict[str, Any]) -> str:
        return f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"

    lines = ["| point | optimizer | λ | seeds | forgetting (first) | Δ vs naive [95% CI] | "
             "forgetting (all) | new_task_loss | Δ new_task_loss | stream_loss | "
             "Δ stream_loss |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in result["points"].values():
        s = p.get("summary")
        if s is None:
            continue
        label = p["group"] if p["group"] != "fisher_samples" else (
            f"fisher_samples={p['ewc']['fisher_samples']}")
        if p["group"] != "naive":
            label += f" (s={p['strength']:g})" if p["group"] != "optimizer" else (
                f" {p['ewc']['ewc_apply']} (s={p['strength']:g})")
        lines.append(
            f"| {label} | {p['optim']} | {p['ewc'].get('ewc_lambda', 0):.3g} | {len(s['seeds'])} | "
            f"{cell(s['forgetting_first'])} | {diff(s['forgetting_first_minus_naive'])} | "
            f"{cell(s['forgetting'])} | {cell(s['new_task_loss'])} | "
            f"{diff(s['new_task_loss_minus_naive'])} | {cell(s['stream_loss'])} | "
            f"{diff(s['stream_loss_minus_naive'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
