"""GGUF files (llama.cpp's single-file format) as base models, through transformers' GGUF support.

A ``run.model.name`` (or ``run.model.tokenizer``) ending in ``.gguf`` names a local file. Its
metadata is read and checked before anything else loads; the weights are dequantized into a
plain, trainable transformers model; the tokenizer is built from the same file.

GGUF writes "no such token" as the id 0xFFFFFFFF (stories260K's padding and separator ids).
transformers takes that id at its word: the model's embedding refuses it as ``padding_idx`` and
the tokenizer indexes its vocabulary with it. Both are handled here.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from adaptune.trainables.errors import ConfigError

SUFFIX = ".gguf"

# GGUF metadata key -> transformers config key, for the special ids the config carries
_SPECIAL_IDS = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}
# tokenizer attribute -> GGUF metadata key (tokenizer.ggml.<key>) of its id
_SPECIAL_TOKENS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def is_gguf(name: str | None) -> bool:
    """Whether a model or tokenizer name is a GGUF file (by its suffix)."""
    return name is not None and name.lower().endswith(SUFFIX)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def read_metadata(name: str, field: str, arrays: tuple[str, ...] = ()) -> dict[str, Any]:
    """The file's metadata (no tensor data); string arrays other than ``arrays`` come back as
    their lengths.

    Raises:
        ConfigError: naming ``field``: the file is missing or is not a readable GGUF file.
    """
    from transformers.integrations.gguf.reader import read_gguf_metadata

    path = Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"{field}: GGUF file {name!r} does not exist; name an existing .gguf file (a relative "
            "path is resolved against the experiment file's folder)"
        )
    try:
        metadata, _ = read_gguf_metadata(str(path), arrays)
        if not isinstance(metadata.get("general.architecture"), str):
            raise ValueError("no general.architecture in its metadata")
    except Exception as err:  # noqa: BLE001 - bad magic, version, truncation: all unreadable
        raise ConfigError(
            f"{field}: {name!r} is not a readable GGUF file ({_first_line(err)}); name a "
            "GGUF model file as llama.cpp writes it"
        ) from None
    return dict(metadata)


def _vocab_size(metadata: dict[str, Any]) -> int | None:
    arch = metadata["general.architecture"]
    tokens = metadata.get("tokenizer.ggml.tokens")
    size = metadata.get(f"{arch}.vocab_size", tokens)
    return len(size) if isinstance(size, list) else size if isinstance(size, int) else None


def absent_ids(metadata: dict[str, Any]) -> dict[str, None]:
    """Config keys to pass as None: special ids that lie outside the vocabulary, i.e. GGUF's
    "no token" 0xFFFFFFFF.

    None, not a stand-in id such as 0: stories260K's id 0 is ``<unk>``, and an embedding's
    ``padding_idx`` row never receives a gradient, so a stand-in would freeze a real token.
    """
    vocab = _vocab_size(metadata)
    if vocab is None:
        return {}
    return {
        key: None
        for gguf_key, key in _SPECIAL_IDS.items()
        if isinstance(metadata.get(gguf_key), int) and metadata[gguf_key] >= vocab
    }


def supported_architectures() -> list[str]:
    """The GGUF architectures this transformers installation loads (new reader and legacy)."""
    from transformers.integrations.gguf import GGUF_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted((set(GGUF_ARCHS) | set(GGUF_SUPPORTED_ARCHITECTURES)) - {"general", "tokenizer"})


def _missing_packages(arch: str) -> list[str]:
    """Packages transformers needs to load this file that are not installed: ``accelerate``
    always (``from_pretrained`` refuses GGUF without it), ``gguf`` for the architectures only
    the legacy loader reads."""
    from transformers.integrations.gguf import GGUF_CONFIG_ARCHS

    needed = ["accelerate"] + ([] if arch in GGUF_CONFIG_ARCHS else ["gguf"])
    return [pkg for pkg in needed if not _installed(pkg)]


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def check_model(name: str) -> Any:
    """Check a GGUF model from its metadata only; returns its transformers config.

    Raises:
        ConfigError: naming ``run.model.name``: missing or unreadable file, an architecture
            transformers cannot load from GGUF, a missing package, or not a causal LM.
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    metadata = read_metadata(name, "run.model.name")
    arch = metadata["general.architecture"]
    missing = _missing_packages(arch)
    if missing:
        raise ConfigError(
            f"run.model.name: loading the GGUF file {name!r} needs the package(s) "
            f"{', '.join(missing)}; install them: pip install {' '.join(missing)}"
        )
    path = Path(name).expanduser()
    try:
        config = transformers.AutoConfig.from_pretrained(
            path.parent, gguf_file=path.name, **absent_ids(metadata)
        )
    except Exception as err:  # noqa: BLE001
        if "not supported" in str(err) or arch not in supported_architectures():
            raise ConfigError(
                f"run.model.name: {name!r} holds a {arch!r} model, which transformers "
                f"{transformers.__version__} cannot load from GGUF; supported architectures: "
                f"{supported_architectures()}; name a transformers folder or hub model instead"
            ) from None
        raise ConfigError(
            f"run.model.name: cannot read the model config from GGUF file {name!r} "
            f"({_first_line(err)})"
        ) from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(
            f"run.model.name: {name!r} holds a {config.model_type!r} model, which is not a "
            "causal language model; name a decoder-only model"
        )
    return config


def load_model(name: str, dtype: torch.dtype) -> Any:
    """The GGUF file's model with every weight dequantized to ``dtype``: a plain transformers
    model that trains and saves like any other.

    ``dequantize=True`` is explicit because transformers otherwise keeps quantized blocks
    packed whenever a GGUF matmul kernel is installed, and such a model can neither train nor
    ``save_pretrained``.
    """
    import transformers

    metadata = read_metadata(name, "run.model.name")
    path = Path(name).expanduser()
    with _no_dequantize_bar():
        return transformers.AutoModelForCausalLM.from_pretrained(
            path.parent,
            gguf_file=path.name,
            dtype=dtype,
            quantization_config=transformers.GgufConfig(dequantize=True),
            **absent_ids(metadata),
        )


@contextlib.contextmanager
def _no_dequantize_bar() -> Iterator[None]:
    """Silence the progress bar transformers' GGUF reader draws on every load (every trial of
    a search, interleaved into Tune's table): it takes no switch, so its ``tqdm`` is swapped
    for a disabled one while the model loads."""
    try:
        from transformers import modeling_gguf_pytorch_utils as reader
    except ImportError:  # another transformers layout: its bar stays
        yield
        return
    bar = getattr(reader, "tqdm", None)
    if bar is None:
        yield
        return
    reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar


def load_tokenizer(name: str, field: str) -> Any:
    """The tokenizer a GGUF file describes: ``AutoTokenizer`` where it can, else the same build
    with the out-of-vocabulary special ids dropped (see :func:`_tokenizer_without_absent_ids`).

    Raises:
        ConfigError: naming ``field``: unreadable file, or no tokenizer can be built from it.
    """
    import transformers

    read_metadata(name, field)
    path = Path(name).expanduser()
    try:
        try:
            return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except IndexError:  # a special id of 0xFFFFFFFF used as an index into the vocabulary
            return _tokenizer_without_absent_ids(str(path))
    except Exception as err:  # noqa: BLE001
        raise ConfigError(
            f"{field}: cannot build a tokenizer from GGUF file {name!r} ({_first_line(err)}); "
            "name a tokenizer folder or hub name in run.model.tokenizer"
        ) from None


def _tokenizer_without_absent_ids(path: str) -> Any:
    """transformers' own GGUF tokenizer build (``get_gguf_tokenizer`` and
    ``convert_gguf_tokenizer``) with special ids outside the vocabulary treated as absent."""
    import transformers
    from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping
    from transformers.integrations.gguf.reader import read_gguf_metadata

    metadata, _ = read_gguf_metadata(path, ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    arch = metadata["general.architecture"]
    grouped = {
        group: {new: metadata[f"tokenizer.{key}"] for key, new in renames.items()
                if f"tokenizer.{key}" in metadata}
        for group, renames in mapping.GGUF_TOKENIZER_MAPPING.items()
    }
    tokens_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    sentencepiece = tokens_dict.get("tokenizer_type") == "llama"
    if sentencepiece:
        # as transformers does: llama.cpp adds BOS to a sentencepiece vocabulary unless told not to
        tokenizer_config.setdefault("add_bos_token", True)
    tokens = tokens_dict["tokens"]
    for special, key in _SPECIAL_TOKENS.items():
        i = metadata.get(f"tokenizer.ggml.{key}")
        tokenizer_config[special] = tokens[i] if isinstance(i, int) and i < len(tokens) else None
    for key in [k for k, v in tokens_dict.items() if k.endswith("_token_id") and v is not None]:
        if tokens_dict[key] >= len(tokens):
            tokens_dict[key] = None
    backend, extra = mapping.convert_gguf_tokenizer(arch, tokens_dict)
    # sentencepiece files get the class that honours add_bos_token; any other is what
    # AutoTokenizer itself returns for a GGUF file
    cls = transformers.LlamaTokenizer if sentencepiece else transformers.TokenizersBackend
    return cls(tokenizer_object=backend, **tokenizer_config, **extra)
