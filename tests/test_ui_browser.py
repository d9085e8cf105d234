"""``adaptune ui`` in a real browser: MLflow's UI in headless Chromium shows the search's trials.

A real MLflow store (the search's tracking callback fed fake trials), ``adaptune ui`` as a
subprocess on a free port, Debian's ``chromium`` driven by Playwright at the printed URL. The page
must show the parent run and every child run, the objective's column with each trial's value,
the rows in objective order, and the table sorted by that column. A screenshot goes to tmp_path,
and to docs/img/mlflow-ui.png (the README's picture) with ADAPTUNE_UPDATE_SCREENSHOT=1.

Needs ``playwright`` (pip) and ``/usr/bin/chromium`` (apt); ``make install-test`` installs both.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
INSTALL = (
    "make install-test (or: sudo apt-get install -y chromium && .venv/bin/pip install playwright)"
)
TASKS = ["docs", "code", "unicode"]
# trial id -> (lr, buffer_size, stream_loss after each task); ASHA stopped the last two early
TRIALS = {
    "t_00000": (1e-3, 16, [3.0, 2.5, 2.125]),
    "t_00001": (5e-3, 0, [4.25]),
    "t_00002": (2e-3, 32, [3.25, 2.5, 1.875]),
    "t_00003": (1e-4, 64, [3.5, 3.375]),
}


@dataclass
class FakeTrial:
    """The attributes the tracking callback reads from a ``ray.tune.experiment.Trial``."""

    trial_id: str
    config: dict[str, Any]
    last_result: dict[str, Any] = field(default_factory=dict)


def _build_store(tmp_path: Path) -> tuple[Path, Any, Any]:
    """One search logged by the real callback: a parent run and one child run per trial."""
    from adaptune.search.experiment import experiment_yaml, parse_experiment
    from adaptune.search.tracking import MlflowTrackingCallback
    from adaptune.spaces.tune import build_param_space

    db = tmp_path / "runs" / "mlflow.db"
    exp = parse_experiment(
        {
            "name": "uitest",
            "run": {"stream": {"tasks": [{"name": n, "builtin": "python_docs"} for n in TASKS]}},
            "space": {"lr": {"loguniform": [1e-4, 1e-2]}, "buffer_size": {"int": [0, 64]}},
            "tracking": {"tracking_uri": f"sqlite:///{db}"},
        }
    )
    text = experiment_yaml(exp)
    callback = MlflowTrackingCallback(exp, experiment_yaml=text)
    callback.setup()
    for trial_id, (lr, buffer_size, losses) in TRIALS.items():
        config = build_param_space(exp)
        config["optim"]["lr"] = lr
        config["components"]["replay"]["buffer_size"] = buffer_size
        trial = FakeTrial(trial_id, config)
        callback.on_trial_start(0, [trial], trial)
        for k, loss in enumerate(losses, start=1):
            matrix = [[5.0] * 3] + [[loss + 0.5, loss, loss - 0.5] for _ in range(k)]
            trial.last_result = {
                "task_index": k, "training_iteration": k, "stream_loss": loss,
                "seen_loss": loss - 0.25, "forgetting": 0.125 * (k - 1), "loss_matrix": matrix,
            }
            callback.on_trial_result(0, [trial], trial, trial.last_result)
        callback.on_trial_complete(0, [trial], trial)
    callback.end_parent()
    path = tmp_path / "uitest.yaml"
    path.write_text(text)
    return path, exp, callback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


def _wait_for_url(proc: subprocess.Popen[bytes], out: Path, err: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"^MLflow UI: (\S+)$", out.read_text(), re.MULTILINE)
        if found:
            return found.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.25)
    raise AssertionError(
        f"adaptune ui printed no URL (exit {proc.poll()}):\n{out.read_text()}\n"
        f"{err.read_text()[-3000:]}"
    )


def test_view_state_sorts_by_the_objective_and_shows_its_column() -> None:
    from adaptune.search.ui import SearchView, share_key, view_state

    view = SearchView("7", "e", "stream_loss", "min", "p", ("lr",), ("seen_loss", "stream_loss"))
    state = view_state(view)
    assert state["orderByKey"] == "metrics.`stream_loss`" and state["orderByAsc"] is True
    assert state["selectedColumns"][:3] == [
        "metrics.`stream_loss`", "metrics.`seen_loss`", "params.`lr`",
    ]
    assert state["columnOrder"] == state["selectedColumns"]  # the objective first, not by name
    assert view_state(SearchView("7", "e", "bwt", "max", None))["orderByAsc"] is False
    assert share_key(state) == share_key(view_state(view))  # one tag per view, not per call


def test_ui_rejects_a_missing_store_and_a_busy_port(tmp_path: Path, capsys) -> None:
    from adaptune.search.cli import main

    assert main(["ui", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    db = tmp_path / "mlflow.db"
    db.touch()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["ui", "--tracking-uri", f"sqlite:///{db}", "--port", str(port)]) == 2
    assert f"--port {port}: cannot listen" in capsys.readouterr().err


def test_ui_shows_the_search_trials_sorted_by_the_objective(tmp_path: Path) -> None:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not installed; {INSTALL}")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.skip(f"playwright not installed; {INSTALL}")

    experiment, exp, callback = _build_store(tmp_path)
    port = _free_port()
    out, err = tmp_path / "ui.out", tmp_path / "ui.err"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "adaptune.search.cli", "ui", str(experiment),
             "--port", str(port)],
            cwd=tmp_path, env=env, stdout=stdout, stderr=stderr,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        url = _wait_for_url(proc, out, err, timeout=90)
        assert url.startswith(f"{base}/#/experiments/{callback.experiment_id}/runs?")
        assert "viewStateShareKey=" in url

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 560})
                page.set_default_timeout(30_000)
                # MLflow's assistant side panel opens itself on a browser's first visit; mark it
                # as seen so the screenshot shows the table at full width.
                page.add_init_script(
                    "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1','true')"
                )
                page.goto(url)

                header = page.locator('[role=columnheader][col-id="metrics.`stream_loss`"]')
                expect(header).to_be_visible()
                # sorted by the objective: MLflow marks the ordering column's header
                expect(page.locator(".is-ordered-by", has_text="stream_loss")).to_be_visible()

                def row_of(name: str) -> int:
                    cell = page.get_by_text(name, exact=True)
                    expect(cell).to_be_visible()
                    row = page.locator("[role=row][row-index]").filter(has=cell)
                    return int(row.first.get_attribute("row-index") or "-1")

                def objective(row: int) -> str:
                    return page.locator(
                        f'[role=row][row-index="{row}"] [col-id="metrics.`stream_loss`"]'
                    ).inner_text().strip()

                parent_row = row_of(f"search-{exp.name}")
                rows = {t: row_of(f"t{i:02d}-{t}") for i, t in enumerate(TRIALS, start=1)}
                for trial_id, row in rows.items():
                    assert float(objective(row)) == TRIALS[trial_id][2][-1], trial_id
                expected = sorted(TRIALS, key=lambda t: TRIALS[t][2][-1])  # best first
                assert sorted(rows, key=rows.get) == expected
                assert objective(parent_row) == "-"  # the parent has no objective: last row
                assert parent_row == max(rows.values()) + 1
                def x_of(column: str) -> float:
                    found = page.locator(f'[role=columnheader][col-id="{column}"]')
                    expect(found).to_be_visible()
                    return float((found.bounding_box() or {"x": -1.0})["x"])

                columns = ["metrics.`stream_loss`", "metrics.`seen_loss`", "metrics.`forgetting`",
                           "params.`buffer_size`", "params.`lr`", "tags.`adaptune.kind`"]
                xs = [x_of(c) for c in columns]
                assert xs == sorted(xs), "the objective first, then metrics, params, tags"

                shot = tmp_path / "mlflow-ui.png"
                page.screenshot(path=str(shot))
            finally:
                browser.close()
        assert shot.read_bytes()[:4] == b"\x89PNG"
        if os.environ.get("ADAPTUNE_UPDATE_SCREENSHOT") == "1":  # never dirty a checkout by default
            (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, ROOT / "docs" / "img" / "mlflow-ui.png")
    finally:
        proc.send_signal(signal.SIGTERM)  # adaptune ui stops the MLflow server it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert not _answers(base), "the MLflow server outlived adaptune ui"
