"""Typed options, declared once by their owner.

Every method, solver and allocator that has settings declares them as a small
:class:`Options` model (type, default, bounds, help). The recipe (``PruneConfig``), its YAML
keys, the ``llmprune prune`` flags and the Python keywords are all derived from these
declarations, so adding an option touches only its owner. Unknown keys are errors everywhere.

Validation is pydantic's, with the project's own one-line messages (:func:`error_message`).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError

from llmprune.errors import LLMPruneError


class Options(BaseModel):
    """Base of every component's options: unknown keys are refused, defaults are trusted."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @classmethod
    def pick(cls, source: Any) -> Options:
        """This owner's options, read by name from ``source`` (e.g. a ``PruneConfig``)."""
        return cls.model_validate({k: getattr(source, k) for k in cls.model_fields})


class Recipe(Options):
    """Options a user writes (a recipe, flags, keywords): building one that is wrong raises a
    one-line :class:`LLMPruneError`, not pydantic's report."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise LLMPruneError(error_message(e, type(self).model_fields)) from None

    def validate(self) -> Recipe:
        """Check every field again (e.g. after attribute assignments)."""
        validated(type(self), self.model_dump())
        return self

    def replace(self, **changes: Any) -> Recipe:
        """A validated copy with ``changes`` applied (unknown keys are errors)."""
        return validated(type(self), {**self.model_dump(), **changes})


def _not_bool(v: Any) -> Any:
    # pydantic's lax mode reads True as 1: in a recipe that is always a mistake.
    if isinstance(v, bool):
        raise ValueError(f"must be a number, got {v!r}")
    return v


def _checked(test: Callable[[float], bool], rule: str) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if v is not None and (not math.isfinite(v) or not test(v)):
            raise ValueError(f"must be {rule}, got {v!r}")
        return v
    return check


def number(kind: type, test: Callable[[float], bool], rule: str) -> Any:
    """An ``int`` / ``float`` annotation that refuses booleans, NaN and ±inf, and ``not test``."""
    return Annotated[kind, BeforeValidator(_not_bool), AfterValidator(_checked(test, rule))]


PositiveInt = number(int, lambda v: v >= 1, "a positive integer")
NonNegativeInt = number(int, lambda v: v >= 0, "an integer ≥ 0")
PositiveFloat = number(float, lambda v: v > 0, "a finite number > 0")
NonNegativeFloat = number(float, lambda v: v >= 0, "a finite number ≥ 0")


def _comma_list(v: Any) -> Any:
    # "wikitext2,c4" from a flag or a recipe means a list, not its letters
    return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v


CommaList = Annotated[list[str], BeforeValidator(_comma_list)]


def error_message(e: ValidationError, known: Iterable[str] = ()) -> str:
    """The first error of ``e`` as one line: the key, what is wrong, and the value given."""
    err = e.errors(include_url=False)[0]
    key = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"])
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, list(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(known))}"
        return f"unknown option {key!r}{hint}"
    if err["type"] == "value_error":  # our own validators: "must be ...", or a whole sentence
        msg = msg.removeprefix("Value error, ")
        return f"{key} {msg}" if key and msg.startswith("must") else msg
    return f"{key}: {msg[0].lower()}{msg[1:]} (got {err.get('input')!r})"


def validated(cls: type[BaseModel], data: dict, known: Iterable[str] | None = None) -> Any:
    """``cls.model_validate(data)`` with a :class:`LLMPruneError` in place of pydantic's report."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise LLMPruneError(error_message(e, cls.model_fields if known is None else known)) from None


def _declared_by(cls: type[BaseModel], name: str) -> type[BaseModel]:
    """The most basic class in ``cls``'s MRO that has the field ``name``."""
    return next(k for k in reversed(cls.__mro__)
                if isinstance(k, type) and issubclass(k, BaseModel) and name in k.model_fields)


def check_distinct_fields(owners: Sequence[type[BaseModel]]) -> None:
    """Refuse owners that declare a field of the same name.

    A config built by inheritance from several owners (``PruneConfig``: the job's fields plus
    every method's, refiner's, solver's and allocator's options) has one flat namespace: recipe
    keys, ``--flags`` and keywords. Two owners declaring one name would silently share (or
    shadow) it; a field two owners inherit from one common base is the same field, not a clash.
    """
    seen: dict[str, type[BaseModel]] = {}
    for owner in owners:
        for name in owner.model_fields:
            first = seen.setdefault(name, owner)
            if first is not owner and _declared_by(first, name) is not _declared_by(owner, name):
                raise TypeError(f"option {name!r} is declared by both {first.__name__} and {owner.__name__}; "
                                "options merge into one namespace (recipe keys, flags): rename one")
