"""Self-generated rehearsal: the filters on handmade samples, the pool against the filters on
stories260K's own samples, real rows in every batch, exact resume, the reported numbers and
texts (metrics, checkpoint, MLflow from ``adaptune train`` and from the Tune callback), and
bad values refused before training."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from adaptune.search import records
from adaptune.search.cli import main
from adaptune.trainables import parse_run_config, prepare, run_stream
from adaptune.trainables.checkpoint import load_state
from adaptune.trainables.components import REGISTRY, TaskContext, build_components, states
from adaptune.trainables.components import base as components_base
from adaptune.trainables.components.self_replay import (
    SelfReplay,
    distinct_n,
    filter_samples,
    jaccard,
    ngrams,
    pack_samples,
)
from adaptune.trainables.config import ComponentsConfig, ModelConfig, SelfReplayConfig
from adaptune.trainables.errors import ConfigError
from adaptune.trainables.model import build_model, load_tokenizer
from conftest import tiny_experiment, write_experiment
from mlflow.tracking import MlflowClient

BAND = {"min_tokens": 3, "overlap_n": 2, "max_overlap": 0.5, "ppl_min": 1.5, "ppl_max": 20.0}
METRICS = ("self_generated", "self_kept", "self_distinct_1", "self_distinct_2", "self_kept_ppl",
           "self_pool_blocks")


def test_filters_drop_short_duplicate_near_duplicate_and_out_of_band_samples() -> None:
    samples = [
        [1, 2, 3, 4, 5, 6],  # 0 kept
        [1, 2],  # 1 too short
        [1, 2, 3, 4, 5, 6],  # 2 exact duplicate of 0
        [1, 2, 3, 4, 5, 9],  # 3 near duplicate of 0: bigram Jaccard 4/6 > 0.5
        [7, 8, 9, 10, 11],  # 4 kept
        [20, 21, 22, 23],  # 5 perplexity below the band (a loop)
        [30, 31, 32, 33],  # 6 perplexity above the band (noise)
        [30, 31, 32, 40, 41],  # 7 kept: 6 was dropped, so nothing it resembles was kept
        [7, 8, 9, 50, 51, 52],  # 8 kept: bigram Jaccard with 4 = 2/7
    ]
    ppls = [4.0, 4.0, 4.0, 4.0, 5.0, 1.2, 50.0, 6.0, 3.0]
    assert jaccard(ngrams(samples[0], 2), ngrams(samples[3], 2)) == pytest.approx(4 / 6)
    assert filter_samples(samples, ppls, **BAND) == [0, 4, 7, 8]
    # at the edges: the band is closed, the overlap threshold is "above"
    assert filter_samples([[1, 2, 3]], [1.5], **BAND) == [0]
    assert filter_samples([[1, 2, 3]], [20.0], **BAND) == [0]
    assert filter_samples([[1, 2, 3]], [float("nan")], **BAND) == []
    loose = {**BAND, "max_overlap": 1.0, "ppl_max": None}
    assert filter_samples(samples, ppls, **loose) == [0, 3, 4, 6, 7, 8]  # only the exact copy goes


def test_distinct_n_and_packing_like_real_text() -> None:
    assert distinct_n([[1, 2, 1, 2], [1, 2]], 1) == pytest.approx(2 / 6)
    assert distinct_n([[1, 2, 1, 2], [1, 2]], 2) == pytest.approx(2 / 4)  # (1,2) (2,1) (1,2) (1,2)
    assert distinct_n([], 2) == 0.0
    blocks = pack_samples([[5, 6, 7], [8, 9]], block_size=4, eos=2)
    # 5 6 7 EOS 8 9 EOS, then the start again to fill the last block
    assert blocks.dtype == torch.int64
    assert blocks.tolist() == [[5, 6, 7, 2], [8, 9, 2, 5]]
    assert pack_samples([[5]], block_size=4, eos=None).tolist() == [[5, 5, 5, 5]]
    assert pack_samples([], block_size=4, eos=2).shape == (0, 4)


@pytest.fixture(scope="module")
def stories(shared_data: Path) -> tuple[Any, Any]:
    """stories260K (a model that writes) and its tokenizer."""
    gguf = shared_data / "models" / "stories260K" / "stories260K.gguf"
    if not gguf.is_file():
        pytest.skip("stories260K is not in the shared data")
    cfg = ModelConfig(name=str(gguf))
    tokenizer = load_tokenizer(cfg)
    return build_model(cfg, tokenizer), tokenizer


def _ctx(model: Any, tokenizer: Any, gen: torch.Generator, **changes: Any) -> TaskContext:
    values: dict[str, Any] = {
        "model": model, "train_blocks": torch.randint(3, 500, (6, 64)), "generator": gen,
        "device": torch.device("cpu"), "k": 1, "n_tasks": 2, "batch_size": 8, "pretrained": True,
        "tokenizer": tokenizer,
    }
    return TaskContext(**(values | changes))


def test_the_pool_holds_only_samples_the_filters_keep(stories: tuple[Any, Any]) -> None:
    model, tok = stories
    cfg = SelfReplayConfig(
        self_fraction=0.5, gen_samples=24, gen_max_tokens=40, gen_min_tokens=24, gen_overlap_n=2,
        gen_max_overlap=0.4, gen_ppl_min=1.5, gen_ppl_max=3.0,
    )
    comp = SelfReplay(cfg)
    gen = torch.Generator().manual_seed(7)
    ctx = _ctx(model, tok, gen)
    rng = torch.get_rng_state()
    comp.before_task(ctx)
    numbers = comp.metrics()
    # every filter has something to drop here, and something passes
    assert 0 < numbers["self_kept"] < numbers["self_generated"] == 24
    assert torch.equal(torch.get_rng_state(), rng)  # the run's global RNG is untouched
    expected = torch.Generator().manual_seed(7)
    torch.randint(0, 2**62, (1,), generator=expected)
    assert torch.equal(gen.get_state(), expected.get_state())  # exactly one draw

    assert comp.pool.blocks is not None
    flat = comp.pool.blocks.flatten().tolist()  # in order: the pool is far from full
    kept: list[list[int]] = []
    for is_eos, group in itertools.groupby(flat, key=lambda t: t == tok.eos_token_id):
        if not is_eos:
            kept.append(list(group))
    kept = kept[: int(numbers["self_kept"])]
    ppls = []
    for ids in kept:
        assert len(ids) >= cfg.gen_min_tokens
        scored = ids + [tok.eos_token_id] if len(ids) < cfg.gen_max_tokens else ids
        x = torch.tensor([[tok.bos_token_id, *scored]])
        with torch.no_grad():
            nll = F.cross_entropy(model(input_ids=x).logits[0, :-1], x[0, 1:])
        ppls.append(math.exp(float(nll)))
        assert cfg.gen_ppl_min * (1 - 1e-4) <= ppls[-1] <= cfg.gen_ppl_max * (1 + 1e-4)
    for a, b in itertools.combinations(kept, 2):
        assert a != b
        assert jaccard(ngrams(a, 2), ngrams(b, 2)) <= cfg.gen_max_overlap
    assert numbers["self_kept_ppl"] == pytest.approx(sum(ppls) / len(ppls), rel=1e-3)
    assert numbers["self_distinct_1"] == pytest.approx(distinct_n(kept, 1))
    assert numbers["self_distinct_2"] == pytest.approx(distinct_n(kept, 2))
    text = comp.artifacts()["samples.txt"]
    assert text.startswith(f"# before task 1: kept {len(kept)} of 24 samples")
    assert text.count("## sample ") == len(kept)


def test_a_fresh_model_writes_nothing_and_draws_nothing(stories: tuple[Any, Any]) -> None:
    model, tok = stories
    comp = SelfReplay(SelfReplayConfig(self_fraction=0.5))
    gen = torch.Generator().manual_seed(3)
    before = gen.get_state()
    ctx = _ctx(model, tok, gen, pretrained=False)
    comp.before_task(ctx)
    assert torch.equal(gen.get_state(), before)
    assert comp.metrics() == {"self_generated": 0, "self_kept": 0, "self_pool_blocks": 0}
    assert comp.rows(ctx) == 0 and comp.artifacts() == {}
    batch = torch.zeros((8, 64), dtype=torch.long)
    assert comp.compose(batch, ctx) is batch


def test_prompts_bos_eos_and_prefix() -> None:
    blocks = torch.arange(40).view(4, 10)
    ctx = TaskContext(model=torch.nn.Linear(1, 1), train_blocks=blocks, generator=torch.Generator(),
                      device=torch.device("cpu"), k=1, n_tasks=1, batch_size=4, pretrained=True)
    gen = torch.Generator().manual_seed(0)
    for prompt, want in (("bos", 7), ("eos", 9)):
        comp = SelfReplay(SelfReplayConfig(self_fraction=0.5, gen_samples=3, gen_prompt=prompt))
        assert comp._prompts(ctx, 7, 9, gen).tolist() == [[want]] * 3
    comp = SelfReplay(SelfReplayConfig(gen_samples=5, gen_prompt="prefix", gen_prefix_tokens=2))
    prefixes = comp._prompts(ctx, 7, 9, gen)
    assert prefixes.shape == (5, 2) and all(p in [[0, 1], [10, 11], [20, 21], [30, 31]]
                                            for p in prefixes.tolist())
    with pytest.raises(ConfigError, match=r"^run.components.self_replay.gen_prompt: 'eos' needs"):
        SelfReplay(SelfReplayConfig(gen_prompt="eos"))._prompts(ctx, None, None, gen)


def _stories_run(shared: Path, **components: Any) -> dict[str, Any]:
    return {
        "seed": 0,
        "model": {"name": str(shared / "models" / "stories260K" / "stories260K.gguf")},
        "stream": {
            "block_size": 64, "max_train_tokens": 1024, "max_eval_blocks": 2,
            "tasks": [
                {"name": "drama", "files": [str(shared / "shakespeare/tinyshakespeare_input.txt")]},
                {"name": "news", "files": [str(shared / "news_agnews/agnews_test_text.txt")]},
                {"name": "code", "files": [str(shared / "code_python/python_code_text.txt")]},
            ],
        },
        "optim": {"batch_size": 8, "schedule": "constant", "lr": 3e-3},
        "components": {
            "self_replay": {"self_fraction": 0.25, "gen_samples": 12, "gen_max_tokens": 32},
            **components,
        },
        "hardware": {"threads": 1},
        "eval_batch_size": 8,
    }


def test_every_batch_keeps_a_real_row_beside_replayed_and_self_generated_ones(
    stories: tuple[Any, Any], shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    class Recording(SelfReplay):
        def compose(self, batch: torch.Tensor, ctx: TaskContext) -> torch.Tensor:
            out = super().compose(batch, ctx)
            assert self.pool.blocks is not None
            seen.append((ctx.k, batch, out, self.pool.blocks.long()))
            return out

    monkeypatch.setitem(REGISTRY, "self_replay", (Recording, lambda c: c.self_fraction > 0))
    run = _stories_run(shared_data, replay={"buffer_size": 64, "replay_fraction": 0.25})
    run["stream"]["tasks"] = run["stream"]["tasks"][:2]
    run["components"]["self_replay"]["self_fraction"] = 0.625  # 5 of 8 rows; replay takes 2
    prep = prepare(parse_run_config(run))
    run_stream(prep, report=lambda m, c: None)
    assert {k for k, *_ in seen} == {1, 2}  # stories260K writes before its first task too
    for k, before, after, pool in seen:
        real = {tuple(r) for r in prep.tasks[k - 1].train.tolist()}
        replay_rows = 2 if k == 2 else 0  # replay's buffer fills after task 1
        n_real = 8 - 5 - replay_rows
        assert after.shape == (8, 64) and after.dtype == torch.int64
        assert torch.equal(after[: before.shape[0]], before)  # appended, never replaced
        assert before.shape[0] == n_real + replay_rows
        assert n_real >= 1 and all(tuple(r) in real for r in after[:n_real].tolist())
        old = {tuple(r) for r in prep.tasks[0].train.tolist()}
        assert all(tuple(r) in old for r in after[n_real : n_real + replay_rows].tolist())
        own = {tuple(r) for r in pool.tolist()}
        assert all(tuple(r) in own for r in after[-5:].tolist())


def test_resume_mid_stream_is_exact_and_reports_the_numbers_and_samples(
    stories: tuple[Any, Any], shared_data: Path, tmp_path: Path
) -> None:
    prep = prepare(parse_run_config(_stories_run(shared_data)))
    straight: list[dict[str, Any]] = []
    texts: list[str] = []

    def keep(metrics: dict[str, Any], ckpt: Path) -> None:
        straight.append(metrics)
        texts.append((ckpt / "artifacts" / "self_replay" / "samples.txt").read_text())

    full = run_stream(prep, report=keep)
    for m in straight:
        assert set(METRICS) <= set(m)
        assert m["self_generated"] == 12 and 0 < m["self_kept"] <= 12
    assert [t.splitlines()[0].split(":")[0] for t in texts] == [
        f"# before task {k}" for k in (1, 2, 3)
    ]

    saved = tmp_path / "after-1"

    def save(metrics: dict[str, Any], ckpt: Path) -> None:
        import shutil

        shutil.copytree(ckpt, saved)

    run_stream(prep, report=save, stop_after=1)
    resumed: list[dict[str, Any]] = []
    final: dict[str, torch.Tensor] = {}

    def last(metrics: dict[str, Any], ckpt: Path) -> None:
        resumed.append(metrics)
        final.update(load_state(ckpt))

    again = run_stream(prep, report=last, resume_from=saved)
    diff = max(abs(a - b) for ra, rb in zip(full.loss_matrix, again.loss_matrix, strict=True)
               for a, b in zip(ra, rb, strict=True))
    assert diff <= 1e-4
    for a, b in zip(straight[1:], resumed, strict=True):
        assert {k: a[k] for k in METRICS} == pytest.approx({k: b[k] for k in METRICS}, rel=1e-5)
    assert int(final["self_replay.totals"][0]) == 36  # 12 samples before each of 3 tasks


def test_registry_order_state_keys_and_off_switch() -> None:
    cfg = ComponentsConfig.model_validate(
        {"distill": {"distill_alpha": 1.0}, "self_replay": {"self_fraction": 0.2},
         "replay": {"buffer_size": 4}}
    )
    comps: dict[str, Any] = build_components(cfg)
    assert list(comps) == ["replay", "self_replay", "distill"]  # row suppliers first
    assert comps["self_replay"].self_fraction == 0.2
    comps["self_replay"].pool.add(torch.arange(8).view(2, 4), torch.Generator())
    assert set(states(comps)) == {
        "replay.seen", "self_replay.pool.seen", "self_replay.pool.blocks", "self_replay.totals",
    }
    assert list(build_components(ComponentsConfig.model_validate({"self_replay": {}}))) == []
    assert records.ARTIFACTS_DIR == components_base.ARTIFACTS_DIR


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"self_replay": {"gen_temperature": 0}}, "self_replay.gen_temperature: Input should be "
                                                  "greater than 0 (got 0)"),
        ({"self_replay": {"self_fraction": 1.0}}, "self_replay.self_fraction: Input should be "
                                                  "less than 1 (got 1.0)"),
        ({"self_replay": {"self_fraction": -0.1}}, "self_fraction: Input should be greater"),
        ({"self_replay": {"gen_top_p": 0}}, "gen_top_p: Input should be greater than 0"),
        ({"self_replay": {"self_fraction": 0.2, "gen_max_tokens": 32}},
         "gen_max_tokens: the prompt (gen_prompt='bos': 1 token(s)) plus gen_max_tokens must "
         "fit in stream.block_size=32 (got gen_max_tokens=32)"),
        ({"self_replay": {"self_fraction": 0.2, "gen_prompt": "prefix", "gen_prefix_tokens": 8,
                          "gen_max_tokens": 25}}, "(gen_prompt='prefix': 8 token(s))"),
        ({"self_replay": {"gen_ppl_min": 5, "gen_ppl_max": 3}}, "`gen_ppl_min < gen_ppl_max`"),
        ({"self_replay": {"gen_prompt": "start"}},
         "gen_prompt: must be one of 'bos', 'eos' or 'prefix' (got 'start')"),
        ({"self_replay": {"self_fraction": 0.5, "gen_max_tokens": 16},
          "replay": {"buffer_size": 8, "replay_fraction": 0.5}},
         "self-replay (4 rows) and replay (4 rows) must leave >= 1 row of optim.batch_size=8"),
    ],
)
def test_bad_values_are_refused_in_one_line_with_exit_2(
    change: dict[str, Any], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tiny_experiment("bad", run={"components": change})
    exp = write_experiment(tmp_path / "bad.yaml", data)
    assert main(["train", str(exp), "--out", str(tmp_path / "o"), "--no-tracking"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists()


def test_train_and_the_tune_callback_log_the_samples_to_mlflow(
    stories: tuple[Any, Any], shared_data: Path, tmp_path: Path
) -> None:
    from adaptune.search.experiment import experiment_yaml, parse_experiment
    from adaptune.search.tracking import MlflowTrackingCallback
    from ray import tune

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = _stories_run(shared_data)
    run["stream"]["tasks"] = run["stream"]["tasks"][:2]
    data = {"name": "self-update", "run": run, "tracking": {"tracking_uri": uri},
            "space": {"self_fraction": {"uniform": [0.1, 0.5]}}}
    exp = write_experiment(tmp_path / "exp.yaml", data)
    assert main(["train", str(exp), "--out", str(tmp_path / "o")]) == 0
    client = MlflowClient(uri)
    (train_run,) = client.search_runs([client.get_experiment_by_name("self-update").experiment_id])
    rid = train_run.info.run_id
    assert [m.step for m in client.get_metric_history(rid, "self_kept")] == [1, 2]
    assert set(METRICS) <= set(train_run.data.metrics)
    for k in (1, 2):
        (art,) = client.list_artifacts(rid, f"self_replay/task-{k}")
        assert art.path == f"self_replay/task-{k}/samples.txt"
    got = Path(client.download_artifacts(rid, "self_replay/task-2/samples.txt", str(tmp_path)))
    ckpt = tmp_path / "o" / "checkpoints" / "task-2"
    assert got.read_text() == (ckpt / "artifacts/self_replay/samples.txt").read_text()

    # the Tune callback on the driver: the same texts, read through the checkpoint's storage
    parsed = parse_experiment(copy.deepcopy(data))
    callback = MlflowTrackingCallback(parsed, experiment_yaml=experiment_yaml(parsed))
    callback.setup()

    class Trial:
        trial_id = "t_00000"
        config = parsed.run.model_dump(mode="json")
        last_result = {"task_index": 2}

    trial = Trial()
    callback.on_trial_start(0, [trial], trial)
    callback.on_checkpoint(0, [trial], trial, tune.Checkpoint.from_directory(str(ckpt)))
    child = callback.child_run_id(trial)
    assert [a.path for a in client.list_artifacts(child, "self_replay/task-2")] == [
        "self_replay/task-2/samples.txt"
    ]


def test_online_stream_writes_before_each_update_and_resumes_exactly(
    stories: tuple[Any, Any], shared_data: Path, tmp_path: Path
) -> None:
    run = _stories_run(shared_data)
    run["stream"] |= {"mode": "online", "chunk_tokens": 256}  # 4 blocks per chunk, every one learnt
    prep = prepare(parse_run_config(run))
    straight: list[dict[str, Any]] = []

    def keep(metrics: dict[str, Any], ckpt: Path) -> None:
        import shutil

        straight.append(metrics)
        if metrics["task_index"] == 1:
            shutil.copytree(ckpt, tmp_path / "seg-1")

    full = run_stream(prep, report=keep)
    pools = [m["self_pool_blocks"] for m in straight]
    assert all(m["self_generated"] == 12 for m in straight) and pools == sorted(pools)
    again = run_stream(prep, report=lambda m, c: None, resume_from=tmp_path / "seg-1")
    diff = max(abs(a - b) for ra, rb in zip(full.loss_matrix, again.loss_matrix, strict=True)
               for a, b in zip(ra, rb, strict=True))
    assert diff <= 1e-4
