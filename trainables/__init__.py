"""One continual-learning run: model, task stream, replay/EWC/distillation, metrics, checkpoints.

Never imports ``search``: the experiment layer composes this package, not the other way round.
"""

from trainables.config import HYPERPARAMETERS, RunConfig, parse_run_config
from trainables.errors import ConfigError, TrainingDivergedError
from trainables.run import Prepared, prepare, run_stream

__all__ = [
    "HYPERPARAMETERS",
    "ConfigError",
    "Prepared",
    "RunConfig",
    "TrainingDivergedError",
    "parse_run_config",
    "prepare",
    "run_stream",
]
