"""The generated parts of the docs: the config reference, rendered from the config model
itself, and the metric reference (``lbstack.metric_reference``), read from the metric
definitions.

``python -m lbstack.reference`` rewrites both between their markers in
docs/configuration.md and docs/metrics.md (``--check``: only say whether they are
stale); tests keep the copies in step, so documented defaults and metrics can never
drift from the real ones.
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from lbstack import metric_reference
from lbstack.address import Address
from lbstack.config import Config, DnsName, GroupConfig, parse_duration, parse_size

__all__ = ["BEGIN", "END", "PAGES", "Config", "Page", "render", "rows", "splice"]

BEGIN = "<!-- config-reference:begin -->"
END = "<!-- config-reference:end -->"
_HEADER = ("| key | type | default | meaning |", "|---|---|---|---|")


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
    if any(a is DnsName or typing.get_args(a)[:1] == (DnsName,) for a in args):
        # DnsName | tuple[Address, ...], or DnsName | None
        return "addresses or DNS name" if len(args) > 1 else "DNS name"
    if any(a is Address or typing.get_args(a)[:1] == (Address,) for a in args):
        return "address list" if typing.get_origin(annotation) is tuple else "address"
    if annotation is Path or Path in args:
        return "path"
    if typing.get_origin(annotation) is tuple:
        return "list"
    if typing.get_origin(annotation) is dict:
        return "table"
    return getattr(args[0] if args else annotation, "__name__", str(annotation))


def _section(field: FieldInfo) -> type[BaseModel] | None:
    """The model of a field that is a config section of its own, else None."""
    annotation = field.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _row(key: str, field: FieldInfo) -> str:
    # Escaped for Markdown: a table cell's bar, and <...> read as an HTML tag.
    description = (field.description or "").replace("|", "\\|").replace("<", "&lt;")
    kind, default = _type(field), _default(field)
    if kind == "duration":
        default = f"`{field.get_default():g}s`"
    return f"| `{key}` | {kind} | {default} | {description} |"


def rows(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """One table row per setting of ``model``, nested sections flattened as ``a.b.c``."""
    for name, field in model.model_fields.items():
        nested = _section(field)
        if nested is None:
            yield _row(f"{prefix}{name}", field)
        else:
            yield from rows(nested, f"{prefix}{name}.")


def _summary(model: type[BaseModel]) -> str:
    return (model.__doc__ or "").strip().splitlines()[0]


def render() -> str:
    """The generated part of docs/configuration.md, markers included: the top-level
    settings, then one table per section, in the model's order."""
    fields = Config.model_fields
    lines = [BEGIN, "### Top level", "", *_HEADER]
    lines += [_row(name, field) for name, field in fields.items() if _section(field) is None]
    for name, field in fields.items():
        nested = _section(field)
        if nested is None:
            continue
        lines += ["", f"### `[{name}]`", "", _summary(nested), "", *_HEADER]
        lines += rows(nested, f"{name}.")
    lines += ["", "### `[[groups]]`", "", _summary(GroupConfig)]
    lines += ["Each entry (one per proxy, in order) takes:", "", *_HEADER]
    lines += [row.replace("| `", "| `groups[].", 1) for row in rows(GroupConfig)]
    lines.append(END)
    return "\n".join(lines)


@dataclass(frozen=True)
class Page:
    """A docs page with a generated part between two markers."""

    path: str  # under the docs directory
    begin: str
    end: str
    render: Callable[[], str]

    def current(self, docs: Path) -> str:
        """The page's generated part as it is in the file."""
        text = (docs / self.path).read_text()
        start, stop = _bounds(text, self.begin, self.end)
        return text[start:stop]


PAGES = (
    Page("configuration.md", BEGIN, END, render),
    Page("metrics.md", metric_reference.BEGIN, metric_reference.END, metric_reference.render),
)


def _bounds(text: str, begin: str, end: str) -> tuple[int, int]:
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"expected the markers {begin} and, after it, {end}: not found")
    return start, stop + len(end)


def splice(text: str, begin: str, end: str, generated: str) -> str:
    """``text`` with what lies between ``begin`` and ``end`` (included) replaced."""
    start, stop = _bounds(text, begin, end)
    return text[:start] + generated + text[stop:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lbstack.reference", description="Regenerate the docs' reference tables."
    )
    parser.add_argument("--docs", type=Path, default=Path("docs"), help="the docs directory")
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if a page is stale"
    )
    args = parser.parse_args(argv)
    stale = []
    for page in PAGES:
        path = args.docs / page.path
        text = path.read_text()
        new = splice(text, page.begin, page.end, page.render())
        if new == text:
            continue
        stale.append(str(path))
        if not args.check:
            path.write_text(new)
    verb = "stale" if args.check else "rewritten"
    print(f"{verb}: {', '.join(stale)}" if stale else "every reference page is current")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
