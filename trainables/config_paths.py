"""Relative paths of a run config resolved against a folder.

Two moments need it: loading an experiment file (its inputs are relative to the file's folder,
:func:`with_local_inputs`) and launching a search (Ray Tune runs each trial in its own folder, so
every relative path, outputs included, is made absolute on the driver, :func:`with_absolute_paths`).
"""

from __future__ import annotations

from pathlib import Path

from adaptune.trainables.config import DomainConfig, RunConfig


def with_absolute_paths(cfg: RunConfig, base: Path) -> RunConfig:
    """A copy of ``cfg`` whose relative local paths are resolved against ``base``.

    Ray Tune runs each trial with its trial folder as working directory, so a search resolves
    paths on the driver first: data files, local dataset folders, local model or tokenizer
    folders and the pretrain cache. Hub names (no such local path) are left alone.
    """

    def local(value: str) -> str:
        p = Path(value).expanduser()
        return value if p.is_absolute() else str((base / p).resolve())

    def maybe_local(value: str | None) -> str | None:
        if value is None or Path(value).is_absolute() or not (base / value).exists():
            return value
        return local(value)

    def domain(d: DomainConfig) -> DomainConfig:
        return d.model_copy(
            update={
                "files": [local(f) for f in d.files] if d.files else d.files,
                "path": maybe_local(d.path) if d.source == "hf" else d.path,
            }
        )

    model = cfg.model.model_copy(
        update={
            "name": cfg.model.name if cfg.model.name == "tiny-gpt" else maybe_local(cfg.model.name),
            "tokenizer": maybe_local(cfg.model.tokenizer),
        }
    )
    if model.pretrain is not None:
        model = model.model_copy(
            update={
                "pretrain": model.pretrain.model_copy(
                    update={
                        "cache_dir": local(model.pretrain.cache_dir),
                        "domain": domain(model.pretrain.domain),
                    }
                )
            }
        )
    stream = cfg.stream.model_copy(
        update={
            "tasks": [domain(t) for t in cfg.stream.tasks],
            "retain": [domain(r) for r in cfg.stream.retain],
        }
    )
    return cfg.model_copy(update={"model": model, "stream": stream})


def with_local_inputs(cfg: RunConfig, base: Path) -> RunConfig:
    """A copy of ``cfg`` whose relative input paths are resolved against ``base`` (the
    experiment file's folder): data files always; a dataset, model or tokenizer folder when
    one exists there (else it is a hub name). Output folders (``cache_dir``) are left alone."""

    def folder(value: str | None) -> str | None:
        if value is None or Path(value).is_absolute() or not (base / value).exists():
            return value
        return str((base / value).resolve())

    def inputs(d: DomainConfig) -> DomainConfig:
        files = [str((base / f).resolve()) if not Path(f).is_absolute() else f
                 for f in (str(Path(f).expanduser()) for f in d.files or [])]
        path = folder(d.path) if d.source == "hf" and d.path else d.path
        return d.model_copy(update={"files": files or d.files, "path": path})

    model = cfg.model.model_copy(
        update={
            "name": cfg.model.name if cfg.model.name == "tiny-gpt" else folder(cfg.model.name),
            "tokenizer": folder(cfg.model.tokenizer),
        }
    )
    if model.pretrain is not None:
        pretrain = model.pretrain.model_copy(update={"domain": inputs(model.pretrain.domain)})
        model = model.model_copy(update={"pretrain": pretrain})
    stream = cfg.stream.model_copy(
        update={
            "tasks": [inputs(t) for t in cfg.stream.tasks],
            "retain": [inputs(r) for r in cfg.stream.retain],
        }
    )
    return cfg.model_copy(update={"model": model, "stream": stream})
