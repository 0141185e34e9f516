"""YAML files validated by pydantic, with errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from station.errors import StationError

M = TypeVar("M", bound=BaseModel)


def describe_validation_error(exc: ValidationError, union_tags: frozenset[str] = frozenset()) -> str:
    """One line per problem, each starting with the dotted key it concerns.

    ``union_tags``: the tags of discriminated unions, which pydantic puts in
    the location (``source.pylon.trigger``) but are not keys the user wrote.
    """
    lines = []
    for err in exc.errors():
        parts = [str(part) for i, part in enumerate(err["loc"]) if not (i > 0 and part in union_tags)]
        key = ".".join(parts) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (misspelt?)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{key}: {msg}")
    return "; ".join(lines)


def load_yaml_model(path: Path, model: type[M], error: type[StationError],
                    union_tags: frozenset[str] = frozenset()) -> M:
    """Read ``path`` as a YAML mapping and validate it; ``error`` names the file and the key."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot be read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise error(f"{path}: {describe_validation_error(exc, union_tags)}") from exc
