"""The names adaptune gives its MLflow tags (and its Optuna user attributes).

One search = one parent run (``KIND_TAG`` = ``search``) with one child run per trial
(``KIND_TAG`` = ``trial``, ``PARENT_TAG`` = the parent's id); ``adaptune train`` makes one
standalone run (``KIND_TAG`` = ``train``). Every module that writes or reads
these names imports them from here; this module imports nothing, so the commands that only read
a store (``adaptune export``, ``adaptune ui``) do not load Ray to know them.
"""

from __future__ import annotations

# -- both kinds of run ------------------------------------------------------------------------
KIND_TAG = "adaptune.kind"
KIND_SEARCH = "search"  # KIND_TAG of a parent run
KIND_TRIAL = "trial"  # KIND_TAG of a child run
KIND_TRAIN = "train"  # KIND_TAG of a standalone run (`adaptune train`), under no search
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: nests a child run under its parent
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own

# -- the parent run (the search) --------------------------------------------------------------
HASH_TAG = "adaptune.experiment_hash"  # sha256 of the resolved experiment YAML
OBJECTIVE_TAG = "adaptune.objective"  # "metric (mode)"
RESUMES_TAG = "adaptune.resumes"  # times the search was resumed (--resume)
OPTUNA_STORAGE_TAG = "adaptune.optuna_storage"  # the study's storage URL
OPTUNA_STUDY_TAG = "adaptune.optuna_study"  # the study's name
SEARCH_DIR_TAG = "adaptune.search_dir"  # <storage_path>/<name>: Ray Tune's state
SEARCHED_TAG = "adaptune.searched"  # the searched hyperparameters' names, comma-separated
CHAMPION_TAG = "adaptune.champion_trial_id"  # the trial registered as @champion
CHAMPION_RUN_TAG = "adaptune.champion_run_id"  # that trial's run, which holds the model
CHAMPION_URI_TAG = "adaptune.champion_model"  # models:/NAME@champion
SELECT_TAG = "adaptune.select"  # the rule the champion was chosen by (search.select)
PARETO_TRIALS_TAG = "adaptune.pareto_trials"  # multi-objective: the front's trial ids

# -- a child run (one trial) ------------------------------------------------------------------
TRIAL_TAG = "adaptune.trial_id"  # Ray's trial id; also on the champion's model and version
TASKS_DONE_TAG = "adaptune.tasks_done"  # tasks the trial ran (fewer: stopped early by ASHA)
ERROR_TAG = "adaptune.error"  # one line: `Type: message (during task k/T 'name')`
LAST_FAILURE_TAG = "adaptune.last_failure"  # the line of the failure Ray last retried
FAILURES_TAG = "adaptune.failures"  # times Ray retried the trial (FailureConfig)
STARTS_TAG = "adaptune.starts"  # times Ray started the trial: first start, retries, resumes
LOST_TAG = "adaptune.lost_trial_id"  # on an adopted run: the Ray trial id it started under
PARETO_TAG = "adaptune.pareto"  # "true" on the Pareto front of a multi-objective search
LINEAGE_TAG = "adaptune.lineage"  # the trial that trained each task: "b7,b7,a1" (PBT copies)
DONORS_TAG = "adaptune.pbt.donors"  # the tasks another trial trained: "1:b7,2:b7"
# the settings the trial ran with (numbers, but not measurements); `adaptune export` pins them
THREADS_TAG = "adaptune.threads"  # torch CPU threads
CUDA_TAG = "adaptune.cuda"  # 1 if the trial ran on a CUDA device, else 0
# where the trial's latest result came from
NODE_ID_TAG = "adaptune.node_id"  # the Ray node (reported by the trainable)
NODE_IP_TAG = "adaptune.node_ip"
HOSTNAME_TAG = "adaptune.hostname"
PID_TAG = "adaptune.pid"  # the process (Ray's worker)

# -- Optuna user attributes -------------------------------------------------------------------
LOST_RAY_TRIAL_ATTR = "adaptune.lost_ray_trial_id"  # on an adopted study trial: its lost Ray id

# -- warm start (``search.warm_start``) ---------------------------------------------------------
WARM_START_RUN_TAG = "adaptune.warm_start_run_id"  # parent run tag: the earlier search's parent
# Optuna user attributes of a study trial that came from an earlier search
WARM_SEARCH_ATTR = "adaptune.warm_start.search"  # the earlier search's name
WARM_RUN_ATTR = "adaptune.warm_start.run_id"  # the earlier search's parent run id
WARM_TRIAL_ATTR = "adaptune.warm_start.trial"  # given as it ran: the earlier trial's number
WARM_ENQUEUED_ATTR = "adaptune.warm_start.enqueued"  # run again first: the earlier trial's number

# -- confirmation over seeds (``search.confirm``) ------------------------------------------------
KIND_CONFIRM = "confirm"  # KIND_TAG of a child run that re-runs a trial's values with a new seed
CONFIRM_TAG = "adaptune.confirm"  # "true" on such a run
CONFIRM_OF_TAG = "adaptune.confirm_of"  # the trial whose values it re-runs
SEED_TAG = "adaptune.seed"  # the run.seed it trained with
CONFIRMED_TAG = "adaptune.confirmed_trial"  # parent run: the trial with the best mean over seeds
