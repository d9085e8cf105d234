"""The champion: the best trial's final model, logged in that trial's MLflow run and registered
in MLflow's model registry with the alias ``champion`` (``models:/NAME@champion``).

The model generates from a plain prompt both ways MLflow loads it: as the transformers
pipeline (``mlflow.transformers.load_model``) and as a pyfunc model, whose signature declares
the generation settings a caller may pass as ``params`` (:data:`GENERATION_PARAMS`).

The champion of a LoRA run is the merged model (a plain transformers model: its base with every
adapter merged in); the adapters themselves are logged beside it in the trial's run, as the
artifacts ``adapter/`` (and ``merged/`` with ``lora_merge_each_task``).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from adaptune.search.experiment import Experiment
from adaptune.search.locations import CHAMPION_ALIAS, registered_model_name
from adaptune.search.tags import CHAMPION_RUN_TAG, CHAMPION_TAG, CHAMPION_URI_TAG, TRIAL_TAG
from adaptune.search.tracking import MlflowTrackingCallback
from adaptune.trainables.checkpoint import materialize_model
from adaptune.trainables.model import (
    context_length,
    default_max_new_tokens,
    serving_tokenizer,
    set_generation_defaults,
)
from adaptune.trainables.update import ADAPTER_DIR, MERGED_DIR

# name -> (MLflow param type, default); None: the default comes from the model
GENERATION_PARAMS: dict[str, tuple[str, Any]] = {
    "max_new_tokens": ("long", None),
    "do_sample": ("boolean", False),
    "temperature": ("double", 1.0),
    "top_p": ("double", 1.0),
}


def generation_signature(context: int | None) -> Any:
    """A text-in, text-out signature whose params are :data:`GENERATION_PARAMS`;
    ``max_new_tokens`` defaults to :func:`default_max_new_tokens` of the model's ``context``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    specs = []
    for name, (kind, default) in GENERATION_PARAMS.items():
        value = default_max_new_tokens(context) if default is None else default
        specs.append(ParamSpec(name, kind, value))
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(specs),
    )


def load_champion_parts(checkpoint_dir: Path, scratch: Path) -> tuple[Any, Any]:
    """The checkpoint's model and tokenizer, ready to generate (a checkpoint written before the
    generation defaults existed gets them here too). A LoRA checkpoint's adapters are merged
    into its base first, in ``scratch`` (:func:`materialize_model`)."""
    import torch
    import transformers

    model_dir = materialize_model(checkpoint_dir, scratch / "model")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    tokenizer = serving_tokenizer(tokenizer, context_length(model.config))
    set_generation_defaults(model, tokenizer)
    return model, tokenizer


def publish_champion(
    callback: MlflowTrackingCallback, exp: Experiment, checkpoint_dir: Path, trial_id: str
) -> tuple[str, str]:
    """Log the checkpoint's ``model/`` in the trial's run and register it as ``@champion``.

    The registered version's source run is the trial's run (its link in the MLflow UI); the
    parent run gets the tags ``adaptune.champion_trial_id``, ``adaptune.champion_run_id`` and
    ``adaptune.champion_model``. The pyfunc model truncates a prompt longer than the context
    from the left (``handle_long_generation="hole"``).

    ``mlflow.transformers.log_model`` is given the loaded model and tokenizer: MLflow 3.17's
    local-checkpoint path form fails with transformers 5 (``task_metadata[1]["impl"]`` is a str).

    Returns:
        (``models:/NAME@champion``, the registered version)
    """
    import mlflow

    name = registered_model_name(exp)
    mlflow.set_tracking_uri(callback.tracking_uri)
    client, parent = callback.client, callback.start_parent()
    run_id = callback.trial_run_id(trial_id) or parent
    # the logged model belongs to the search's experiment (and its artifact location), not to
    # MLflow's default experiment: log_model takes the experiment from the fluent API
    mlflow.set_experiment(experiment_id=callback.experiment_id)
    hub_noise = _HubMetadataFilter()
    logging.getLogger("mlflow.transformers").addFilter(hub_noise)
    # the scratch folder (a LoRA run's merged model) outlives the weights loaded from it
    with tempfile.TemporaryDirectory(prefix="adaptune-champion-") as scratch:
        try:
            model, tokenizer = load_champion_parts(checkpoint_dir, Path(scratch))
            info = _log_model(model, tokenizer, trial_id, run_id)
        finally:
            logging.getLogger("mlflow.transformers").removeFilter(hub_noise)
    for folder in (ADAPTER_DIR, MERGED_DIR):  # LoRA: the adapters beside the merged model
        if (checkpoint_dir / folder).is_dir():
            client.log_artifacts(run_id, str(checkpoint_dir / folder), artifact_path=folder)
    version = mlflow.register_model(info.model_uri, name, tags={TRIAL_TAG: trial_id})
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version.version)
    uri = f"models:/{name}@{CHAMPION_ALIAS}"
    tags = {CHAMPION_TAG: trial_id, CHAMPION_RUN_TAG: run_id, CHAMPION_URI_TAG: uri}
    for tag, value in tags.items():
        client.set_tag(parent, tag, value)
    return uri, str(version.version)


def _log_model(model: Any, tokenizer: Any, trial_id: str, run_id: str) -> Any:
    import mlflow
    import transformers

    return mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name="champion",
        task="text-generation",
        signature=generation_signature(context_length(model.config)),
        model_config={"handle_long_generation": "hole"},
        pip_requirements=[f"transformers=={transformers.__version__}", "torch", "safetensors"],
        metadata={TRIAL_TAG: trial_id},
        run_id=run_id,
    )


class _HubMetadataFilter(logging.Filter):
    """Drops MLflow's warnings about the hub metadata (model card, licence) of a model it
    saves: the champion is a local checkpoint with neither, and offline the hub is unreachable."""

    NOISE = (
        "The model card could not be retrieved",
        "Unable to find license information",
        "Failed to download the license file",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)

