"""Server-wide steering settings: presets, the default spec, keys and limits.

Presets and the default spec are read from JSON or YAML files (or inline JSON for
`--default-steering`) and validated against the served model at start-up: a server with a
broken preset does not start, and the message names the preset and the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import invalid
from .experiments.definition import ExperimentDef, ExperimentFile
from .experiments.store import DEFAULT_DATABASE_URL

# A request's body: enough for a few full-model inline vectors (a 4096-wide model's 32
# layers as JSON text are ~3 MB), far below what would strain the server.
DEFAULT_MAX_BODY_BYTES = 16 << 20


class SettingsError(ValueError):
    pass


def read_structured(path: str | Path, what: str) -> Any:
    """A JSON or YAML file's content (YAML is a superset of JSON)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SettingsError(f"{what}: cannot read {p}: {e.strerror}") from None
    try:
        return json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise SettingsError(f"{what}: {p} is not valid JSON/YAML: {e}") from None


def load_presets(path: str | Path | None) -> dict[str, dict]:
    """`{name: spec}` from a presets file (a mapping of names to specs)."""
    if path is None:
        return {}
    data = read_structured(path, "--presets")
    if data is None:
        return {}
    if not isinstance(data, Mapping) or not all(isinstance(v, Mapping) for v in data.values()):
        raise SettingsError(f"--presets: {path} must map preset names to steering specs")
    presets = {str(k): dict(v) for k, v in data.items()}
    for name, spec in presets.items():
        if "preset" in spec:
            raise SettingsError(f"--presets: preset {name!r} names another preset; inline it")
    return presets


def load_default_spec(value: str | None) -> dict | None:
    """`--default-steering`: inline JSON (starts with `{`) or a JSON/YAML file."""
    if value is None:
        return None
    if value.lstrip().startswith("{"):
        try:
            data = json.loads(value)
        except json.JSONDecodeError as e:
            raise SettingsError(f"--default-steering: not valid JSON: {e}") from None
    else:
        data = read_structured(value, "--default-steering")
    if not isinstance(data, Mapping):
        raise SettingsError("--default-steering must be a steering spec (a JSON object)")
    if "default" in data:
        raise SettingsError("--default-steering: 'default' is a request field, not a spec field")
    return dict(data)


def load_experiments(path: str | Path | None) -> list[ExperimentDef]:
    """`--experiments`: a JSON/YAML list of experiment definitions (or `{experiments: [...]}`)."""
    if path is None:
        return []
    data = read_structured(path, "--experiments")
    if data is None:
        return []
    try:
        return ExperimentFile.model_validate(data).experiments
    except ValidationError as e:
        raise SettingsError(f"--experiments: {path}: {invalid(e).message}") from None


@dataclass
class ServerSettings:
    api_keys: list[str] = field(default_factory=list)
    admin_key: str | None = None
    presets_path: str | None = None
    presets: dict[str, dict] = field(default_factory=dict)
    default_spec: dict | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_inline_floats: int | None = None  # None: SpecContext's default
    experiments: list[ExperimentDef] = field(default_factory=list)
    database_url: str = DEFAULT_DATABASE_URL
