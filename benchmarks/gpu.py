"""GPU figures: bf16 speed and model FLOPs utilisation of the trainable, how many trials share
one GPU before each slows down, whether trials in one process hand their GPU memory back, and
fractional ``resources.gpus_per_trial`` through a real search.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu.py [--smollm2 FILE.gguf]
        [--models gpt2-small,smollm2] [--parts speed,share,sequential,search]
        [--rounds 2] [--shares 1,2,4] [--json benchmarks/results/gpu.json]

Without a CUDA device it prints "no CUDA device: nothing measured" and exits 0;
``--device cpu --quick`` runs the same code on the CPU with a tiny model, as a smoke test of
the script (its figures mean nothing). Models:

- ``gpt2-small``: the built model (``run.model.name: tiny-gpt``) in GPT-2 small's shape (12
  layers, 768 wide, 12 heads, context 1024) with the GPT-2 BPE tokenizer from the shared data
  (50,257 tokens: 124M parameters); without those files, the byte vocabulary (86M).
- ``smollm2``: SmolLM2-135M from a GGUF file (``--smollm2``; ``run.model.name`` is the file).

Parts, each for every model asked for (``search`` for the first only):

1. ``speed``: the trainable (naive fine-tuning, ``hardware.bf16``: bf16 autocast) against a bare
   PyTorch loop with the same autocast, model, data and batch, interleaved, ``--rounds``
   rounds, best round each: training tokens/s of task 2, and model FLOPs utilisation,
   6 * parameters * tokens/s over the device's dense bf16 peak (``DATASHEET_BF16``, by device
   name) and over a large bf16 matmul's FLOP/s measured here.
2. ``share``: k = 1, 2, 4 trainings at once as separate processes on the one GPU; per process
   the median training tokens/s of its tasks after the first (all k run by then), median over
   processes, and their sum. The answer is the largest k whose per-process speed is still
   >= 90 % of k = 1's.
3. ``sequential``: 20 trials one after another in this process, as a Tune worker reused across
   trials runs them (``run_stream``, then the trainable's ``release_accelerator_memory``), with
   replay, EWC and distillation on; ``torch.cuda.memory_allocated`` after each must be within
   100 MiB of its value before the first.
4. ``search``: one ``adaptune search`` of 4 trials at once with ``gpus_per_trial: 0.25``; every
   trial must finish on CUDA (its ``adaptune.cuda`` tag) with a ``peak_gpu_mb``.
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
from adaptune.trainables.errors import ConfigError
from adaptune.trainables.model import build_model, next_token_loss
from adaptune.trainables.trainable import release_accelerator_memory

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GPT2_FILES = ROOT.parent / "shared" / "data" / "tokenizers" / "gpt2"

GPT2_SMALL = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024}
TINY = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 128}
MIB = 2**20

# dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity), FLOP/s; the first
# name that occurs in torch's device name wins, so the specific ones come first
DATASHEET_BF16 = [
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100 80GB HBM3", 989e12),  # SXM
    ("H100 SXM", 989e12),
    ("A100", 312e12),  # SXM and PCIe alike
]


def datasheet_peak(gpu: str) -> float | None:
    return next((flops for name, flops in DATASHEET_BF16 if name in gpu), None)


def run_dict(
    model: dict[str, Any], args: argparse.Namespace, *, tokens: int | None = None, **extra: Any
) -> dict[str, Any]:
    """A three-task run of ``model`` (a ``run.model`` mapping) at the benchmark's sizes."""
    return {
        "seed": 0,
        "model": model,
        "stream": {
            "block_size": args.block,
            "max_train_tokens": tokens or args.tokens,
            "max_eval_blocks": 8,
            "tasks": [
                {"name": "docs", "builtin": "python_docs"},
                {"name": "code", "builtin": "python_source"},
                {"name": "unicode", "builtin": "unicode_names"},
            ],
        },
        "optim": {"lr": 3e-4, "batch_size": args.batch, "schedule": "cosine"},
        "hardware": {"device": args.device, "bf16": args.device == "cuda"},
        **extra,
    }


def models(args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, Any]]:
    """``run.model`` of each model asked for; a GPT-2 tokenizer folder is written in ``tmp``."""
    out: dict[str, dict[str, Any]] = {}
    for name in args.models.split(","):
        if name == "gpt2-small":
            shape = TINY if args.quick else GPT2_SMALL
            out[name] = {"name": "tiny-gpt", **shape}
            if (GPT2_FILES / "merges.txt").is_file() and not args.quick:
                import transformers

                folder = tmp / "gpt2-tokenizer"
                transformers.GPT2TokenizerFast.from_pretrained(GPT2_FILES).save_pretrained(folder)
                out[name]["tokenizer"] = str(folder)
        elif name == "smollm2":
            if args.smollm2 is None:
                print("smollm2: not measured (no --smollm2 FILE.gguf; "
                      "../shared/models/get-smollm2.sh fetches one)")
                continue
            out[name] = {"name": str(args.smollm2)}
        else:
            raise SystemExit(f"--models: unknown model {name!r}; valid: gpt2-small, smollm2")
    return out


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
                capture_output=True, text=True, check=True,
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


def reports_of(prep: Any) -> list[dict[str, Any]]:
    """What one trial reports, in this process, as a Tune worker runs it."""
    reports: list[dict[str, Any]] = []
    try:
        run_stream(prep, report=lambda m, _c: reports.append(m))
    finally:
        release_accelerator_memory()
    return reports


def bare_loop(prep: Any, steps: int, device: torch.device) -> float:
    """The same model and batch trained by the plainest loop (AdamW, clipping, the same
    autocast): tokens/s of task 2's blocks, timed after one warm-up step."""
    cfg, blocks = prep.cfg, prep.tasks[1].train
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, prep.tokenizer).to(device).train()
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


def speed(args: argparse.Namespace, model: dict[str, Any], gpu: str) -> dict[str, Any]:
    device = torch.device(args.device)
    prep = prepare(parse_run_config(run_dict(model, args)))
    steps = max(1, prep.tasks[1].train.shape[0] // args.batch)
    rng = random.Random(0)
    tps: dict[str, list[float]] = {"bare": [], "naive": []}
    peaks, params, gpu_mb = [], 0, None
    for _ in range(args.rounds):
        order = list(tps)
        rng.shuffle(order)
        for name in order:
            if name == "bare":
                tps[name].append(bare_loop(prep, steps, device))
                release_accelerator_memory()  # its model and optimizer, gone with its frame
                continue
            task2 = reports_of(prep)[1]
            tps[name].append(float(task2["train_tokens_per_s"]))
            params, gpu_mb = int(task2["params_trainable"]), task2.get("peak_gpu_mb")
        peaks.append(matmul_peak(device, args.matmul))
    best = {k: max(v) for k, v in tps.items()}
    sheet = datasheet_peak(gpu)
    flops = 6 * params * best["naive"]
    return {
        "params": params,
        "tokens_per_s": tps,
        "best": best,
        "ratio": best["naive"] / best["bare"],
        "matmul_flops": peaks,
        "mfu_datasheet": flops / sheet if sheet else None,
        "mfu_measured_peak": flops / max(peaks),
        "datasheet_flops": sheet,
        "peak_gpu_mb": gpu_mb,
    }


def worker(run: str) -> None:
    """``--worker``: one run in this process; its per-task speeds as the last stdout line."""
    reports = reports_of(prepare(parse_run_config(json.loads(run))))
    print(json.dumps({
        "tokens_per_s": [float(m["train_tokens_per_s"]) for m in reports],
        "peak_gpu_mb": reports[-1].get("peak_gpu_mb"),
    }))


def share(args: argparse.Namespace, model: dict[str, Any], k: int) -> dict[str, Any]:
    """k trainings at once on the one GPU, each its own process (as k trials of a search)."""
    threads = max(1, (os.cpu_count() or 1) // k)
    run = run_dict(model, args) | {"hardware": {
        "device": args.device, "bf16": args.device == "cuda", "threads": threads}}
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, __file__, "--worker", json.dumps(run)]
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(k)]
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - start
    if any(p.returncode for p in procs):
        raise SystemExit(f"share k={k}: a training process failed")
    done = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    per_proc = [statistics.median(d["tokens_per_s"][1:]) for d in done]
    return {
        "k": k,
        "per_process_tokens_per_s": statistics.median(per_proc),
        "sum_tokens_per_s": sum(per_proc),
        "peak_gpu_mb": [d["peak_gpu_mb"] for d in done],
        "wall_s": wall,
    }


def sequential(args: argparse.Namespace, model: dict[str, Any]) -> dict[str, Any]:
    """Trials one after another in this process; memory left on the GPU after each."""
    components = {
        "replay": {"buffer_size": 16},
        "ewc": {"ewc_lambda": 1.0, "fisher_samples": 8},
        "distill": {"distill_alpha": 0.5},
    }
    run = run_dict(model, args, tokens=4 * args.batch * args.block, components=components)
    run["stream"]["tasks"] = run["stream"]["tasks"][:2]
    prep = prepare(parse_run_config(run))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.init()
    base = torch.cuda.memory_allocated() / MIB if cuda else 0.0
    after, peaks = [], []
    # checkpoints are written after every task and are not what this part measures: keep them
    # in memory where the machine has a RAM disk
    saved = tempfile.tempdir
    tempfile.tempdir = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    try:
        for _ in range(args.sequential):
            reports: list[dict[str, Any]] = []
            try:
                run_stream(prep, report=lambda m, _c, out=reports: out.append(m))
            finally:
                release_accelerator_memory()
            after.append(torch.cuda.memory_allocated() / MIB if cuda else 0.0)
            peaks.append(reports[-1].get("peak_gpu_mb"))
    finally:
        tempfile.tempdir = saved
    drift = max(abs(a - base) for a in after)
    return {"trials": len(after), "baseline_mb": base, "after_mb": after,
            "peak_gpu_mb": peaks, "max_drift_mb": drift, "ok": drift <= 100 if cuda else None}


def search(args: argparse.Namespace, model: dict[str, Any]) -> dict[str, Any]:
    """One ``adaptune search``: 4 trials at once, a quarter of the GPU each."""
    import mlflow

    cuda = args.device == "cuda"
    with tempfile.TemporaryDirectory(prefix="adaptune-gpu-search-") as tmp_name:
        tmp = Path(tmp_name)
        exp = {
            "name": "gpu-share",
            "run": run_dict(model, args, tokens=4 * args.batch * args.block)
            | {"hardware": {"device": "auto", "bf16": cuda}},
            "space": {"lr": {"loguniform": [1e-4, 1e-3]}},
            "search": {"num_samples": 4, "max_concurrent": 4, "scheduler": "fifo"},
            "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0.25 if cuda else 0},
            "storage_path": str(tmp / "ray"),
            "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        }
        path = tmp / "gpu-share.yaml"
        path.write_text(yaml.safe_dump(exp))
        env = os.environ | {"HF_HUB_OFFLINE": "1"}
        out = subprocess.run([str(BIN / "adaptune"), "search", str(path)], cwd=tmp, env=env,
                             capture_output=True, text=True)
        at = out.stdout.find("\nsearch gpu-share")
        table = out.stdout[at if at >= 0 else -2000 :].split("\nMLflow:")[0].strip()
        if out.returncode != 0:
            return {"ok": False, "output": (out.stdout + out.stderr)[-3000:]}
        client = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
        eid = client.get_experiment_by_name("gpu-share").experiment_id
        runs = client.search_runs([eid], filter_string="tags.`adaptune.kind` = 'trial'")
        trials = [{"status": r.info.status, "cuda": r.data.tags.get("adaptune.cuda"),
                   "peak_gpu_mb": r.data.metrics.get("peak_gpu_mb")} for r in runs]
    ok = len(trials) == 4 and all(
        t["status"] == "FINISHED" and (not cuda or t["cuda"] == "1" and t["peak_gpu_mb"])
        for t in trials
    )
    return {"ok": ok, "trials": trials, "table": table}


def report(name: str, args: argparse.Namespace, found: dict[str, Any]) -> None:
    """Markdown tables of one model's figures."""
    if "speed" in found:
        s = found["speed"]
        sheet = f"{s['mfu_datasheet']:.1%}" if s["mfu_datasheet"] else "n/a (GPU not listed)"
        print(
            f"\n### {name}: {s['params'] / 1e6:.1f}M parameters, block {args.block}, batch "
            f"{args.batch}, {args.tokens} train tokens per task, {args.rounds} rounds\n\n"
            "| figure | value |\n|---|---|\n"
            f"| bare loop, train tokens/s (best round) | {s['best']['bare']:,.0f} |\n"
            f"| trainable (naive), train tokens/s (task 2, best round) | "
            f"{s['best']['naive']:,.0f} |\n"
            f"| naive / bare loop | {s['ratio']:.2f} |\n"
            f"| MFU: 6 N tokens/s / datasheet dense bf16 peak | {sheet} |\n"
            f"| MFU / measured matmul {args.matmul}^3 peak "
            f"({max(s['matmul_flops']) / 1e12:.3g} TFLOP/s) | {s['mfu_measured_peak']:.1%} |\n"
            f"| peak_gpu_mb (trainable) | {s['peak_gpu_mb'] or '-'} |",
            flush=True,
        )
    if "share" in found:
        rows = found["share"]
        base = rows[0]["per_process_tokens_per_s"]
        print(f"\n{name}, trainings at once on one GPU, each its own process:\n\n"
              "| trainings | per-process tokens/s (median) | vs 1 | all together | "
              "peak_gpu_mb (largest) |\n|---|---|---|---|---|")
        for r in rows:
            top = max(m or 0 for m in r["peak_gpu_mb"])
            print(f"| {r['k']} | {r['per_process_tokens_per_s']:,.0f} | "
                  f"{r['per_process_tokens_per_s'] / base:.2f} | {r['sum_tokens_per_s']:,.0f} | "
                  f"{f'{top:.0f}' if top else '-'} |")
        fits = rows[0]["k"]
        for r in rows[1:]:
            if r["per_process_tokens_per_s"] < 0.9 * base:
                break
            fits = r["k"]
        print(f"\n{name}: trainings per GPU before per-process speed drops below 90 % of one "
              f"alone: {fits}")
    if "sequential" in found:
        q = found["sequential"]
        print(f"\n{name}: {q['trials']} sequential trials, memory_allocated {q['baseline_mb']:.0f} "
              f"MiB before, at most {q['max_drift_mb']:.0f} MiB away after each: "
              f"{ {True: 'PASS', False: 'FAIL', None: 'not checked on the CPU'}[q['ok']] } "
              "(limit 100 MiB)")
    if "search" in found:
        s = found["search"]
        print(f"\n{name}: adaptune search, 4 trials at gpus_per_trial 0.25: "
              f"{'PASS' if s['ok'] else 'FAIL'}\n{s.get('table') or s.get('output')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--models", default="gpt2-small,smollm2")
    parser.add_argument("--smollm2", type=Path, help="SmolLM2-135M GGUF file")
    parser.add_argument("--parts", default="speed,share,sequential,search")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shares", default="1,2,4", help="trainings per GPU to try")
    parser.add_argument("--sequential", type=int, default=20, help="trials in one process")
    parser.add_argument("--tokens", type=int, default=262144, help="train tokens per task")
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--matmul", type=int, default=8192, help="matmul size for the peak")
    parser.add_argument("--quick", action="store_true", help="CPU smoke test sizes")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing measured (--device cpu --quick: smoke test of the script)")
        return
    if args.quick:
        args.tokens, args.block, args.batch, args.matmul, args.rounds = 4096, 64, 8, 512, 1
        args.shares, args.sequential = "1,2", 3
    parts = set(args.parts.split(","))
    info = machine()
    print(f"\n## GPU benchmark on {info.get('gpu', 'the CPU (smoke test)')}\n")
    print(json.dumps(info))
    found: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="adaptune-gpu-") as tmp:
        for i, (name, model) in enumerate(models(args, Path(tmp)).items()):
            found[name] = got = {}
            try:
                if "speed" in parts:
                    got["speed"] = speed(args, model, info.get("gpu") or "")
                if "share" in parts:
                    got["share"] = [share(args, model, int(k)) for k in args.shares.split(",")]
                if "sequential" in parts:
                    got["sequential"] = sequential(args, model)
                if "search" in parts and i == 0:
                    got["search"] = search(args, model)
            except ConfigError as err:
                got["error"] = str(err)
                print(f"\n{name}: not measured: {err}")
            report(name, args, got)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "models": found}, indent=1) + "\n")


if __name__ == "__main__":
    main()
