"""How a request's limits are read and its violations told: one clear line per problem.

`Checked` models answer a bad payload with INVALID_INPUT naming the first thing
wrong, in the words of the field's `title`; `field_bounds` and `field_choices`
read a field's limits so that front ends (Discord option ranges, CLI help)
offer exactly what the model accepts.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal

from annotated_types import Ge, Le, MaxLen, MinLen
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

from modal_services.errors import ErrorCode, ToolboxError


class Checked(BaseModel):
    """A model whose violations reach people as one clear INVALID_INPUT line."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def parse(cls, payload: dict[str, Any]):
        """The value `payload` describes, or INVALID_INPUT naming the first thing wrong with it."""
        try:
            return cls.model_validate(payload)
        except ValidationError as error:
            raise invalid_input(error, cls) from None


def field_bounds(model: type[BaseModel], name: str) -> tuple[Any, Any]:
    """(low, high) of a field: its value range for numbers, its length range for strings and lists."""
    return constraint_bounds(model.model_fields[name])


def constraint_bounds(field: FieldInfo) -> tuple[Any, Any]:
    low = high = None
    for constraint in _constraints(field):
        if isinstance(constraint, Ge):
            low = constraint.ge
        elif isinstance(constraint, Le):
            high = constraint.le
        elif isinstance(constraint, MinLen):
            low = constraint.min_length
        elif isinstance(constraint, MaxLen):
            high = constraint.max_length
    return low, high


def field_choices(model: type[BaseModel], name: str) -> tuple[str, ...]:
    """The values a Literal field allows."""
    return next(typing.get_args(arg) for arg in _flatten(model.model_fields[name].annotation)
                if typing.get_origin(arg) is Literal)


def invalid_input(error: ValidationError, model: type[BaseModel]) -> ToolboxError:
    """INVALID_INPUT with one line about the first thing wrong, in the field's own words."""
    return ToolboxError(ErrorCode.INVALID_INPUT, describe_problem(error.errors(include_url=False)[0], model))


def describe_problem(problem: dict, model: type[BaseModel]) -> str:
    """One of pydantic's problems with a `model` value (an item of `ValidationError.errors()`, its `loc`
    relative to the model) as one sentence in the field's own words: the wording every front end shows."""
    owner, field = _field_at(model, problem["loc"])
    label = _title(field) or str(problem["loc"][-1] if problem["loc"] else "value").replace("_", " ")
    return _sentence(_message(problem, owner, label, field))


def _message(error: dict, owner: type[BaseModel], label: str, field: FieldInfo | None) -> str:
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    low, high = constraint_bounds(field) if field is not None else (None, None)
    title = owner.model_config.get("title")
    if kind in ("greater_than_equal", "less_than_equal"):
        if low is not None and high is not None:
            return f"{label} must be between {_number(low)} and {_number(high)} (got {_number(value)})."
        return f"{label} must be at {'least' if low is not None else 'most'} {_number(low if low is not None else high)}."
    if kind == "multiple_of":
        return f"{label} must be a multiple of {_number(ctx['multiple_of'])} (got {_number(value)})."
    if kind == "greater_than":
        return f"{label} must be more than {_number(ctx['gt'])}."
    if kind == "string_too_long":
        return f"{label} is limited to {ctx['max_length']} characters."
    if kind == "string_too_short":
        return f"{label} cannot be empty."
    if kind in ("too_long", "too_short") and low == high:
        return f"{label} needs exactly {low} values."
    if kind == "too_long":
        return f"At most {ctx['max_length']} {label}."
    if kind == "too_short":
        return f"{title} needs at least {ctx['min_length']} of its {label}."
    if kind == "literal_error":
        return f"{label} must be one of {ctx['expected']} (got {value!r})."
    if kind == "missing":
        noun = label.removeprefix("The ")
        return f"{title} needs {_article(noun)} {noun}."
    if kind == "value_error":
        return str(ctx["error"])
    if kind == "control_character":
        return (f"{label} contains a control character ({ctx['code']}, at position {ctx['position']}): only "
                "text, line breaks and tabs are allowed.")
    if kind == "extra_forbidden":
        return f"{title} has no field {error['loc'][-1]!r}."
    if kind.startswith(("int_", "float_")) or kind in ("finite_number", "bool_parsing", "bool_type"):
        whole = "a whole number" if kind.startswith("int_") else "a number"
        bounds = f" from {_number(low)} to {_number(high)}" if low is not None and high is not None else ""
        return f"{label} must be {whole}{bounds}."
    return f"{label}: {error['msg']}."


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _title(field: FieldInfo | None) -> str | None:
    """A field's label: its own title, or that of the Annotated type it is optional of."""
    if field is None:
        return None
    titles = [field.title] + [
        extra.title for arg in _flatten(field.annotation, keep_annotated=True) if typing.get_origin(arg) is Annotated
        for extra in arg.__metadata__ if isinstance(extra, FieldInfo)
    ]
    return next((title for title in titles if title), None)


def _article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"


def _field_at(model: type[BaseModel], loc: tuple) -> tuple[type[BaseModel], FieldInfo | None]:
    """The model owning the field an error location points at, and that field."""
    owner, field = model, None
    for part in loc:
        if isinstance(part, int):
            continue
        if field is not None:
            nested = next((arg for arg in _flatten(field.annotation) if _is_model(arg)), None)
            if nested is None:
                break
            owner = nested
        field = owner.model_fields.get(part)
        if field is None:
            break
    return owner, field


def _constraints(field: FieldInfo) -> list[Any]:
    """A field's constraints, including those of an optional Annotated type (`Prompt | None`)."""
    found = list(field.metadata)
    for arg in _flatten(field.annotation, keep_annotated=True):
        if typing.get_origin(arg) is Annotated:
            for extra in arg.__metadata__:
                found += extra.metadata if isinstance(extra, FieldInfo) else [extra]
    return found


def _flatten(annotation: Any, keep_annotated: bool = False) -> list[Any]:
    """An annotation and every type inside it (unions, lists, Annotated)."""
    found = [annotation]
    origin = typing.get_origin(annotation)
    if origin is Annotated and not keep_annotated:
        return found + _flatten(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found += _flatten(arg, keep_annotated)
    return found


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)
