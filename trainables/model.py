"""Base model and tokenizer: a tiny GPT built from config, or any transformers causal LM."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from adaptune.trainables import gguf
from adaptune.trainables.config import ModelConfig, StreamConfig
from adaptune.trainables.errors import ConfigError
from torch import Tensor, nn

TINY = "tiny-gpt"


def next_token_loss(logits: Tensor, blocks: Tensor) -> Tensor:
    """Mean next-token cross-entropy (nats/token): logits (B, T, V), blocks (B, T)."""
    # The targets are shifted, not the logits: slicing the (B, T, V) logits would copy them,
    # and its gradient would be another tensor as large. The last position predicts nothing.
    targets = F.pad(blocks[:, 1:], (0, 1), value=-100)  # (B, T)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def load_tokenizer(cfg: ModelConfig) -> Any:
    """Byte-level ByT5 tokenizer (no files) for the built model, the tokenizer a GGUF file
    describes for a ``.gguf`` name, else ``AutoTokenizer``.

    Raises:
        ConfigError: the tokenizer cannot be loaded (offline, missing path, unknown name).
    """
    import transformers

    _quiet_transformers()
    if cfg.name == TINY and cfg.tokenizer is None:
        return transformers.ByT5Tokenizer()
    name = cfg.tokenizer or cfg.name
    field = f"run.model.{'tokenizer' if cfg.tokenizer else 'name'}"
    if gguf.is_gguf(name):
        tok = gguf.load_tokenizer(name, field)
    else:
        tok = _auto_tokenizer(cfg, name, field)
    if tok.eos_token_id is None and tok.sep_token_id is not None:
        tok.eos_token = tok.sep_token
    return tok


def _auto_tokenizer(cfg: ModelConfig, name: str, field: str) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(
            name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except Exception as err:  # noqa: BLE001 - OSError, ValueError, hub errors: all unloadable
        raise ConfigError(
            f"{field}: cannot load tokenizer {name!r} ({_why(name, err)}); valid values: "
            f"{TINY!r}, a local path, a .gguf file, or a hub name reachable from this machine"
        ) from None


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
    """A fresh tiny GPT-2 (dropout and sizes from ``cfg``) or a pretrained causal LM (a
    transformers folder, a hub name or a ``.gguf`` file) with its weights in ``cfg.dtype``.

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
    dtype = getattr(torch, cfg.dtype)
    try:
        if gguf.is_gguf(cfg.name):
            return gguf.load_model(cfg.name, dtype)
        return transformers.AutoModelForCausalLM.from_pretrained(
            cfg.name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=dtype
        )
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001
        raise _unloadable(cfg.name, err) from None


def _unloadable(name: str, err: BaseException) -> ConfigError:
    return ConfigError(
        f"run.model.name: cannot load causal LM {name!r} ({_why(name, err)}); valid values: "
        f"{TINY!r}, a local path, a .gguf file, or a hub name reachable from this machine"
    )


def check_model_loadable(cfg: ModelConfig) -> Any:
    """Fail fast (config only, no weights) when a named model cannot be loaded. A ``.gguf``
    file is checked from its metadata: the file, its header, its architecture and the
    packages transformers needs to load it (:func:`adaptune.trainables.gguf.check_model`).

    Returns:
        The model's transformers config, or None for the built model.

    Raises:
        ConfigError: one line naming ``run.model.name``, the cause and what to do.
    """
    if cfg.name == TINY:
        return None
    import transformers

    _quiet_transformers()
    if gguf.is_gguf(cfg.name):
        return gguf.check_model(cfg.name)
    try:
        return transformers.AutoConfig.from_pretrained(
            cfg.name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except Exception as err:  # noqa: BLE001
        raise _unloadable(cfg.name, err) from None


# English prose, Python and a little punctuation: any usable tokenizer of a language model
# encodes it in well under one token per byte, with few unknown tokens.
_TOKENIZER_SAMPLE = (
    "The river rose after three days of rain, and the old bridge was closed to traffic. "
    "def mean(values):\n    return sum(values) / len(values)  # 42 items, 3.14 avg\n"
    "Questions? Write to the library: open Monday to Friday, 9:00-17:00."
)
MAX_TOKENS_PER_BYTE = 1.5  # a byte-level tokenizer makes 1.0 (UTF-8 bytes)
MAX_UNKNOWN_RATIO = 0.5


def check_tokenizer(cfg: ModelConfig, tokenizer: Any, config: Any) -> None:
    """Refuse a tokenizer that cannot feed the model: fewer than 2 tokens, more tokens than
    the model has embedding rows, or a short sample text encoded into a single repeated id,
    mostly unknown tokens, or more than :data:`MAX_TOKENS_PER_BYTE` tokens per byte.

    Args:
        cfg: the model settings (names the field to blame).
        tokenizer: from :func:`load_tokenizer`.
        config: the model's transformers config, or None for the built model (whose
            embedding is sized from the tokenizer).

    Raises:
        ConfigError: naming ``run.model.tokenizer`` (or ``run.model.name``), the rule and
            what was measured.
    """
    field = "run.model.tokenizer" if cfg.tokenizer else "run.model.name"
    name = cfg.tokenizer or cfg.name

    def refuse(rule: str, got: str) -> ConfigError:
        return ConfigError(f"{field}: tokenizer {name!r} {rule} (got {got})")

    size = len(tokenizer)
    if size < 2:
        raise refuse("must have at least 2 tokens", f"{size}")
    rows = getattr(config, "vocab_size", None) if config is not None else None
    if isinstance(rows, int) and size > rows:
        raise refuse(
            f"must have at most as many tokens as the model's vocab_size ({rows})", f"{size}"
        )
    ids = list(tokenizer(_TOKENIZER_SAMPLE, add_special_tokens=False)["input_ids"])
    n_bytes = len(_TOKENIZER_SAMPLE.encode("utf-8"))
    if not ids:
        raise refuse("must encode a sample text into tokens", f"0 tokens for {n_bytes} bytes")
    unk = tokenizer.unk_token_id
    unknown = sum(i == unk for i in ids) / len(ids) if unk is not None else 0.0
    if unknown > MAX_UNKNOWN_RATIO:
        raise refuse(
            f"must know most of a sample text: at most {MAX_UNKNOWN_RATIO:.0%} unknown tokens",
            f"{unknown:.0%} of {len(ids)} tokens are {tokenizer.unk_token!r}",
        )
    if len(set(ids)) == 1:
        raise refuse(
            "must encode a sample text into more than one distinct id",
            f"{len(ids)} tokens, all id {ids[0]}",
        )
    if len(ids) / n_bytes > MAX_TOKENS_PER_BYTE:
        raise refuse(
            f"must encode a sample text in at most {MAX_TOKENS_PER_BYTE} tokens per byte",
            f"{len(ids) / n_bytes:.2f}: {len(ids)} tokens for {n_bytes} bytes",
        )


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
        "model": cfg.model_dump(exclude={"pretrain", "dtype"}),  # the built model: float32
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


# New tokens a caller gets by default where it may pass a count (the champion's pyfunc params),
# at most half the context.
DEFAULT_MAX_NEW_TOKENS = 64


def default_max_new_tokens(context: int | None) -> int:
    """:data:`DEFAULT_MAX_NEW_TOKENS`, or half the context when that is shorter."""
    return min(DEFAULT_MAX_NEW_TOKENS, context // 2) if context else DEFAULT_MAX_NEW_TOKENS


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters, which the
    ``tokenizers`` ``ByteLevel`` pre-tokenizer and decoder use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _byte_tokenizer(tokenizer: Any, context: int | None) -> Any:
    """A ``tokenizers``-backed copy of a ``ByT5Tokenizer``: the same ids (specials, bytes,
    extra ids), but a prompt gets no ``</s>`` appended.

    ``ByT5Tokenizer`` always appends ``</s>`` when ``add_special_tokens`` is on, which every
    pipeline does by default; after that end-of-document token the model starts a new document
    instead of continuing the prompt. Training never calls it with special tokens, so its ids
    are unchanged.
    """
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    offset = tokenizer.offset  # ids below are <pad>, </s>, <unk>
    vocab = {tokenizer.convert_ids_to_tokens(i): i for i in range(offset)}
    vocab |= {char: b + offset for b, char in _bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=str(tokenizer.unk_token)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    specials = [tokenizer.convert_ids_to_tokens(i) for i in range(offset + 256, len(tokenizer))]
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=str(tokenizer.pad_token),
        eos_token=str(tokenizer.eos_token),
        unk_token=str(tokenizer.unk_token),
        **({"model_max_length": context} if context else {}),
    )
    fast.add_special_tokens({"additional_special_tokens": specials})
    return fast


def serving_tokenizer(tokenizer: Any, context: int | None) -> Any:
    """The tokenizer to save beside the weights, for generation from a plain prompt.

    A ``ByT5Tokenizer`` becomes a byte-identical tokenizer that appends no ``</s>`` (see
    :func:`_byte_tokenizer`); any other tokenizer is kept. ``model_max_length`` is set to the
    model's context so a pipeline's ``handle_long_generation="hole"`` truncates a long prompt
    from the left.

    Args:
        tokenizer: the tokenizer the run trained with.
        context: the model's context length (:func:`context_length`), if known.
    """
    import transformers

    if isinstance(tokenizer, transformers.ByT5Tokenizer):
        return _byte_tokenizer(tokenizer, context)
    if context and tokenizer.model_max_length > context:
        tokenizer = copy.deepcopy(tokenizer)  # the run's own tokenizer keeps its settings
        tokenizer.model_max_length = context
    return tokenizer


def set_generation_defaults(model: Any, tokenizer: Any) -> None:
    """Give ``model.generation_config`` defaults that never run past the context.

    ``max_length`` is the context and ``max_new_tokens`` stays unset: a transformers pipeline
    called with a prompt only then generates until the context is full (otherwise it adds its
    own ``max_new_tokens=256`` and sampling, and indexes past the position embeddings). A model
    whose context is unknown gets :data:`DEFAULT_MAX_NEW_TOKENS`. Decoding is greedy; the end
    and padding tokens are the tokenizer's.
    """
    context = context_length(model.config)
    gen = model.generation_config
    if context:
        gen.max_length, gen.max_new_tokens = context, None
    else:
        gen.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    gen.do_sample = False
    if tokenizer.eos_token_id is not None:
        gen.eos_token_id = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is not None:
        gen.pad_token_id = pad
