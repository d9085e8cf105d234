"""``adaptune train`` through the real console script and through ``main()``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from adaptune.search.cli import main
from conftest import tiny_experiment

ROOT = Path(__file__).resolve().parents[1]
ADAPTUNE = [sys.executable, "-m", "adaptune.search.cli"]

SMALL = tiny_experiment(
    "small",
    run={
        "model": {"n_positions": 32},
        "stream": {
            "max_train_tokens": 2048,
            "tasks": [
                {"name": "docs", "builtin": "python_docs"},
                {"name": "unicode", "builtin": "unicode_names"},
            ],
        },
        "optim": None,
        "eval_batch_size": None,
        "components": {"replay": {"buffer_size": 16}, "ewc": {"ewc_lambda": 10.0}},
        "hardware": {"threads": 1},
    },
)


def write(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process runs write their default MLflow store (``runs/mlflow.db``) under tmp_path."""
    monkeypatch.chdir(tmp_path)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [*ADAPTUNE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_quickstart_trains_and_prints_the_loss_matrix(tmp_path: Path) -> None:
    # The quickstart file as shipped, with two optimizer steps per task and a quarter of its
    # evaluation blocks to keep the suite short (the full run's time is in docs/benchmarks.md).
    out = tmp_path / "qs"
    proc = run_cli(
        "train", str(ROOT / "experiments/quickstart.yaml"), "--out", str(out),
        "--set", "run.stream.max_train_tokens=4096", "--set", "run.stream.max_eval_blocks=8",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "loss matrix" in proc.stdout
    for row in ("before", "after docs", "after code", "after unicode"):
        assert row in proc.stdout
    saved = json.loads((out / "loss_matrix.json").read_text())
    assert len(saved["loss_matrix"]) == 4
    assert (out / "checkpoints/task-3/model/model.safetensors").is_file()


def test_stop_and_resume_through_the_cli_gives_the_same_matrix(tmp_path: Path) -> None:
    exp = write(tmp_path / "small.yaml", SMALL)
    assert main(["train", str(exp), "--out", str(tmp_path / "full")]) == 0
    assert main(["train", str(exp), "--out", str(tmp_path / "part"), "--stop-after", "1"]) == 0
    assert main(["train", str(exp), "--out", str(tmp_path / "part"), "--resume"]) == 0
    full = json.loads((tmp_path / "full/loss_matrix.json").read_text())["loss_matrix"]
    part = json.loads((tmp_path / "part/loss_matrix.json").read_text())["loss_matrix"]
    assert len(part) == len(full) == 3
    for row_part, row_full in zip(part, full, strict=True):
        assert row_part == pytest.approx(row_full, abs=1e-4)


def test_existing_output_is_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = write(tmp_path / "small.yaml", SMALL)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/metrics.jsonl").write_text("{}\n")
    assert main(["train", str(exp), "--out", str(tmp_path / "busy")]) == 2
    assert "--resume" in capsys.readouterr().err


BAD = [
    ("negative lr", ["--set", "lr=-0.1"], "run.optim.lr", "greater than 0"),
    ("unknown key", ["--set", "run.optim.lrate=0.1"], "run.optim.lrate", "valid keys"),
    (
        "unknown component",
        ["--set", "run.components.dropout={}"],
        "run.components.dropout",
        "replay, ewc, distill",
    ),
    ("negative buffer", ["--set", "buffer_size=-1"], "buffer_size", "greater than or equal to 0"),
    ("replay fraction 1", ["--set", "replay_fraction=1.0"], "replay_fraction", "less than 1"),
    (
        "missing file",
        ["--set", "run.stream.tasks=[{name: a, source: files, files: [nope.txt]}]"],
        "run.stream.tasks.0.files",
        "not found",
    ),
    (
        "model offline",
        ["--set", "run.model.name=nobody/no-such-model"],
        "run.model.name",
        "cannot load",
    ),
]


@pytest.mark.parametrize(("label", "args", "field", "rule"), BAD, ids=[b[0] for b in BAD])
def test_bad_values_exit_2_with_one_line_and_write_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    label: str,
    args: list[str],
    field: str,
    rule: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    exp = write(tmp_path / "small.yaml", SMALL)
    assert main(["train", str(exp), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert field in err and rule in err, err
    assert not (tmp_path / "runs").exists()


def test_text_field_not_in_the_data_lists_the_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"body": f"line {i}", "id": i}) for i in range(50)))
    data = json.loads(json.dumps(SMALL))
    data["run"]["stream"]["tasks"][1] = {"name": "rows", "source": "files", "files": [str(rows)]}
    exp = write(tmp_path / "bad.yaml", data)
    assert main(["train", str(exp)]) == 2
    err = capsys.readouterr().err
    assert "run.stream.tasks.1.text_field" in err and "body, id" in err
    assert not (tmp_path / "runs").exists()


def test_console_script_exit_code_and_malformed_yaml(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "name: x\nrun: [unclosed\n")
    proc = run_cli("train", str(bad), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "invalid YAML: line" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_console_script_flushes_all_output_before_its_fast_exit(tmp_path: Path) -> None:
    # The console script leaves with os._exit after the exit handlers: piped output must
    # still arrive whole.
    exp = write(tmp_path / "small.yaml", SMALL)
    proc = run_cli("search", str(exp), "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.rstrip("\n").splitlines()
    assert lines[0].startswith("adaptune search small (dry run")
    assert lines[-1].startswith("mlflow:     sqlite:///") and "@champion" in lines[-1]
    assert not (tmp_path / "runs").exists()


def test_the_command_line_loads_torch_ray_and_mlflow_only_for_the_commands_that_need_them() -> None:
    # `adaptune --help`, and `adaptune ui` / `export` up to their store checks, must not pay
    # for torch and transformers (seconds of imports); `prepare` still loads them when used.
    heavy = ("torch", "transformers", "ray", "mlflow")
    code = (
        "import sys, adaptune.search.cli; "
        f"print([m for m in {heavy!r} if m in sys.modules]); "
        "from adaptune.trainables import prepare; "
        "print(prepare.__module__, 'torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.splitlines() == ["[]", "adaptune.trainables.run True"]
    assert subprocess.run([*ADAPTUNE, "--help"], capture_output=True, timeout=300).returncode == 0
