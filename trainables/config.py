"""The schema of one continual-learning run.

A run is fully described by one :class:`RunConfig`. Ray Tune hands the trainable a plain nested
dict; :func:`parse_run_config` turns it back into a frozen, validated ``RunConfig`` with the same
rules the experiment file was checked against.

The searchable hyperparameters have one name each, used unchanged in the YAML, in search spaces,
in MLflow params and in the docs (``lr``, ``buffer_size``, ``ewc_lambda``, ``distill_alpha``...).
:data:`HYPERPARAMETERS` maps each name to its path inside the run config.

Errors become one line each in :mod:`trainables.config_errors`; relative paths are resolved in
:mod:`trainables.config_paths`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from adaptune.trainables.config_errors import format_validation_error, register_schema
from adaptune.trainables.errors import ConfigError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


BUILTIN_DOMAINS = ("python_docs", "python_source", "unicode_names")


class DomainConfig(_Strict):
    """One domain of text: built in, local files, or a Hugging Face dataset."""

    name: str = Field(min_length=1)  # the task's name in metrics (`loss/<name>`)
    source: Literal["builtin", "files", "hf"] = "builtin"
    builtin: Literal["python_docs", "python_source", "unicode_names"] | None = None
    # files: one path or several; format from the extension (txt, jsonl/json, csv, parquet)
    files: list[str] | None = None
    # hf: datasets.load_dataset(path, name, split=split)
    path: str | None = None
    config_name: str | None = None
    split: str = "train"
    text_field: str = "text"  # column holding the text (txt files always use "text")
    max_docs: int | None = Field(None, ge=1)  # read at most this many rows
    # csv files: false when the first row is data, not column names
    header: bool = True
    column_names: list[str] | None = Field(None, min_length=1)  # header: false; default [text]

    @model_validator(mode="before")
    @classmethod
    def _source_from_fields(cls, data: Any) -> Any:
        """``files:`` (or ``path:``) without ``source:`` means that source."""
        if isinstance(data, dict) and data.get("source") is None:
            if data.get("files") is not None and data.get("builtin") is None:
                data = {**data, "source": "files"}
            elif data.get("path") is not None and data.get("builtin") is None:
                data = {**data, "source": "hf"}
        if isinstance(data, dict) and isinstance(data.get("files"), str):
            data = {**data, "files": [data["files"]]}  # one path
        return data

    @model_validator(mode="after")
    def _check(self) -> DomainConfig:
        needed = {"builtin": "builtin", "files": "files", "hf": "path"}[self.source]
        if getattr(self, needed) in (None, []):
            valid = f"; valid values: {', '.join(BUILTIN_DOMAINS)}" if needed == "builtin" else ""
            raise ValueError(f"source `{self.source}` needs the field `{needed}`{valid}")
        if self.column_names is not None and self.header:
            raise ValueError("`column_names` names the columns of a csv without a header row; "
                             "add `header: false`")
        if not self.header and self.text_field not in (self.column_names or ["text"]):
            raise ValueError(
                f"`text_field` must be one of column_names {self.column_names or ['text']} "
                f"(got {self.text_field!r})"
            )
        return self


class PretrainConfig(_Strict):
    """Train the default model once on a base domain before the stream; cached by config hash."""

    domain: DomainConfig
    steps: int = Field(200, ge=1)  # optimizer steps on the base domain
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    cache_dir: str = "runs/cache"  # pretrained weights land in <cache_dir>/pretrain-<hash>/


class ModelConfig(_Strict):
    # "tiny-gpt" builds a GPT-2-style model from the fields below with a byte-level tokenizer;
    # anything else is a transformers model name, a local folder (AutoModelForCausalLM) or a
    # local .gguf file (dequantized; its tokenizer comes from the same file).
    name: str = "tiny-gpt"
    tokenizer: str | None = None  # defaults to `name` for transformers models; a folder or .gguf
    dtype: Literal["float32", "bfloat16"] = "float32"  # weights of a pretrained model
    n_layer: int = Field(2, ge=1)
    n_embd: int = Field(128, ge=8)
    n_head: int = Field(4, ge=1)
    n_positions: int = Field(256, ge=8)  # context length of the built model
    dropout: float = Field(0.0, ge=0, lt=1)
    trust_remote_code: bool = False  # never on unless the experiment says so
    revision: str | None = None
    pretrain: PretrainConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.name == "tiny-gpt" and self.n_embd % self.n_head:
            raise ValueError(
                f"`n_embd % n_head == 0` must hold, but got (n_embd={self.n_embd}, "
                f"n_head={self.n_head})"
            )
        if self.pretrain is not None and self.name != "tiny-gpt":
            raise ValueError("`pretrain` applies only to the built model (name: tiny-gpt)")
        if self.dtype != "float32" and self.name == "tiny-gpt":
            raise ValueError(
                "`dtype` applies only to pretrained models; the built model (name: tiny-gpt) "
                f"trains in float32 (bf16 on CUDA: hardware.bf16), but got dtype={self.dtype!r}"
            )
        return self


class StreamConfig(_Strict):
    tasks: list[DomainConfig] = Field(min_length=1)
    # eval-only domains, never trained on: what a pretrained model keeps of its general ability
    retain: list[DomainConfig] = []
    block_size: int = Field(128, ge=8)  # tokens per packed block
    max_train_tokens: int = Field(65536, ge=1)  # cap on training tokens per task
    max_eval_blocks: int = Field(32, ge=1)  # cap on held-out blocks per task
    data_seed: int = 0  # fixes the train/eval split, shared by all trials of a search
    # tasks: train on each task whole, then evaluate; online: the tasks' training blocks arrive
    # in chunks, each scored before the model may learn from it (docs/online.md)
    mode: Literal["tasks", "online"] = "tasks"
    chunk_tokens: int = Field(2048, ge=1)  # online: tokens per chunk, a multiple of block_size
    # online: which chunks the model trains on (every one, every n-th, or after drift)
    update_policy: Literal["every", "interval", "drift"] = "every"
    update_interval: int = Field(4, ge=1)  # interval: train on chunks 1, 1+n, 1+2n, ...
    drift_detector: Literal["page_hinkley", "adwin"] = "page_hinkley"  # drift: river detector
    drift_threshold: float = Field(1.0, gt=0)  # drift: Page-Hinkley λ (nats), or ADWIN δ < 1
    drift_min_chunks: int = Field(3, ge=1)  # drift: scores a fresh detector needs before firing
    drift_update_chunks: int = Field(4, ge=1)  # drift: chunks trained on from each detection

    @model_validator(mode="after")
    def _check(self) -> StreamConfig:
        if self.mode == "online" and self.chunk_tokens % self.block_size:
            raise ValueError(
                f"`chunk_tokens % block_size == 0` must hold in online mode (a chunk is whole "
                f"blocks), but got (chunk_tokens={self.chunk_tokens}, "
                f"block_size={self.block_size})"
            )
        if self.mode == "online" and self.drift_detector == "adwin" and self.drift_threshold >= 1:
            raise ValueError(
                f"`drift_threshold < 1` must hold for drift_detector `adwin` (it is ADWIN's "
                f"confidence δ), but got drift_threshold={self.drift_threshold}"
            )
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"task names must be unique, but got duplicates {dupes}")
        names += [r.name for r in self.retain]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(
                f"names must be unique across tasks and retain, but got duplicates {dupes}"
            )
        return self


class OptimConfig(_Strict):
    lr: float = Field(1e-3, gt=0, le=1)  # AdamW learning rate
    batch_size: int = Field(16, ge=1)  # blocks per step, replayed ones included
    epochs: float = Field(1.0, gt=0)  # passes over each task's training blocks
    schedule: Literal["constant", "cosine"] = "cosine"  # per task; cosine has linear warmup
    warmup_frac: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # max grad norm; 0 = off


class ReplayConfig(_Strict):
    buffer_size: int = Field(0, ge=0)  # blocks kept; 0 = replay off
    replay_fraction: float = Field(0.25, ge=0, lt=1)  # share of every batch drawn from the buffer
    # reservoir: a uniform sample of every block offered so far; window: the latest blocks
    buffer_kind: Literal["reservoir", "window"] = "reservoir"

    @model_validator(mode="after")
    def _check(self) -> ReplayConfig:
        if self.buffer_kind == "window" and self.buffer_size == 0 and self.replay_fraction > 0:
            raise ValueError(
                f"a window buffer of 0 blocks keeps nothing to replay: buffer_kind `window` "
                f"needs buffer_size >= 1 while replay_fraction > 0 (got buffer_size=0, "
                f"replay_fraction={self.replay_fraction}); replay_fraction 0 or buffer_kind "
                f"`reservoir` with buffer_size 0 switches replay off"
            )
        return self


class EWCConfig(_Strict):
    ewc_lambda: float = Field(0.0, ge=0)  # penalty weight; 0 = EWC off
    ewc_mode: Literal["separate", "online"] = "separate"
    ewc_gamma: float = Field(1.0, ge=0, le=1)  # online mode: decay of the old Fisher
    fisher_samples: int = Field(64, ge=1)  # sequences used to estimate the Fisher
    # loss: λ/2·Σ F(θ−θ*)² added to the loss; decoupled: θ ← θ − lr·λ·F(θ−θ*) after each step
    ewc_apply: Literal["loss", "decoupled"] = "loss"
    # labels of the Fisher's gradients: the data's next tokens, or drawn from the model
    fisher_estimator: Literal["empirical", "sampled"] = "empirical"
    # one squared gradient per block, or per batch_size blocks (≈ 1/batch of the former)
    fisher_unit: Literal["sequence", "batch"] = "sequence"


class DistillConfig(_Strict):
    distill_alpha: float = Field(0.0, ge=0)  # KD weight; 0 = distillation off
    temperature: float = Field(2.0, gt=0)


class SelfReplayConfig(_Strict):
    """Self-generated rehearsal: before each task the model writes ``gen_samples`` samples; the
    filters' survivors, packed into blocks, fill ``self_fraction`` of every batch."""

    self_fraction: float = Field(0.0, ge=0, lt=1)  # share of every batch from the pool; 0 = off
    self_pool_size: int = Field(1024, ge=1)  # blocks kept across tasks (reservoir sampling)
    gen_samples: int = Field(64, ge=1)  # samples written before each task
    gen_temperature: float = Field(1.0, gt=0)
    gen_top_p: float = Field(0.95, gt=0, le=1)  # nucleus sampling; 1 = the whole vocabulary
    gen_max_tokens: int = Field(64, ge=1)  # new tokens per sample; with the prompt <= block_size
    # bos: the model's document start; eos: the separator the stream's text is packed with;
    # prefix: the first gen_prefix_tokens of a random current-task block
    gen_prompt: Literal["bos", "eos", "prefix"] = "bos"
    gen_prefix_tokens: int = Field(8, ge=1)  # prefix: its length in tokens
    gen_min_tokens: int = Field(8, ge=1)  # shorter samples are dropped
    gen_overlap_n: int = Field(3, ge=1)  # n-gram order of the near-duplicate test
    gen_max_overlap: float = Field(0.5, ge=0, le=1)  # n-gram Jaccard above which a sample drops
    gen_ppl_min: float = Field(1.0, ge=1)  # perplexity band under the pre-update model
    gen_ppl_max: float | None = Field(None, gt=1)  # None = no upper bound


class ComponentsConfig(_Strict):
    replay: ReplayConfig = ReplayConfig()
    ewc: EWCConfig = EWCConfig()
    distill: DistillConfig = DistillConfig()
    self_replay: SelfReplayConfig = SelfReplayConfig()


class HardwareConfig(_Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when present
    bf16: bool = False  # bf16 autocast on CUDA
    threads: int | None = Field(None, ge=1)  # torch CPU threads; default: the trial's CPUs


class UpdateConfig(_Strict):
    """Which weights a run trains. Knobs of another mode are ignored (searches sample them
    jointly), so every one is searchable on its own."""

    # full: every weight; freeze: the embeddings and the bottom `freeze_layers` blocks stay
    # fixed; lora: LoRA adapters (peft) train, the base weights stay fixed
    mode: Literal["full", "freeze", "lora"] = "full"
    freeze_layers: int = Field(0, ge=0)  # freeze: transformer blocks frozen, from the bottom
    lora_r: int = Field(8, ge=1)  # lora: rank of each adapter
    lora_alpha: float = Field(16.0, gt=0)  # lora: the update is scaled by lora_alpha / lora_r
    lora_dropout: float = Field(0.0, ge=0, lt=1)  # lora: dropout on the adapters' input
    # lora: names of the modules that get adapters (a list, or one string "a,b"); None = peft's
    # default for the architecture (GPT-2: c_attn; Llama: q_proj, v_proj)
    target_modules: list[str] | None = Field(None, min_length=1)
    # lora: merge the adapter into the weights at each task boundary and train a fresh one on
    # the next task; false: one adapter trained across the whole stream
    lora_merge_each_task: bool = False

    @model_validator(mode="before")
    @classmethod
    def _modules_from_string(cls, data: Any) -> Any:
        """``target_modules: "c_attn,c_proj"``: a search can choose among strings only."""
        if isinstance(data, dict) and isinstance(data.get("target_modules"), str):
            names = [n.strip() for n in data["target_modules"].split(",")]
            data = {**data, "target_modules": [n for n in names if n]}
        return data


class RunConfig(_Strict):
    seed: int = 0
    model: ModelConfig = ModelConfig()
    stream: StreamConfig
    optim: OptimConfig = OptimConfig()
    components: ComponentsConfig = ComponentsConfig()
    hardware: HardwareConfig = HardwareConfig()
    update: UpdateConfig = UpdateConfig()
    eval_batch_size: Annotated[int, Field(ge=1)] = 32
    # per-task values, one per task, of hyperparameters that may change between tasks
    # ({lr: [1e-3, 5e-4, 2e-4]}; trainables.schedule.MUTABLE); declared last: its check reads
    # every other field
    schedule: dict[str, list[Any]] | None = None

    @field_validator("schedule")
    @classmethod
    def _check_schedule(
        cls, value: dict[str, list[Any]] | None, info: ValidationInfo
    ) -> dict[str, list[Any]] | None:
        if not value:
            return None
        from adaptune.trainables.schedule import check_schedule  # it imports this module

        return check_schedule(info.data, value)

    @model_validator(mode="after")
    def _check_self_replay(self) -> RunConfig:
        s, r, b = self.components.self_replay, self.components.replay, self.optim.batch_size
        if s.gen_ppl_max is not None and s.gen_ppl_max <= s.gen_ppl_min:
            raise ValueError(f"components.self_replay: `gen_ppl_min < gen_ppl_max` must hold, but "
                             f"got (gen_ppl_min={s.gen_ppl_min}, gen_ppl_max={s.gen_ppl_max})")
        if s.self_fraction == 0:
            return self
        prompt = s.gen_prefix_tokens if s.gen_prompt == "prefix" else 1
        if prompt + s.gen_max_tokens > self.stream.block_size:
            raise ValueError(
                f"components.self_replay.gen_max_tokens: the prompt (gen_prompt={s.gen_prompt!r}: "
                f"{prompt} token(s)) plus gen_max_tokens must fit in stream.block_size="
                f"{self.stream.block_size} (got gen_max_tokens={s.gen_max_tokens})")
        rows = [min(b - 1, round(f * b)) for f in (s.self_fraction, r.replay_fraction)]
        if r.buffer_size > 0 and sum(rows) > b - 1:
            raise ValueError(
                f"components.self_replay.self_fraction: self-replay ({rows[0]} rows) and replay "
                f"({rows[1]} rows) must leave >= 1 row of optim.batch_size={b} to the current "
                f"task (got self_fraction={s.self_fraction}, replay_fraction={r.replay_fraction})")
        return self


# online-mode knobs of StreamConfig (searchable; ignored in tasks mode)
ONLINE_KNOBS = ("chunk_tokens", "update_policy", "update_interval", "drift_detector",
                "drift_threshold", "drift_min_chunks", "drift_update_chunks")
# name -> path inside RunConfig; one name per searchable hyperparameter.
HYPERPARAMETERS: dict[str, tuple[str, ...]] = {
    "seed": ("seed",),
    **{k: ("optim", k) for k in OptimConfig.model_fields},
    **{k: ("components", "replay", k) for k in ReplayConfig.model_fields},
    **{k: ("components", "ewc", k) for k in EWCConfig.model_fields},
    **{k: ("components", "distill", k) for k in DistillConfig.model_fields},
    **{k: ("components", "self_replay", k) for k in SelfReplayConfig.model_fields},
    "update_mode": ("update", "mode"),
    **{k: ("update", k) for k in UpdateConfig.model_fields if k != "mode"},
    **{k: ("stream", k) for k in ONLINE_KNOBS},
}

register_schema(RunConfig)  # unknown keys in a run config are answered with the valid ones


def parse_run_config(data: dict[str, Any]) -> RunConfig:
    """Validate a plain dict (as Ray Tune hands it to the trainable).

    Raises:
        ConfigError: naming the field, the rule and the value.
    """
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, prefix="run")) from None
