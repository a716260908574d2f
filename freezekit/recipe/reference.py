"""The recipe reference: every key, its type, default and meaning, as a markdown table, generated
from the schema so that the documentation cannot drift from the code."""

from __future__ import annotations

import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .schema import Recipe

__all__ = ["reference"]


def _type(annotation: typing.Any) -> str:
    text = str(annotation).replace("typing.", "").replace("NoneType", "null").replace(" | ", " or ")
    for old, new in (("Literal[", "one of ["), ("<class '", ""), ("'>", ""), ("freezekit.recipe.schema.", "")):
        text = text.replace(old, new)
    return text


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        inner = typing.get_args(annotation)
        nested = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if nested is not None:
            out += _rows(nested, key + ".")
            continue
        if field.default_factory is not None:
            default = repr(field.default_factory()) if not any(
                isinstance(a, type) and issubclass(a, BaseModel) for a in inner) else "[]"
        else:
            default = "required" if field.default is PydanticUndefined else repr(field.default)
        if inner and isinstance(inner[0], type) and issubclass(inner[0], BaseModel):  # a list of sections
            out.append(f"| `{key}` | list | `[]` | {field.description} |")
            out += _rows(inner[0], key + "[].")
            continue
        out.append(f"| `{key}` | `{_type(annotation)}` | `{default}` | {field.description or ''} |")
    return out


def reference() -> str:
    """The markdown table of every recipe key."""
    return "\n".join(["| key | type | default | meaning |", "| --- | --- | --- | --- |", *_rows(Recipe, "")])
