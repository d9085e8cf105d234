"""What a trial costs: parameter counts and peak memory in every report, through ``adaptune
train`` into MLflow; the summary table's cost columns; GPU shares per trial."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from adaptune.search.cli import main
from adaptune.search.experiment import parse_experiment
from adaptune.search.summary import TrialRow, format_table
from adaptune.trainables import parse_run_config, prepare, run_stream
from adaptune.trainables.cost import CostMeter, param_counts, peak_rss_mb, reset_peak_rss
from adaptune.trainables.errors import ConfigError
from adaptune.trainables.model import build_model
from conftest import tiny_experiment, write_experiment
from mlflow.tracking import MlflowClient

SMALL = tiny_experiment(
    "cost",
    run={
        "stream": {
            "max_train_tokens": 512,
            "max_eval_blocks": 2,
            "tasks": [
                {"name": "docs", "builtin": "python_docs"},
                {"name": "names", "builtin": "unicode_names"},
            ],
        },
        "hardware": {"threads": 1},
    },
)


def test_adaptune_train_records_parameters_and_peak_memory_in_mlflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    exp = write_experiment(tmp_path / "cost.yaml", SMALL)
    assert main(["train", str(exp), "--out", str(tmp_path / "out")]) == 0

    cfg = parse_run_config(SMALL["run"])
    n = sum(p.numel() for p in build_model(cfg.model, prepare(cfg).tokenizer).parameters())
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("cost").experiment_id])
    got = run.data.metrics  # the last task's values
    assert got["params_trainable"] == got["params_total"] == n
    assert 50 < got["peak_rss_mb"] < 24000
    assert "peak_gpu_mb" not in got  # CPU run
    history = client.get_metric_history(run.info.run_id, "peak_rss_mb")
    assert sorted(m.step for m in history) == [1, 2]


def test_frozen_parameters_count_as_total_only() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)
    assert param_counts(model) == {"params_trainable": 8, "params_total": 23}
    tied = torch.nn.Linear(4, 4, bias=False)
    shared = torch.nn.ModuleDict({"a": tied, "b": tied})  # tied weights count once
    assert param_counts(shared) == {"params_trainable": 16, "params_total": 16}


def test_the_peak_is_the_runs_own_not_the_process_lifetimes() -> None:
    if not reset_peak_rss():
        pytest.skip("the kernel does not reset the peak RSS here (not Linux >= 4.0)")
    big = torch.ones(80 * 2**20)  # 320 MiB, every page written
    before = peak_rss_mb()
    del big
    reports: list[dict] = []
    run_stream(prepare(parse_run_config(SMALL["run"])), report=lambda m, _c: reports.append(m))
    assert reports[-1]["peak_rss_mb"] < before - 200
    assert reports[0]["peak_rss_mb"] <= reports[-1]["peak_rss_mb"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_peak_gpu_memory_on_cuda() -> None:
    device = torch.device("cuda")
    meter = CostMeter(device)
    x = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
    got = meter.measure(torch.nn.Linear(2, 2))
    assert got["peak_gpu_mb"] >= 64
    del x


def _row(trial: str, gpu: float | None) -> TrialRow:
    return TrialRow(trial, 2.5, 3, "complete", {"lr": 0.001}, 590_000, 134_515_008, 812.4, gpu)


def test_summary_table_shows_cost_columns_and_gpu_only_when_used() -> None:
    cpu = format_table([_row("a", None), TrialRow("b", None, 0, "error", {"lr": 0.01})], "loss")
    head, first, second = cpu.splitlines()
    assert head.split()[-3:] == ["lr", "params", "rss_mb"]
    assert first.split()[-2:] == ["590K/135M", "812"]
    assert second.split()[-2:] == ["-", "-"]
    gpu = format_table([_row("a", 5123.6), _row("b", None)], "loss")
    assert gpu.splitlines()[0].split()[-1] == "gpu_mb"
    assert [line.split()[-1] for line in gpu.splitlines()[1:]] == ["5124", "-"]


@pytest.mark.parametrize("share", [0.25, 1 / 3, 1, 2])
def test_a_gpu_share_reaches_tunes_resources(share: float) -> None:
    from adaptune.search.tuner import trial_resources
    from ray import tune

    exp = parse_experiment(tiny_experiment("gpu", resources={"gpus_per_trial": share}))
    wrapped = tune.with_resources(lambda _config: None, trial_resources(exp))
    bundles = wrapped._resources.bundles  # the placement group Tune asks Ray for
    assert bundles == [{"CPU": 1.0, "GPU": share}]


@pytest.mark.parametrize("share", [1.5, 0.00001, -0.5])
def test_a_gpu_share_ray_cannot_grant_is_refused(share: float) -> None:
    with pytest.raises(ConfigError, match=r"resources\.gpus_per_trial: .*\(got "):
        parse_experiment(tiny_experiment("gpu", resources={"gpus_per_trial": share}))
