"""Shared test setup: offline Hugging Face libraries, the read-only shared data, and the tiny
experiment most tests run.

The environment variables are set at import time, before any test module imports
``transformers``/``datasets``/``huggingface_hub`` (they read them once, on import).

Test modules import the plain helpers by name (``from conftest import tiny_experiment``):
pytest's default ``prepend`` import mode puts ``tests/`` on ``sys.path``.

In-process searches share one local Ray (the ``shared_ray`` fixture) instead of starting and
stopping one each; Ray runs only through the test modules that ask for it.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
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
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- one local Ray for the in-process searches ---------------------------------------------------
class _SharedRay:
    """The local Ray this conftest started, if it runs (``ray.init`` takes seconds)."""

    running = False
    home: Path | None = None  # its processes' working directory (a new temporary folder)
    modules: frozenset[Path] = frozenset()  # the test files with a test that asks for it


def _ray_is_idle(timeout_s: float) -> bool:
    """Whether the running Ray answers and, within ``timeout_s``, has every CPU and GPU free
    again (the previous search's trial actors let theirs go once it has returned)."""
    import ray

    deadline = time.monotonic() + timeout_s
    try:
        while True:
            total, free = ray.cluster_resources(), ray.available_resources()
            if total.get("CPU") and all(
                free.get(key, 0.0) >= total[key] for key in ("CPU", "GPU") if key in total
            ):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - a dead cluster: started afresh
        return False


def _stop_shared_ray() -> None:
    import ray

    if _SharedRay.running:
        _SharedRay.running = False
        ray.shutdown()


def _start_shared_ray() -> None:
    """A local Ray as ``search.local_ray.start_ray`` starts one for ``adaptune search`` (the
    environment its processes inherit, its CPU count, no dashboard; the driver's imports
    meanwhile), unless it runs already and is healthy. Not ``start_ray`` itself: it would also
    create an MLflow store for no search."""
    import ray
    from adaptune.search.local_ray import LOCAL_RAY_ENV, local_cpu_count
    from adaptune.search.preload import NEEDED_AFTER_INIT, preload_thread

    if ray.is_initialized():
        if _SharedRay.running and _ray_is_idle(timeout_s=20.0):
            return
        # left broken or busy by the test before, or a Ray some test started itself
        ray.shutdown()
        _SharedRay.running = False
    if _SharedRay.home is None:
        _SharedRay.home = Path(tempfile.mkdtemp(prefix="adaptune-shared-ray-"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)  # inherited by the processes ray.init starts
    cwd = Path.cwd()
    os.chdir(_SharedRay.home)  # Ray's processes keep the working directory of ray.init
    preload = preload_thread(NEEDED_AFTER_INIT)
    try:
        ray.init(num_cpus=local_cpu_count(), include_dashboard=False)
        _SharedRay.running = True
    finally:
        preload.join()
        os.chdir(cwd)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _SharedRay.modules = frozenset(i.path for i in items if "shared_ray" in i.fixturenames)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before a test's fixtures: a test that asks for ``shared_ray`` gets it running and idle; a
    test file where none asks runs without it (such tests start their own Ray, or check that
    nothing started one)."""
    if "shared_ray" in item.fixturenames:
        _start_shared_ray()
    elif item.path not in _SharedRay.modules:
        _stop_shared_ray()


def pytest_sessionfinish(session: pytest.Session) -> None:
    _stop_shared_ray()
    if _SharedRay.home is not None:
        shutil.rmtree(_SharedRay.home, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_ray() -> None:
    """One local Ray, running during each test that asks for this (directly or through its
    fixtures), started the way ``adaptune search`` starts a local one.

    ``run_search`` finds Ray running and leaves it running, so in-process searches skip
    ``ray.init`` and its shutdown. It stays up through the following tests of the same file and
    of the files right after that ask for it too; a file with no test asking for it never sees
    it. Before each test that asks, a Ray left broken, or with CPUs still held, is restarted.
    A test that needs a Ray of its own (counts its startup output, makes ``ray.init`` fail,
    kills the driver) does not ask for this one.
    """


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
