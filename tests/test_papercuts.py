"""Small things a first-time user trips on: data sources, relative paths, --version,
``train --dry-run``, stopping ``adaptune ui``, MLflow's hub warnings offline."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from adaptune.search.cli import main
from adaptune.search.experiment import load_experiment
from adaptune.trainables.config import DomainConfig
from adaptune.trainables.data import domain_documents
from adaptune.trainables.errors import ConfigError
from conftest import tiny_experiment, write_experiment

ROWS = "".join(f"row {i}: some plain text, with a comma\n" for i in range(40))


def test_files_without_source_are_a_files_domain(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello\n\nworld\n")
    domain = DomainConfig.model_validate({"name": "a", "files": str(tmp_path / "a.txt")})
    assert domain.source == "files"
    assert [d.strip() for d in domain_documents(domain)] == ["hello", "world"]


def test_csv_without_a_header_row(tmp_path: Path) -> None:
    csv = tmp_path / "rows.csv"
    csv.write_text('"first row, quoted",1\n' + ROWS.replace(",", ";"))
    domain = DomainConfig(name="c", files=[str(csv)], header=False, column_names=["text", "n"])
    docs = domain_documents(domain)
    assert docs[0] == "first row, quoted" and len(docs) == 41

    single = tmp_path / "single.csv"
    single.write_text(ROWS.replace(",", ";"))
    assert domain_documents(DomainConfig(name="s", files=[str(single)], header=False))[0] == (
        "row 0: some plain text; with a comma"
    )
    with pytest.raises(ConfigError, match="needs `header: false`"):
        domain_documents(DomainConfig(name="s", files=[str(single)]))
    with pytest.raises(ValueError, match="add `header: false`"):
        DomainConfig(name="s", files=[str(single)], column_names=["text"])


def test_relative_paths_resolve_against_the_yaml_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    folder = tmp_path / "experiments"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "notes.txt").write_text("\n\n".join(ROWS.splitlines()))
    data = tiny_experiment("rel")
    data["run"]["stream"]["tasks"][0] = {"name": "notes", "files": ["data/notes.txt"]}
    write_experiment(folder / "rel.yaml", data)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    exp = load_experiment("../experiments/rel.yaml")
    assert exp.run.stream.tasks[0].files == [str((folder / "data" / "notes.txt").resolve())]
    assert main(["train", "../experiments/rel.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing started, nothing written" in out
    assert "3 tasks (notes, code, unicode)" in out and "max_train_tokens: 1024" in out
    assert list(elsewhere.iterdir()) == []  # nothing written


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("adaptune ")


def test_mlflow_hub_metadata_warnings_are_dropped(tmp_path: Path) -> None:
    # MLflow's own helpers that log_model calls for a transformers model; offline, both warn
    from adaptune.search.champion import _HubMetadataFilter
    from mlflow.transformers import _fetch_model_card, _write_license_information

    messages: list[str] = []

    class Seen(logging.Handler):  # on the logger itself: MLflow's loggers may not propagate
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger, seen = logging.getLogger("mlflow.transformers"), Seen(logging.WARNING)
    hub_noise = _HubMetadataFilter()  # as publish_champion installs it around log_model
    logger.addFilter(hub_noise)
    logger.addHandler(seen)
    try:
        _write_license_information("local/model", None, tmp_path)
        _fetch_model_card("local/model")
        logger.warning("an unrelated warning")
    finally:
        logger.removeFilter(hub_noise)
        logger.removeHandler(seen)
    assert messages == ["an unrelated warning"], messages


@pytest.mark.slow
def test_ui_stops_quietly_on_sigterm(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'm.db'}").search_experiments()  # creates the store
    proc = subprocess.Popen(
        [sys.executable, "-m", "adaptune.search.cli", "ui", "--port", "0",
         "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    assert proc.stdout is not None
    deadline, seen = time.monotonic() + 120, ""
    while "Ctrl-C stops the server" not in seen and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
    assert "MLflow UI: http://127.0.0.1:" in seen, seen
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
