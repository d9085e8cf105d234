"""The champion: the best trial's final model, logged on the search's parent run and registered
in MLflow's model registry with the alias ``champion`` (``models:/NAME@champion``)."""

from __future__ import annotations

from pathlib import Path

from adaptune.search.experiment import Experiment
from adaptune.search.locations import CHAMPION_ALIAS, registered_model_name
from adaptune.search.tags import CHAMPION_TAG, TRIAL_TAG
from adaptune.search.tracking import MlflowTrackingCallback


def publish_champion(
    callback: MlflowTrackingCallback, exp: Experiment, checkpoint_dir: Path, trial_id: str
) -> tuple[str, str]:
    """Log the checkpoint's ``model/`` on the parent run and register it as ``@champion``.

    ``mlflow.transformers.log_model`` is given the loaded model and tokenizer: MLflow 3.17's
    local-checkpoint path form fails with transformers 5 (``task_metadata[1]["impl"]`` is a str).

    Returns:
        (``models:/NAME@champion``, the registered version)
    """
    import mlflow
    import torch
    import transformers

    model_dir = checkpoint_dir / "model"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    name = registered_model_name(exp)
    mlflow.set_tracking_uri(callback.tracking_uri)
    client, parent = callback.client, callback.start_parent()
    with mlflow.start_run(run_id=parent):
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="champion",
            task="text-generation",
            pip_requirements=[f"transformers=={transformers.__version__}", "torch", "safetensors"],
            metadata={TRIAL_TAG: trial_id},
        )
    version = mlflow.register_model(info.model_uri, name, tags={TRIAL_TAG: trial_id})
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version.version)
    client.set_tag(parent, CHAMPION_TAG, trial_id)
    return f"models:/{name}@{CHAMPION_ALIAS}", str(version.version)
