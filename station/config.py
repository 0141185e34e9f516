"""station.yaml: the configuration of `station run`, validated by pydantic.

Every error names the key that is wrong (``source.path: required key is missing``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from station.errors import ConfigError
from station.validation import load_yaml_model

_STATION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FolderSourceConfig(_Strict):
    kind: Literal["folder"] = "folder"
    path: Path
    poll_interval_s: float = Field(default=0.2, gt=0, le=60)
    process_existing: bool = True


class PublishConfig(_Strict):
    endpoint: str = "tcp://127.0.0.1:5556"
    heartbeat_interval_s: float = Field(default=1.0, gt=0, le=60)

    @field_validator("endpoint")
    @classmethod
    def _zmq_endpoint(cls, v: str) -> str:
        if not re.match(r"^(tcp|ipc|inproc)://.+", v):
            raise ValueError("must be a ZeroMQ endpoint such as tcp://0.0.0.0:5556 or ipc:///run/station.sock")
        return v


class DecisionConfig(_Strict):
    class_confidence: float | None = Field(default=None, gt=0, le=1)
    anomaly_threshold: float | None = None


class InferenceConfig(_Strict):
    backend: Literal["onnxruntime"] = "onnxruntime"
    threads: int = Field(default=0, ge=0, le=256)
    queue_size: int = Field(default=8, ge=1, le=10_000)


class OutputConfig(_Strict):
    jsonl: Path | None = None


class StationConfig(_Strict):
    station_id: str
    model: Path
    source: FolderSourceConfig
    publish: PublishConfig = PublishConfig()
    inference: InferenceConfig = InferenceConfig()
    decision: DecisionConfig = DecisionConfig()
    output: OutputConfig = OutputConfig()
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("station_id")
    @classmethod
    def _topic_safe(cls, v: str) -> str:
        if not _STATION_ID.match(v):
            raise ValueError("use letters, digits, '_', '-' and '.', starting with a letter or digit")
        return v


def load_config(path: Path) -> StationConfig:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    config = load_yaml_model(path, StationConfig, ConfigError)
    base = path.parent
    # Relative paths in a config file mean relative to that file, not to the cwd of systemd.
    config.model = (base / config.model) if not config.model.is_absolute() else config.model
    if not config.source.path.is_absolute():
        config.source.path = base / config.source.path
    if config.output.jsonl is not None and not config.output.jsonl.is_absolute():
        config.output.jsonl = base / config.output.jsonl
    return config
