"""Online stream mode: prequential scoring, update policies, drift detection, window buffers,
exact resume, refusals and the MLflow record of the per-chunk losses."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from adaptune.search.api import train
from adaptune.search.cli import main
from adaptune.search.experiment import experiment_yaml, parse_experiment
from adaptune.search.tracking import MlflowTrackingCallback
from adaptune.spaces.tune import build_param_space
from adaptune.trainables import parse_run_config, prepare, run_stream
from adaptune.trainables.components.replay import Replay, ReservoirBuffer, WindowBuffer
from adaptune.trainables.config import ReplayConfig
from adaptune.trainables.drift import DriftDetector
from adaptune.trainables.evaluation import evaluate
from adaptune.trainables.metrics import drift_metrics, prequential_metrics
from adaptune.trainables.run import base_model
from conftest import tiny_experiment, write_experiment
from mlflow.tracking import MlflowClient

CPU = torch.device("cpu")
# tiny_experiment: 3 tasks of 32 blocks of 32 tokens (1,024 tokens each), eval batches of 8


def online(name: str = "online", *, run: dict[str, Any] | None = None, **stream: Any) -> Any:
    """The tiny experiment in online mode: 256-token chunks (8 blocks, 4 per segment)."""
    changes = {
        "stream": {"mode": "online", "chunk_tokens": 256, **stream},
        "optim": {"lr": 1e-2},
        "hardware": {"threads": 1},
        **(run or {}),
    }
    return tiny_experiment(name, run=changes)


def run_online(data: dict[str, Any], ckpts: Path | None = None) -> list[dict[str, Any]]:
    """Run the stream; keep each segment's report (and checkpoint, under ``ckpts/seg-<k>``)."""
    reports: list[dict[str, Any]] = []

    def report(metrics: dict[str, Any], path: Path) -> None:
        reports.append(metrics)
        if ckpts is not None:
            shutil.copytree(path, ckpts / f"seg-{metrics['task_index']}")

    run_stream(prepare(parse_run_config(data["run"])), report=report)
    return reports


def load(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path / "model", dtype=torch.float32)


# ---- prequential order -------------------------------------------------------------------------


def test_each_chunk_is_scored_by_the_model_before_its_update(tmp_path: Path) -> None:
    # one chunk per segment: the checkpoint after segment k is the model that scores chunk k+1
    data = online(chunk_tokens=1024)
    prep = prepare(parse_run_config(data["run"]))
    reports = run_online(data, tmp_path)
    nll = reports[-1]["chunk_nll"]
    assert len(nll) == 3 and reports[-1]["updates"] == 3
    untrained = base_model(prep, CPU)  # the weights the run starts from (the run's seed)
    assert nll[0] == pytest.approx(evaluate(untrained, prep.tasks[0].train, 8, CPU), abs=1e-5)
    for k in (1, 2):
        before, after = load(tmp_path / f"seg-{k}"), load(tmp_path / f"seg-{k + 1}")
        chunk = prep.tasks[k].train
        assert nll[k] == pytest.approx(evaluate(before, chunk, 8, CPU), abs=1e-5)
        # the update on the chunk lowered its loss: a score taken after it would be lower
        assert evaluate(after, chunk, 8, CPU) < nll[k] - 0.05


def test_chunks_between_updates_are_scored_by_the_same_model(tmp_path: Path) -> None:
    # interval 100: only the stream's first chunk is trained on; every later chunk is scored
    # by the model as segment 1's checkpoint holds it
    data = online(update_policy="interval", update_interval=100)
    prep = prepare(parse_run_config(data["run"]))
    reports = run_online(data, tmp_path)
    nll = reports[-1]["chunk_nll"]
    assert reports[-1]["chunk_updates"] == [0] and len(nll) == 12
    model = load(tmp_path / "seg-1")
    blocks = torch.cat([t.train for t in prep.tasks]).split(8)
    assert nll[1:] == pytest.approx([evaluate(model, b, 8, CPU) for b in blocks[1:]], abs=1e-5)
    assert evaluate(model, blocks[0], 8, CPU) < nll[0] - 0.05  # chunk 0 was learnt after it


# ---- policies ----------------------------------------------------------------------------------


def test_every_and_interval_update_counts_and_the_window_buffer(tmp_path: Path) -> None:
    buffer = {"components": {"replay": {"buffer_kind": "window", "buffer_size": 4}}}
    every = run_online(online(run=buffer), tmp_path)
    interval = run_online(online(update_policy="interval", update_interval=5))
    assert [m["updates"] for m in every] == [4, 8, 12]
    assert every[-1]["chunk_updates"] == list(range(12))
    assert [m["updates"] for m in interval] == [1, 2, 3]
    assert interval[-1]["chunk_updates"] == [0, 5, 10]
    assert interval[-1]["train_tokens"] < every[-1]["train_tokens"] / 3
    for m in (every[-1], interval[-1]):
        assert m["chunks"] == 12 and m["chunk_boundaries"] == [0, 4, 8, 12]
        # equal chunks: the prequential loss is the plain mean of the chunk scores
        assert m["prequential_loss"] == pytest.approx(sum(m["chunk_nll"]) / 12)
        assert m["update_seconds"] > 0
    # the window holds the 4 latest blocks trained on: the end of the last chunk
    from safetensors.torch import load_file

    kept = load_file(tmp_path / "seg-3" / "state.safetensors")["replay.blocks"]
    last = prepare(parse_run_config(online()["run"])).tasks[-1].train[-4:]
    assert torch.equal(kept.long(), last)


def test_drift_policy_trains_from_the_start_and_after_each_detection() -> None:
    reports = run_online(
        online(update_policy="drift", drift_threshold=0.05, drift_min_chunks=1,
               drift_update_chunks=2)
    )
    m = reports[-1]
    assert m["chunk_updates"][:2] == [0, 1]  # the start counts as a shift
    assert m["chunk_detections"], "a λ of 0.05 nats fires on this stream"
    for d in m["chunk_detections"]:
        assert d in m["chunk_updates"] and d + 1 in m["chunk_updates"] + [12]
    assert m["updates"] == 2 + 2 * len(m["chunk_detections"]) - (m["chunk_detections"][-1] == 11)
    assert {"detections", "shifts_detected", "false_alarms_per_10k"} <= set(m)


# ---- drift detectors ---------------------------------------------------------------------------


def step_stream(seed: int = 0) -> list[float]:
    """50 losses ~N(2.0, 0.05), then 50 ~N(3.0, 0.05)."""
    r = random.Random(seed)
    return [r.gauss(2.0, 0.05) for _ in range(50)] + [r.gauss(3.0, 0.05) for _ in range(50)]


@pytest.mark.parametrize(
    ("kind", "threshold", "fires_at"),
    [("page_hinkley", 1.0, [50]), ("page_hinkley", 2.0, [51]), ("adwin", 0.002, [69])],
)
def test_detector_fires_within_its_delay_on_a_step_and_stays_silent_when_stationary(
    kind: str, threshold: float, fires_at: list[int]
) -> None:
    det = DriftDetector(kind, threshold=threshold, min_chunks=3)
    assert [i for i, x in enumerate(step_stream()) if det.update(x)] == fires_at
    det = DriftDetector(kind, threshold=threshold, min_chunks=3)
    down = [i for i, x in enumerate(step_stream()[::-1]) if det.update(x)]
    assert down and down[0] - 50 <= fires_at[0] - 50 + 1  # a fall of the loss counts too
    r = random.Random(1)
    det = DriftDetector(kind, threshold=threshold, min_chunks=3)
    assert not any(det.update(r.gauss(2.0, 0.05)) for _ in range(200))


@pytest.mark.parametrize("kind", ["page_hinkley", "adwin"])
def test_a_detector_rebuilt_from_its_history_continues_exactly(kind: str) -> None:
    xs = step_stream(3)
    a = DriftDetector(kind, threshold=1.0 if kind == "page_hinkley" else 0.01, min_chunks=3)
    for x in xs[:45]:
        a.update(x)
    b = DriftDetector(a.kind, threshold=a.threshold, min_chunks=3, history=list(a.history))
    assert [a.update(x) for x in xs[45:]] == [b.update(x) for x in xs[45:]]
    assert any(a.update(x) for x in [9.0] * 30)


# ---- buffers -----------------------------------------------------------------------------------


def items(n: int, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + n).repeat_interleave(3).view(n, 3)


def test_window_keeps_the_latest_blocks_and_the_reservoir_a_sample_of_all() -> None:
    gen = torch.Generator().manual_seed(0)
    window = WindowBuffer(4)
    window.add(items(3), gen)
    assert window.blocks[:, 0].tolist() == [0, 1, 2]
    window.add(items(5, start=100), gen)
    assert window.blocks[:, 0].tolist() == [101, 102, 103, 104] and window.seen == 8
    kept_old = 0
    for seed in range(50):
        reservoir = ReservoirBuffer(4)
        g = torch.Generator().manual_seed(seed)
        reservoir.add(items(3), g)
        reservoir.add(items(5, start=100), g)
        kept_old += bool((reservoir.blocks[:, 0] < 100).any())
    assert kept_old > 35  # P(no old block kept) = C(5,4)/C(8,4) = 1/14
    replay = Replay(ReplayConfig(buffer_size=4, buffer_kind="window"))
    assert isinstance(replay.buffer, WindowBuffer)
    replay.buffer.add(items(6), gen)
    again = Replay(ReplayConfig(buffer_size=4, buffer_kind="window"))
    again.load_state_dict(replay.state_dict())
    again.buffer.add(items(1, start=50), gen)
    assert again.buffer.blocks[:, 0].tolist() == [3, 4, 5, 50]


# ---- metrics -----------------------------------------------------------------------------------


def test_prequential_and_drift_metrics_by_hand() -> None:
    got = prequential_metrics([3.0, 2.0, 1.0], [4, 4, 2])
    assert got["prequential_loss"] == pytest.approx((12 + 8 + 2) / 10)
    # shifts at 1000 and 2000 tokens; window 500
    got = drift_metrics([400, 1200, 1300, 2600], [1000, 2000], 3000, window=500)
    assert got["shifts_detected"] == 1 and got["detection_delay"] == 200
    assert got["detections"] == 4
    assert got["false_alarms_per_10k"] == pytest.approx(3 / 3000 * 1e4)
    assert "detection_delay" not in drift_metrics([100], [1000], 3000)


# ---- resume ------------------------------------------------------------------------------------


def test_resume_mid_stream_continues_exactly(tmp_path: Path) -> None:
    # the detector, fed since chunk 1, fires on the first chunk of segment 3 (chunk 8): a
    # resumed detector that had lost its 7 scores could not fire before 3 new ones
    data = online(
        update_policy="drift", drift_threshold=0.2, drift_min_chunks=3, drift_update_chunks=1,
        run={"components": {"replay": {"buffer_kind": "window", "buffer_size": 8},
                            "ewc": {"ewc_lambda": 10.0, "fisher_samples": 4}}},
    )
    path = write_experiment(tmp_path / "online.yaml", data)
    full = train(path, out=tmp_path / "full", tracking=False, quiet=True)
    train(path, out=tmp_path / "part", stop_after=2, tracking=False, quiet=True)
    saved = json.loads((tmp_path / "part/checkpoints/task-2/online.json").read_text())
    assert len(saved["detector"]) == 7, "the detector has scores to carry over"
    resumed = train(path, out=tmp_path / "part", resume=True, tracking=False, quiet=True)
    a, b = full.metrics, resumed.metrics
    assert a["chunk_detections"] == b["chunk_detections"] == [8]
    assert a["chunk_updates"] == b["chunk_updates"]
    assert b["chunk_nll"] == pytest.approx(a["chunk_nll"], abs=1e-4)
    assert b["prequential_loss"] == pytest.approx(a["prequential_loss"], abs=1e-4)
    for ra, rb in zip(full.loss_matrix, resumed.loss_matrix, strict=True):
        assert rb == pytest.approx(ra, abs=1e-4)


# ---- refusals ----------------------------------------------------------------------------------

BAD = [
    ("chunk larger than the stream", {"chunk_tokens": 4096},
     "run.stream.chunk_tokens: must be <= the stream's training tokens (3072"),
    ("chunk not whole blocks", {"chunk_tokens": 100}, "`chunk_tokens % block_size == 0`"),
    ("interval below 1", {"update_interval": 0}, "run.stream.update_interval"),
    ("threshold 0", {"drift_threshold": 0}, "run.stream.drift_threshold"),
    ("unknown detector", {"drift_detector": "cusum"}, "'page_hinkley' or 'adwin'"),
    ("adwin delta 1", {"drift_detector": "adwin", "drift_threshold": 1.0}, "drift_threshold < 1"),
]


@pytest.mark.parametrize(("label", "stream", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_values_exit_2_with_one_line(
    label: str, stream: dict[str, Any], message: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_experiment(tmp_path / "x.yaml", online(update_policy="drift", **stream))
    assert main(["train", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize(
    ("run", "message"),
    [
        ({"components": {"replay": {"buffer_kind": "window", "buffer_size": 0}}},
         "a window buffer of 0 blocks keeps nothing to replay"),
        ({"update": {"mode": "lora", "lora_merge_each_task": True}},
         "run.update.lora_merge_each_task"),
    ],
)
def test_contradictory_settings_exit_2(
    run: dict[str, Any], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_experiment(tmp_path / "x.yaml", online(run=run))
    assert main(["train", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_drift_without_river_says_how_to_install_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "river", None)  # import river -> ImportError
    monkeypatch.setitem(sys.modules, "river.drift", None)
    path = write_experiment(tmp_path / "x.yaml", online(update_policy="drift"))
    assert main(["train", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'adaptune[online]'" in err, err
    every = write_experiment(tmp_path / "y.yaml", online(update_policy="every"))
    assert main(["train", str(every), "--dry-run"]) == 0  # river only for the drift policy


def test_prequential_loss_is_an_objective_of_online_searches_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = online(update_policy="interval", update_interval=2)
    data["search"]["metric"] = "prequential_loss"
    write_experiment(tmp_path / "on.yaml", data)
    assert main(["search", "on.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "online:     12 chunks of 256 tokens (8 blocks)" in out
    assert "segment 2: 4 chunks, 1,024 tokens" in out
    assert "policy:     interval: trains on chunks 1, 3, 5, ... (6 updates)" in out
    assert "objective:  prequential_loss (min)" in out
    data["run"]["stream"]["mode"] = "tasks"
    write_experiment(tmp_path / "off.yaml", data)
    assert main(["search", "off.yaml", "--dry-run"]) == 2
    assert "'prequential_loss' is not an objective" in capsys.readouterr().err


# ---- MLflow ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"


def test_train_logs_the_chunk_series_and_the_prequential_plot(tmp_path: Path, db: Path) -> None:
    data = online("online-train", update_policy="drift", drift_threshold=0.2)
    data["tracking"] = {"tracking_uri": f"sqlite:///{db}"}
    result = train(write_experiment(tmp_path / "x.yaml", data), out=tmp_path / "out", quiet=True)
    client = MlflowClient(result.tracking_uri)
    history = sorted(client.get_metric_history(result.run_id, "chunk_nll"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(12))
    assert [m.value for m in history] == pytest.approx(result.metrics["chunk_nll"])
    run = client.get_run(result.run_id)
    assert run.data.metrics["prequential_loss"] == pytest.approx(
        result.metrics["prequential_loss"]
    )
    assert {"updates", "update_seconds", "false_alarms_per_10k"} <= set(run.data.metrics)
    assert "prequential.png" in {a.path for a in client.list_artifacts(result.run_id)}


class FakeTrial:
    def __init__(self, trial_id: str, config: dict[str, Any]) -> None:
        self.trial_id, self.config, self.last_result, self.num_failures = trial_id, config, {}, 0


def test_the_tune_callback_logs_each_segments_chunks_once(db: Path) -> None:
    data = online("online-callback")
    data["tracking"] = {"tracking_uri": f"sqlite:///{db}"}
    exp = parse_experiment(data)
    callback = MlflowTrackingCallback(exp, experiment_yaml=experiment_yaml(exp))
    callback.setup()
    trial = FakeTrial("t1", build_param_space(exp))
    callback.on_trial_start(0, [trial], trial)
    nll = [5.0 - 0.1 * i for i in range(12)]
    for k in (1, 2, 3):
        trial.last_result = {
            "task_index": k, "stream_loss": 4.0, "prequential_loss": 4.5,
            "loss_matrix": [[5.0] * 3] * (k + 1), "chunk_nll": nll[: 4 * k],
            "chunk_boundaries": [0, 4, 8, 12], "chunk_updates": [0, 4, 8],
            "chunk_detections": [4, 8],
        }
        callback.on_trial_result(0, [trial], trial, trial.last_result)
    callback.on_trial_complete(0, [trial], trial)
    client, run_id = callback.client, callback.trial_run_id("t1")
    history = client.get_metric_history(run_id, "chunk_nll")
    assert sorted((m.step, m.value) for m in history) == list(enumerate(nll))
    assert "prequential.png" in {a.path for a in client.list_artifacts(run_id)}
