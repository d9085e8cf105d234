"""Claims from the continual-learning literature, re-measured with adaptune on real domains.

    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1
    nice -n 10 .venv/bin/python benchmarks/findings.py replay
    nice -n 10 .venv/bin/python benchmarks/findings.py replay-fine  # 1 % replay, batch 100
    nice -n 10 .venv/bin/python benchmarks/findings.py lr
    nice -n 10 .venv/bin/python benchmarks/findings.py distill
    nice -n 10 .venv/bin/python benchmarks/findings.py lora        # from learns-less.json
    nice -n 10 .venv/bin/python benchmarks/findings.py search
    nice -n 10 .venv/bin/python benchmarks/findings.py ewc-vs-replay --set ewc_lambda=100
    nice -n 10 .venv/bin/python benchmarks/findings.py ewc-vs-replay --set ewc_lambda=10000
    .venv/bin/python benchmarks/findings.py report                  # tables and plots again

Each claim writes ``benchmarks/results/findings-<claim>.json`` after every run (a stopped
command resumes: runs already in the file are kept) and ``docs/img/findings-<claim>.png``.

Fixed before any run, the same for every variant:

- seeds 0, 1, 2 (model initialisation, batch order, every component's draws); the figures are
  the mean ± sample std over them, every seed's value in the JSON;
- the stream: Shakespeare, WikiText-2, then Python code (``../shared/data``; the landscape's),
  65,536 training tokens each (1,024 blocks of 64 tokens), 32 held-out blocks per task, the
  same split (``data_seed`` 0);
- the model: the tiny GPT (2 layers x 64, byte-level tokenizer, built from config), AdamW at
  lr 2e-3 (the quickstart's), cosine schedule, batch 20 blocks (so 5, 10, 25 and 50 % replay
  are whole rows of a batch; 1 %: ``replay-fine``, batch 100), 1 epoch, 1 thread;
- replay keeps a reservoir of 2,048 blocks: every block of the first two tasks;
- a difference between two variants counts when the three per-seed paired differences share
  their sign and their mean exceeds their std; "most forgetting removed" means more than half
  of naive fine-tuning's mean forgetting.

``replay-fine`` re-measures 0, 1 and 5 % replay at a batch of 100 blocks (1 % is one row) with
262,144 tokens per task (41 steps per task) and a buffer holding both earlier tasks.
``replay`` also runs a control: naive fine-tuning with the steps of 50 % replay. ``ewc-vs-replay``
takes the EWC variant's settings from ``--set`` (each setting adds its rows to the same file).
``search`` uses three other domains (AG News sports, medical abstracts, AG News world; 32,768
tokens per task) and the quickstart's space and search settings; see :func:`cmd_search`.
"""

from __future__ import annotations

import argparse
import copy
import csv
import html
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
IMG = ROOT / "docs" / "img"
LEARNS_LESS = RESULTS / "learns-less.json"  # benchmarks/learns_less.py's runs
CACHE = ROOT / "runs" / "cache" / "findings"  # derived news files (not committed)

SEEDS = (0, 1, 2)
DEFAULT_LR = 2e-3
BUFFER = 2048  # blocks: every block of the main stream's first two tasks
MAIN_TASKS = {
    "shakespeare": "shakespeare/tinyshakespeare_input.txt",
    "wikipedia": "wikipedia/wikitext2_raw_test.txt",
    "code": "code_python/python_code_text.txt",
}
MAIN_NAME = "Shakespeare → WikiText → code"
# AG News classes (test.csv's first column) kept as separate domains for the search stream
NEWS_CLASSES = {"news_sports": "2", "news_world": "1"}
SEARCH_TASKS = ["news_sports", "medical", "news_world"]
MEDICAL = "biomed_medical_abstracts/medical_abstracts_text.txt"

REPLAY_DOSES = (0.0, 0.05, 0.10, 0.25, 0.50)
# replay-fine: a batch of 100 blocks makes 1 % a whole row; 4x the tokens keeps ~41 steps a task
FINE_DOSES = (0.0, 0.01, 0.05)
FINE_BATCH = 100
FINE_TOKENS = 262144
FINE_BUFFER = 2 * FINE_TOKENS // 64  # blocks: every block of the first two tasks
LRS = (3e-4, 1e-3, 2e-3, 4e-3, 8e-3)
DISTILL_ALPHAS = (1.0, 4.0)
SEARCH_SEED = 100  # the search's own seed (its confirm runs: 101, 102), apart from SEEDS
SEARCH_TRIALS = 12  # the quickstart's num_samples
METRICS = ("stream_loss", "forgetting", "new_task_loss", "bwt", "train_tokens", "train_loss")

# A claim's runs: label -> overrides (``--set`` syntax) on the stream's base run.
CLAIMS: dict[str, dict[str, list[str]]] = {
    "replay": {
        f"replay {round(100 * f)} %": [f"buffer_size={BUFFER if f else 0}",
                                       f"replay_fraction={f}"]
        for f in REPLAY_DOSES
    } | {
        # replayed rows are added to a task's steps, not taken from them: naive fine-tuning
        # with the steps of 50 % replay (2 passes over tasks 2 and 3) separates the two effects
        "naive, steps of replay 50 %": ["run.schedule={epochs: [1, 2, 2]}"],
    },
    "replay-fine": {
        f"replay {round(100 * f)} %": [f"buffer_size={FINE_BUFFER if f else 0}",
                                       f"replay_fraction={f}"]
        for f in FINE_DOSES
    },
    "lr": {f"naive lr {lr:g}": [f"lr={lr}"] for lr in LRS},
    "distill": {
        "replay 10 %": [f"buffer_size={BUFFER}", "replay_fraction=0.1"],
        **{f"replay 10 % + distill α={a:g}": [f"buffer_size={BUFFER}", "replay_fraction=0.1",
                                              f"distill_alpha={a}", "temperature=2.0"]
           for a in DISTILL_ALPHAS},
    },
}


def base_run(tasks: dict[str, str], tokens: int) -> dict[str, Any]:
    """The fixed part of every run of a claim; ``tasks``: name -> file."""
    return {
        "seed": 0,
        "model": {"name": "tiny-gpt", "n_layer": 2, "n_embd": 64, "n_head": 4,
                  "n_positions": 64},
        "stream": {
            "block_size": 64, "max_train_tokens": tokens, "max_eval_blocks": 32, "data_seed": 0,
            "tasks": [{"name": n, "source": "files", "files": [f]} for n, f in tasks.items()],
        },
        "optim": {"lr": DEFAULT_LR, "batch_size": 20, "epochs": 1, "schedule": "cosine"},
        "components": {
            "replay": {"buffer_size": 0, "replay_fraction": 0.0},
            "ewc": {"ewc_lambda": 0.0},
            "distill": {"distill_alpha": 0.0, "temperature": 2.0},
        },
        "hardware": {"device": "cpu", "threads": 1},
    }


def main_stream() -> dict[str, Any]:
    return base_run({n: str(DATA / f) for n, f in MAIN_TASKS.items()}, 65536)


def fine_stream() -> dict[str, Any]:
    run = base_run({n: str(DATA / f) for n, f in MAIN_TASKS.items()}, FINE_TOKENS)
    run["optim"]["batch_size"] = FINE_BATCH
    return run


def search_stream() -> dict[str, Any]:
    files = derive_news()
    files["medical"] = str(DATA / MEDICAL)
    return base_run({n: files[n] for n in SEARCH_TASKS}, 32768)


def derive_news() -> dict[str, str]:
    """AG News test rows of one class as text (title, newline, description; blank line
    between rows), as SOURCES.md derives the whole file."""
    CACHE.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, label in NEWS_CLASSES.items():
        path = CACHE / f"{name}.txt"
        if not path.is_file():
            with open(DATA / "news_agnews" / "test.csv", newline="", encoding="utf-8") as f:
                rows = [r for r in csv.reader(f) if r and r[0] == label]

            def clean(s: str) -> str:
                s = html.unescape(re.sub(r"#(\d+);", r"&#\1;", s.replace("\\", " ")))
                return re.sub(r" +", " ", s).strip()

            path.write_text("\n\n".join(f"{clean(t)}\n{clean(d)}" for _, t, d in rows) + "\n")
        out[name] = str(path)
    return out


# ---- running jobs in-process ---------------------------------------------------------------

_PREPARED: dict[str, Any] = {}


def resolve(run: dict[str, Any], overrides: list[str]) -> Any:
    """``overrides`` applied as ``adaptune train --set`` applies them; a validated RunConfig."""
    from adaptune.search.experiment import apply_overrides
    from adaptune.trainables import parse_run_config

    data = apply_overrides({"name": "findings", "run": copy.deepcopy(run)}, overrides)
    return parse_run_config(data["run"])


def one_run(run: dict[str, Any], overrides: list[str], seed: int) -> dict[str, Any]:
    """One ``adaptune train`` equivalent: the final report, loss matrix and costs."""
    from adaptune.trainables import prepare, run_stream
    from adaptune.trainables.run import Prepared

    cfg = resolve(run, [*overrides, f"seed={seed}"])
    key = json.dumps(run["stream"], sort_keys=True)
    if key not in _PREPARED:  # the stream is tokenized once per process
        _PREPARED[key] = prepare(cfg)
    prep = _PREPARED[key]
    reports: list[dict[str, Any]] = []
    wall, cpu = time.perf_counter(), time.process_time()
    run_stream(Prepared(cfg, prep.tokenizer, prep.tasks, None),
               report=lambda m, _c: reports.append(m))
    last = reports[-1]
    return {
        "seed": seed, "overrides": overrides,
        **{k: last[k] for k in METRICS},
        **{k: v for k, v in last.items() if k.startswith("loss/")},
        "params_trainable": last["params_trainable"],
        "loss_matrix": last["loss_matrix"],
        "ewc": cfg.components.ewc.model_dump(mode="json"),
        "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
    }


def stats(values: list[float]) -> dict[str, Any]:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": sd, "values": values}


def summarize(runs: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """label -> metric -> mean, std and per-seed values (in SEEDS order)."""
    out = {}
    for label in labels:
        rows = sorted((r for r in runs if r["variant"] == label), key=lambda r: r["seed"])
        if rows:
            out[label] = {m: stats([r[m] for r in rows]) for m in (*METRICS, "wall_s", "cpu_s")}
    return out


def paired(s: dict[str, Any], a: str, b: str, metric: str) -> dict[str, Any]:
    """``a − b`` seed by seed, and whether it counts (same sign on every seed, |mean| > std)."""
    d = [x - y for x, y in zip(s[a][metric]["values"], s[b][metric]["values"], strict=True)]
    st = stats(d)
    same = all(x > 0 for x in d) or all(x < 0 for x in d)
    return {**st, "counts": same and abs(st["mean"]) > st["std"]}


def result_path(claim: str) -> Path:
    return RESULTS / f"findings-{claim}.json"


def load(claim: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The claim's results so far when they were made on the same base run (variants added
    since join them), else a fresh record."""
    path = result_path(claim)
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("setup", {}).get("base_run") == meta["setup"]["base_run"]:
            data["variants"] = {**data.get("variants", {}), **meta["variants"]}
            return data
    return {**meta, "runs": []}


def save(claim: str, data: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result_path(claim).write_text(json.dumps(data, indent=1) + "\n")


def run_variants(claim: str, data: dict[str, Any], run: dict[str, Any],
                 variants: dict[str, list[str]]) -> None:
    """Every variant x seed not yet in ``data``, seed by seed; saved after each run."""
    for seed in SEEDS:
        for label, overrides in variants.items():
            if any(r["variant"] == label and r["seed"] == seed for r in data["runs"]):
                continue
            rec = {"variant": label, **one_run(run, overrides, seed)}
            data["runs"].append(rec)
            data["summary"] = summarize(data["runs"], list(data["variants"]))
            save(claim, data)
            print(f"  {label} seed {seed}: stream {rec['stream_loss']:.4f} forgetting "
                  f"{rec['forgetting']:+.4f} new {rec['new_task_loss']:.4f} tokens "
                  f"{rec['train_tokens']:,} ({rec['wall_s']:.0f} s wall, {rec['cpu_s']:.0f} s "
                  "cpu)", flush=True)


def command_line() -> str:
    return "benchmarks/findings.py " + " ".join(sys.argv[1:])


def portable(run: dict[str, Any]) -> dict[str, Any]:
    """The run with data paths relative to the repository's parent (machine-independent)."""
    run = copy.deepcopy(run)
    for t in run["stream"]["tasks"]:
        t["files"] = [os.path.relpath(f, ROOT.parent) for f in t["files"]]
    return run


def cmd_grid(claim: str, _args: argparse.Namespace) -> dict[str, Any]:
    """replay, replay-fine, lr, distill: a fixed list of variants on the main stream."""
    run = fine_stream() if claim == "replay-fine" else main_stream()
    variants = CLAIMS[claim]
    meta = {"claim": claim, "command": command_line(), "seeds": list(SEEDS),
            "setup": {"base_run": portable(run), "variants": variants}, "variants": variants}
    data = load(claim, meta)
    data["command"] = meta["command"]
    run_variants(claim, data, run, variants)
    return data


# ---- EWC against replay at equal memory ------------------------------------------------------


def trainable_params(run: dict[str, Any]) -> int:
    from adaptune.trainables.model import build_model, load_tokenizer

    cfg = resolve(run, [])
    model = build_model(cfg.model, load_tokenizer(cfg.model))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def cmd_ewc(args: argparse.Namespace) -> dict[str, Any]:
    """Naive, EWC with the ``--set`` settings, and replay holding the bytes EWC holds.

    EWC keeps, per trainable parameter, a float32 Fisher (or its running sum) and a float32
    anchor: 8 bytes. The replay buffer keeps each block as ``block_size`` int32 token ids
    (``ReservoirBuffer``): 4 * block_size bytes. Equal memory: N = 8 P / (4 * block_size)
    = 2 P / block_size blocks, capped by the blocks the stream has before its last task.
    """
    run = main_stream()
    p = trainable_params(run)
    block = run["stream"]["block_size"]
    equal = 2 * p // block
    # the blocks seen before the last task: more cannot be kept
    available = (len(run["stream"]["tasks"]) - 1) * run["stream"]["max_train_tokens"] // block
    buffer = min(equal, available)
    ewc = args.set or ["ewc_lambda=100"]
    ewc_label = "EWC " + ", ".join(ewc)
    variants = {
        "naive": [],
        ewc_label: ewc,
        f"replay 25 %, {buffer} blocks": [f"buffer_size={buffer}", "replay_fraction=0.25"],
    }
    memory = {"params_trainable": p, "ewc_bytes": 8 * p, "block_bytes": 4 * block,
              "equal_memory_blocks": equal, "blocks_available": available,
              "buffer_size": buffer, "replay_bytes": 4 * block * buffer}
    meta = {"claim": "ewc-vs-replay", "command": command_line(), "seeds": list(SEEDS),
            "setup": {"base_run": portable(run)}, "variants": {}, "memory": memory}
    data = load("ewc-vs-replay", meta)
    data["variants"].update(variants)  # a later --set adds its EWC variant beside earlier ones
    data["command"], data["memory"] = meta["command"], memory
    data.setdefault("ewc_variants", [])
    if ewc_label not in data["ewc_variants"]:
        data["ewc_variants"].append(ewc_label)
    # the same --set under changed EWC defaults is a new configuration: run it again
    now = resolve(run, ewc).components.ewc.model_dump(mode="json")
    stale = [r for r in data["runs"] if r["variant"] == ewc_label and r["ewc"] != now]
    data.setdefault("superseded_runs", []).extend(stale)
    data["runs"] = [r for r in data["runs"] if r not in stale]
    run_variants("ewc-vs-replay", data, run, variants)
    return data


# ---- LoRA: learns less, forgets less (from learns_less.py's runs) ------------------------------


def cmd_lora(_args: argparse.Namespace) -> dict[str, Any]:
    """Mean ± std over learns_less.py's seeds, per update mode; nothing is trained here."""
    src = json.loads(LEARNS_LESS.read_text())
    runs = src["runs"]
    labels = list(src["variants"])
    m0 = runs[0]["matrix"]
    medical0 = m0["loss_matrix"][0][m0["tasks"].index("medical")]
    summary = {}
    for label in labels:
        rows = sorted((r for r in runs if r["variant"] == label), key=lambda r: r["seed"])
        summary[label] = {
            "seeds": [r["seed"] for r in rows],
            "medical_loss": stats([r["loss/medical"] for r in rows]),
            "learned": stats([medical0 - r["loss/medical"] for r in rows]),
            "retain_forgetting": stats([r["retain_forgetting"] for r in rows]),
            "params_trainable": rows[0]["params_trainable"],
        }
    data = {"claim": "lora", "command": command_line(),
            "source": "benchmarks/results/learns-less.json (benchmarks/learns_less.py)",
            "model": "SmolLM2-135M", "medical_before": medical0,
            "retain_before": m0["retain_matrix"][0][0], "variants": src["variants"],
            "summary": summary}
    save("lora", data)
    return data


# ---- is the search worth it? ------------------------------------------------------------------


def search_experiment(run: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """The quickstart's space and search settings on ``run``, one trial at a time."""
    from adaptune.search.experiment import read_yaml

    quick = read_yaml(ROOT / "experiments" / "quickstart.yaml")
    return {
        "name": "findings-search",
        "run": {**copy.deepcopy(run), "seed": SEARCH_SEED},
        "space": quick["space"],
        "search": {**quick["search"], "num_samples": SEARCH_TRIALS, "max_concurrent": 1},
        "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0},
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
                     "experiment_name": "findings-search"},
        "storage_path": str(tmp / "ray"),
    }


def run_search(run: dict[str, Any]) -> dict[str, Any]:
    """One search through the Python API; its champion's values and what it cost."""
    from adaptune.search import search
    from adaptune.search.experiment import parse_experiment

    with tempfile.TemporaryDirectory(prefix="findings-search-") as tmp:
        data = search_experiment(run, Path(tmp))
        exp = parse_experiment(data, "findings-search")
        start = time.perf_counter()
        found = search(exp, quiet=True)
        wall = time.perf_counter() - start
    best = found.summary.best
    trial_tokens = sum(int((r.metrics or {}).get("train_tokens", 0)) for r in found.result_grid)
    confirm_tokens, confirm_runs = 0, 0
    for row in found.summary.rows:
        if row.confirmed is not None:
            extra = row.confirmed.runs[1:]  # the trial itself is counted above
            confirm_runs += len(extra)
            confirm_tokens += sum(int(r.get("train_tokens", 0)) for r in extra)
    return {
        "space": data["space"], "search_settings": data["search"], "run_seed": SEARCH_SEED,
        "champion": {"trial_id": best.trial_id, "params": best.params,
                     "value": best.value},
        "trials": [{k: v for k, v in r.items()} for r in found.rows],
        "n_trials": len(found.rows), "confirm_runs": confirm_runs,
        "trained_tokens": trial_tokens + confirm_tokens, "trial_tokens": trial_tokens,
        "confirm_tokens": confirm_tokens, "wall_s": wall,
    }


def cmd_search(_args: argparse.Namespace) -> dict[str, Any]:
    """Naive over the lr grid and the literature default (10 % replay at the default lr) on
    SEEDS; one search (run seed SEARCH_SEED, so its confirm runs use seeds 101 and 102, not
    SEEDS); its champion re-run on SEEDS. Naive's best lr is the grid point with the lowest
    mean stream_loss over SEEDS (picked on the same seeds it is reported on)."""
    run = search_stream()
    variants = {**{f"naive lr {lr:g}": [f"lr={lr}"] for lr in LRS},
                "literature default: replay 10 %": [f"buffer_size={BUFFER}",
                                                    "replay_fraction=0.1"]}
    meta = {"claim": "search", "command": command_line(), "seeds": list(SEEDS),
            "setup": {"base_run": portable(run), "trials": SEARCH_TRIALS,
                      "search_seed": SEARCH_SEED},
            "variants": dict(variants)}
    data = load("search", meta)
    data["command"] = meta["command"]
    run_variants("search", data, run, variants)
    if "search" not in data:
        print("  search ...", flush=True)
        data["search"] = run_search(run)
        save("search", data)
    params = data["search"]["champion"]["params"]
    champion = {"search champion": [f"{k}={v}" for k, v in params.items()]}
    data["variants"].update(champion)
    run_variants("search", data, run, champion)
    naive = {k: v for k, v in data["summary"].items() if k.startswith("naive")}
    data["naive_best"] = min(naive, key=lambda k: naive[k]["stream_loss"]["mean"])
    save("search", data)
    return data


# ---- verdicts, tables, plots --------------------------------------------------------------------


def fmt(s: dict[str, Any], digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def verdict_replay(s: dict[str, Any], target: str = "replay 5 %") -> dict[str, Any]:
    """``target`` (5 % replay) against none: the share of naive's mean forgetting it removes
    (target: more than half, and a paired difference that counts) and what it costs on the new
    domain."""
    naive, labels = "replay 0 %", [k for k in s if k != "replay 0 %"]
    f0 = s[naive]["forgetting"]["mean"]
    out = {label: {"forgetting_removed": 1 - s[label]["forgetting"]["mean"] / f0,
                   "forgetting_diff": paired(s, label, naive, "forgetting"),
                   "new_task_loss_diff": paired(s, label, naive, "new_task_loss"),
                   "train_tokens_ratio": s[label]["train_tokens"]["mean"]
                   / s[naive]["train_tokens"]["mean"]}
           for label in labels}
    five = out.get(target)
    if five is None:
        return {"per_dose": out, "verdict": "incomplete"}
    ok = five["forgetting_diff"]["counts"] and five["forgetting_diff"]["mean"] < 0
    word = ("reproduced" if ok and five["forgetting_removed"] > 0.5
            else "partly" if ok else "not reproduced")
    return {"per_dose": out, "verdict": word}


def verdict_fine(s: dict[str, Any]) -> dict[str, Any]:
    """1 % replay against none at batch 100, and whether 5 % agrees with 5 % at batch 20: the
    rule's verdict on (5 % − 0 %) forgetting in each setting, and that difference's per-seed
    change from batch 20 to batch 100."""
    out = verdict_replay(s, "replay 1 %")
    coarse = result_path("replay")
    if coarse.is_file() and "replay 5 %" in s:
        c = json.loads(coarse.read_text())["summary"]
        d20, d100 = (paired(x, "replay 5 %", "replay 0 %", "forgetting") for x in (c, s))
        change = stats([b - a for a, b in zip(d20["values"], d100["values"], strict=True)])
        out["five_vs_batch20"] = {"batch20": d20, "batch100": d100, "change": change,
                                  "same_verdict": d20["counts"] == d100["counts"]}
    return out


def fine_curve() -> tuple[str, list[float], list[Any]] | None:
    """replay-fine's doses as a second curve on the replay plot, when it has run."""
    path = result_path("replay-fine")
    if not path.is_file():
        return None
    s = json.loads(path.read_text()).get("summary", {})
    return ("batch 100, 4x tokens", [float(k.split()[1]) for k in s], list(s.values()))


def verdict_lr(s: dict[str, Any], replay: dict[str, Any] | None) -> dict[str, Any]:
    """Forgetting rises and new-domain loss falls with lr (monotone over the grid's means);
    first-order: its forgetting range across the grid exceeds replay's across 0-50 %."""
    labels = [f"naive lr {lr:g}" for lr in LRS if f"naive lr {lr:g}" in s]
    f = [s[k]["forgetting"]["mean"] for k in labels]
    n = [s[k]["new_task_loss"]["mean"] for k in labels]
    up = all(b > a for a, b in zip(f, f[1:], strict=False))
    down = all(b < a for a, b in zip(n, n[1:], strict=False))
    lr_range = max(f) - min(f)
    out = {"forgetting_monotone_up": up, "new_task_loss_monotone_down": down,
           "forgetting_range": lr_range}
    if replay:
        rf = [v["forgetting"]["mean"] for v in replay["summary"].values()]
        out["replay_forgetting_range"] = max(rf) - min(rf)
        first = lr_range > out["replay_forgetting_range"]
    else:
        first = False
    out["verdict"] = ("reproduced" if up and first else "partly" if up or first
                      else "not reproduced")
    return out


def verdict_vs(s: dict[str, Any], ref: str, metrics: tuple[str, ...]) -> dict[str, Any]:
    """Every other variant against ``ref``: paired differences per metric."""
    return {k: {m: paired(s, k, ref, m) for m in metrics} for k in s if k != ref}


def verdict_search(data: dict[str, Any]) -> dict[str, Any]:
    s, best = data["summary"], data.get("naive_best")
    if "search champion" not in s or best is None:
        return {"verdict": "incomplete"}
    refs = {"literature default": "literature default: replay 10 %", "naive best lr": best}
    out = {name: paired(s, "search champion", ref, "stream_loss") for name, ref in refs.items()}
    beats = [v["counts"] and v["mean"] < 0 for v in out.values()]
    single = s["literature default: replay 10 %"]
    out["compute"] = {
        "search_trained_tokens": data["search"]["trained_tokens"],
        "single_run_tokens": single["train_tokens"]["mean"],
        "search_wall_s": data["search"]["wall_s"], "single_run_wall_s": single["wall_s"]["mean"],
        "naive_grid_tokens": sum(sum(v["train_tokens"]["values"]) for k, v in s.items()
                                 if k.startswith("naive")),
    }
    out["verdict"] = ("worth it" if all(beats) else "partly" if any(beats) else "not worth it")
    return out


def table(s: dict[str, Any], metrics: tuple[str, ...]) -> str:
    head = "| variant | " + " | ".join(metrics) + " | per-seed " + metrics[0] + " |"
    lines = [head, "|---" * (len(metrics) + 2) + "|"]
    for label, m in s.items():
        seeds = ", ".join(f"{v:.3f}" for v in m[metrics[0]]["values"])
        cells = " | ".join(fmt(m[k]) if k != "train_tokens" else f"{m[k]['mean']:,.0f}"
                           for k in metrics)
        lines.append(f"| {label} | {cells} | {seeds} |")
    return "\n".join(lines)


def _axes(n: int) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), dpi=110)
    return fig, axes


def _second_curve(ax: Any, metric: str, curve: tuple[str, list[float], list[Any]]) -> None:
    """A second dose curve (label, positions, each point's statistics) in its own colour."""
    label, xs, points = curve
    ax.errorbar(xs, [p[metric]["mean"] for p in points], yerr=[p[metric]["std"] for p in points],
                fmt="s--", color="tab:orange", capsize=4, label=label, zorder=4)
    for x, p in zip(xs, points, strict=True):
        ax.scatter([x] * len(p[metric]["values"]), p[metric]["values"], s=12,
                   color="tab:orange", alpha=0.5, zorder=2)


def plot_metrics(s: dict[str, Any], metrics: tuple[str, ...], path: Path, title: str,
                 xs: list[float] | None = None, xlabel: str = "", logx: bool = False,
                 extra: dict[str, tuple[float, dict[str, Any]]] | None = None,
                 curve: tuple[str, list[float], list[Any]] | None = None) -> None:
    """One panel per metric: mean ± std (error bars) and every seed (dots); ``xs``: numeric
    positions of the variants (a dose curve), else one column per variant; ``extra``: label ->
    (x, its statistics), a control drawn apart from the curve; ``curve``: a second dose curve
    (label, positions, each point's statistics)."""
    fig, axes = _axes(len(metrics))
    for ax, metric in zip(axes, metrics, strict=True):
        for label, (x, st) in (extra or {}).items():
            ax.errorbar([x], [st[metric]["mean"]], yerr=[st[metric]["std"]], fmt="D",
                        color="tab:red", capsize=4, label=label, zorder=4)
        if curve:
            _second_curve(ax, metric, curve)
        if extra or curve:
            ax.legend(fontsize=7)
    labels = list(s)
    pos = xs if xs is not None else list(range(len(labels)))
    for ax, metric in zip(axes, metrics, strict=True):
        means = [s[k][metric]["mean"] for k in labels]
        ax.errorbar(pos, means, yerr=[s[k][metric]["std"] for k in labels], fmt="o-"
                    if xs is not None else "o", capsize=4, color="tab:blue", zorder=3)
        for x, k in zip(pos, labels, strict=True):
            vals = s[k][metric]["values"]
            ax.scatter([x] * len(vals), vals, s=12, color="gray", alpha=0.7, zorder=2)
        ax.set_title(metric, fontsize=10)
        if xs is None:
            ax.set_xticks(pos, [k.replace(": ", ":\n").replace(" + ", "\n+ ") for k in labels],
                          fontsize=7, rotation=30, ha="right")
        else:
            ax.set_xlabel(xlabel)
            if logx:
                ax.set_xscale("log")
                ax.minorticks_off()
                ax.set_xticks(pos, [f"{x:g}" for x in pos], fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title + f" (mean ± std, dots: seeds {', '.join(map(str, SEEDS))})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def report_claim(claim: str) -> None:  # noqa: C901 - one branch per claim
    path = result_path(claim)
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    img = IMG / f"findings-{claim}.png"
    main = ("stream_loss", "forgetting", "new_task_loss", "train_tokens")
    print(f"\n## {claim}\n\n`{data['command']}`\n")
    if claim == "lora":
        s = data["summary"]
        print("| variant | medical loss | learned | WikiText retain_forgetting | per-seed "
              "retain_forgetting |\n|---|---|---|---|---|")
        for k, m in s.items():
            seeds = ", ".join(f"{v:+.3f}" for v in m["retain_forgetting"]["values"])
            print(f"| {k} | {fmt(m['medical_loss'])} | {fmt(m['learned'])} | "
                  f"{fmt(m['retain_forgetting'])} | {seeds} |")
        plot_metrics({k: {"medical loss after": m["medical_loss"],
                          "WikiText retain_forgetting": m["retain_forgetting"]}
                      for k, m in s.items()},
                     ("medical loss after", "WikiText retain_forgetting"), img,
                     "SmolLM2-135M, 8k medical tokens")
        data["verdicts"] = {"vs full": {
            k: {"medical_loss": paired_lora(s, k, "medical_loss"),
                "retain_forgetting": paired_lora(s, k, "retain_forgetting")}
            for k in s if k != "full"}}
    else:
        s = data.get("summary", {})
        if not s:
            return
        print(table(s, main))
        if claim == "replay":
            dose = {k: v for k, v in s.items() if k.startswith("replay ")}
            control = {k: (50.0, v) for k, v in s.items() if k not in dose}
            plot_metrics(dose, ("forgetting", "new_task_loss", "stream_loss"), img,
                         f"Replay dose, {MAIN_NAME}", [float(k.split()[1]) for k in dose],
                         "replay % of each batch", extra=control, curve=fine_curve())
            data["verdicts"] = verdict_replay(s)
        elif claim == "replay-fine":
            data["verdicts"] = verdict_fine(s)
        elif claim == "lr":
            xs = [float(k.split()[-1]) for k in s]
            replay = result_path("replay")
            plot_metrics(s, ("forgetting", "new_task_loss", "stream_loss"), img,
                         f"Naive fine-tuning, {MAIN_NAME}", xs, "learning rate", logx=True)
            data["verdicts"] = verdict_lr(
                s, json.loads(replay.read_text()) if replay.is_file() else None)
        elif claim == "distill":
            plot_metrics(s, ("forgetting", "new_task_loss", "stream_loss"), img,
                         f"Distillation on top of replay, {MAIN_NAME}")
            data["verdicts"] = verdict_vs(s, "replay 10 %", main[:3])
        elif claim == "ewc-vs-replay":
            plot_metrics(s, ("forgetting", "new_task_loss", "stream_loss"), img,
                         f"EWC vs replay holding at most its memory, {MAIN_NAME}")
            data["verdicts"] = verdict_vs(s, "naive", main[:3])
            print(f"\nmemory: {data['memory']}")
        elif claim == "search":
            plot_metrics(s, ("stream_loss", "forgetting", "new_task_loss"), img,
                         "Sports news → medical → world news")
            data["verdicts"] = verdict_search(data)
    print("\n" + json.dumps(data.get("verdicts", {}), indent=1))
    save(claim, data)


def paired_lora(s: dict[str, Any], a: str, metric: str) -> dict[str, Any]:
    return paired({k: {metric: v[metric]} for k, v in s.items()}, a, "full", metric)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("claim", choices=["replay", "replay-fine", "lr", "distill", "lora",
                                          "search", "ewc-vs-replay", "report"])
    parser.add_argument("--set", action="append", default=[],
                        help="ewc-vs-replay: the EWC variant's settings, e.g. ewc_lambda=100")
    args = parser.parse_args()
    if not (DATA / MAIN_TASKS["wikipedia"]).is_file():
        print(f"skipped: the shared data is absent ({DATA})")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    claims = (["replay-fine", "replay", "lr", "distill", "lora", "search", "ewc-vs-replay"]
              if args.claim == "report" else [args.claim])
    start = time.perf_counter()
    if args.claim in CLAIMS:
        cmd_grid(args.claim, args)
    elif args.claim == "ewc-vs-replay":
        cmd_ewc(args)
    elif args.claim == "lora":
        cmd_lora(args)
    elif args.claim == "search":
        cmd_search(args)
    for claim in claims:
        report_claim(claim)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
