"""Validation errors as one line each: ``source: field.path: rule (got value)``.

Pydantic's messages name the rule but not the valid keys of a mapping; every schema that wants
its unknown keys answered with the valid ones (and a near match) registers itself here with
:func:`register_schema`.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError


def format_validation_error(err: ValidationError, *, prefix: str = "", source: str = "") -> str:
    """One line for the first error: ``source: field.path: rule (got value)``."""
    return format_validation_errors(err, prefix=prefix, source=source)[0]


def format_validation_errors(
    err: ValidationError, *, prefix: str = "", source: str = ""
) -> list[str]:
    """One line per error: ``source: field.path: rule (got value)``.

    A validator that found several problems in one field (a search space) puts one per line
    in its message; each becomes a line of its own.
    """
    head = f"{source}: " if source else ""
    lines: list[str] = []
    for error in err.errors():
        loc = ".".join(str(p) for p in (*([prefix] if prefix else []), *error["loc"]))
        for msg in _error_message(err.title, error).splitlines():
            lines.append(f"{head}{loc}: {msg}")
    return lines


def _error_message(title: str, error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        model = _model_at(title, error["loc"])
        valid = list(model.model_fields) if model is not None else []
        near = difflib.get_close_matches(str(error["loc"][-1]), valid, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        return f"unknown key{hint}; valid keys: {', '.join(valid) or 'see docs'}"
    if kind == "missing":
        return "required field is missing"
    msg = str(error["msg"]).removeprefix("Value error, ")
    if kind == "literal_error":
        msg = msg.replace("Input should be", "must be one of")
    value = error.get("input")
    if "input" in error and not isinstance(value, dict | list):
        msg += f" (got {value!r})"
    elif isinstance(value, dict | list) and kind.endswith(("_type", "_parsing")):
        msg += f" (got a {'list' if isinstance(value, list) else 'mapping'})"
    return msg


_MODELS: dict[str, type[BaseModel]] = {}


def _model_at(root_title: str, loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Walk the pydantic model tree along ``loc`` (minus the last key) to list valid keys."""
    model: Any = _MODELS.get(root_title)
    for part in loc[:-1]:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _pydantic_model_in(field.annotation)
    return model


def _pydantic_model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _pydantic_model_in(arg)
        if found is not None:
            return found
    return None


def register_schema(model: type[BaseModel]) -> None:
    """Let :func:`format_validation_error` list valid keys for errors raised by ``model``."""
    _MODELS[model.__name__] = model
