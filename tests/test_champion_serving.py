"""The registered champion generates from a plain prompt, the default ways MLflow loads it.

A real tiny run (``run_stream``) writes the checkpoint; ``publish_champion`` logs and registers
it in a real sqlite MLflow store. The model learns one repeated sentence, so greedy generation
continues a prompt with visible bytes that can be counted.
"""

from __future__ import annotations

import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pytest
import transformers
from adaptune.search.champion import publish_champion
from adaptune.search.experiment import experiment_yaml, parse_experiment
from adaptune.search.tags import CHAMPION_RUN_TAG, CHAMPION_TAG, TRIAL_TAG
from adaptune.search.tracking import MlflowTrackingCallback
from adaptune.trainables import parse_run_config, prepare, run_stream
from conftest import tiny_experiment

CONTEXT = 64  # the tiny model's n_positions (conftest)
PROMPT = "The "
TRIAL_ID = "5e7a1c2b"


@dataclass
class Champion:
    uri: str
    checkpoint: Path
    callback: MlflowTrackingCallback
    trial_run_id: str
    version: str
    mlflow_warnings: list[str]


@dataclass
class _Trial:  # what the callback reads of a Ray trial
    trial_id: str
    config: dict[str, Any]


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory) -> Champion:
    tmp = tmp_path_factory.mktemp("champion")
    corpus = tmp / "fox.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog.\n" * 400)
    data = tiny_experiment(
        "serving",
        run={
            "stream": {
                "tasks": [{"name": "fox", "files": [str(corpus)]}],
                "max_train_tokens": 8192,
            },
            "optim": {"lr": 3e-3, "epochs": 2},
        },
        tracking={"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
    )
    exp = parse_experiment(data)
    checkpoint = tmp / "checkpoint"

    def keep(_metrics: dict[str, Any], ckpt: Path) -> None:
        shutil.rmtree(checkpoint, ignore_errors=True)
        shutil.copytree(ckpt, checkpoint)

    run_stream(prepare(parse_run_config(data["run"])), report=keep, threads=1)
    callback = MlflowTrackingCallback(exp, experiment_yaml=experiment_yaml(exp))
    run_id = callback.child_run_id(_Trial(TRIAL_ID, exp.run.model_dump(mode="json")))
    seen = _Records()
    logger = logging.getLogger("mlflow.transformers")
    logger.addHandler(seen)  # after the logger's filters: what a user would see
    try:
        uri, version = publish_champion(callback, exp, checkpoint, TRIAL_ID)
    finally:
        logger.removeHandler(seen)
    mlflow.set_tracking_uri(callback.tracking_uri)
    return Champion(uri, checkpoint, callback, run_id, version, seen.messages)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_publishing_offline_prints_no_hub_model_card_or_licence_warning(
    champion: Champion,
) -> None:
    noise = ("model card", "license")
    assert not [m for m in champion.mlflow_warnings if any(n in m.lower() for n in noise)]


def _new_bytes(prompt: str, text: str) -> bytes:
    assert text.startswith(prompt), (prompt, text)
    return text[len(prompt) :].encode()


def test_saved_tokenizer_appends_no_eos_and_keeps_the_training_ids(champion: Champion) -> None:
    saved = transformers.AutoTokenizer.from_pretrained(champion.checkpoint / "model")
    byt5 = transformers.ByT5Tokenizer()
    assert saved(PROMPT)["input_ids"] == [ord(c) + 3 for c in PROMPT]  # no </s> (id 1)
    rng = random.Random(0)
    text = "".join(chr(rng.randrange(1, 0x3000)) for _ in range(2000)) + "<extra_id_7></s>"
    assert saved(text)["input_ids"] == byt5(text, add_special_tokens=False)["input_ids"]
    assert len(saved) == len(byt5) and saved.eos_token_id == byt5.eos_token_id
    generation = transformers.GenerationConfig.from_pretrained(champion.checkpoint / "model")
    assert generation.max_length == CONTEXT and not generation.do_sample


def test_pipeline_generates_from_a_plain_prompt_and_refuses_a_too_long_one(
    champion: Champion,
) -> None:
    pipe = mlflow.transformers.load_model(champion.uri)
    text = pipe(PROMPT)[0]["generated_text"]
    new = _new_bytes(PROMPT, text)
    assert new.strip() and len(text.encode()) <= CONTEXT  # bytes = tokens: inside the context
    with pytest.raises(ValueError, match="max_length"):
        pipe("x" * CONTEXT)
    # truncated from the left on request
    long = pipe("x" * 3 * CONTEXT, handle_long_generation="hole", max_new_tokens=8)
    assert len(_new_bytes("x" * 3 * CONTEXT, long[0]["generated_text"])) <= 8


def test_pyfunc_generates_and_honours_max_new_tokens(champion: Champion) -> None:
    model = mlflow.pyfunc.load_model(champion.uri)
    params = {p.name: p.default for p in model.metadata.signature.params.params}
    assert params["max_new_tokens"] == CONTEXT // 2 and params["do_sample"] is False
    (text,) = model.predict([PROMPT])
    assert _new_bytes(PROMPT, text).strip()
    for n in (8, 4):
        (text,) = model.predict([PROMPT], params={"max_new_tokens": n})
        assert len(_new_bytes(PROMPT, text)) == n, text
    long = "The quick brown fox " * 10  # 200 bytes: truncated from the left, not a crash
    (text,) = model.predict([long], params={"max_new_tokens": 8})
    assert len(_new_bytes(long, text)) == 8, text


def test_registered_version_links_the_trial_run(champion: Champion) -> None:
    client = champion.callback.client
    version = client.get_model_version_by_alias("adaptune-serving", "champion")
    assert str(version.version) == champion.version and version.run_id == champion.trial_run_id
    assert version.tags[TRIAL_TAG] == TRIAL_ID
    parent = client.get_run(champion.callback.parent_run_id or "")
    assert parent.data.tags[CHAMPION_TAG] == TRIAL_ID
    assert parent.data.tags[CHAMPION_RUN_TAG] == champion.trial_run_id
    trial_run = client.get_run(champion.trial_run_id)
    assert trial_run.outputs.model_outputs, "the trial's run lists the logged model"
