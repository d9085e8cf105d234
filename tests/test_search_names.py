"""``--name`` names a search, not its MLflow experiment: every search of one experiment file
lands in the file's MLflow experiment and registered model; ``adaptune export`` finds each by
its search name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from adaptune.search.cli import main
from adaptune.search.tags import KIND_SEARCH, KIND_TAG, PARENT_TAG
from conftest import tiny_experiment, write_experiment
from mlflow.tracking import MlflowClient

TINY = tiny_experiment(
    "names",
    run={
        "stream": {
            "max_train_tokens": 256,
            "max_eval_blocks": 2,
            "tasks": [
                {"name": "docs", "builtin": "python_docs"},
                {"name": "unicode", "builtin": "unicode_names"},
            ],
        },
    },
    search={"num_samples": 2, "scheduler": "fifo"},
)


@pytest.mark.slow
def test_searches_of_one_file_share_an_mlflow_experiment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, shared_ray: None
) -> None:
    monkeypatch.chdir(tmp_path)
    write_experiment(tmp_path / "names.yaml", TINY)
    assert main(["search", "names.yaml"]) == 0, capsys.readouterr().err
    # a rerun of a finished search needs --name; it lands beside the first
    assert main(["search", "names.yaml", "--name", "names-2"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "adaptune export names-2 -o best.yaml" in out

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "names"]
    experiment = client.get_experiment_by_name("names")
    parents = [
        r for r in client.search_runs([experiment.experiment_id])
        if r.data.tags.get(KIND_TAG) == KIND_SEARCH and PARENT_TAG not in r.data.tags
    ]
    by_name = {r.info.run_name: r.info.run_id for r in parents}
    assert set(by_name) == {"search-names", "search-names-2"}
    versions = client.search_model_versions("name = 'adaptune-names'")
    assert len(versions) == 2  # both champions under the file's registered model
    assert (tmp_path / "runs" / "ray" / "names-2").is_dir()

    for search, run_name in (("names", "search-names"), ("names-2", "search-names-2")):
        out_file = f"best-{search}.yaml"
        assert main(["export", search, "-o", out_file]) == 0, capsys.readouterr().err
        assert by_name[run_name] in capsys.readouterr().out
        assert yaml.safe_load((tmp_path / out_file).read_text())["name"] == f"{search}-best"
    # a parent run id works as the argument too
    assert main(["export", by_name["search-names"], "-o", "by-id.yaml"]) == 0
    assert by_name["search-names"] in capsys.readouterr().out
