"""Where a search keeps its state: Ray Tune's results, the Optuna study, the champion's name."""

from __future__ import annotations

from pathlib import Path

from adaptune.search.experiment import Experiment, default_model_name

CHAMPION_ALIAS = "champion"  # the registry alias of a search's best model


def local_results_dir(exp: Experiment) -> Path | None:
    """``<storage_path>/<name>`` as an absolute local path, or None for a URI (s3://, gs://)."""
    if "://" in exp.storage_path:
        return None
    return Path(exp.storage_path).expanduser().resolve() / exp.name


def search_location(exp: Experiment) -> str:
    """``<storage_path>/<name>``: an absolute local path, or a URI (s3://, gs://)."""
    local = local_results_dir(exp)
    return str(local) if local is not None else f"{exp.storage_path.rstrip('/')}/{exp.name}"


def optuna_storage_file(exp: Experiment) -> Path:
    """The Optuna study's sqlite file: beside the Ray results when they are local."""
    local = local_results_dir(exp)
    return local / "optuna.db" if local else Path("runs/optuna").resolve() / f"{exp.name}.db"


def optuna_storage_url(exp: Experiment) -> str:
    """The Optuna study's storage as a URL (``sqlite:///...``)."""
    return f"sqlite:///{optuna_storage_file(exp)}"


def registered_model_name(exp: Experiment) -> str:
    """The MLflow registered model the champion goes to (default ``adaptune-<name>``)."""
    return exp.tracking.registered_model_name or default_model_name(exp.name)
