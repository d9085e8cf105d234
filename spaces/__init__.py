"""Search spaces: YAML distributions over the run's hyperparameters.

A space maps hyperparameter names (``lr``, ``buffer_size``, ``ewc_lambda``, ... see
:data:`trainables.HYPERPARAMETERS`) to one of::

    lr: {loguniform: [1.0e-4, 3.0e-3]}
    replay_fraction: {uniform: [0.1, 0.5]}
    buffer_size: {int: [0, 2048]}            # inclusive bounds
    ewc_mode: {choice: [separate, online]}
    temperature: 2.0                         # a fixed value

or a named preset (``replay``, ``ewc``, ``distill``, ``all``; see :mod:`spaces.presets`)
with optional overrides: ``{preset: replay, lr: {loguniform: [1.0e-4, 1.0e-3]}}``.
"""

from __future__ import annotations

import builtins
import difflib
from typing import Any, Literal

from adaptune.trainables.config import HYPERPARAMETERS
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Kind = Literal["loguniform", "uniform", "int", "choice"]


class Dist(BaseModel):
    """One searched hyperparameter."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    # `builtins.int`: inside the class body a bare `int` would resolve to this field (None)
    int: tuple[builtins.int, builtins.int] | None = None
    choice: list[Any] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _check(self) -> Dist:
        given = [
            k for k in ("loguniform", "uniform", "int", "choice") if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one distribution; valid values: loguniform, uniform, int, choice "
                f"(got {given or 'none'})"
            )
        kind = given[0]
        if kind in ("loguniform", "uniform", "int"):
            low, high = getattr(self, kind)
            if not low < high:
                raise ValueError(f"`low < high` must hold, but got (low={low}, high={high})")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"`low > 0` must hold for loguniform, but got low={low}")
        return self

    @property
    def kind(self) -> Kind:
        for k in ("loguniform", "uniform", "int", "choice"):
            if getattr(self, k) is not None:
                return k  # type: ignore[return-value]
        raise AssertionError("unreachable")

    def values(self) -> tuple[Any, ...] | list[Any]:
        return getattr(self, self.kind)  # type: ignore[no-any-return]


Spec = Dist | float | int | str | bool


def check_space(space: dict[str, Any]) -> dict[str, Spec]:
    """Validate space keys against the run's hyperparameters and parse distributions.

    Raises:
        ValueError: every problem of the space, one per line: an unknown hyperparameter name
            (with a near match, listing the valid ones), a bad distribution.
    """
    if "preset" in space:
        from adaptune.spaces.presets import PRESETS

        name = space["preset"]
        if name not in PRESETS:
            raise ValueError(f"preset: unknown preset {name!r}; valid values: {', '.join(PRESETS)}")
        space = {**PRESETS[name], **{k: v for k, v in space.items() if k != "preset"}}
    parsed: dict[str, Spec] = {}
    problems: list[str] = []
    for name, spec in space.items():
        try:
            parsed[name] = _parse_spec(name, spec)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("\n".join(problems))
    return parsed


# names other tools give these hyperparameters, for "did you mean"
_OTHER_NAMES = {
    "learning_rate": "lr",
    "lambda": "ewc_lambda",
    "ewc_weight": "ewc_lambda",
    "alpha": "distill_alpha",
    "kd_alpha": "distill_alpha",
    "buffer": "buffer_size",
    "memory_size": "buffer_size",
}


def _parse_spec(name: str, spec: Any) -> Spec:
    if name not in HYPERPARAMETERS:
        near = difflib.get_close_matches(str(name), list(HYPERPARAMETERS), n=1)
        near = [_OTHER_NAMES[name]] if name in _OTHER_NAMES else near
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(
            f"unknown hyperparameter {name!r}{hint}; valid keys: {', '.join(HYPERPARAMETERS)}"
        )
    if isinstance(spec, dict):
        try:
            return Dist.model_validate(spec)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            msg = first["msg"].removeprefix("Value error, ")
            if first["type"] == "extra_forbidden":
                msg = "unknown distribution; valid values: loguniform, uniform, int, choice"
            raise ValueError(f"{name}{'.' + where if where else ''}: {msg}") from None
    if isinstance(spec, float | int | str | bool):
        return spec
    raise ValueError(
        f"{name}: must be a fixed value or one of loguniform, uniform, int, choice "
        f"(got {spec!r})"
    )
