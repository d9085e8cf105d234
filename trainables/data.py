"""The task stream: domains of text -> documents -> tokens -> fixed-length blocks.

Every domain is split into held-out eval documents and training documents by a seeded shuffle
(``stream.data_seed``, the same for every trial of a search), so eval text is never trained on.
A retain domain (``stream.retain``) is eval text only: it is measured, never trained on.
Long documents are first cut at line boundaries into chunks of a few blocks, so the eval set
samples many places of a domain rather than one long file.
"""

from __future__ import annotations

import os
import random
import sys
import sysconfig
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from adaptune.trainables.config import DomainConfig, StreamConfig
from adaptune.trainables.errors import ConfigError
from torch import Tensor

FILE_LOADERS = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}


@dataclass(frozen=True)
class TaskData:
    name: str
    train: Tensor  # (N, block_size) int64
    eval: Tensor  # (M, block_size) int64

    @property
    def train_tokens(self) -> int:
        return int(self.train.numel())


# ---- built-in domains: real text that ships with every CPython -----------------------------


def _python_docs() -> Iterator[str]:
    """The reference-manual topics behind ``help()``: English technical prose."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def _python_source() -> Iterator[str]:
    """The standard library's own source files (tests and site-packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    files = []
    # os.walk leaves the skipped trees unvisited (the interpreter's site-packages and tests
    # hold 20x the files kept); the same files as rglob("*.py") less those, in Path order
    for top, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        files.extend(Path(top, n) for n in names if n.endswith(".py"))
    files.sort()
    for path in files:
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def _unicode_names() -> Iterator[str]:
    """Unicode character names, ``U+0041 LATIN CAPITAL LETTER A``, 64 to a document."""
    lines: list[str] = []
    for cp in range(sys.maxunicode + 1):
        name = unicodedata.name(chr(cp), None)
        if name is None:
            continue
        lines.append(f"U+{cp:04X} {name}")
        if len(lines) == 64:
            yield "\n".join(lines)
            lines = []
    if lines:
        yield "\n".join(lines)


BUILTIN = {
    "python_docs": _python_docs,
    "python_source": _python_source,
    "unicode_names": _unicode_names,
}


# ---- files and Hugging Face datasets ---------------------------------------------------------


def _load_texts(domain: DomainConfig, field: str) -> list[str]:
    """Rows of ``domain`` through the ``datasets`` library (local loaders or the hub)."""
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if domain.source == "files":
        assert domain.files is not None
        for f in domain.files:
            if not Path(f).is_file():
                raise ConfigError(f"{field}.files: file not found: {f}")
        kinds = {FILE_LOADERS.get("".join(Path(f).suffixes[-1:]).lower()) for f in domain.files}
        if None in kinds or len(kinds) != 1:
            raise ConfigError(
                f"{field}.files: all files must share one supported extension; valid values: "
                f"{', '.join(FILE_LOADERS)} (got {domain.files})"
            )
        builder = kinds.pop()
        kwargs: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
        if builder == "csv" and not domain.header:
            # pandas reads every row as data under these names (datasets passes them on)
            kwargs = {"header": None, "column_names": domain.column_names or ["text"]}
        try:
            ds = datasets.load_dataset(builder, data_files=domain.files, split="train", **kwargs)
        except Exception as err:  # noqa: BLE001 - any reader error is the user's file
            raise ConfigError(f"{field}.files: cannot read as {builder}: {err}") from None
    else:
        try:
            ds = datasets.load_dataset(domain.path, domain.config_name, split=domain.split)
        except Exception as err:  # noqa: BLE001 - hub, config and split errors alike
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"{field}.path: cannot load dataset {domain.path!r} "
                f"(config_name={domain.config_name!r}, split={domain.split!r}): {first}"
            ) from None
    column = "text" if domain.source == "files" and builder == "text" else domain.text_field
    if column not in ds.column_names:
        hint = (
            "; a csv whose first row is data needs `header: false` (and `column_names`)"
            if domain.source == "files" and builder == "csv" and domain.header
            else ""
        )
        raise ConfigError(
            f"{field}.text_field: column {column!r} is not in the data; "
            f"valid values: {', '.join(map(str, ds.column_names))}{hint}"
        )
    if domain.max_docs is not None:
        ds = ds.select(range(min(domain.max_docs, len(ds))))
    return [t for t in ds[column] if isinstance(t, str) and t.strip()]


def domain_documents(domain: DomainConfig, field: str = "domain") -> list[str]:
    """All documents of one domain, in a fixed order."""
    if domain.source == "builtin":
        assert domain.builtin is not None
        docs = list(BUILTIN[domain.builtin]())
        return docs[: domain.max_docs] if domain.max_docs else docs
    docs = _load_texts(domain, field)
    if not docs:
        raise ConfigError(f"{field}: the domain has no non-empty text")
    return docs


def _chunks(doc: str, max_chars: int) -> Iterator[str]:
    """Cut a document at line boundaries into pieces of at most ~``max_chars`` characters."""
    if len(doc) <= max_chars:
        yield doc
        return
    piece: list[str] = []
    size = 0
    for line in doc.splitlines(keepends=True):
        piece.append(line)
        size += len(line)
        if size >= max_chars:
            yield "".join(piece)
            piece, size = [], 0
    if piece:
        yield "".join(piece)


def _pack(token_lists: list[list[int]], block_size: int) -> Tensor:
    flat = [t for ids in token_lists for t in ids]
    n = len(flat) // block_size
    return torch.tensor(flat[: n * block_size], dtype=torch.long).view(n, block_size)


def _token_docs(
    domain: DomainConfig, stream: StreamConfig, tokenizer: Any, field: str, train_need: int
) -> tuple[list[list[int]], list[list[int]], int]:
    """Token ids of the domain's shuffled chunks: eval documents first (``max_eval_blocks``
    worth), then up to ``train_need`` training tokens; and the count of both."""
    docs = domain_documents(domain, field)
    chunks = [c for d in docs for c in _chunks(d, max_chars=4 * stream.block_size * 4)]
    random.Random(f"{stream.data_seed}:{domain.name}").shuffle(chunks)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    eval_need = stream.max_eval_blocks * stream.block_size
    eval_ids: list[list[int]] = []
    train_ids: list[list[int]] = []
    have_eval = have_train = 0
    # Tokenize in slices so a huge domain costs only what the caps need.
    i = 0
    while i < len(chunks) and (have_eval < eval_need or have_train < train_need):
        batch = chunks[i : i + 64]
        i += len(batch)
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids = list(ids) + eos
            if have_eval < eval_need:
                eval_ids.append(ids)
                have_eval += len(ids)
            elif have_train < train_need:
                train_ids.append(ids)
                have_train += len(ids)
    return eval_ids, train_ids, have_eval + have_train


def build_task(
    domain: DomainConfig, stream: StreamConfig, tokenizer: Any, field: str = "domain"
) -> TaskData:
    """Tokenize and pack one domain into train and eval blocks, deterministic for ``data_seed``."""
    eval_ids, train_ids, have = _token_docs(
        domain, stream, tokenizer, field, stream.max_train_tokens
    )
    eval_blocks = _pack(eval_ids, stream.block_size)[: stream.max_eval_blocks]
    train_blocks = _pack(train_ids, stream.block_size)
    train_blocks = train_blocks[: max(1, stream.max_train_tokens // stream.block_size)]
    if eval_blocks.shape[0] == 0 or train_blocks.shape[0] == 0:
        raise ConfigError(
            f"{field}: too little text for one train and one eval block of "
            f"block_size={stream.block_size} tokens (got {have} tokens)"
        )
    return TaskData(domain.name, train_blocks, eval_blocks)


def build_eval_task(
    domain: DomainConfig, stream: StreamConfig, tokenizer: Any, field: str = "domain"
) -> TaskData:
    """One eval-only domain (a retain domain): all its blocks held out, up to
    ``max_eval_blocks``, sampled like a task's; ``train`` is empty, so nothing trains on it."""
    eval_ids, _, have = _token_docs(domain, stream, tokenizer, field, train_need=0)
    eval_blocks = _pack(eval_ids, stream.block_size)[: stream.max_eval_blocks]
    if eval_blocks.shape[0] == 0:
        raise ConfigError(
            f"{field}: too little text for one eval block of block_size={stream.block_size} "
            f"tokens (got {have} tokens)"
        )
    return TaskData(domain.name, eval_blocks[:0], eval_blocks)


def build_stream(stream: StreamConfig, tokenizer: Any) -> list[TaskData]:
    """Every task of the stream, in order.

    Raises:
        ConfigError: a missing file, an unreadable dataset, a text field not in the data.
    """
    return [
        build_task(d, stream, tokenizer, field=f"run.stream.tasks.{i}")
        for i, d in enumerate(stream.tasks)
    ]


def build_retain(stream: StreamConfig, tokenizer: Any) -> list[TaskData]:
    """Every retain domain of the stream (eval blocks only), in order.

    Raises:
        ConfigError: as :func:`build_stream`, naming ``run.stream.retain.<i>``.
    """
    return [
        build_eval_task(d, stream, tokenizer, field=f"run.stream.retain.{i}")
        for i, d in enumerate(stream.retain)
    ]
