"""Shared test setup: offline Hugging Face libraries and the read-only shared data.

The environment variables are set at import time, before any test module imports
``transformers``/``datasets``/``huggingface_hub`` (they read them once, on import).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

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
