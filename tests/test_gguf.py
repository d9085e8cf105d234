"""GGUF base models: stories260K loaded through transformers' GGUF support (model and tokenizer
from the one file), bad GGUF inputs refused before training, and one ``adaptune train`` run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from adaptune.search.cli import main
from adaptune.trainables import gguf
from adaptune.trainables.config import ModelConfig
from adaptune.trainables.errors import ConfigError
from adaptune.trainables.model import (
    build_model,
    check_model_loadable,
    check_tokenizer,
    context_length,
    load_tokenizer,
)
from conftest import tiny_experiment, write_experiment

# What stories260K writes greedily after BOS (llama2.c's reference sample of this model).
REFERENCE = (
    "Once upon a time, there was a little girl named Lily. "
    "She loved to play outside in the park."
)
SAMPLE = "Once upon a time, Lily saw a big dog in the park. It was happy!"


@pytest.fixture(scope="module")
def stories(shared_data: Path) -> Path:
    path = shared_data / "models" / "stories260K" / "stories260K.gguf"
    if not path.is_file():
        pytest.skip(f"stories260K not available at {path}")
    return path


@pytest.fixture(scope="module")
def loaded(stories: Path) -> tuple[ModelConfig, Any, Any, Any]:
    """(cfg, transformers config, tokenizer, model), loaded the way a run loads them."""
    cfg = ModelConfig(name=str(stories))
    config = check_model_loadable(cfg)
    tok = load_tokenizer(cfg)
    return cfg, config, tok, build_model(cfg, tok).eval()


def test_stories260k_loads_from_gguf_and_writes_its_reference_story(
    loaded: tuple[ModelConfig, Any, Any, Any],
) -> None:
    cfg, config, tok, model = loaded
    # GGUF's "no token" padding id (0xFFFFFFFF) becomes None in the config and the model
    assert config.vocab_size == 512 and config.pad_token_id is None
    assert context_length(config) == 2048
    assert model.config.pad_token_id is None
    assert model.model.embed_tokens.padding_idx is None
    assert (len(tok), tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (512, 1, 2, 0)
    assert tok.pad_token_id is None
    check_tokenizer(cfg, tok, config)
    # dense float32 weights, no quantizer left behind: the model trains and saves as any other
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert getattr(model, "hf_quantizer", None) is None
    with torch.no_grad():
        out = model.generate(
            torch.tensor([[tok.bos_token_id]]), max_new_tokens=40, do_sample=False
        )
    assert tok.decode(out[0], skip_special_tokens=True).startswith(REFERENCE)


def test_gguf_model_and_tokenizer_save_and_reload_unchanged(
    loaded: tuple[ModelConfig, Any, Any, Any], tmp_path: Path
) -> None:
    _, _, tok, model = loaded
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for special in (True, False):
        ids = tok(SAMPLE, add_special_tokens=special)["input_ids"]
        assert again(SAMPLE, add_special_tokens=special)["input_ids"] == ids
    assert tok(SAMPLE)["input_ids"][0] == tok.bos_token_id  # llama.cpp adds BOS to this vocab
    x = torch.tensor([tok(SAMPLE)["input_ids"]])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, model(input_ids=x).logits)


def test_bfloat16_dequantizes_the_weights_to_bf16(
    stories: Path, loaded: tuple[ModelConfig, Any, Any, Any]
) -> None:
    _, _, tok, model = loaded
    half = build_model(ModelConfig(name=str(stories), dtype="bfloat16"), tok).eval()
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    x = torch.tensor([tok(SAMPLE)["input_ids"]])
    with torch.no_grad():
        full_logits = model(input_ids=x).logits
        half_logits = half(input_ids=x).logits.float()
    assert torch.isfinite(half_logits).all()
    # the same model, rounded: the greedy next token agrees almost everywhere
    agree = (half_logits.argmax(-1) == full_logits.argmax(-1)).float().mean()
    assert agree > 0.8


def _garbage(path: Path) -> Path:
    path.write_bytes(bytes(range(256)) * 4)
    return path


def _unsupported_architecture(path: Path, arch: str = "nosucharch") -> Path:
    """A valid GGUF file (header and metadata only) of an architecture nobody loads."""
    writer = pytest.importorskip("gguf").GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_check_refuses_bad_gguf_files(tmp_path: Path) -> None:
    cases = {
        "does not exist": tmp_path / "missing.gguf",
        "is not a readable GGUF file (": _garbage(tmp_path / "garbage.gguf"),
        "holds a 'nosucharch' model, which transformers": _unsupported_architecture(
            tmp_path / "arch.gguf"
        ),
    }
    not_causal = _unsupported_architecture(tmp_path / "t5.gguf", "t5")
    with pytest.raises(ConfigError, match="holds a 't5' model, which is not a causal language"):
        check_model_loadable(ModelConfig(name=str(not_causal)))
    for cause, path in cases.items():
        with pytest.raises(ConfigError) as err:
            check_model_loadable(ModelConfig(name=str(path)))
        msg = str(err.value)
        assert msg.startswith("run.model.name: ") and cause in msg and "\n" not in msg, msg
        assert repr(str(path)) in msg
    assert "'llama'" in str(err.value)  # the supported architectures are listed


def test_missing_accelerate_says_how_to_install_it(
    stories: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gguf, "_installed", lambda package: package != "accelerate")
    with pytest.raises(ConfigError) as err:
        check_model_loadable(ModelConfig(name=str(stories)))
    assert str(err.value).startswith("run.model.name: ")
    assert "pip install accelerate" in str(err.value)


def test_bad_gguf_tokenizer_names_the_tokenizer_field(tmp_path: Path) -> None:
    bad = _garbage(tmp_path / "tok.gguf")
    with pytest.raises(ConfigError) as err:
        load_tokenizer(ModelConfig(tokenizer=str(bad)))
    assert str(err.value).startswith("run.model.tokenizer: ")
    assert "not a readable GGUF file" in str(err.value)


def test_gguf_tokenizer_beside_a_different_model_name(stories: Path) -> None:
    tok = load_tokenizer(ModelConfig(name="unused/by-the-tokenizer", tokenizer=str(stories)))
    assert len(tok) == 512 and tok.bos_token_id == 1


BAD_FILES = {
    "missing": (lambda tmp: None, "GGUF file 'missing.gguf' does not exist"),
    "not gguf": (lambda tmp: _garbage(tmp / "missing.gguf"), "is not a readable GGUF file"),
    "architecture": (
        lambda tmp: _unsupported_architecture(tmp / "missing.gguf"),
        "holds a 'nosucharch' model",
    ),
}


@pytest.mark.parametrize("label", list(BAD_FILES))
def test_cli_refuses_a_bad_gguf_model_with_one_line(
    label: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make, cause = BAD_FILES[label]
    make(tmp_path)
    monkeypatch.chdir(tmp_path)
    exp = write_experiment(
        tmp_path / "exp.yaml", tiny_experiment("gguf-bad", run={"model": {"name": "missing.gguf"}})
    )
    assert main(["train", str(exp), "--no-tracking"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "run.model.name: " in err and cause in err, err
    assert not (tmp_path / "runs").exists()


def _story_lines(topic: str, n: int) -> str:
    names = ["Lily", "Tom", "Sue", "Max", "Ben", "Mia"]
    return "\n".join(
        f"One day {names[i % 6]} went to the {topic}. {names[(i + 1) % 6]} saw a big "
        f"{topic} and was very happy. They played all day and then went home."
        for i in range(n)
    )


def test_adaptune_train_on_stories260k_end_to_end(stories: Path, tmp_path: Path) -> None:
    here = tmp_path / "exp"
    here.mkdir()
    shutil.copy(stories, here / "stories.gguf")  # relative to the experiment file
    (here / "park.txt").write_text(_story_lines("park", 24))
    (here / "sea.txt").write_text(_story_lines("sea", 24))
    data = tiny_experiment(
        "gguf-e2e",
        run={
            "model": {"name": "stories.gguf"},
            "stream": {
                "block_size": 32,
                "max_train_tokens": 256,
                "max_eval_blocks": 2,
                "tasks": [
                    {"name": "park", "files": ["park.txt"]},
                    {"name": "sea", "files": ["sea.txt"]},
                ],
            },
            "optim": {"batch_size": 4, "lr": 1e-3},
        },
    )
    exp = write_experiment(here / "exp.yaml", data)
    out = tmp_path / "out"
    assert main(["train", str(exp), "--out", str(out), "--no-tracking"]) == 0
    matrix = json.loads((out / "loss_matrix.json").read_text())["loss_matrix"]
    assert len(matrix) == 3 and all(len(row) == 2 for row in matrix)
    assert all(math.isfinite(v) for row in matrix for v in row)
    # a pretrained story model: already far better than uniform over its 512 tokens
    assert matrix[0][0] < 0.75 * math.log(512)
    # training on a task lowers its loss
    assert matrix[1][0] < matrix[0][0] and matrix[2][1] < matrix[0][1]
    saved = out / "checkpoints" / "task-2" / "model"
    tok = transformers.AutoTokenizer.from_pretrained(saved)
    assert tok("Once upon a time", add_special_tokens=False)["input_ids"] == load_tokenizer(
        ModelConfig(name=str(stories))
    )("Once upon a time", add_special_tokens=False)["input_ids"]
