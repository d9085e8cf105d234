"""End-to-end behaviour of one continual-learning run on the built-in stream."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from adaptune.trainables import TrainingDivergedError, parse_run_config, prepare, run_stream
from adaptune.trainables.run import Prepared
from conftest import tiny_experiment


def small_run(**components: Any) -> dict[str, Any]:
    """The quickstart stream at test size: three built-in domains, a 2-layer GPT."""
    return tiny_experiment(
        run={
            "seed": 0,
            "model": {"n_layer": 2, "n_embd": 64, "n_head": 4},
            "stream": {"block_size": 64, "max_train_tokens": 32768, "max_eval_blocks": 16},
            "optim": {"lr": 3e-3, "batch_size": 16, "schedule": "cosine"},
            "components": components,
            "hardware": {"threads": 2},
            "eval_batch_size": None,
        }
    )["run"]


def collect(prep: Prepared, **kwargs: Any) -> tuple[list[dict[str, Any]], Any]:
    reports: list[dict[str, Any]] = []
    progress = run_stream(prep, report=lambda m, _ckpt: reports.append(m), **kwargs)
    return reports, progress


@pytest.fixture(scope="module")
def naive_and_replay() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    naive, _ = collect(prepare(parse_run_config(small_run())))
    replay, _ = collect(
        prepare(parse_run_config(small_run(replay={"buffer_size": 512, "replay_fraction": 0.25})))
    )
    return naive, replay


def test_naive_finetuning_forgets_the_first_domain(naive_and_replay: Any) -> None:
    naive, _ = naive_and_replay
    assert [m["task_index"] for m in naive] == [1, 2, 3]
    assert naive[-1]["forgetting/docs"] > 0.05
    # the loss matrix behind it: docs got worse after the later tasks than right after docs
    L = naive[-1]["loss_matrix"]
    assert L[3][0] > L[1][0] + 0.05


def test_replay_forgets_clearly_less_at_the_same_lr(naive_and_replay: Any) -> None:
    naive, replay = naive_and_replay
    assert replay[-1]["forgetting/docs"] < 0.5 * naive[-1]["forgetting/docs"]
    assert replay[-1]["forgetting"] < 0.5 * naive[-1]["forgetting"]
    assert replay[-1]["stream_loss"] < naive[-1]["stream_loss"]


def test_reports_carry_every_metric(naive_and_replay: Any) -> None:
    m = naive_and_replay[0][1]
    for key in (
        "stream_loss",
        "seen_loss",
        "new_task_loss",
        "forgetting",
        "bwt",
        "fwt",
        "stream_ppl",
        "loss/docs",
        "ppl/code",
        "forgetting/docs",
        "train_tokens_per_s",
        "train_tokens",
    ):
        assert key in m, key
    assert len(m["loss_matrix"]) == 3 and len(m["loss_matrix"][0]) == 3
    assert m["new_task_loss"] == m["loss/code"]


def test_resume_after_task_one_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    # every component on, so buffer, Fisher, anchors, teacher, optimizer and RNGs must all resume
    cfg = small_run(
        replay={"buffer_size": 256, "replay_fraction": 0.25},
        ewc={"ewc_lambda": 100.0, "fisher_samples": 8},
        distill={"distill_alpha": 0.5},
    )
    cfg["stream"]["max_train_tokens"] = 8192
    cfg["model"]["dropout"] = 0.1  # the torch RNG matters too
    prep = prepare(parse_run_config(cfg))
    full, _ = collect(prep)

    saved = tmp_path / "after-task-1"

    def keep(_metrics: dict[str, Any], ckpt: Path) -> None:
        shutil.copytree(ckpt, saved)

    run_stream(prep, report=keep, stop_after=1)
    resumed, _ = collect(prep, resume_from=saved)
    assert [m["task_index"] for m in resumed] == [2, 3]
    for a, b in zip(full[1:], resumed, strict=True):
        for key in ("stream_loss", "forgetting", "train_loss", "loss/docs", "loss/unicode"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key


def test_nan_loss_raises_with_task_and_step(monkeypatch: pytest.MonkeyPatch) -> None:
    import adaptune.trainables.run as run_module

    real_build = run_module.build_model

    def poisoned(cfg: Any, tokenizer: Any) -> torch.nn.Module:
        model = real_build(cfg, tokenizer)
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return model

    monkeypatch.setattr(run_module, "build_model", poisoned)
    cfg = small_run()
    cfg["stream"]["max_train_tokens"] = 2048
    with pytest.raises(TrainingDivergedError, match=r"task 1 \('docs'\), step 1/"):
        collect(prepare(parse_run_config(cfg)))


def test_pretrain_is_cached_and_adds_a_base_column(tmp_path: Path) -> None:
    cfg = small_run()
    cfg["stream"]["max_train_tokens"] = 2048
    cfg["stream"]["tasks"] = cfg["stream"]["tasks"][1:]
    cfg["model"]["pretrain"] = {
        "domain": {"name": "docs", "builtin": "python_docs"},
        "steps": 20,
        "cache_dir": str(tmp_path / "cache"),
    }
    prep = prepare(parse_run_config(cfg))
    first, _ = collect(prep)
    cached = list((tmp_path / "cache").glob("pretrain-*/model.safetensors"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    second, _ = collect(prep)
    assert cached[0].stat().st_mtime_ns == stamp  # reused, not retrained
    assert first[-1]["base_loss"] == pytest.approx(second[-1]["base_loss"], abs=1e-6)
    assert "base_forgetting" in first[-1]
