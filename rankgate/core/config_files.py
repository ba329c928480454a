"""YAML file -> pydantic model, with errors that cite the file and the field."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from rankgate.core.errors import ConfigError

Model = TypeVar("Model", bound=BaseModel)


class Strict(BaseModel):
    """Base of every typed file and config section: an unknown field is an error (a
    typo never goes unnoticed), and a loaded value cannot be changed in place."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


MAX_ERRORS_SHOWN = 5
"""Validation errors a message names one by one (the rest are counted)."""


def validation_message(source: str, exc: ValidationError) -> str:
    """Every failing field (up to MAX_ERRORS_SHOWN) with what is wrong with it."""
    parts = []
    for error in exc.errors()[:MAX_ERRORS_SHOWN]:
        where = ".".join(str(p) for p in error["loc"]) or "(top level)"
        parts.append(f"field {where!r}: {error['msg']}")
    hidden = exc.error_count() - MAX_ERRORS_SHOWN
    more = f" (and {hidden} more)" if hidden > 0 else ""
    return f"{source}: " + "; ".join(parts) + more


def read_config_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc


def parse_yaml_model(content: bytes, source: Path, model: type[Model]) -> Model:
    """`content` (read from `source`) as `model`; errors cite `source` and the field."""
    try:
        raw = yaml.safe_load(content)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    try:
        return model.model_validate(raw if raw is not None else {})
    except ValidationError as exc:
        raise ConfigError(validation_message(str(source), exc)) from exc


def load_yaml_model(path: Path, model: type[Model]) -> Model:
    return parse_yaml_model(read_config_bytes(path), path, model)
