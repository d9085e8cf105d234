"""GPU figures: bf16 speed and model FLOPs utilisation of the GPT-2-small-shaped trainable, and
how many trials share one GPU (fractional ``resources.gpus_per_trial``) before each slows down.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu.py [--rounds 3] [--shares 1,2,4,8]
        [--json benchmarks/results/gpu.json]

Needs a CUDA GPU; ``--device cpu --quick`` runs the same code on the CPU with a tiny model, as a
smoke test of the script (its figures mean nothing). Everything is measured in one run:

1. The machine: GPU name and memory, driver, CUDA and torch versions, CPU count.
2. The GPU's own limit: a large bf16 matmul's FLOP/s, measured here.
3. The trainable (naive fine-tuning, ``hardware.bf16``: bf16 autocast) against a bare PyTorch
   loop with the same autocast, model, data and batch, interleaved, ``--rounds`` rounds, best
   round each (as in ``speed.py``): training tokens/s of task 2, and model FLOPs utilisation,
   6 * parameters * tokens/s over the measured matmul peak (and over the datasheet's dense bf16
   peak, for GPUs listed in ``DATASHEET_BF16``).
4. Sharing: for each k in ``--shares``, one ``adaptune search`` runs k trials at once, each with
   ``resources.gpus_per_trial = 1/k`` on the same GPU; per trial, the training tokens/s of its
   tasks after the first (all k trials are running by then), median over trials, and their sum.
   The answer is the largest k whose per-trial speed is still >= 90 % of k = 1's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from adaptune.trainables import parse_run_config, prepare, run_stream
from adaptune.trainables.model import build_model, next_token_loss

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

GPT2_SMALL = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024}
TINY = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 128}

# dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity), FLOP/s
DATASHEET_BF16 = {
    "H200": 989e12,
    "H100 80GB HBM3": 989e12,  # SXM
    "H100 PCIe": 756e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
}


def run_dict(
    shape: dict[str, int], tokens: int, block: int, batch: int, device: str, bf16: bool
) -> dict[str, Any]:
    return {
        "seed": 0,
        "model": {"name": "tiny-gpt", **shape},
        "stream": {
            "block_size": block,
            "max_train_tokens": tokens,
            "max_eval_blocks": 8,
            "tasks": [
                {"name": "docs", "builtin": "python_docs"},
                {"name": "code", "builtin": "python_source"},
                {"name": "unicode", "builtin": "unicode_names"},
            ],
        },
        "optim": {"lr": 3e-4, "batch_size": batch, "schedule": "cosine"},
        "hardware": {"device": device, "bf16": bf16},
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_gib": props.total_memory / 2**30}
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                check=True,
            )
            info["driver"] = smi.stdout.strip().splitlines()[0]
        except (OSError, subprocess.CalledProcessError):
            info["driver"] = None
    return info


def matmul_peak(device: torch.device, n: int, reps: int = 20) -> float:
    """FLOP/s of an n x n matmul: bf16 on CUDA, float32 on the CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def trainable_task2(cfg: Any) -> float:
    """Task 2's training tokens/s as the trainable reports it."""
    reports: list[dict[str, Any]] = []
    run_stream(prepare(cfg), report=lambda m, _c: reports.append(m))
    return float(reports[1]["train_tokens_per_s"])


def bare_loop(cfg: Any, blocks: torch.Tensor, steps: int, device: torch.device) -> float:
    """The same model and batch trained by the plainest loop (AdamW, clipping, the same
    autocast): tokens/s, timed after one warm-up step."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, prepare(cfg).tokenizer).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    use_bf16 = device.type == "cuda" and cfg.hardware.bf16
    b = cfg.optim.batch_size

    def step() -> int:
        x = blocks[torch.randint(0, blocks.shape[0], (b,), generator=gen)].to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            loss = next_token_loss(model(input_ids=x).logits, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return x.numel()

    step()
    sync(device)
    start = time.perf_counter()
    tokens = sum(step() for _ in range(steps))
    sync(device)
    return tokens / (time.perf_counter() - start)


def speed(
    args: argparse.Namespace, device: torch.device, shape: dict[str, int], gpu: str
) -> dict[str, Any]:
    """``gpu``: the device's name (from :func:`machine`), for its datasheet peak."""
    bf16 = device.type == "cuda"
    cfg = parse_run_config(run_dict(shape, args.tokens, args.block, args.batch, device.type, bf16))
    prep = prepare(cfg)
    blocks = prep.tasks[1].train
    steps = max(1, blocks.shape[0] // args.batch)
    params = sum(p.numel() for p in build_model(cfg.model, prep.tokenizer).parameters())
    rng = random.Random(0)
    tps: dict[str, list[float]] = {"bare": [], "naive": []}
    peaks = []
    for _ in range(args.rounds):
        order = list(tps)
        rng.shuffle(order)
        for name in order:
            value = (
                bare_loop(cfg, blocks, steps, device) if name == "bare" else trainable_task2(cfg)
            )
            tps[name].append(value)
        peaks.append(matmul_peak(device, args.matmul))
    best = {k: max(v) for k, v in tps.items()}
    peak = max(peaks)
    sheet = next((v for k, v in DATASHEET_BF16.items() if k in gpu), None)
    return {
        "params": params,
        "tokens_per_s": tps,
        "matmul_flops": peaks,
        "best": best,
        "ratio": best["naive"] / best["bare"],
        "mfu_measured_peak": 6 * params * best["naive"] / peak,
        "mfu_datasheet": 6 * params * best["naive"] / sheet if sheet else None,
        "datasheet_flops": sheet,
        "peak_flops": peak,
    }


def share(
    args: argparse.Namespace, device: torch.device, shape: dict[str, int], k: int
) -> dict[str, Any]:
    """One ``adaptune search`` of k trials at once on one GPU (1/k of it each)."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix=f"adaptune-gpu-share{k}-") as tmp_name:
        tmp = Path(tmp_name)
        cpus = max(1, (os.cpu_count() or 1) // k)
        exp = {
            "name": f"share{k}",
            "run": run_dict(
                shape, args.tokens, args.block, args.batch, "auto", device.type == "cuda"
            ),
            "space": {"lr": {"loguniform": [1e-4, 1e-3]}},
            "search": {"num_samples": k, "max_concurrent": k, "scheduler": "fifo"},
            "resources": (
                {"cpus_per_trial": cpus, "gpus_per_trial": 1 / k}
                if device.type == "cuda"
                else {"cpus_per_trial": 1, "gpus_per_trial": 0}
            ),
            "storage_path": str(tmp / "ray"),
            "tracking": {
                "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
                "experiment_name": f"share{k}",
                "registered_model_name": f"gpu-share{k}",
            },
        }
        path = tmp / "share.yaml"
        path.write_text(yaml.safe_dump(exp))
        env = os.environ | {"HF_HUB_OFFLINE": "1"}
        start = time.perf_counter()
        out = subprocess.run(
            [str(BIN / "adaptune"), "search", str(path)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        if out.returncode != 0:
            raise SystemExit(f"adaptune search (k={k}) failed:\n{out.stdout[-3000:]}")
        client = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
        eid = client.get_experiment_by_name(f"share{k}").experiment_id
        runs = client.search_runs([eid], filter_string="tags.`adaptune.kind` = 'trial'")
        per_trial = []
        for run in runs:
            history = client.get_metric_history(run.info.run_id, "train_tokens_per_s")
            later = [m.value for m in sorted(history, key=lambda m: m.step)[1:]]
            per_trial.append(statistics.median(later))
    return {
        "k": k,
        "gpus_per_trial": 1 / k if device.type == "cuda" else 0,
        "cpus_per_trial": cpus if device.type == "cuda" else 1,
        "trials": len(per_trial),
        "per_trial_tokens_per_s": statistics.median(per_trial),
        "sum_tokens_per_s": sum(per_trial),
        "search_wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shares", default="1,2,4,8", help="trials per GPU to try")
    parser.add_argument("--tokens", type=int, default=262144, help="train tokens per task")
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--matmul", type=int, default=8192, help="matmul size for the peak")
    parser.add_argument("--quick", action="store_true", help="CPU smoke test sizes")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU (--device cpu --quick: smoke test)")
    device = torch.device(args.device)
    shape = GPT2_SMALL
    if args.quick:
        shape = TINY
        args.tokens, args.block, args.batch, args.matmul, args.rounds = 8192, 128, 8, 512, 1
        args.shares = "1,2"
    info = machine()
    print(f"\n## GPU benchmark on {info.get('gpu', 'the CPU (smoke test)')}\n")
    print(json.dumps(info))
    s = speed(args, device, shape, info.get("gpu") or "")
    print(
        f"\n{s['params'] / 1e6:.1f}M parameters, block {args.block}, batch {args.batch}, "
        f"{args.tokens} train tokens per task, {args.rounds} rounds\n\n"
        "| figure | value |\n|---|---|\n"
        f"| bare loop, train tokens/s (best round) | {s['best']['bare']:,.0f} |\n"
        f"| trainable (naive), train tokens/s (task 2, best round) | "
        f"{s['best']['naive']:,.0f} |\n"
        f"| naive / bare loop | {s['ratio']:.2f} |\n"
        f"| matmul {args.matmul}^3 FLOP/s (measured peak) | {s['peak_flops'] / 1e12:.1f} T |\n"
        f"| model FLOPs utilisation, 6 N tokens/s / measured peak | "
        f"{s['mfu_measured_peak']:.1%} |\n"
        f"| model FLOPs utilisation / datasheet dense bf16 peak | "
        + (f"{s['mfu_datasheet']:.1%} |" if s["mfu_datasheet"] else "n/a (GPU not listed) |"),
        flush=True,
    )
    shares = [share(args, device, shape, int(k)) for k in args.shares.split(",")]
    base = shares[0]["per_trial_tokens_per_s"]
    print(
        "\n| trials on one GPU | gpus_per_trial | per-trial train tokens/s (median) | "
        "vs 1 trial | all trials together |\n|---|---|---|---|---|"
    )
    for r in shares:
        print(
            f"| {r['k']} | {r['gpus_per_trial']:.3g} | {r['per_trial_tokens_per_s']:,.0f} | "
            f"{r['per_trial_tokens_per_s'] / base:.2f} | {r['sum_tokens_per_s']:,.0f} |"
        )
    fits = shares[0]["k"]
    for r in shares[1:]:
        if r["per_trial_tokens_per_s"] < 0.9 * base:
            break
        fits = r["k"]
    print(f"\ntrials per GPU before per-trial speed drops below 90 % of one trial's: {fits}")
    if args.json:
        args.json.write_text(
            json.dumps({"machine": info, "speed": s, "shares": shares}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
