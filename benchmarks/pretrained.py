"""SmolLM2-135M on the CPU: a training step in each update mode, where its time goes, two costs
the trainable removed, and the trainable against a bare PyTorch loop.

    ../shared/models/get-smollm2.sh            # the GGUF file, into the default --model path
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/pretrained.py [--model FILE.gguf]
        [--parts profile,fixes,speed] [--speed-runs bare,full,bare-fused,lora,freeze]
        [--rounds 3] [--steps 3] [--threads 2] [--batch 4] [--block 128] [--tokens 2048]

Update modes: ``full`` (every weight), ``lora`` (r = 16, alpha = 32, peft's default targets for
Llama: ``q_proj``, ``v_proj``) and ``freeze`` (the embeddings and the bottom 15 of 30 blocks
fixed). Every figure uses the same batch of ``--batch`` blocks of ``--block`` tokens and
``--threads`` torch threads.

Parts:

1. ``profile``: one process loads the GGUF file through the product's loader (its time and peak
   resident memory are printed), then, per mode, trains steps on medical-abstract blocks with
   the product's loss and optimizer, each step split at the module boundaries into stages
   timed apart: the body's forward (embeddings and 30 blocks), the output head's forward
   (576 -> 49,152), the cross-entropy's forward, its backward, the head's backward, the body's
   backward, gradient clipping, AdamW. The split does the same work as one ``loss.backward()``
   (the graph is cut with ``detach`` and each piece's gradient handed on). Median of
   ``--steps`` steps after one warm-up; one more step runs under ``torch.profiler``, whose top
   operators (self CPU time) are printed.
2. ``fixes``: the loss as the trainable computed it before (logits sliced) against now
   (targets shifted), forward and backward on (batch, block, 49,152) logits; AdamW as PyTorch
   defaults it on CPU (a loop of single-tensor updates) against fused, over each mode's
   trainable parameters; alternating, median of ``--repeats``.
3. ``speed``: each run is a fresh process (its own peak memory): bare loops (plain PyTorch:
   the model, AdamW over every weight, PyTorch's default AdamW or fused, inline cross-entropy,
   clipping; full fine-tuning) and the trainable (``run_stream``) in each mode, on the same
   model, blocks, order, batch and threads; task 1 untimed as warm-up, task 2 timed (the
   trainable's own ``train_tokens_per_s``, the bare loop between the same boundaries). Runs
   interleave in ABBA order; each ratio is the median over rounds of the ratio within a
   round. Peak memory is each process's ``peak_rss_mb`` (the trainable's report; the bare
   loop reads the same counter the same way).

On a shared machine other processes distort the figures: with as many torch threads as
cores, every parallel region waits for a pre-empted thread. The script waits
(``--quiet-wait``) for other processes to use under 0.25 cores before it starts and before each
round, measures the cores they use during each step or run (the machine's busy time less this
process's own), discards a profiled step and repeats a round (at most twice) when they used
over 0.3, and prints what it kept.

The GGUF file is dequantized once into a transformers folder (``runs/cache/smollm2-f32/``: the
same float32 weights and tokenizer, checked on a sample text) that the ``speed`` runs load, so
each fresh process spends ~2 s, not ~25 s, loading it. Writes
``benchmarks/results/pretrained.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_GGUF = Path(
    "~/.cache/adaptune-models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
).expanduser()
CACHE = ROOT / "runs" / "cache" / "smollm2-f32"
MEDICAL = DATA / "biomed_medical_abstracts" / "medical_abstracts_text.txt"
NEWS = DATA / "news_agnews" / "agnews_test_text.txt"
MODES: dict[str, dict[str, Any]] = {
    "full": {"mode": "full"},
    "lora": {"mode": "lora", "lora_r": 16, "lora_alpha": 32},
    "freeze": {"mode": "freeze", "freeze_layers": 15},
}
# a step or run during which other processes kept more cores than this busy is not counted:
# with as many torch threads as cores, every parallel region then waits for a pre-empted thread
OTHERS_MAX = 0.3
BARE = {
    "bare": "bare PyTorch loop (full, default AdamW)",
    "bare-fused": "bare PyTorch loop (full, fused AdamW)",
}
SAMPLE = "Serum ferritin rose 3.2-fold (p < 0.01) in 41 of 57 patients; see Table 2.\n"


# ---- the model, once -------------------------------------------------------------------------


def dequantized_folder(gguf_file: Path, folder: Path = CACHE) -> Path:
    """A transformers folder holding the GGUF file's model dequantized to float32 and its
    tokenizer, written on first use (the file's size and mtime recorded beside it).

    Raises:
        RuntimeError: the saved tokenizer encodes a sample differently from the GGUF one.
    """
    import transformers
    from adaptune.trainables.config import ModelConfig
    from adaptune.trainables.model import build_model, load_tokenizer

    stat = gguf_file.stat()
    stamp = {"gguf": str(gguf_file.resolve()), "size": stat.st_size, "mtime": stat.st_mtime}
    marker = folder / "adaptune-source.json"
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return folder
    cfg = ModelConfig(name=str(gguf_file))
    tokenizer = load_tokenizer(cfg)
    build_model(cfg, tokenizer).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    saved = transformers.AutoTokenizer.from_pretrained(folder)
    if saved(SAMPLE)["input_ids"] != tokenizer(SAMPLE)["input_ids"]:
        raise RuntimeError(f"{folder}: the saved tokenizer does not match {gguf_file}")
    marker.write_text(json.dumps(stamp))
    return folder


def unwrap(model: torch.nn.Module) -> Any:
    """The transformers causal LM inside a peft model (LoRA layers are injected in place)."""
    from adaptune.trainables.update import is_lora

    return model.get_base_model() if is_lora(model) else model


# ---- part 1: where a step's time goes ----------------------------------------------------------


@contextmanager
def stage(times: dict[str, float], name: str) -> Iterator[None]:
    with torch.profiler.record_function(name):
        start = time.perf_counter()
        yield
        times[name] = times.get(name, 0.0) + time.perf_counter() - start


def staged_step(
    model: torch.nn.Module, x: torch.Tensor, params: list[torch.nn.Parameter], opt: Any
) -> dict[str, float]:
    """One training step of the product's loss, cut into stages timed apart (seconds)."""
    from adaptune.trainables.model import next_token_loss

    lm = unwrap(model)
    t: dict[str, float] = {}
    with stage(t, "forward: body"):
        h = lm.model(input_ids=x).last_hidden_state  # (B, T, D)
    h_in = h.detach().requires_grad_(h.requires_grad)
    with stage(t, "forward: head"):
        logits = lm.lm_head(h_in)  # (B, T, V)
    z = logits.detach().requires_grad_()
    with stage(t, "forward: cross-entropy"):
        loss = next_token_loss(z, x)
    opt.zero_grad(set_to_none=True)
    with stage(t, "backward: cross-entropy"):
        loss.backward()
    with stage(t, "backward: head"):
        logits.backward(z.grad)
    if h.requires_grad and h_in.grad is not None:
        with stage(t, "backward: body"):
            h.backward(h_in.grad)
    with stage(t, "clip"):
        torch.nn.utils.clip_grad_norm_(params, 1.0)
    with stage(t, "optimizer"):
        opt.step()
    return t


def profile_mode(
    model: torch.nn.Module, params: list[torch.nn.Parameter], opt: Any,
    batches: list[torch.Tensor], steps: int,
) -> dict[str, Any]:
    """Stage times (median over ``steps`` undisturbed steps after a warm-up) and the top
    operators of one more step under ``torch.profiler``. A step during which other processes
    kept over ``OTHERS_MAX`` cores busy is discarded (at most until the batches run out)."""
    staged_step(model, batches[0], params, opt)  # warm-up: AdamW's state, first pages
    kept: list[dict[str, float]] = []
    discarded = 0
    for batch in batches[1:-1]:
        if len(kept) == steps:
            break
        times, others = undisturbed(lambda b=batch: staged_step(model, b, params, opt))
        if others < OTHERS_MAX:
            kept.append(times)
        else:
            discarded += 1
            wait_quiet(60)
    for _ in range(3):  # one undisturbed profiled step, if the machine allows
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            _, others = undisturbed(lambda: staged_step(model, batches[-1], params, opt))
        if others < OTHERS_MAX:
            break
        wait_quiet(60)
    ops = sorted(
        (e for e in prof.key_averages()
         if not e.key.startswith(("forward:", "backward:", "clip", "optimizer"))),
        key=lambda e: e.self_cpu_time_total, reverse=True,
    )
    times = {k: statistics.median(t.get(k, 0.0) for t in kept) for k in kept[0]}
    return {
        "stages_s": times,
        "step_s": sum(times.values()),
        "steps_kept": len(kept),
        "steps_discarded": discarded,
        "profiled_step_others_cores": others,
        "top_ops_ms": [[e.key, e.self_cpu_time_total / 1e3] for e in ops[:10]],
    }


def profile_part(args: argparse.Namespace) -> dict[str, Any]:
    from adaptune.trainables.config import ModelConfig, UpdateConfig, parse_run_config
    from adaptune.trainables.cost import param_counts, peak_rss_mb, reset_peak_rss
    from adaptune.trainables.model import build_model, load_tokenizer
    from adaptune.trainables.run import _optimizer
    from adaptune.trainables.update import apply_update

    torch.set_num_threads(args.threads)
    reset_peak_rss()
    start = time.perf_counter()
    cfg = ModelConfig(name=str(args.model))
    tokenizer = load_tokenizer(cfg)
    base = build_model(cfg, tokenizer)
    load = {"load_s": time.perf_counter() - start, "load_peak_rss_mb": peak_rss_mb()}
    print(f"GGUF load: {load['load_s']:.1f} s, peak RSS {load['load_peak_rss_mb']:,.0f} MiB",
          file=sys.stderr, flush=True)
    ids = tokenizer(MEDICAL.read_text()[:200_000])["input_ids"]
    n = args.batch * args.block
    batches = [torch.tensor(ids[i * n : (i + 1) * n]).view(args.batch, args.block)
               for i in range(min(len(ids) // n, 4 * args.steps + 2))]
    out: dict[str, Any] = {**load, "modes": {}}
    for mode, knobs in MODES.items():
        run = parse_run_config({"stream": {"tasks": [{"name": "x", "builtin": "python_docs"}]},
                                "optim": {"lr": 1e-4}, "update": knobs})
        torch.manual_seed(0)
        model = apply_update(copy.deepcopy(base), UpdateConfig(**knobs)).train()
        params, opt = _optimizer(run, model)  # the trainable's AdamW
        m = {**param_counts(model), **profile_mode(model, params, opt, batches, args.steps)}
        m["tokens_per_s"] = n / m["step_s"]
        out["modes"][mode] = m
        print(f"{mode}: {m['step_s']:.2f} s/step, {m['tokens_per_s']:,.0f} tok/s "
              f"({m['steps_discarded']} disturbed steps discarded)", file=sys.stderr, flush=True)
    return out


def print_profile(p: dict[str, Any], args: argparse.Namespace) -> None:
    modes = p["modes"]
    print(f"\n## Where a step's time goes: batch {args.batch} x {args.block} tokens, "
          f"{args.threads} threads, median of {args.steps} steps (seconds, share of the step)\n")
    print("| stage | " + " | ".join(modes) + " |")
    print("|---|" + "---|" * len(modes))
    stages = list(next(iter(modes.values()))["stages_s"])
    for m in modes.values():
        stages += [s for s in m["stages_s"] if s not in stages]
    for s in stages:
        cells = []
        for m in modes.values():
            v = m["stages_s"].get(s)
            cells.append("-" if v is None else f"{v:.3f} ({v / m['step_s']:.0%})")
        print(f"| {s} | " + " | ".join(cells) + " |")
    print("| **step** | " + " | ".join(f"**{m['step_s']:.2f}**" for m in modes.values()) + " |")
    print("| tokens/s | " + " | ".join(f"{m['tokens_per_s']:,.0f}" for m in modes.values()) + " |")
    print("| params trainable / total | " + " | ".join(
        f"{m['params_trainable'] / 1e6:.2f}M / {m['params_total'] / 1e6:.2f}M"
        for m in modes.values()) + " |")
    print("\nsteps kept / discarded (other processes busy): " + ", ".join(
        f"{k} {m['steps_kept']} / {m['steps_discarded']}" for k, m in modes.items()))
    print(f"\nGGUF load (tokenizer and model): {p['load_s']:.1f} s, "
          f"peak RSS {p['load_peak_rss_mb']:,.0f} MiB")
    for name, m in modes.items():
        print(f"\ntop operators, {name} (self CPU ms, one profiled step): " + ", ".join(
            f"{k} {v:,.0f}" for k, v in m["top_ops_ms"]))


# ---- part 3: the two costs the trainable removed, old and new side by side ---------------------


def sliced_loss(logits: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The loss as the trainable computed it before: the logits sliced (a copy), not the
    targets shifted."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), blocks[:, 1:].reshape(-1))


def fixes_part(args: argparse.Namespace) -> dict[str, Any]:
    """Old against new, alternating, ``--repeats`` times each, median (seconds): the loss's
    forward and backward on logits of SmolLM2's vocabulary, and AdamW's step, PyTorch's default
    (a loop of single-tensor updates on CPU) against fused, over each mode's trainable
    parameters (SmolLM2's shapes, random values)."""
    from adaptune.trainables.model import next_token_loss

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab, width, layers = 49152, 576, 30
    blocks = torch.randint(0, vocab, (args.batch, args.block))
    logits = torch.randn(args.batch, args.block, vocab) * 3  # (B, T, V)
    same = float(sliced_loss(logits, blocks)) == float(next_token_loss(logits, blocks))

    def loss_step(fn: Any) -> float:
        z = logits.clone().requires_grad_()
        start = time.perf_counter()
        fn(z, blocks).backward()
        return time.perf_counter() - start

    block = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
             (576, 1536), (576,), (576,)]
    lora = [(16, 576), (576, 16), (16, 576), (192, 16)]  # q_proj, v_proj: A and B
    shapes = {
        "full": [(vocab, width), *block * layers, (width,)],
        "freeze": [*block * (layers // 2), (width,)],
        "lora": lora * layers,
    }
    pairs: dict[str, dict[str, Any]] = {"loss": {"old": lambda: loss_step(sliced_loss),
                                                 "new": lambda: loss_step(next_token_loss)}}
    for mode, mode_shapes in shapes.items():
        params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in mode_shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opts = {k: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=fused)
                for k, fused in (("old", None), ("new", True))}

        def step(opt: Any) -> float:
            start = time.perf_counter()
            opt.step()
            return time.perf_counter() - start

        for opt in opts.values():
            opt.step()  # AdamW's state
        pairs[f"AdamW, {mode}"] = {k: (lambda o=o: step(o)) for k, o in opts.items()}
    out: dict[str, Any] = {"loss_identical": same}
    for name, fns in pairs.items():
        times: dict[str, list[float]] = {"old": [], "new": []}
        for r in range(args.repeats):
            for k in ("old", "new") if r % 2 == 0 else ("new", "old"):
                times[k].append(fns[k]())
        out[name] = {k: statistics.median(v) for k, v in times.items()}
    return out


def print_fixes(f: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n## Old against new: median of {args.repeats} alternating repeats, "
          f"{args.threads} threads (ms)\n")
    print("| cost | before | after | saved per step |")
    print("|---|---|---|---|")
    for name, v in f.items():
        if isinstance(v, dict):
            print(f"| {name} | {v['old'] * 1e3:.0f} | {v['new'] * 1e3:.0f} | "
                  f"{(v['old'] - v['new']) * 1e3:.0f} |")
    print(f"\nthe two losses are bit for bit equal: {f['loss_identical']}")


# ---- the machine: other processes' load --------------------------------------------------------


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (``/proc/stat``)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # less idle, iowait


def others_now(seconds: float = 2.0) -> float:
    """Cores other processes keep busy now (this one sleeps meanwhile)."""
    start = busy_seconds()
    time.sleep(seconds)
    return (busy_seconds() - start) / seconds


def wait_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (at most ``max_wait`` seconds) until other processes use under ``threshold``
    cores; returns their load when it stopped waiting."""
    deadline = time.monotonic() + max_wait
    while True:
        load = others_now()
        if load < threshold or time.monotonic() > deadline:
            return load
        time.sleep(10)


def undisturbed(fn: Any) -> tuple[Any, float]:
    """``fn()`` and the cores other processes used meanwhile (the machine's busy time less
    this process's CPU time, over the wall time)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    busy0, own0 = busy_seconds(), usage.ru_utime + usage.ru_stime
    start = time.perf_counter()
    result = fn()
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    own = usage.ru_utime + usage.ru_stime - own0
    return result, max(0.0, (busy_seconds() - busy0 - own) / wall)


def run_child(cmd: list[str]) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``cmd``; also the cores other processes used meanwhile, on average (the machine's
    busy time less the child's own CPU time, over the wall time)."""
    busy0, child0 = busy_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime)
    return done, max(0.0, (busy_seconds() - busy0 - own) / wall)


# ---- part 2: the trainable against a bare loop, one fresh process per run ---------------------


def run_config(folder: Path, args: argparse.Namespace, update: dict[str, Any]) -> Any:
    from adaptune.trainables.config import parse_run_config

    return parse_run_config({
        "seed": 0,
        "model": {"name": str(folder)},
        "stream": {
            "block_size": args.block,
            "max_train_tokens": args.tokens,
            "max_eval_blocks": 1,
            "tasks": [{"name": "medical", "files": [str(MEDICAL)]},
                      {"name": "news", "files": [str(NEWS)]}],
        },
        "optim": {"lr": 1e-4, "batch_size": args.batch},
        "update": update,
        "hardware": {"threads": args.threads, "device": "cpu"},
    })


def trainable_run(folder: Path, args: argparse.Namespace, mode: str) -> dict[str, Any]:
    from adaptune.trainables.run import prepare, run_stream

    reports: list[dict[str, Any]] = []
    prep = prepare(run_config(folder, args, MODES[mode]))
    run_stream(prep, report=lambda m, _c: reports.append(m), stop_after=2)
    keys = ("train_tokens_per_s", "steps", "peak_rss_mb", "params_trainable", "params_total")
    return {k: reports[1][k] for k in keys}


def bare_run(folder: Path, args: argparse.Namespace, *, fused: bool) -> dict[str, Any]:
    """Full fine-tuning by the plainest loop: the trainable's model, blocks and batch order;
    AdamW as PyTorch defaults it (``fused=False``) or fused, as the trainable runs it."""
    import transformers
    from adaptune.trainables.cost import peak_rss_mb, reset_peak_rss
    from adaptune.trainables.run import prepare

    cfg = run_config(folder, args, MODES["full"])
    prep = prepare(cfg)
    torch.set_num_threads(args.threads)
    reset_peak_rss()  # where the trainable's CostMeter starts counting
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(
        params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=fused or None
    )
    b, result = args.batch, {}
    for task in prep.tasks:
        blocks = task.train  # (N, T)
        steps = max(1, math.ceil(blocks.shape[0] / b))
        order = torch.cat([torch.randperm(blocks.shape[0], generator=gen)
                           for _ in range(math.ceil(steps * b / blocks.shape[0]))])
        start = time.perf_counter()
        for step in range(steps):
            x = blocks[order[step * b : (step + 1) * b]]  # (B, T)
            logits = model(input_ids=x).logits  # (B, T, V)
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            opt.step()
        result = {"train_tokens_per_s": steps * b * blocks.shape[1] / (time.perf_counter() - start),
                  "steps": steps}
    n = sum(p.numel() for p in params)
    return {**result, "peak_rss_mb": peak_rss_mb(), "params_trainable": n, "params_total": n}


def one_run(args: argparse.Namespace) -> None:
    """``--one NAME``: a single run in this process; prints its figures as one JSON line."""
    folder = Path(args.folder)
    if args.one in BARE:
        result = bare_run(folder, args, fused=args.one == "bare-fused")
    else:
        result = trainable_run(folder, args, args.one)
    print(json.dumps(result))


def speed_part(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    names = args.speed_runs.split(",")
    unknown = sorted(set(names) - {*BARE, *MODES})
    if unknown or "full" not in names:
        raise SystemExit(f"--speed-runs: must name full and any of {', '.join([*BARE, *MODES])}"
                         f" (got {args.speed_runs})")
    rounds: list[dict[str, dict[str, Any]]] = []
    while sum(not disturbed(r) for r in rounds) < args.rounds and len(rounds) < args.rounds + 2:
        order = names if len(rounds) % 2 == 0 else names[::-1]
        before = wait_quiet(args.quiet_wait)
        this: dict[str, dict[str, Any]] = {}
        for name in order:
            cmd = [sys.executable, __file__, "--one", name, "--folder", str(folder),
                   "--threads", str(args.threads), "--batch", str(args.batch),
                   "--block", str(args.block), "--tokens", str(args.tokens)]
            done, others = run_child(cmd)
            if done.returncode != 0:
                raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            this[name] = {**result, "others_cores": others, "others_before": before}
        rounds.append(this)
        print(f"round {len(rounds)}: " + ", ".join(
            f"{k} {this[k]['train_tokens_per_s']:.0f}" for k in order) + " tok/s; other "
            "processes: " + ", ".join(f"{this[k]['others_cores']:.2f}" for k in order)
            + f" cores{' (disturbed: not counted)' if disturbed(this) else ''}",
            file=sys.stderr, flush=True)
    if len({x["steps"] for r in rounds for x in r.values()}) != 1:
        raise RuntimeError("the bare loop and the trainable took different step counts")
    return {"rounds": rounds}


def disturbed(round_: dict[str, dict[str, Any]]) -> bool:
    """Whether other processes kept over ``OTHERS_MAX`` cores busy during a run of the round."""
    return any(x["others_cores"] > OTHERS_MAX for x in round_.values())


def print_speed(s: dict[str, Any], args: argparse.Namespace) -> None:
    clean = [r for r in s["rounds"] if not disturbed(r)] or s["rounds"]
    runs = {k: [r[k] for r in clean] for k in clean[0]}

    def paired(a: str, b: str) -> list[float]:
        return [x["train_tokens_per_s"] / y["train_tokens_per_s"]
                for x, y in zip(runs[a], runs[b], strict=True)]

    steps = runs["full"][0]["steps"]
    others = [x["others_cores"] for v in runs.values() for x in v]
    print(f"\n## Speed and memory per update mode: batch {args.batch} x {args.block} tokens, "
          f"{args.threads} threads, {len(clean)} undisturbed rounds of {len(s['rounds'])}, "
          f"{steps} timed steps per run\n")
    print("| run | params trainable / total | train tokens/s, median (range) | "
          "time per step vs full: paired median (range) | peak RSS MiB, median |")
    print("|---|---|---|---|---|")
    for name in runs:
        tps = [x["train_tokens_per_s"] for x in runs[name]]
        rel = paired("full", name)
        first = runs[name][0]
        label = BARE.get(name, f"trainable, {name}")
        print(f"| {label} | {first['params_trainable'] / 1e6:.2f}M / "
              f"{first['params_total'] / 1e6:.2f}M | {statistics.median(tps):.0f} "
              f"({min(tps):.0f}-{max(tps):.0f}) | {statistics.median(rel):.2f}x "
              f"({min(rel):.2f}-{max(rel):.2f}) | "
              f"{statistics.median(x['peak_rss_mb'] for x in runs[name]):,.0f} |")
    print(f"\nother processes on the machine during the runs: {statistics.mean(others):.2f} "
          f"cores on average, {max(others):.2f} at most (2 cores in all)")
    for bare in [b for b in BARE if b in runs]:
        ratio = paired("full", bare)
        print(f"\nfull trainable / {BARE[bare]} tokens/s: paired median "
              f"{statistics.median(ratio):.2f} (per round: {', '.join(f'{r:.2f}' for r in ratio)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_GGUF, help="the SmolLM2 GGUF file")
    parser.add_argument("--parts", default="profile,fixes,speed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="profile: timed steps per mode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=2048, help="speed: train tokens per task")
    parser.add_argument("--repeats", type=int, default=8, help="fixes: repeats of each")
    parser.add_argument("--quiet-wait", type=float, default=300,
                        help="speed: seconds to wait, before each round, for other processes "
                             "to use under 0.25 cores")
    parser.add_argument("--speed-runs", default="bare,full,bare-fused,lora,freeze",
                        help="speed: the runs of a round, in ABBA order")
    parser.add_argument("--json", type=Path, default=RESULTS / "pretrained.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one_run(args)
        return
    if not args.model.exists():
        parser.error(f"--model: no such file {args.model}; get it with "
                     "../shared/models/get-smollm2.sh")
    parts = set(args.parts.split(","))
    out: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()},
                           "torch": torch.__version__}
    out["others_at_start"] = wait_quiet(args.quiet_wait)
    start = time.perf_counter()
    if "profile" in parts:  # first: its load's peak memory is the process's own
        out["profile"] = profile_part(args)
        print_profile(out["profile"], args)
    if "fixes" in parts:
        out["fixes"] = fixes_part(args)
        print_fixes(out["fixes"], args)
    if "speed" in parts:
        out["speed"] = speed_part(args, dequantized_folder(args.model))
        print_speed(out["speed"], args)
    out["wall_s"] = time.perf_counter() - start
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nfigures: {args.json} ({out['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
