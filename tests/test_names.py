"""One name per thing: MLflow tags only in search/tags.py, reported metrics only in
trainables/metrics.py, and the search reading both from there."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from adaptune.search import tags
from adaptune.trainables.metrics import (
    HEADLINE_METRICS,
    OBJECTIVES,
    STREAM_METRICS,
    direction,
    objectives,
    stream_metrics,
)

ROOT = Path(__file__).resolve().parents[1]
SEARCH = sorted((ROOT / "search").glob("*.py"))
PACKAGES = {"search", "spaces", "trainables"}  # `adaptune.<package>` is a module, not a tag


def _string_constants(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]


def test_no_tag_name_is_written_outside_tags_py() -> None:
    tag_like = re.compile(r"(adaptune\.(?P<name>[a-z_]+)|mlflow\.parentRunId|mlflow\.source\..*)")
    found = []
    for path in SEARCH:
        if path.name == "tags.py":
            continue
        for line, text in _string_constants(path):
            match = tag_like.fullmatch(text)
            if match and match.group("name") not in PACKAGES:
                found.append(f"{path.name}:{line}: {text!r}")
    assert found == [], "use the constants of search/tags.py"


def test_every_tag_constant_is_distinct_and_used() -> None:
    names = {k: v for k, v in vars(tags).items() if k.isupper()}
    assert len(set(names.values())) == len(names)
    sources = "\n".join(p.read_text(encoding="utf-8") for p in SEARCH if p.name != "tags.py")
    unused = [k for k in names if not re.search(rf"\b{k}\b", sources)]
    assert unused == []


def test_the_store_reading_commands_know_the_tags_without_ray() -> None:
    code = (
        "import sys, adaptune.search.export, adaptune.search.ui; "
        "print(sorted(m for m in ('ray', 'mlflow', 'torch') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert out.strip() == "[]"


def test_the_metric_list_is_what_stream_metrics_reports() -> None:
    L = [[3.0, 3.0], [2.0, 2.5], [2.2, 1.5]]
    assert set(stream_metrics(L, 1)) == set(STREAM_METRICS)
    assert set(HEADLINE_METRICS) <= set(STREAM_METRICS)
    assert "forgetting" in STREAM_METRICS and "forgetting" not in OBJECTIVES
    assert {m for m, d in STREAM_METRICS.items() if d == "max"} == {"bwt", "fwt"}


@pytest.mark.parametrize(
    ("metric", "better"),
    [
        ("stream_loss", "min"),
        ("bwt", "max"),
        ("fwt", "max"),
        ("loss/any-task", "min"),
        ("ppl/any-task", "min"),
        ("base_loss", "min"),
        ("forgetting", None),  # reported, never an objective
        ("train_loss", None),
        ("accuracy/docs", None),
    ],
)
def test_direction_of_an_objective(metric: str, better: str | None) -> None:
    assert direction(metric) == better


def test_objectives_of_a_stream() -> None:
    got = objectives(["docs", "code"], pretrain=False)
    assert got == OBJECTIVES | {
        "loss/docs": "min", "ppl/docs": "min", "loss/code": "min", "ppl/code": "min"
    }
    assert objectives([], pretrain=True) == OBJECTIVES | {"base_loss": "min", "base_ppl": "min"}
    assert all(direction(m) == d for m, d in got.items())
