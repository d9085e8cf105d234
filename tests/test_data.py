"""The task stream: built-in domains, local files, local Hugging Face datasets, user errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import transformers
from adaptune.trainables.config import DomainConfig, StreamConfig
from adaptune.trainables.data import build_stream, build_task, domain_documents
from adaptune.trainables.errors import ConfigError

BLOCK = 64


@pytest.fixture(scope="module")
def tok() -> Any:
    return transformers.ByT5Tokenizer()


def stream(tasks: list[dict[str, Any]], **kwargs: Any) -> StreamConfig:
    defaults: dict[str, Any] = {"block_size": BLOCK, "max_train_tokens": 4096, "max_eval_blocks": 8}
    return StreamConfig.model_validate({"tasks": tasks, **defaults, **kwargs})


def rows(t: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(r) for r in t.tolist()}


# ---- built-in domains -------------------------------------------------------------------------


@pytest.mark.parametrize("builtin", ["python_docs", "python_source", "unicode_names"])
def test_builtin_domain_blocks(builtin: str, tok: Any) -> None:
    cfg = stream([{"name": builtin, "builtin": builtin}])
    first = build_task(cfg.tasks[0], cfg, tok)
    again = build_task(cfg.tasks[0], cfg, tok)
    assert first.name == builtin
    # caps: 4096 // 64 = 64 train blocks, 8 eval blocks; real text has plenty of both
    assert first.train.shape == (4096 // BLOCK, BLOCK)
    assert first.eval.shape == (8, BLOCK)
    assert first.train.dtype == torch.long and first.train_tokens == 4096
    assert int(first.train.max()) < len(tok) and int(first.train.min()) >= 0
    # deterministic for a data_seed
    assert torch.equal(first.train, again.train) and torch.equal(first.eval, again.eval)
    # held out: no eval block appears verbatim among the train blocks
    assert not rows(first.eval) & rows(first.train)
    # and the blocks are not all one token
    assert len(set(first.train.flatten().tolist())) > 20


def test_data_seed_changes_the_split(tok: Any) -> None:
    a = stream([{"name": "d", "builtin": "python_docs"}], data_seed=0)
    b = stream([{"name": "d", "builtin": "python_docs"}], data_seed=1)
    ta, tb = build_task(a.tasks[0], a, tok), build_task(b.tasks[0], b, tok)
    assert not torch.equal(ta.eval, tb.eval)


@pytest.mark.parametrize(
    ("max_train_tokens", "max_eval_blocks", "train_blocks"),
    [(1000, 3, 15), (640, 1, 10), (64, 2, 1), (10, 2, 1)],  # 1000 // 64 = 15, 640 // 64 = 10
)
def test_caps_respected(
    tok: Any, max_train_tokens: int, max_eval_blocks: int, train_blocks: int
) -> None:
    cfg = stream(
        [{"name": "u", "builtin": "unicode_names"}],
        max_train_tokens=max_train_tokens,
        max_eval_blocks=max_eval_blocks,
    )
    task = build_task(cfg.tasks[0], cfg, tok)
    assert task.eval.shape == (max_eval_blocks, BLOCK)
    assert task.train.shape == (train_blocks, BLOCK)
    # the cap holds whenever it allows one whole block; below that, one block is the minimum
    assert task.train_tokens <= max(max_train_tokens, BLOCK)


def test_max_docs_limits_builtin_documents() -> None:
    docs = domain_documents(DomainConfig(name="u", builtin="unicode_names", max_docs=3))
    assert len(docs) == 3
    # control characters have no name: the first named code point is U+0020, 64 lines a document
    assert docs[0].splitlines()[0] == "U+0020 SPACE"
    assert all(len(d.splitlines()) == 64 for d in docs)


# ---- local files --------------------------------------------------------------------------------

DOCS = [f"doc {i:03d}: " + " ".join(f"w{i}x{j}" for j in range(12)) for i in range(120)]


def write(kind: str, folder: Path) -> tuple[Path, str]:
    """Write DOCS as ``kind``; return the path and the text field."""
    frame = pd.DataFrame({"body": DOCS, "n": range(len(DOCS))})
    if kind == "txt":
        path = folder / "docs.txt"
        path.write_text("\n\n".join(DOCS) + "\n")  # one paragraph per document
        return path, "text"
    path = folder / f"docs.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps({"body": d, "n": i}) + "\n" for i, d in enumerate(DOCS)))
    elif kind == "csv":
        frame.to_csv(path, index=False)
    elif kind == "parquet":
        frame.to_parquet(path)
    return path, "body"


@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv", "parquet"])
def test_local_files_load(kind: str, tmp_path: Path, tok: Any) -> None:
    path, field = write(kind, tmp_path)
    domain = DomainConfig(name=kind, source="files", files=[str(path)], text_field=field)
    docs = domain_documents(domain)
    assert [d.strip() for d in docs] == DOCS
    limited = domain_documents(domain.model_copy(update={"max_docs": 5}))
    assert [d.strip() for d in limited] == DOCS[:5]


def markers(blocks: torch.Tensor, tok: Any) -> set[str]:
    # A marker cut by a block boundary never matches: "doc 0" lacks the colon, "c 012:" the "do".
    return {m for row in blocks.tolist() for m in re.findall(r"doc (\d{3}):", tok.decode(row))}


def test_eval_and_train_documents_are_disjoint(tmp_path: Path, tok: Any) -> None:
    path, field = write("jsonl", tmp_path)
    cfg = stream(
        [{"name": "j", "source": "files", "files": [str(path)], "text_field": field}],
        block_size=32,
        max_eval_blocks=20,
        max_train_tokens=100_000,
    )
    (task,) = build_stream(cfg, tok)
    in_eval, in_train = markers(task.eval, tok), markers(task.train, tok)
    assert len(in_eval) >= 3 and len(in_train) >= 50
    assert not in_eval & in_train
    # and the split is not simply the first documents in file order (it is shuffled)
    assert in_eval != {f"{i:03d}" for i in range(len(in_eval))}


def test_local_hf_dataset_folder(tmp_path: Path, tok: Any) -> None:
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    pd.DataFrame({"content": DOCS}).to_parquet(folder / "train.parquet")
    domain = DomainConfig(name="hf", source="hf", path=str(folder), text_field="content")
    assert domain_documents(domain) == DOCS
    cfg = stream([domain.model_dump()], block_size=32, max_eval_blocks=4)
    (task,) = build_stream(cfg, tok)
    assert task.eval.shape == (4, 32) and task.train.shape[0] >= 1


# ---- user errors --------------------------------------------------------------------------------


def _files_task(files: list[str], **kw: Any) -> dict[str, Any]:
    return {"name": "t", "source": "files", "files": files, **kw}


def test_missing_file(tmp_path: Path, tok: Any) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(ConfigError, match=r"run\.stream\.tasks\.0\.files: file not found") as err:
        build_stream(stream([_files_task([str(missing)])]), tok)
    assert str(missing) in str(err.value)


def test_unsupported_extension(tmp_path: Path, tok: Any) -> None:
    path = tmp_path / "docs.xml"
    path.write_text("<doc>hi</doc>")
    with pytest.raises(ConfigError) as err:
        build_stream(stream([_files_task([str(path)])]), tok)
    msg = str(err.value)
    assert msg.startswith("run.stream.tasks.0.files:")
    for ext in (".txt", ".jsonl", ".csv", ".parquet"):
        assert ext in msg


def test_mixed_extensions_rejected(tmp_path: Path, tok: Any) -> None:
    a, _ = write("csv", tmp_path)
    b, _ = write("jsonl", tmp_path)
    with pytest.raises(ConfigError, match=r"run\.stream\.tasks\.0\.files: all files must share"):
        build_stream(stream([_files_task([str(a), str(b)], text_field="body")]), tok)


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_text_field_not_in_columns(kind: str, tmp_path: Path, tok: Any) -> None:
    path, _ = write(kind, tmp_path)
    tasks = [
        {"name": "ok", "builtin": "python_docs"},
        _files_task([str(path)], text_field="content"),
    ]
    with pytest.raises(ConfigError) as err:
        build_stream(stream(tasks), tok)
    msg = str(err.value)
    assert msg.startswith("run.stream.tasks.1.text_field:")  # the second task's field
    assert "'content'" in msg
    assert "valid values: body, n" in msg


def test_text_field_not_in_hf_dataset(tmp_path: Path, tok: Any) -> None:
    pd.DataFrame({"content": DOCS}).to_parquet(tmp_path / "train.parquet")
    task = {"name": "h", "source": "hf", "path": str(tmp_path), "text_field": "text"}
    with pytest.raises(ConfigError) as err:
        build_stream(stream([task]), tok)
    assert str(err.value).startswith("run.stream.tasks.0.text_field:")
    assert "valid values: content" in str(err.value)


def test_unloadable_hf_path(tmp_path: Path, tok: Any) -> None:
    task = {"name": "h", "source": "hf", "path": str(tmp_path / "absent")}
    with pytest.raises(ConfigError, match=r"run\.stream\.tasks\.0\.path: cannot load dataset"):
        build_stream(stream([task]), tok)


def test_too_little_text(tmp_path: Path, tok: Any) -> None:
    path = tmp_path / "tiny.txt"
    path.write_text("hi\n")
    with pytest.raises(ConfigError, match=r"run\.stream\.tasks\.0: too little text"):
        build_stream(stream([_files_task([str(path)])]), tok)


def test_only_blank_rows(tmp_path: Path, tok: Any) -> None:
    path = tmp_path / "blank.csv"
    pd.DataFrame({"text": ["  ", "\n"]}).to_csv(path, index=False)
    with pytest.raises(ConfigError, match=r"run\.stream\.tasks\.0: the domain has no non-empty"):
        build_stream(stream([_files_task([str(path)])]), tok)


def test_python_source_reads_the_stdlib_without_its_tests_or_site_packages() -> None:
    # The built-in code domain walks the stdlib pruning the skipped trees; its documents must
    # stay those of every *.py under the stdlib outside them, in path order (the stream of an
    # existing experiment must not change).
    import sysconfig

    from adaptune.trainables.data import _python_source

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    expected = []
    for path in sorted(root.rglob("*.py")):
        if skip.intersection(path.relative_to(root).parts):
            continue
        try:
            expected.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    docs = list(_python_source())
    assert len(docs) > 300
    assert docs == expected
    assert (root / "os.py").read_text(encoding="utf-8") in docs
