"""Shared test setup: offline Hugging Face libraries, the read-only shared data, and the tiny
experiment most tests run.

The environment variables are set at import time, before any test module imports
``transformers``/``datasets``/``huggingface_hub`` (they read them once, on import).

Test modules import the plain helpers by name (``from conftest import tiny_experiment``):
pytest's default ``prepend`` import mode puts ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# The read-only corpora live in shared/data beside the repository's clone.
SHARED_DATA = Path(
    os.environ.get("ADAPTUNE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
GPT2_TOKENIZER_DIR = SHARED_DATA / "tokenizers" / "gpt2"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only shared data folder; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not available at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the GPT-2 BPE files under the names ``from_pretrained`` expects.

    (``GPT2TokenizerFast(vocab_file=..., merges_file=...)`` silently builds an empty
    tokenizer in transformers 5, so the files are loaded through ``from_pretrained``.)
    """
    files = [GPT2_TOKENIZER_DIR / "vocab.json", GPT2_TOKENIZER_DIR / "merges.txt"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        pytest.skip(f"GPT-2 tokenizer files not available: {', '.join(missing)}")
    out = tmp_path_factory.mktemp("gpt2-tokenizer")
    for f in files:
        shutil.copy(f, out / f.name)
    return out


# A complete experiment at test size: a 1-layer GPT on the three built-in domains, a few
# optimizer steps per task, a one-hyperparameter space and a small FIFO search.
_TINY: dict[str, Any] = {
    "run": {
        "model": {"name": "tiny-gpt", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64},
        "stream": {
            "block_size": 32,
            "max_train_tokens": 1024,
            "max_eval_blocks": 4,
            "tasks": [
                {"name": "docs", "builtin": "python_docs"},
                {"name": "code", "builtin": "python_source"},
                {"name": "unicode", "builtin": "unicode_names"},
            ],
        },
        "optim": {"batch_size": 8, "schedule": "constant"},
        "eval_batch_size": 8,
    },
    "space": {"lr": {"loguniform": [1.0e-4, 1.0e-2]}},
    "search": {"num_samples": 4, "max_concurrent": 2, "seed": 0, "scheduler": "fifo"},
    "resources": {"cpus_per_trial": 1},
}


def _merge(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``changes`` into ``base`` in place: mappings key by key, ``None`` removes the key,
    any other value (lists included) replaces it."""
    for key, value in changes.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, Mapping):
            node = base.get(key)
            base[key] = _merge(node if isinstance(node, dict) else {}, value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def tiny_experiment(name: str = "tiny", **changes: Any) -> dict[str, Any]:
    """A fresh experiment dict that validates and runs in seconds, with ``changes`` merged in.

    Each top-level keyword is merged into the section of that name: nested mappings merge key
    by key, any other value (a list of tasks, a number) replaces the old one, and ``None``
    removes the key so the schema's default applies. A search-space entry is a mapping too,
    so a new distribution kind names the old one with ``None``
    (``space={"lr": {"loguniform": None, "uniform": [1e-3, 1e-2]}}``); otherwise the two
    kinds merge into an entry the schema refuses.

    Args:
        name: the experiment's name (the search's folder, MLflow experiment and model name).
        **changes: ``run``, ``space``, ``search``, ``resources``, ``tracking``,
            ``storage_path``: what this test needs to differ from the tiny default.

    Returns:
        A new nested dict; callers may mutate it.

    Example:
        >>> data = tiny_experiment("e2e", run={"stream": {"max_train_tokens": 4096}}, space=None)
    """
    return _merge({"name": name, **copy.deepcopy(_TINY)}, changes)


def write_experiment(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as an experiment YAML file at ``path`` and return the path.

    Example:
        >>> path = write_experiment(tmp_path / "exp.yaml", tiny_experiment("exp"))
    """
    path = Path(path)
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False))
    return path
