"""Base model and tokenizer: the built tiny GPT, a local transformers model, offline errors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from adaptune.trainables.config import ModelConfig, StreamConfig
from adaptune.trainables.errors import ConfigError
from adaptune.trainables.model import (
    build_model,
    check_model_loadable,
    context_length,
    load_tokenizer,
    next_token_loss,
    pretrain_dir,
    pretrain_key,
)


def test_next_token_loss_shifts_by_one_and_averages_positions() -> None:
    # Position t predicts token t + 1; the last position predicts nothing, so its (extreme)
    # logits must not count. Positions 0 and 1 each give the target probability 3/4.
    ln3 = math.log(3.0)
    logits = torch.tensor([[[ln3, 0.0], [0.0, ln3], [100.0, -100.0]]])  # (1, 3, 2)
    blocks = torch.tensor([[1, 0, 1]])  # targets: 0, then 1
    loss = next_token_loss(logits, blocks)
    assert float(loss) == pytest.approx(-math.log(0.75), rel=1e-6)
    # a batch of the same row twice: the mean, not the sum
    assert float(next_token_loss(logits.repeat(2, 1, 1), blocks.repeat(2, 1))) == pytest.approx(
        -math.log(0.75), rel=1e-6
    )


def test_default_tiny_model_with_byt5_tokenizer() -> None:
    cfg = ModelConfig(n_layer=1, n_embd=32, n_head=4, n_positions=16)
    tok = load_tokenizer(cfg)
    assert isinstance(tok, transformers.ByT5Tokenizer)
    # 3 specials (pad, eos, unk) + 256 bytes + 125 extra ids = 384
    assert len(tok) == 384
    assert tok.eos_token_id == 1 and tok.pad_token_id == 0
    # "hi" = bytes 104, 105, shifted by the 3 specials
    assert tok("hi", add_special_tokens=False)["input_ids"] == [107, 108]
    check_model_loadable(cfg)  # nothing to check for the built model
    model = build_model(cfg, tok)
    assert isinstance(model, transformers.GPT2LMHeadModel)
    assert model.config.vocab_size == 384
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head) == (1, 32, 4)
    assert context_length(model.config) == 16
    x = torch.randint(0, 384, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=x).logits
    assert logits.shape == (2, 5, 384)
    assert torch.isfinite(logits).all()


def test_tiny_model_dropout_from_config() -> None:
    tok = load_tokenizer(ModelConfig())
    model = build_model(ModelConfig(n_layer=1, n_embd=16, n_head=2, dropout=0.2), tok)
    assert model.config.resid_pdrop == model.config.attn_pdrop == model.config.embd_pdrop == 0.2


@pytest.fixture(scope="module")
def local_gpt2(tmp_path_factory: pytest.TempPathFactory, gpt2_tokenizer_dir: Path) -> Path:
    """A tiny random GPT-2 with the real GPT-2 tokenizer, saved with ``save_pretrained``."""
    tok = transformers.GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_dir)
    assert tok("Hello world")["input_ids"] == [15496, 995]  # the real GPT-2 ids
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    out = tmp_path_factory.mktemp("local-gpt2")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_local_transformers_model_loads_by_path(local_gpt2: Path) -> None:
    cfg = ModelConfig(name=str(local_gpt2))
    check_model_loadable(cfg)
    tok = load_tokenizer(cfg)
    assert len(tok) == 50257 and tok.eos_token_id == 50256
    assert tok("Hello world")["input_ids"] == [15496, 995]
    model = build_model(cfg, tok)
    assert context_length(model.config) == 32
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([tok("Hello world")["input_ids"]])
    reference = transformers.GPT2LMHeadModel.from_pretrained(local_gpt2).eval()
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
        assert logits.shape == (1, 2, 50257)
        torch.testing.assert_close(logits, reference(input_ids=ids).logits)


def test_separate_tokenizer_path(
    local_gpt2: Path, gpt2_tokenizer_dir: Path, tmp_path: Path
) -> None:
    transformers.GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_dir).save_pretrained(tmp_path)
    tok = load_tokenizer(ModelConfig(name=str(local_gpt2), tokenizer=str(tmp_path)))
    assert tok("Hello world")["input_ids"] == [15496, 995]


def test_dtype_sets_the_weights_of_a_pretrained_model(local_gpt2: Path) -> None:
    cfg = ModelConfig(name=str(local_gpt2), dtype="bfloat16")
    model = build_model(cfg, load_tokenizer(cfg))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="`dtype` applies only to pretrained models"):
        ModelConfig(dtype="bfloat16")  # the built model


UNKNOWN = "adaptune-tests/no-such-model-xyz"


def _assert_names_field(err: pytest.ExceptionInfo[ConfigError], field: str, name: str) -> None:
    msg = str(err.value)
    assert msg.startswith(f"{field}: ")
    assert repr(name) in msg
    assert "valid values: 'tiny-gpt'" in msg


@pytest.mark.parametrize("name", [UNKNOWN, "/no/such/local/model/dir"])
def test_unknown_model_offline_raises_config_error(name: str) -> None:
    cfg = ModelConfig(name=name)
    with pytest.raises(ConfigError) as err:
        check_model_loadable(cfg)
    _assert_names_field(err, "run.model.name", name)
    with pytest.raises(ConfigError) as err:
        load_tokenizer(cfg)
    _assert_names_field(err, "run.model.name", name)
    with pytest.raises(ConfigError) as err:
        build_model(cfg, transformers.ByT5Tokenizer())
    _assert_names_field(err, "run.model.name", name)


def test_unknown_tokenizer_names_the_tokenizer_field() -> None:
    with pytest.raises(ConfigError) as err:
        load_tokenizer(ModelConfig(tokenizer=UNKNOWN))
    _assert_names_field(err, "run.model.tokenizer", UNKNOWN)


def _pretrain_cfg(**pretrain: Any) -> ModelConfig:
    base = {"domain": {"name": "base", "builtin": "python_docs"}, "steps": 10}
    return ModelConfig.model_validate({"pretrain": {**base, **pretrain}})


STREAM = StreamConfig.model_validate({"tasks": [{"name": "a", "builtin": "unicode_names"}]})


def test_pretrain_key_tracks_what_determines_the_weights(tmp_path: Path) -> None:
    key = pretrain_key(_pretrain_cfg(), STREAM)
    assert len(key) == 16 and key == pretrain_key(_pretrain_cfg(), STREAM)  # stable
    changed = {
        "steps": pretrain_key(_pretrain_cfg(steps=11), STREAM),
        "lr": pretrain_key(_pretrain_cfg(lr=1e-3), STREAM),
        "batch_size": pretrain_key(_pretrain_cfg(batch_size=8), STREAM),
        "domain": pretrain_key(
            _pretrain_cfg(domain={"name": "base", "builtin": "python_source"}), STREAM
        ),
        "model size": pretrain_key(
            ModelConfig.model_validate({**_pretrain_cfg().model_dump(), "n_embd": 64}), STREAM
        ),
        "block_size": pretrain_key(
            _pretrain_cfg(), STREAM.model_copy(update={"block_size": 64})
        ),
        "data_seed": pretrain_key(_pretrain_cfg(), STREAM.model_copy(update={"data_seed": 1})),
    }
    for what, other in changed.items():
        assert other != key, what
    # where the weights are cached is not part of what they are
    moved = _pretrain_cfg(cache_dir=str(tmp_path / "elsewhere"))
    assert pretrain_key(moved, STREAM) == key
    assert pretrain_dir(moved, STREAM) == (tmp_path / "elsewhere" / f"pretrain-{key}").resolve()
    # nor are the stream's task list
    other_tasks = StreamConfig.model_validate({"tasks": [{"name": "b", "builtin": "python_docs"}]})
    assert pretrain_key(_pretrain_cfg(), other_tasks) == key
