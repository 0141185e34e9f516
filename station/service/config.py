"""station.yaml: the configuration of `station run`, validated by pydantic.

Every error names the key that is wrong (``source.path: required key is missing``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from station.core.defect_rule import DefectRule
from station.core.parallelism import Threads, Workers
from station.core.validation import load_yaml_model
from station.errors import ConfigError

# The source settings live with the sources; re-exported, as station.yaml's model is read from here.
from station.sources.settings import SOURCE_KINDS as SOURCE_KINDS
from station.sources.settings import FolderSourceConfig as FolderSourceConfig
from station.sources.settings import OpenCvSourceConfig as OpenCvSourceConfig
from station.sources.settings import PylonSourceConfig as PylonSourceConfig
from station.sources.settings import SourceConfig as SourceConfig
from station.sources.uri import classify

_STATION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MetricsConfig(_Strict):
    #: host:port for the Prometheus scrape endpoint; null turns metrics off
    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[^:\s]*:\d{1,5}$", v):
            raise ValueError("must be host:port, e.g. 0.0.0.0:9108 (or null to turn metrics off)")
        return v


class ArchiveConfig(_Strict):
    #: folder for images of rejected bottles; null turns the archive off
    path: Path | None = None
    max_count: int = Field(default=10_000, ge=1)
    max_bytes: int = Field(default=2_000_000_000, ge=1_000_000)
    max_age_days: float = Field(default=30.0, gt=0)
    #: stop archiving (never the inspection) when the filesystem has less free space than this
    min_free_bytes: int = Field(default=1_000_000_000, ge=0)
    queue_size: int = Field(default=64, ge=1, le=10_000)


class CurveConfig(_Strict):
    #: the station's secret key file (station keys generate → NAME.key_secret)
    secret_key: Path
    #: folder of the public key files (NAME.key) of the subscribers allowed to connect
    allowed_clients: Path


class PublishConfig(_Strict):
    endpoint: str = "tcp://127.0.0.1:5556"
    #: CURVE encryption with an allow-list of client keys; null: plain (keep the endpoint on 127.0.0.1 then)
    curve: CurveConfig | None = None
    heartbeat_interval_s: float = Field(default=1.0, gt=0, le=60)
    #: hold the first frame until this many verdict subscribers are connected (a bounded wait: a line
    #: must run even when a bridge is down, so after wait_timeout_s the station starts anyway, with a warning)
    wait_subscribers: int = Field(default=0, ge=0, le=1000)
    wait_timeout_s: float = Field(default=30.0, gt=0, le=3600)

    @field_validator("endpoint")
    @classmethod
    def _zmq_endpoint(cls, v: str) -> str:
        if not re.match(r"^(tcp|ipc|inproc)://.+", v):
            raise ValueError("must be a ZeroMQ endpoint such as tcp://0.0.0.0:5556 or ipc:///run/station.sock")
        return v


class DecisionConfig(_Strict):
    class_confidence: float | None = Field(default=None, gt=0, le=1)
    anomaly_threshold: float | None = None
    #: the anomaly score the classifier alone needs to fail a bottle (None: the bundle's; 0: none)
    classifier_min_anomaly: float | None = Field(default=None, ge=0)
    #: what fails a bottle by its class: top_class or defect_sum (None: the bundle's; station/core/decide.py)
    defect_rule: DefectRule | None = None


class InferenceConfig(_Strict):
    #: auto: TensorRT where a CUDA GPU, pycuda and TensorRT are present, else ONNX Runtime on the CPU
    backend: Literal["auto", "onnxruntime", "tensorrt"] = "auto"
    #: the models' precision on either backend: auto (the measured best per backend and model, where the
    #: bundle has its file: docs/performance.md), fp32, fp16, int8 (files made by station export), or
    #: per model, e.g. {classifier: fp32, autoencoder: int8}; a model not named runs fp32
    precision: Literal["auto", "fp32", "fp16", "int8"] | dict[str, Literal["fp32", "fp16", "int8"]] = "auto"
    #: TensorRT: build missing or out-of-date engines at start (minutes); false refuses to start without them
    build_engines: bool = True
    #: inspection workers; 0: one per usable core (station/core/parallelism.py says why)
    workers: Workers = 0
    #: intra-op threads of each model session; 0: the cores shared out among the workers
    threads: Threads = 0
    queue_size: int = Field(default=8, ge=1, le=10_000)

    @field_validator("precision")
    @classmethod
    def _known_models(cls, v: str | dict[str, str]) -> str | dict[str, str]:
        unknown = sorted(set(v) - {"classifier", "autoencoder"}) if isinstance(v, dict) else []
        if unknown:
            raise ValueError(f"unknown model {', '.join(unknown)}; the models are classifier and autoencoder")
        return v


class OutputConfig(_Strict):
    jsonl: Path | None = None


class DriftConfig(_Strict):
    """Drift watch (station/core/drift.py, docs/service.md): the line compared with the bundle's training data."""

    enabled: bool = True
    #: bottles per rolling window; the bounds widen for a shorter one (its median is less certain)
    window: int = Field(default=200, ge=20, le=100_000)


class StationConfig(_Strict):
    station_id: str
    model: Path
    source: SourceConfig
    publish: PublishConfig = PublishConfig()
    metrics: MetricsConfig = MetricsConfig()
    archive: ArchiveConfig = ArchiveConfig()
    inference: InferenceConfig = InferenceConfig()
    decision: DecisionConfig = DecisionConfig()
    output: OutputConfig = OutputConfig()
    drift: DriftConfig = DriftConfig()
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("source", mode="before")
    @classmethod
    def _folder_by_default(cls, v: object) -> object:
        # A source without ``kind`` is a watched folder, as before cameras were supported.
        if isinstance(v, dict) and "kind" not in v:
            return {**v, "kind": "folder"}
        return v

    @field_validator("station_id")
    @classmethod
    def _topic_safe(cls, v: str) -> str:
        if not _STATION_ID.match(v):
            raise ValueError("use letters, digits, '_', '-' and '.', starting with a letter or digit")
        return v


def load_config(path: Path) -> StationConfig:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    config = load_yaml_model(path, StationConfig, ConfigError, SOURCE_KINDS)
    base = path.parent
    # Relative paths in a config file mean relative to that file, not to the cwd of systemd.
    config.model = (base / config.model) if not config.model.is_absolute() else config.model
    src = config.source
    if isinstance(src, FolderSourceConfig) and not src.path.is_absolute():
        src.path = base / src.path
    if isinstance(src, PylonSourceConfig) and src.image_folder is not None and not src.image_folder.is_absolute():
        src.image_folder = base / src.image_folder
    if isinstance(src, OpenCvSourceConfig) and _is_relative_file(src.uri):
        src.uri = str(base / src.uri)
    curve = config.publish.curve
    if curve is not None:
        curve.secret_key = curve.secret_key if curve.secret_key.is_absolute() else base / curve.secret_key
        if not curve.allowed_clients.is_absolute():
            curve.allowed_clients = base / curve.allowed_clients
    if config.archive.path is not None and not config.archive.path.is_absolute():
        config.archive.path = base / config.archive.path
    if config.output.jsonl is not None and not config.output.jsonl.is_absolute():
        config.output.jsonl = base / config.output.jsonl
    return config


def _is_relative_file(uri: str) -> bool:
    return classify(uri) == "file" and not Path(uri).is_absolute()
