"""The config reference in the README, rendered from the config model itself.

``python -m app.reference`` prints the Markdown table; a test keeps the README's
copy identical, so the documented defaults can never drift from the real ones.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from app.address import Address
from app.config import Config, GroupConfig, parse_duration, parse_size

__all__ = ["BEGIN", "END", "Config", "render", "rows"]

BEGIN = "<!-- config-reference:begin -->"
END = "<!-- config-reference:end -->"


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return ""
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return "`[" + ", ".join(f'"{v}"' for v in value) + "]`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value}`"


def _type(field: FieldInfo) -> str:
    annotation = field.annotation
    validators = {getattr(m, "func", None) for m in field.metadata}
    if parse_duration in validators:
        return "duration"
    if parse_size in validators:
        return "size"
    if typing.get_origin(annotation) is typing.Literal:
        return " or ".join(f'"{a}"' for a in typing.get_args(annotation))
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if any(a is Address or typing.get_args(a)[:1] == (Address,) for a in args):
        return "address list" if typing.get_origin(annotation) is tuple else "address"
    if annotation is Path or Path in args:
        return "path"
    if typing.get_origin(annotation) is tuple:
        return "list"
    return getattr(args[0] if args else annotation, "__name__", str(annotation))


def rows(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    for name, field in model.model_fields.items():
        annotation = field.annotation
        nested = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
        key = f"{prefix}{name}"
        if nested is not None:
            yield from rows(nested, f"{key}.")
            continue
        description = (field.description or "").replace("|", "\\|")
        kind, default = _type(field), _default(field)
        if kind == "duration":
            default = f"`{field.get_default():g}s`"
        yield f"| `{key}` | {kind} | {default} | {description} |"


def render() -> str:
    lines = [
        BEGIN,
        "| key | type | default | meaning |",
        "|---|---|---|---|",
        *rows(Config),
        "",
        "Each `[[groups]]` entry (one per proxy, in order) takes:",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
        *(row.replace("| `", "| `groups[].", 1) for row in rows(GroupConfig)),
        END,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render())
