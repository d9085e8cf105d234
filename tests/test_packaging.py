"""The built wheel installs under the ``adaptune`` namespace, so packages with the same short
names (Hugging Face's ``spaces``, any ``search`` module) neither shadow nor break it."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import tiny_experiment, write_experiment

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the build backend comes from this environment, no download.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(REPO)],
        check=True, capture_output=True, timeout=600,
    )
    (found,) = out.glob("adaptune-*.whl")
    return found


def test_the_wheel_holds_only_the_adaptune_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"adaptune"}
    for module in ("search/cli.py", "spaces/presets.py", "trainables/run.py",
                   "trainables/components/replay.py"):
        assert f"adaptune/{module}" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "adaptune = adaptune.search.cli:console_main" in zipfile.ZipFile(wheel).read(
        entry
    ).decode()


@pytest.mark.slow
def test_the_installed_wheel_runs_beside_other_spaces_and_search_modules(
    wheel: Path, tmp_path: Path
) -> None:
    # A fresh virtual environment with the wheel alone in its site-packages; the heavy
    # dependencies (torch, Ray, ...) are read from this environment's site-packages, added
    # after it by a plain path line (so its editable install of adaptune is not loaded).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # This environment's pip, run by the new interpreter, installs into the new environment
    # and writes the `adaptune` script for it; --ignore-installed, or it would uninstall the
    # editable adaptune it sees through deps.pth.
    subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "--no-deps", "--ignore-installed",
         str(wheel)],
        check=True, capture_output=True, timeout=300,
    )
    # Modules named like ours, first on sys.path: what `pip install spaces` would put there.
    shadow = tmp_path / "shadow"
    (shadow / "search").mkdir(parents=True)
    (shadow / "search" / "__init__.py").write_text("raise ImportError('not adaptune search')\n")
    (shadow / "spaces.py").write_text("GPU = 'huggingface spaces'\n")
    (shadow / "trainables.py").write_text("raise ImportError('not adaptune trainables')\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    write_experiment(
        work / "tiny.yaml",
        tiny_experiment(
            "wheel",
            run={
                "stream": {
                    "block_size": 64,
                    "max_train_tokens": 2048,
                    "max_eval_blocks": 2,
                    "tasks": [
                        {"name": "docs", "builtin": "python_docs"},
                        {"name": "names", "builtin": "unicode_names"},
                    ],
                },
                "optim": {"lr": 1.0e-3, "batch_size": 4, "schedule": None},
                "eval_batch_size": None,
            },
        ),
    )
    env = {"PYTHONPATH": str(shadow), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path)}
    adaptune = venv / "bin" / "adaptune"
    where = subprocess.run(
        [str(py), "-c", "import adaptune.search, spaces; print(adaptune.search.__file__, "
                        "spaces.GPU)"],
        cwd=work, env=env, capture_output=True, text=True, check=True,
    ).stdout
    assert str(venv) in where and "huggingface spaces" in where and str(REPO) not in where
    helped = subprocess.run([str(adaptune), "--help"], cwd=work, env=env, capture_output=True,
                            text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr
    assert "{train,search,ui,export}" in helped.stdout.replace(" ", "")
    trained = subprocess.run(
        [str(adaptune), "train", "tiny.yaml", "--out", "out"], cwd=work, env=env,
        capture_output=True, text=True, timeout=600,
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "loss matrix" in trained.stdout
    assert (work / "out" / "loss_matrix.json").is_file()
