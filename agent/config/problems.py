"""Problems as sentences: the ConfigError an administrator reads, and pydantic's errors turned
into ``At 'key': ...`` lines with suggestions for misspelt keys."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import cast, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import ErrorDetails

from agent.config.models import Settings
from agent.config.units import show


class ConfigError(Exception):
    """The configuration cannot be used. `problems` holds one line per problem: ``At 'key': ...``
    for a bad key, or a sentence about the file itself (missing, empty, not YAML)."""

    def __init__(self, problems: list[str], source: str = "<config>") -> None:
        self.problems = problems
        self.source = source
        super().__init__("\n".join(f"{source}: {problem}" for problem in problems))


def problem_sentence(error: ErrorDetails) -> str:
    kind, loc, value = error["type"], error["loc"], error["input"]
    if kind in ("extra_forbidden", "invalid_key"):
        key = value if kind == "invalid_key" else loc[-1]  # pydantic's loc spells None as 'None'
        name = key if isinstance(key, str) else show(key).strip("'")
        return f"At {key_path((*loc[:-1], name))}: unknown key{_suggestion(loc[:-1], name)}"
    if kind == "value_error":
        return f"At {key_path(loc)}: {error.get('ctx', {}).get('error')}"
    if kind == "missing":
        return f"At {key_path(loc)}: required"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"At {key_path(loc)}: expected a mapping of keys, not {show(value)}"
    if kind in ("tuple_type", "list_type", "iterable_type"):
        return f"At {key_path(loc)}: expected a list, not {show(value)}"
    return f"At {key_path(loc)}: {show(value)} is not accepted here"


def key_path(loc: tuple[int | str, ...]) -> str:
    """Return a location as the user writes it: ``'dicom.peers[1].ae_title'``."""
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
    return "'" + repr(text.lstrip("."))[1:-1] + "'"  # repr escapes newlines: one line each


def _suggestion(loc: tuple[int | str, ...], key: str) -> str:
    everywhere = list(_field_paths(Settings, ""))
    if key in everywhere:
        return f" (write {key!r} as nested keys, one per line)"
    model = _model_at(loc)
    close = difflib.get_close_matches(key, list(model.model_fields) if model else [], n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    elsewhere = [path for path in everywhere if path.rsplit(".", 1)[-1] == key]
    return f" (did you mean {' or '.join(repr(path) for path in elsewhere)}?)" if elsewhere else ""


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Settings
    for part in loc:
        if isinstance(part, int):
            continue  # an index into a list of models: the field already led to the item model
        field = model.model_fields.get(part) if model else None
        model = _item_model(field.annotation) if field else None
    return model


def _item_model(annotation: object) -> type[BaseModel] | None:
    candidates: tuple[object, ...] = (annotation, *get_args(annotation))
    for candidate in candidates:
        # a generic alias such as tuple[Peer, ...] is no class to test, whatever isinstance says
        is_class = get_origin(candidate) is None and isinstance(candidate, type)
        if is_class and issubclass(cast(type, candidate), BaseModel):
            return cast(type[BaseModel], candidate)
    return None


def _field_paths(model: type[BaseModel], prefix: str) -> Iterator[str]:
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        yield path
        inner = _item_model(field.annotation)
        if inner is not None:
            brackets = "[]" if get_origin(field.annotation) is tuple else ""
            yield from _field_paths(inner, f"{path}{brackets}.")
