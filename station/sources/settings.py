"""The sources' settings: station.yaml's ``source`` section, validated by pydantic.

They live with the sources that read them (the drivers take them as they are); station/service/config.py
puts them into the whole configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FolderSourceConfig(_Strict):
    kind: Literal["folder"] = "folder"
    path: Path
    poll_interval_s: float = Field(default=0.2, gt=0, le=60)
    process_existing: bool = True
    #: seconds between full listings that catch files whose inotify events were dropped (0: never)
    rescan_s: float = Field(default=60.0, ge=0, le=86_400)
    #: inspection busy: ``wait`` (every file inspected) or ``skip`` (a ``skipped`` verdict, bounded latency)
    on_overload: Literal["wait", "skip"] = "wait"


class _CameraCommon(_Strict):
    #: Longest wait between reconnect attempts; a returning camera is back within this plus its open time.
    reconnect_max_s: float = Field(default=1.0, gt=0, le=60)


class PylonSourceConfig(_CameraCommon):
    kind: Literal["pylon"]
    serial: str | None = None  # None: the first camera found
    pixel_format: str | None = None  # e.g. Mono8, BayerRG8, BGR8Packed; None keeps the camera's
    exposure_us: float | None = Field(default=None, gt=0)
    gain_db: float | None = Field(default=None, ge=0)
    gain_raw: int | None = Field(default=None, ge=0)  # for cameras that only have GainRaw
    width: int | None = Field(default=None, gt=0)
    height: int | None = Field(default=None, gt=0)
    trigger: Literal["free_run", "software", "line1", "line2", "line3", "line4"] = "free_run"
    trigger_activation: Literal["rising_edge", "falling_edge"] = "rising_edge"
    software_trigger_hz: float = Field(default=5.0, gt=0, le=1000)
    frame_rate_hz: float | None = Field(default=None, gt=0)  # free-run only
    grab_strategy: Literal["one_by_one", "latest_image_only"] = "one_by_one"
    grab_timeout_ms: int = Field(default=1000, ge=10, le=60_000)
    buffers: int = Field(default=10, ge=1, le=1000)
    image_folder: Path | None = None  # the pylon camera emulator's ImageFilename (tests, demos)


class OpenCvSourceConfig(_CameraCommon):
    kind: Literal["opencv"]
    #: device index ("0"), V4L2 path, rtsp:// or http:// URL, GStreamer pipeline ending in appsink, or a video file
    uri: str = Field(min_length=1)
    backend: Literal["auto", "v4l2", "ffmpeg", "gstreamer"] = "auto"
    latest_only: bool | None = None  # None: newest-frame-only for live inputs, every frame for files
    width: int | None = Field(default=None, gt=0)
    height: int | None = Field(default=None, gt=0)
    fps: float | None = Field(default=None, gt=0)
    fourcc: str | None = Field(default=None, min_length=4, max_length=4)
    open_timeout_ms: int = Field(default=3000, ge=100, le=120_000)
    read_timeout_ms: int = Field(default=2000, ge=100, le=120_000)


SOURCE_KINDS = frozenset({"folder", "pylon", "opencv"})
SourceConfig = Annotated[
    FolderSourceConfig | PylonSourceConfig | OpenCvSourceConfig, Field(discriminator="kind")
]
