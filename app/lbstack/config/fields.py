"""The value types config sections are made of: durations, sizes, addresses; and the
base every section derives from."""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer
from pydantic_core import PydanticCustomError

from lbstack.address import Address, parse_address

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# The unit is optional (seconds), so "0.05" from a command line means what 0.05 does.
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ns|us|µs|ms|s|m|h)?\s*$")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a string like ``250ms``, ``2s``, ``1.5m``."""
    if isinstance(value, bool):
        raise PydanticCustomError("duration", 'expected a duration like "250ms" or "2s"')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION_RE.match(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    else:
        raise PydanticCustomError(
            "duration", 'expected a duration like "250ms", "2s" or a number of seconds'
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise PydanticCustomError("duration", "expected a non-negative, finite duration")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from an integer or a string like ``64KiB``, ``1GiB``."""
    if isinstance(value, bool):
        raise PydanticCustomError("size", 'expected a size like "64KiB" or a number of bytes')
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and (match := _SIZE_RE.match(value)):
        unit = match.group(2).lower()
        if unit in _SIZE_UNITS:
            return int(match.group(1)) * _SIZE_UNITS[unit]
    raise PydanticCustomError("size", 'expected a size like "64KiB", "1GiB" or a byte count')


def _address(value: object) -> Address:
    if isinstance(value, Address):
        return value
    if not isinstance(value, str):
        raise PydanticCustomError(
            "address", "expected 'unix:/path', 'tcp://host:port' or 'https://host:port'"
        )
    try:
        return parse_address(value)
    except ValueError as exc:
        raise PydanticCustomError("address", str(exc)) from exc


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
AddressField = Annotated[Address, BeforeValidator(_address), PlainSerializer(str, return_type=str)]


class Model(BaseModel):
    """Base of every config section: immutable, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")
