"""Update modes (``run.update``): which weights train in full, freeze and LoRA mode, exact
resume from LoRA and freeze checkpoints, the merged model served from a LoRA checkpoint, bad
input (a LoRA search's registered champion: tests/test_pretrained.py)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from adaptune.search.cli import main
from adaptune.trainables import parse_run_config, prepare, run_stream
from adaptune.trainables.checkpoint import load_state, materialize_model
from adaptune.trainables.config import HYPERPARAMETERS, UpdateConfig
from adaptune.trainables.cost import param_counts
from adaptune.trainables.errors import ConfigError
from adaptune.trainables.evaluation import evaluate
from adaptune.trainables.run import Prepared, base_model
from adaptune.trainables.update import apply_update, load_adapters
from conftest import tiny_experiment, write_experiment
from safetensors.torch import load_file

CPU = torch.device("cpu")
D = 32  # n_embd of the tiny model (conftest)


def run_config(update: dict[str, Any], **run: Any) -> dict[str, Any]:
    """The tiny stream, 16 steps a task at a learning rate that moves an adapter visibly."""
    changes = {
        "model": {"n_layer": 2},
        "stream": {"max_train_tokens": 4096},
        "optim": {"lr": 2e-2},
        "update": update,
        "hardware": {"threads": 1},
    }
    return tiny_experiment(run={**changes, **run})["run"]


def run_all(
    prep: Prepared, out: Path, **kwargs: Any
) -> tuple[list[dict[str, Any]], dict[int, Path]]:
    """Reports, and a copy of each task's checkpoint in ``out/task-<k>``."""
    reports: list[dict[str, Any]] = []
    ckpts: dict[int, Path] = {}

    def keep(metrics: dict[str, Any], ckpt: Path) -> None:
        reports.append(metrics)
        k = metrics["task_index"]
        ckpts[k] = out / f"task-{k}"
        shutil.copytree(ckpt, ckpts[k])

    run_stream(prep, report=keep, **kwargs)
    return reports, ckpts


def test_update_knobs_are_hyperparameters_and_target_modules_take_a_string() -> None:
    assert HYPERPARAMETERS["update_mode"] == ("update", "mode")
    for name in ("freeze_layers", "lora_r", "lora_alpha", "lora_dropout", "target_modules",
                 "lora_merge_each_task"):
        assert HYPERPARAMETERS[name] == ("update", name)
    assert UpdateConfig(target_modules="c_attn, c_proj").target_modules == ["c_attn", "c_proj"]
    with pytest.raises(ConfigError, match=r"run\.update\.mode: must be one of .*'lora'"):
        parse_run_config(run_config({"mode": "lora2"}))
    with pytest.raises(ConfigError, match=r"run\.update\.lora_dropout"):
        parse_run_config(run_config({"lora_dropout": 1.0}))


def test_freeze_keeps_embeddings_and_bottom_blocks_bit_identical_and_trains_the_rest(
    tmp_path: Path,
) -> None:
    prep = prepare(parse_run_config(run_config({"mode": "freeze", "freeze_layers": 1})))
    base = base_model(prep, CPU)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    bottom = ("transformer.wte", "transformer.wpe", "transformer.h.0.")
    frozen_numel = sum(p.numel() for n, p in base.named_parameters() if n.startswith(bottom))
    counts = param_counts(apply_update(base, prep.cfg.update))
    trainable, total = counts["params_trainable"], counts["params_total"]
    assert total == sum(p.numel() for p in base.parameters())
    assert trainable == total - frozen_numel  # the tied output head is the frozen embedding

    _, ckpts = run_all(prep, tmp_path, stop_after=1)
    after = load_file(ckpts[1] / "model" / "model.safetensors")
    for name, value in after.items():
        frozen = name.startswith(("transformer.w", "transformer.h.0.", "lm_head"))  # tied head
        if frozen:
            assert torch.equal(value, before[name]), name
        elif name.endswith("weight"):
            assert not torch.equal(value, before[name]), f"{name} did not train"


@pytest.mark.parametrize("merge", [False, True])
def test_lora_trains_only_the_adapter(merge: bool, tmp_path: Path) -> None:
    update = {"mode": "lora", "lora_r": 4, "lora_merge_each_task": merge}
    prep = prepare(parse_run_config(run_config(update)))
    base = base_model(prep, CPU)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    counts = param_counts(apply_update(base_model(prep, CPU), prep.cfg.update))
    trainable, total = counts["params_trainable"], counts["params_total"]
    adapter = 2 * 4 * (D + 3 * D)  # per block: c_attn's lora_A (r, D) and lora_B (3D, r)
    assert (trainable, total) == (adapter, sum(p.numel() for p in base.parameters()) + adapter)

    reports, ckpts = run_all(prep, tmp_path)
    assert not (ckpts[3] / "model").exists()  # no copy of the base weights
    merged = sorted(p.name for p in (ckpts[3] / "merged").glob("*")) if merge else []
    assert merged == (["1", "2"] if merge else [])  # none after the last task
    model = load_adapters(base_model(prep, CPU), ckpts[3])
    live = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(live)
    assert all(p.abs().sum() > 0 for n, p in live.items() if "lora_B" in n)  # it trained
    for name, value in model.get_base_model().state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        same = torch.equal(value, before[key])
        # merged: tasks 1 and 2's adapters are in c_attn's weights; the rest stays as built
        assert same != (merge and "c_attn.weight" in key), name

    # the served model is the base with every adapter merged: it computes the last loss row
    served = transformers.AutoModelForCausalLM.from_pretrained(
        materialize_model(ckpts[3], tmp_path / "served"), dtype=torch.float32
    )
    row = [evaluate(served, t.eval, 8, CPU) for t in prep.tasks]
    assert row == pytest.approx(reports[-1]["loss_matrix"][3], abs=1e-5)


RESUMED = {
    "lora": {"mode": "lora", "lora_dropout": 0.1},
    "lora-merge": {"mode": "lora", "lora_dropout": 0.1, "lora_merge_each_task": True},
    "freeze": {"mode": "freeze", "freeze_layers": 1},
}


@pytest.mark.parametrize("mode", list(RESUMED))
def test_resume_after_task_one_matches_an_uninterrupted_run(mode: str, tmp_path: Path) -> None:
    # every component on (replay, EWC over the trainable parameters, distillation from the
    # model with its adapter), and dropout: buffer, Fisher, teacher, optimizer, RNGs all resume
    components = {
        "replay": {"buffer_size": 64, "replay_fraction": 0.25},
        "ewc": {"ewc_lambda": 100.0, "fisher_samples": 8},
        "distill": {"distill_alpha": 0.5},
    }
    cfg = run_config(RESUMED[mode], components=components)
    cfg["model"]["dropout"] = 0.1
    prep = prepare(parse_run_config(cfg))
    full, ckpts = run_all(prep, tmp_path / "full")
    L = full[-1]["loss_matrix"]
    assert max(abs(a - b) for a, b in zip(L[0], L[3], strict=True)) > 1e-2  # it learnt
    precision = [k for k in load_state(ckpts[2]) if k.startswith("ewc.precision.")]
    assert precision  # EWC covers exactly the trainable parameters: the adapter in LoRA mode
    assert all(("lora_" in k) == (mode != "freeze") for k in precision)
    if mode == "freeze":
        assert not any("h.0." in k or ".wte." in k for k in precision)

    resumed, again = run_all(prep, tmp_path / "resumed", resume_from=ckpts[1])
    assert [m["task_index"] for m in resumed] == [2, 3]
    for a, b in zip(full[1:], resumed, strict=True):
        flat_a, flat_b = sum(a["loss_matrix"], []), sum(b["loss_matrix"], [])
        assert flat_a == pytest.approx(flat_b, abs=1e-4)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
    weights = "adapter/adapter_model.safetensors" if mode != "freeze" else "model/model.safetensors"
    end, end_again = load_file(ckpts[3] / weights), load_file(again[3] / weights)
    assert all(torch.allclose(end[k], end_again[k], atol=1e-6) for k in end)


def test_lora_on_a_gguf_llama_targets_its_attention_and_serves_merged(
    shared_data: Path, tmp_path: Path
) -> None:
    stories = shared_data / "models" / "stories260K" / "stories260K.gguf"
    if not stories.is_file():
        pytest.skip(f"stories260K not available at {stories}")
    update = {"mode": "lora", "lora_merge_each_task": True}
    cfg = run_config(update, model={"name": str(stories)}, optim={"lr": 1e-2, "batch_size": 4})
    cfg["stream"].update({"max_train_tokens": 512, "max_eval_blocks": 2})
    cfg["stream"]["tasks"] = cfg["stream"]["tasks"][:2]
    cfg["components"] = {"ewc": {"ewc_lambda": 10.0, "fisher_samples": 4}}
    prep = prepare(parse_run_config(cfg))
    model = apply_update(base_model(prep, CPU), prep.cfg.update)
    trained = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters()
               if p.requires_grad}
    assert trained == {"q_proj", "v_proj"}  # peft's Llama default

    reports, ckpts = run_all(prep, tmp_path)
    assert (ckpts[2] / "merged" / "1").is_dir()
    served = transformers.AutoModelForCausalLM.from_pretrained(
        materialize_model(ckpts[2], tmp_path / "served"), dtype=torch.float32
    )
    row = [evaluate(served, t.eval, 4, CPU) for t in prep.tasks]
    assert row == pytest.approx(reports[-1]["loss_matrix"][2], abs=1e-4)

    freeze = run_config({"mode": "freeze", "freeze_layers": 6}, model={"name": str(stories)})
    with pytest.raises(ConfigError, match=r"run\.update\.freeze_layers: .* 5 transformer blocks"):
        prepare(parse_run_config(freeze))


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"update_mode": "lora2"}, "run.update.mode: must be one of 'full', 'freeze' or 'lora'"),
        ({"update_mode": "freeze", "freeze_layers": 3},
         "run.update.freeze_layers: must be <= the model's 2 transformer blocks (got 3)"),
        ({"update_mode": "lora", "target_modules": "q_proj"},
         "run.update.target_modules: Target modules {'q_proj'} not found"),
    ],
)
def test_bad_update_input_exits_2_with_one_line(
    update: dict[str, Any], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tiny_experiment("bad", run={"model": {"n_layer": 2}})
    exp = write_experiment(tmp_path / "exp.yaml", data)
    sets = [arg for k, v in update.items() for arg in ("--set", f"{k}={v}")]
    assert main(["train", str(exp), "--no-tracking", "--out", str(tmp_path / "out"), *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_dry_run_shows_a_search_over_update_modes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    space = {
        "update_mode": {"choice": ["full", "freeze", "lora"]},
        "lora_r": {"int": [2, 8]},
        "target_modules": {"choice": ["c_attn", "c_attn,c_proj"]},
        "lora_merge_each_task": {"choice": [True, False]},
    }
    write_experiment("x.yaml", tiny_experiment("x", space=space))
    assert main(["search", "x.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for line in (
        r"update_mode +choice \['full', 'freeze', 'lora'\]",
        r"target_modules +choice \['c_attn', 'c_attn,c_proj'\]",
        r"lora_merge_each_task +choice \[True, False\]",
        r"freeze_layers +0",  # fixed, from run.update
    ):
        assert re.search(rf"^  {line}$", out, re.MULTILINE), (line, out)
    assert not (tmp_path / "runs").exists()
