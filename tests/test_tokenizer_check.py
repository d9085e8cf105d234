"""A tokenizer that cannot feed the model is refused where the model is checked (``prepare``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers
from adaptune.search.cli import main
from adaptune.search.experiment import parse_experiment
from adaptune.trainables.errors import ConfigError
from adaptune.trainables.run import prepare
from conftest import tiny_experiment, write_experiment
from tokenizers import Tokenizer, models, pre_tokenizers


def _model_dir(path: Path, vocab_size: int) -> Path:
    """A local model folder holding a tiny GPT-2 config (``prepare`` reads no weights)."""
    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=1, n_head=2
    )
    config.save_pretrained(path)
    return path


def _word_tokenizer(path: Path, words: list[str]) -> Path:
    """A WordLevel tokenizer knowing ``[UNK]`` and ``words``, saved as a transformers folder."""
    vocab = {"[UNK]": 0, **{w: i for i, w in enumerate(words, start=1)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    fast.save_pretrained(path)
    return path


def _gpt2_tokenizer(source: Path, path: Path) -> Path:
    """The GPT-2 BPE files as a folder ``AutoTokenizer`` loads (with its tokenizer config)."""
    transformers.GPT2TokenizerFast.from_pretrained(source).save_pretrained(path)
    return path


def _run(model: Path, tokenizer: Path | None = None) -> object:
    model_cfg: dict[str, object] = {"name": str(model), "n_layer": None, "n_embd": None,
                                    "n_head": None, "n_positions": None}
    if tokenizer is not None:
        model_cfg["tokenizer"] = str(tokenizer)
    return parse_experiment(tiny_experiment("tok", run={"model": model_cfg})).run


def test_a_one_token_tokenizer_in_the_model_folder_is_refused_naming_the_model(
    tmp_path: Path,
) -> None:
    folder = _model_dir(tmp_path / "model", vocab_size=100)
    _word_tokenizer(folder, [])
    with pytest.raises(ConfigError) as err:
        prepare(_run(folder))
    message = str(err.value)
    assert message.startswith("run.model.name: ")
    assert "at least 2 tokens (got 1)" in message
    assert "\n" not in message


def test_a_separate_degenerate_tokenizer_is_refused_by_search_dry_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    model = _model_dir(tmp_path / "model", vocab_size=100)
    tok = _word_tokenizer(tmp_path / "tok", [])
    data = tiny_experiment("tok")
    data["run"]["model"] = {"name": str(model), "tokenizer": str(tok)}
    exp = write_experiment(tmp_path / "x.yaml", data)
    assert main(["search", str(exp), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "run.model.tokenizer: " in err and "at least 2 tokens (got 1)" in err
    assert not (tmp_path / "runs").exists()


def test_a_tokenizer_that_knows_almost_no_word_is_refused(tmp_path: Path) -> None:
    folder = _model_dir(tmp_path / "model", vocab_size=100)
    tok = _word_tokenizer(tmp_path / "tok", ["the", "river"])
    with pytest.raises(ConfigError, match=r"run\.model\.tokenizer: .*unknown tokens \(got 9\d%"):
        prepare(_run(folder, tok))


def test_more_tokens_than_embedding_rows_is_refused(
    tmp_path: Path, gpt2_tokenizer_dir: Path
) -> None:
    folder = _model_dir(tmp_path / "model", vocab_size=1000)
    with pytest.raises(ConfigError) as err:
        prepare(_run(folder, _gpt2_tokenizer(gpt2_tokenizer_dir, tmp_path / "tok")))
    assert "vocab_size (1000)" in str(err.value) and "(got 50257)" in str(err.value)


def test_gpt2_tokenizer_with_a_gpt2_sized_model_passes(
    tmp_path: Path, gpt2_tokenizer_dir: Path
) -> None:
    folder = _model_dir(tmp_path / "model", vocab_size=50257)
    prep = prepare(_run(folder, _gpt2_tokenizer(gpt2_tokenizer_dir, tmp_path / "tok")))
    assert len(prep.tokenizer) == 50257
    assert all(t.train.max() < 50257 for t in prep.tasks)


def test_byte_level_tokenizer_of_the_built_model_passes() -> None:
    prep = prepare(parse_experiment(tiny_experiment("tok")).run)
    assert len({int(i) for i in prep.tasks[0].train.flatten()}) > 10


def test_the_tokenizer_file_is_what_makes_the_difference(tmp_path: Path) -> None:
    # same model folder, same experiment: only the tokenizer's vocabulary changes the verdict
    folder = _model_dir(tmp_path / "model", vocab_size=100)
    words = ("The river rose after three days of rain , and the old bridge was closed to "
             "traffic . def mean ( values ): return sum / len # 42 items 3 14 avg Questions ? "
             "Write to library : open Monday Friday 9 00 - 17 .").split()
    tok = _word_tokenizer(tmp_path / "tok", sorted(set(words)))
    assert json.loads((tok / "tokenizer.json").read_text())["model"]["type"] == "WordLevel"
    prep = prepare(_run(folder, tok))
    assert len(prep.tokenizer) > 2
