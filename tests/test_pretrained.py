"""A pretrained model end to end: stories260K (GGUF) adapted in every update mode with a
retain domain, and a LoRA search on it whose champion serves from the registry alias."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from adaptune.search import train
from adaptune.search.cli import main
from adaptune.trainables.config import ModelConfig
from adaptune.trainables.model import build_model
from conftest import tiny_experiment, write_experiment

STORIES_PARAMS = 292_800  # stories260K: dim 64, 5 blocks, vocab 512, tied embeddings


@pytest.fixture
def stories_exp(shared_data: Path, tmp_path: Path) -> Path:
    """A folder with stories260K, one new domain (Shakespeare) and a retain domain of short
    stories, as an experiment's inputs."""
    gguf = shared_data / "models" / "stories260K" / "stories260K.gguf"
    drama = shared_data / "shakespeare" / "tinyshakespeare_input.txt"
    if not gguf.is_file() or not drama.is_file():
        pytest.skip("stories260K or the Shakespeare corpus is not in the shared data")
    here = tmp_path / "exp"
    here.mkdir()
    shutil.copy(gguf, here / "stories.gguf")
    (here / "drama.txt").write_text(drama.read_text()[:40_000])
    names = ["Lily", "Tom", "Sue", "Ben"]
    (here / "own.txt").write_text("\n\n".join(
        f"Once upon a time, {names[i % 4]} went to the park. {names[(i + 1) % 4]} saw a big "
        "dog. They played all day and were very happy." for i in range(40)))
    return here


def _experiment(here: Path, mode: str, **search: object) -> Path:
    data = tiny_experiment(
        "stories",
        run={
            "model": {"name": "stories.gguf"},
            "stream": {
                "block_size": 64,
                "max_train_tokens": 2048,
                "max_eval_blocks": 4,
                "tasks": [{"name": "drama", "files": ["drama.txt"]}],
                "retain": [{"name": "own", "files": ["own.txt"]}],
            },
            "optim": {"batch_size": 4, "lr": 1e-2},
            "update": {"mode": mode, "freeze_layers": 3, "lora_r": 4},
        },
        **({"space": {"lr": None, "lora_r": {"choice": [2, 4]}}, "search": search}
           if search else {}),
    )
    return write_experiment(here / f"{mode}.yaml", data)


@pytest.mark.parametrize("mode", ["full", "freeze", "lora"])
def test_each_update_mode_adapts_stories260k_and_reports_retention(
    stories_exp: Path, mode: str
) -> None:
    result = train(_experiment(stories_exp, mode), out=stories_exp / f"out-{mode}",
                   tracking=False, quiet=True)
    m = result.metrics
    (before,), (after,) = result.retain_losses[0], result.retain_losses[-1]
    assert m["retain/own"] == pytest.approx(after) and m["retain_loss"] == pytest.approx(after)
    assert m["retain_forgetting"] == pytest.approx(after - before)
    assert result.loss_matrix[1][0] < result.loss_matrix[0][0]  # it learnt the new domain
    assert m["params_total"] == STORIES_PARAMS + (m["params_trainable"] if mode == "lora" else 0)
    if mode == "full":
        assert m["params_trainable"] == STORIES_PARAMS
    else:  # freeze: 3 of 5 blocks and the (tied) embeddings; lora: r=4 on q_proj and v_proj
        assert 0 < m["params_trainable"] < STORIES_PARAMS // 2
    saved = json.loads((stories_exp / f"out-{mode}" / "loss_matrix.json").read_text())
    assert saved["retain"] == ["own"] and len(saved["retain_matrix"]) == 2


@pytest.mark.slow
def test_lora_search_on_stories260k_serves_its_champion_from_the_alias(
    stories_exp: Path, monkeypatch: pytest.MonkeyPatch, shared_ray: None
) -> None:
    monkeypatch.chdir(stories_exp)
    exp = _experiment(stories_exp, "lora", num_samples=2, scheduler="fifo",
                      metric="retain_loss")
    assert main(["search", str(exp)]) == 0

    mlflow.set_tracking_uri(f"sqlite:///{stories_exp / 'runs' / 'mlflow.db'}")
    pipe = mlflow.transformers.load_model("models:/adaptune-stories@champion")
    text = pipe("Once upon a time", max_new_tokens=16)[0]["generated_text"]
    assert text.startswith("Once upon a time") and len(text.split()) > 5, text
    # merged: the adapted attention weights are the base's plus the adapter, the rest the base's
    base = build_model(ModelConfig(name=str(stories_exp / "stories.gguf")), None).state_dict()
    served = pipe.model.state_dict()
    q, mlp = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(served[q], base[q]) and torch.equal(served[mlp], base[mlp])

    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("adaptune-stories", "champion")
    run = mlflow.get_run(version.run_id)
    assert run.data.params["update_mode"] == "lora"
    assert "retain_forgetting" in run.data.metrics
    files = {f.path for f in client.list_artifacts(version.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= files
