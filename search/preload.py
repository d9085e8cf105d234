"""Imports the search driver will need, done in a thread while it waits on Ray.

``ray.init`` mostly waits for Ray's processes to come up, and ``fit()`` for the trials' workers
to start: the driver's own imports (and opening the MLflow store) overlap those waits instead of
following them.
"""

from __future__ import annotations

import threading

from adaptune.search.experiment import Experiment
from adaptune.search.stores import resolve_tracking_uri

# What the driver imports after ray.init (the sqlite stores, the heatmaps, MLflow's transformers
# flavour): imported while it waits on ray.init.
NEEDED_AFTER_INIT = (
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "optuna.storages._rdb.storage",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    "mlflow.transformers",
)
# What it imports only after the trials (Optuna's fANOVA importances with scikit-learn; the
# champion's model class is added by preload_modules): imported while fit() runs. Only packages
# that nothing in the Tune loop imports belong here: two threads importing the same modules at
# once can trip importlib's deadlock detection (docs/benchmarks.md, section 2).
NEEDED_AFTER_TRIALS = ("sklearn.ensemble", "optuna.importance")


def preload_modules(
    names: tuple[str, ...], exp: Experiment | None = None, tracking_uri: str | None = None
) -> None:
    """Import ``names``; given ``exp``, also the class its champion loads with; given
    ``tracking_uri``, open MLflow's store there (a new sqlite store creates its tables).
    A module or store that fails here fails again where it is used, so errors are ignored."""
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001, S112 - best effort; the real import reports it
            continue
    if tracking_uri is not None:
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))  # cached per URI
        except Exception:  # noqa: BLE001 - reported by the callback's own client
            pass
    if exp is None:
        return
    try:
        import transformers
        from adaptune.trainables.model import TINY

        model = exp.run.model
        if model.name == TINY:
            transformers.GPT2LMHeadModel  # noqa: B018 - the lazy module imports it here
        else:  # the class AutoModelForCausalLM picks for this config (config only)
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

            config = transformers.AutoConfig.from_pretrained(
                model.name, revision=model.revision, trust_remote_code=model.trust_remote_code
            )
            MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except Exception:  # noqa: BLE001 - e.g. remote code: loaded where it is used
        pass


def preload_thread(
    names: tuple[str, ...], exp: Experiment | None = None, tracking_uri: str | None = None
) -> threading.Thread:
    """:func:`preload_modules` in a started daemon thread (join it before importing the same)."""
    thread = threading.Thread(
        target=preload_modules,
        args=(names, exp, tracking_uri),
        name="adaptune-preload",
        daemon=True,
    )
    thread.start()
    return thread
