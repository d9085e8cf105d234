"""Base model and tokenizer: a tiny GPT built from config, or any transformers causal LM."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from adaptune.trainables.config import ModelConfig, StreamConfig
from adaptune.trainables.errors import ConfigError
from torch import Tensor, nn

TINY = "tiny-gpt"


def next_token_loss(logits: Tensor, blocks: Tensor) -> Tensor:
    """Mean next-token cross-entropy (nats/token): logits (B, T, V), blocks (B, T)."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), blocks[:, 1:].reshape(-1))


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def load_tokenizer(cfg: ModelConfig) -> Any:
    """Byte-level ByT5 tokenizer (no files) for the built model, else ``AutoTokenizer``.

    Raises:
        ConfigError: the tokenizer cannot be loaded (offline, missing path, unknown name).
    """
    import transformers

    _quiet_transformers()
    if cfg.name == TINY and cfg.tokenizer is None:
        return transformers.ByT5Tokenizer()
    name = cfg.tokenizer or cfg.name
    try:
        tok = transformers.AutoTokenizer.from_pretrained(
            name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except Exception as err:  # noqa: BLE001 - OSError, ValueError, hub errors: all unloadable
        raise ConfigError(
            f"run.model.{'tokenizer' if cfg.tokenizer else 'name'}: cannot load tokenizer "
            f"{name!r} ({_why(name, err)}); valid values: {TINY!r}, a local path, or a hub "
            "name reachable from this machine"
        ) from None
    if tok.eos_token_id is None and tok.sep_token_id is not None:
        tok.eos_token = tok.sep_token
    return tok


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _why(name: str, err: BaseException) -> str:
    """Why ``name`` did not load. A local path that does not exist says so: transformers would
    report it as a malformed hub repo id."""
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        return "no such local directory"
    return _first_line(err)


def build_model(cfg: ModelConfig, tokenizer: Any) -> nn.Module:
    """A fresh tiny GPT-2 (dropout and sizes from ``cfg``) or a pretrained causal LM.

    Raises:
        ConfigError: the model cannot be loaded.
    """
    import transformers

    _quiet_transformers()
    if cfg.name == TINY:
        config = transformers.GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=cfg.n_positions,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return transformers.GPT2LMHeadModel(config)
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            cfg.name,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            dtype=torch.float32,
        )
    except Exception as err:  # noqa: BLE001
        raise ConfigError(
            f"run.model.name: cannot load causal LM {cfg.name!r} ({_why(cfg.name, err)}); valid "
            f"values: {TINY!r}, a local path, or a hub name reachable from this machine"
        ) from None


def check_model_loadable(cfg: ModelConfig) -> Any:
    """Fail fast (config only, no weights) when a named model cannot be loaded.

    Returns:
        The model's transformers config, or None for the built model.
    """
    if cfg.name == TINY:
        return None
    import transformers

    _quiet_transformers()
    try:
        return transformers.AutoConfig.from_pretrained(
            cfg.name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except Exception as err:  # noqa: BLE001
        raise ConfigError(
            f"run.model.name: cannot load causal LM {cfg.name!r} ({_why(cfg.name, err)}); valid "
            f"values: {TINY!r}, a local path, or a hub name reachable from this machine"
        ) from None


def context_length(config: Any) -> int | None:
    """The longest sequence a transformers config allows, if it says."""
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def pretrain_key(cfg: ModelConfig, stream: StreamConfig) -> str:
    """Hash of everything that determines the pretrained weights."""
    payload = {
        "model": cfg.model_dump(exclude={"pretrain"}),
        "pretrain": cfg.pretrain.model_dump(exclude={"cache_dir"}) if cfg.pretrain else None,
        "block_size": stream.block_size,
        "max_train_tokens": stream.max_train_tokens,
        "max_eval_blocks": stream.max_eval_blocks,
        "data_seed": stream.data_seed,
        "torch": torch.__version__.split("+")[0],
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def pretrain_dir(cfg: ModelConfig, stream: StreamConfig) -> Path:
    assert cfg.pretrain is not None
    return (
        Path(cfg.pretrain.cache_dir).expanduser().resolve()
        / f"pretrain-{pretrain_key(cfg, stream)}"
    )
