"""Settings in (a TOML file, command-line overrides, a child's JSON), a ``Config`` or
every problem out."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lbstack import tls
from lbstack.config.network import check_token_file
from lbstack.config.stack import Config
from lbstack.errors import ConfigError


def _describe(errors: ValidationError, prefix: str = "") -> list[str]:
    problems = []
    for error in errors.errors(include_url=False):
        path = ".".join(str(part) for part in error["loc"]) or "(top level)"
        found = error.get("input")
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            problems.append(f"{prefix}{path}: unknown field (expected one of the documented keys)")
            continue
        if error["type"] == "missing":
            problems.append(f"{prefix}{path}: required field is missing")
            continue
        if not error["loc"] and "found" in message:
            # A whole-model check: its message names the field and what it found.
            problems.append(f"{prefix}{message}")
            continue
        message = message[0].lower() + message[1:] if message else message
        if "expected" not in message:
            message = f"expected: {message}"
        if "found" not in message:
            shown = f"a {type(found).__name__}" if isinstance(found, dict | list) else repr(found)
            message = f"{message}; found {shown}"
        problems.append(f"{prefix}{path}: {message}")
    return problems


def validate(data: Mapping[str, Any], source: str = "") -> Config:
    """Validate raw settings into a Config, or raise ConfigError listing every problem.

    The files it names (certificates, keys, CAs, the admin token) are checked too: they must be
    usable now. (A child validates only the model again: see ``from_json``.)
    """
    prefix = f"{source}: " if source else ""
    try:
        config = Config.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, prefix)) from exc
    problems = tls.problems(config)
    if config.admin.token_file is not None:
        token_problem = check_token_file(config.admin.token_file)
        problems += [token_problem] if token_problem else []
    if problems:
        raise ConfigError([prefix + p for p in problems])
    return config


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError as exc:
        raise ConfigError([f"{path}: no such config file"]) from exc
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from exc


def load(path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load the TOML file (if any), apply CLI overrides on top, validate once."""
    data: dict[str, Any] = read_toml(path) if path is not None else {}
    for dotted, value in (overrides or {}).items():
        target = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return validate(data, str(path) if path is not None else "")


def from_json(text: str) -> Config:
    """The config a child receives from its supervisor."""
    return Config.model_validate_json(text)
