"""Learns less, forgets less? SmolLM2-135M adapted to medical abstracts in each update mode:
the new domain's loss against the loss it gains on WikiText, which it never trains on.

    ../shared/models/get-smollm2.sh            # the GGUF file experiments/smollm2.yaml names
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/learns_less.py [--seeds 0,1,2] [--gguf]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/learns_less.py --report   # table and plot again

Every run is one ``adaptune train experiments/smollm2.yaml --stop-after 1`` (the first task,
medical abstracts, then stop) with the ``--set`` overrides printed beside its figures. Fixed
before any run, not tuned on the results:

- data: 8,192 training tokens of medical abstracts (64 blocks of 128 tokens), one epoch,
  batch 4 (16 steps), cosine schedule with 10 % warm-up, weight decay 0.01, clipping 1.0;
  8 held-out blocks of each domain evaluated (``max_eval_blocks``); the same blocks for every
  run (``data_seed`` 0); 2 threads, CPU.
- variants and learning rates: full fine-tuning at lr 1e-4; freeze (the embeddings and the
  bottom 15 of 30 blocks fixed) at lr 1e-4, as full fine-tuning of the blocks it trains; LoRA
  r = 4, 16, 64 with alpha = 2r (the same scale alpha/r = 2 at every rank) on peft's default
  targets for Llama (``q_proj``, ``v_proj``) at lr 1e-3, an order of magnitude above full
  fine-tuning, the usual practice for LoRA (the question is Biderman et al. 2024's, "LoRA
  Learns Less and Forgets Less").
- seeds 0, 1, 2 per variant (batch order and the adapters' initialisation); the figures are
  the mean and the min-max over seeds.

By default the GGUF file is dequantized once into a transformers folder (the same float32
weights and tokenizer, ``benchmarks/pretrained.py``'s ``dequantized_folder``) passed as
``run.model.name``, so each run spends ~2 s, not ~25 s, loading the model; ``--gguf`` loads the
file itself in every run. Writes ``benchmarks/results/learns-less.json`` (every run's metrics)
and ``docs/img/learns-less-forgets-less.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pretrained import DEFAULT_GGUF, OTHERS_MAX, dequantized_folder, run_child, wait_quiet

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "smollm2.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "learns-less.json"
PLOT = ROOT / "docs" / "img" / "learns-less-forgets-less.png"
COMMON = [
    "run.stream.max_train_tokens=8192",
    "run.stream.block_size=128",
    "run.stream.max_eval_blocks=8",
    "batch_size=4",
    "run.hardware.threads=2",
    "run.hardware.device=cpu",
]
VARIANTS: dict[str, list[str]] = {
    "full": ["update_mode=full", "lr=1e-4"],
    "freeze 15/30": ["update_mode=freeze", "freeze_layers=15", "lr=1e-4"],
    "LoRA r=4": ["update_mode=lora", "lora_r=4", "lora_alpha=8", "lr=1e-3"],
    "LoRA r=16": ["update_mode=lora", "lora_r=16", "lora_alpha=32", "lr=1e-3"],
    "LoRA r=64": ["update_mode=lora", "lora_r=64", "lora_alpha=128", "lr=1e-3"],
}
KEPT = (
    "loss/medical", "retain_forgetting", "retain_loss", "train_tokens_per_s", "train_time_s",
    "peak_rss_mb", "params_trainable", "params_total", "train_loss",
)


def command(variant: str, seed: int, model: str, out: Path) -> list[str]:
    sets = [*COMMON, *VARIANTS[variant], f"seed={seed}", f"run.model.name={model}"]
    cmd = [str(Path(sys.executable).parent / "adaptune"), "train", str(EXPERIMENT),
           "--stop-after", "1", "--no-tracking", "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def one_run(variant: str, seed: int, model: str, quiet_wait: float) -> dict[str, Any]:
    """One ``adaptune train`` once other processes are quiet (at most ``quiet_wait`` s): its
    last report, loss matrices, wall time and the cores other processes used meanwhile."""
    with tempfile.TemporaryDirectory(prefix="learns-less-") as tmp:
        cmd = command(variant, seed, model, Path(tmp) / "run")
        wait_quiet(quiet_wait)
        start = time.perf_counter()
        done, others = run_child(cmd)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{variant} seed {seed} failed:\n{done.stderr[-3000:]}")
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
        metrics = json.loads(lines[-1])
        matrix = json.loads((Path(tmp) / "run" / "loss_matrix.json").read_text())
    return {
        "variant": variant, "seed": seed, "wall_s": wall, "others_cores": others,
        "command": " ".join(cmd[cmd.index("train"):]).replace(str(ROOT) + "/", ""),
        "matrix": matrix, **{k: metrics[k] for k in KEPT},
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """variant -> metric -> [mean, min, max] over seeds."""
    out: dict[str, dict[str, list[float]]] = {}
    for variant in VARIANTS:
        rows = [r for r in runs if r["variant"] == variant]
        if rows:
            out[variant] = {
                k: [statistics.fmean(r[k] for r in rows), min(r[k] for r in rows),
                    max(r[k] for r in rows)]
                for k in KEPT
            }
    return out


def before_losses(runs: list[dict[str, Any]]) -> tuple[float, float]:
    """Medical and WikiText losses of the untrained model (row 0, the same in every run)."""
    m = runs[0]["matrix"]
    return m["loss_matrix"][0][m["tasks"].index("medical")], m["retain_matrix"][0][0]


def print_table(data: dict[str, Any]) -> None:
    runs, s = data["runs"], summary(data["runs"])
    medical0, wiki0 = before_losses(runs)
    seeds = sorted({r["seed"] for r in runs})
    print(f"\nSmolLM2-135M, medical abstracts (8,192 tokens, 16 steps of 4 x 128), retain "
          f"WikiText; seeds {', '.join(map(str, seeds))}: mean [min, max]; tokens/s over the "
          f"runs during which other processes used at most {OTHERS_MAX} cores\n")
    print(f"before training: medical {medical0:.3f}, WikiText {wiki0:.3f} nats/token\n")
    print("| variant | lr | params trainable | medical loss after | learned (before - after) "
          "| WikiText forgetting | train tokens/s, undisturbed runs | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")

    def cell(v: list[float], fmt: str) -> str:
        return f"{v[0]:{fmt}} [{v[1]:{fmt}}, {v[2]:{fmt}}]"

    def speed(variant: str) -> str:
        tps = [r["train_tokens_per_s"] for r in runs
               if r["variant"] == variant and r.get("others_cores", 0.0) <= OTHERS_MAX]
        if not tps:
            return "- (every run disturbed)"
        runs_ = f"{len(tps)} run{'s' * (len(tps) > 1)}"
        return f"{statistics.fmean(tps):.0f} [{min(tps):.0f}, {max(tps):.0f}] ({runs_})"

    for variant, m in s.items():
        lr = next(x.split("=")[1] for x in VARIANTS[variant] if x.startswith("lr="))
        learned = [medical0 - m["loss/medical"][0], medical0 - m["loss/medical"][2],
                   medical0 - m["loss/medical"][1]]
        print(f"| {variant} | {lr} | {m['params_trainable'][0] / 1e6:.2f}M | "
              f"{cell(m['loss/medical'], '.3f')} | {cell(learned, '.3f')} | "
              f"{cell(m['retain_forgetting'], '+.3f')} | {speed(variant)} | "
              f"{cell(m['peak_rss_mb'], ',.0f')} |")


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary(data["runs"])
    medical0, _ = before_losses(data["runs"])
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    colors = {"full": "tab:red", "freeze 15/30": "tab:orange"}
    for variant, m in s.items():
        x, y = m["retain_forgetting"], m["loss/medical"]
        ax.errorbar(x[0], y[0], xerr=[[x[0] - x[1]], [x[2] - x[0]]],
                    yerr=[[y[0] - y[1]], [y[2] - y[0]]], fmt="o", capsize=3,
                    color=colors.get(variant, "tab:blue"))
        ax.annotate(variant, (x[0], y[0]), textcoords="offset points", xytext=(6, 5), fontsize=9)
    ax.scatter([0.0], [medical0], marker="*", s=90, color="gray", zorder=3)
    ax.annotate("before training", (0.0, medical0), textcoords="offset points",
                xytext=(-8, -4), fontsize=9, color="gray", ha="right")
    ax.set_xlim(right=max(0.0, *(m["retain_forgetting"][2] for m in s.values())) + 0.01)
    ax.axvline(0.0, color="gray", lw=0.5, ls=":")
    seeds = len({r["seed"] for r in data["runs"]})
    ax.set_xlabel("WikiText forgetting (retain_forgetting, nats/token;\n"
                  "right = forgets more, left of 0 = improves)")
    ax.set_ylabel("medical loss after training\n(nats/token; down = learns more)")
    ax.set_title(f"SmolLM2-135M on 8k medical tokens: mean, min-max over {seeds} seeds",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--gguf", action="store_true",
                        help="load the GGUF file in every run (default: its dequantized folder)")
    parser.add_argument("--model", type=Path, default=DEFAULT_GGUF, help="the SmolLM2 GGUF file")
    parser.add_argument("--quiet-wait", type=float, default=300,
                        help="seconds to wait, before each run, for other processes to use "
                             "under 0.25 cores")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT)
    parser.add_argument("--report", action="store_true", help="table and plot from --json")
    args = parser.parse_args()
    if args.report:
        data = json.loads(args.json.read_text())
    else:
        if not args.model.exists():
            parser.error(f"--model: no such file {args.model}; get it with "
                         "../shared/models/get-smollm2.sh")
        model = str(args.model if args.gguf else dequantized_folder(args.model))
        variants = args.variants.split(",")
        unknown = sorted(set(variants) - set(VARIANTS))
        if unknown:
            parser.error(f"--variants: unknown {unknown}; valid values: {', '.join(VARIANTS)}")
        runs: list[dict[str, Any]] = []
        start = time.perf_counter()
        for i, seed in enumerate(int(s) for s in args.seeds.split(",")):
            for variant in variants if i % 2 == 0 else variants[::-1]:  # ABBA: drift evens out
                runs.append(one_run(variant, seed, model, args.quiet_wait))
                r = runs[-1]
                print(f"{variant} seed {seed}: medical {r['loss/medical']:.4f}, retain_forgetting "
                      f"{r['retain_forgetting']:+.4f}, {r['train_tokens_per_s']:.0f} tok/s, "
                      f"{r['peak_rss_mb']:,.0f} MiB, {r['wall_s']:.0f} s, other processes "
                      f"{r['others_cores']:.2f} cores", file=sys.stderr,
                      flush=True)
        data = {"runs": runs, "common": COMMON, "variants": VARIANTS,
                "model": model, "wall_s": time.perf_counter() - start}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    print_table(data)
    plot(data, args.plot)
    print(f"\nruns: {args.json}\nplot: {args.plot}")


if __name__ == "__main__":
    main()
