"""OpenCV capture: a V4L2 device, an RTSP/HTTP stream, a GStreamer pipeline or a video file.

Live captures queue frames inside the driver (V4L2 keeps 4 buffers, FFmpeg
buffers the network stream, GStreamer's appsink is unbounded by default), so
an inspection that takes longer than a frame period would be handed ever older
frames. ``CAP_PROP_BUFFERSIZE`` is ignored by most backends; what works
everywhere is a reader thread that reads as fast as the camera delivers and
keeps only the newest frame. Frames it overwrites before inspection took them
are counted and become ``skipped`` verdicts (reason ``camera_skipped``).

A video file is read in order, every frame, and ends the run at its end.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any

import cv2
import numpy as np
import structlog

from station.errors import ConfigError, SourceError
from station.sources.camera import CameraLost, Grab, SourceEnded
from station.sources.settings import OpenCvSourceConfig
from station.sources.uri import classify

log = structlog.get_logger("station.opencv")

_BACKENDS = {"auto": cv2.CAP_ANY, "v4l2": cv2.CAP_V4L2, "ffmpeg": cv2.CAP_FFMPEG, "gstreamer": cv2.CAP_GSTREAMER}
#: FFmpeg options for a live network stream: no input buffering, a short probe (the default waits
#: 5 s of stream before the first frame), TCP for RTSP so a lost packet is not a torn frame.
LOW_DELAY_FFMPEG_OPTIONS = "rtsp_transport;tcp|fflags;nobuffer|flags;low_delay|analyzeduration;200000|probesize;65536"


def gstreamer_pipeline(pipeline: str) -> str:
    """Make the pipeline's appsink keep one buffer and drop the rest, unless the user chose otherwise."""
    if "appsink" not in pipeline:
        raise ConfigError("source.uri: a GStreamer pipeline must end in an appsink")
    if not re.search(r"\bdrop\s*=", pipeline):
        pipeline = re.sub(r"\bappsink\b", "appsink drop=true max-buffers=1 sync=false", pipeline, count=1)
    return pipeline


class OpenCvCamera:
    def __init__(self, config: OpenCvSourceConfig) -> None:
        self.config = config
        self.kind = classify(config.uri)
        self.finite = self.kind == "file"
        self.latest_only = config.latest_only if config.latest_only is not None else not self.finite
        self.name = f"opencv:{config.uri}"
        if self.kind == "gstreamer" and not cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
            raise ConfigError("source.uri is a GStreamer pipeline, but this OpenCV build has no GStreamer backend "
                              "(opencv-python wheels do not; use a distribution OpenCV built with GStreamer)")
        self._cap: Any = None
        self._index = 0
        self._reader: threading.Thread | None = None
        self._cond = threading.Condition()
        self._newest: tuple[int, np.ndarray] | None = None
        self._dropped: list[int] = []
        self._failure: str | None = None
        self._closing = False

    def _target(self) -> tuple[Any, int]:
        uri = self.config.uri
        api = _BACKENDS[self.config.backend]
        if self.kind == "device":
            return (int(uri) if uri.isdigit() else uri), (api if self.config.backend != "auto" else cv2.CAP_V4L2)
        if self.kind == "gstreamer":
            return gstreamer_pipeline(uri), cv2.CAP_GSTREAMER
        if self.kind == "stream" and "OPENCV_FFMPEG_CAPTURE_OPTIONS" not in os.environ:
            # Read by OpenCV at each open; an operator's own setting wins.
            os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = LOW_DELAY_FFMPEG_OPTIONS
        return uri, api

    def open(self) -> None:
        c = self.config
        if self.kind == "file" and not os.path.isfile(c.uri):
            raise ConfigError(f"source.uri: video file {c.uri} does not exist")
        target, api = self._target()
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, c.open_timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, c.read_timeout_ms]
        cap = cv2.VideoCapture(target, api, params)
        if not cap.isOpened():
            cap.release()
            if self.kind == "file":
                raise ConfigError(f"source.uri: OpenCV cannot decode video file {c.uri}")
            raise SourceError(f"cannot open {self.kind} {c.uri}")
        if self.kind == "device":
            if c.fourcc:
                cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*c.fourcc))
            if c.width:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, c.width)
            if c.height:
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, c.height)
            if c.fps:
                cap.set(cv2.CAP_PROP_FPS, c.fps)
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # honoured by some V4L2 drivers; the reader thread covers the rest
        self._cap = cap
        self._index = 0
        self._failure = None
        self._closing = False
        self._newest = None
        self._dropped = []
        if self.latest_only:
            self._reader = threading.Thread(target=self._read_loop, name="opencv-reader", daemon=True)
            self._reader.start()
        log.info("opencv_open", uri=c.uri, kind=self.kind, backend=cap.getBackendName(),
                 latest_only=self.latest_only, width=cap.get(cv2.CAP_PROP_FRAME_WIDTH),
                 height=cap.get(cv2.CAP_PROP_FRAME_HEIGHT))

    def _read_loop(self) -> None:
        cap = self._cap
        index = 0
        while not self._closing:
            ok, image = cap.read()
            with self._cond:
                if not ok:
                    self._failure = "end of stream" if self.finite else "stream stopped delivering frames"
                    self._cond.notify_all()
                    return
                if self._newest is not None:
                    self._dropped.append(self._newest[0])
                self._newest = (index, image)
                self._cond.notify_all()
            index += 1

    def _grab_id(self, index: int) -> str:
        return f"{self.config.uri}#{index}"

    def grab(self) -> Grab | None:
        if not self.latest_only:
            ok, image = self._cap.read()
            if not ok:
                if self.finite:
                    raise SourceEnded(f"end of video file {self.config.uri}")
                raise CameraLost(f"{self.config.uri}: stream stopped delivering frames")
            grab = Grab(frame_id=self._grab_id(self._index), image=image)
            self._index += 1
            return grab
        with self._cond:
            if self._newest is None and self._failure is None:
                self._cond.wait(self.config.read_timeout_ms / 1e3)
            if self._newest is None:
                if self._failure is not None:
                    if self.finite:
                        raise SourceEnded(f"end of {self.config.uri}")
                    raise CameraLost(f"{self.config.uri}: {self._failure}")
                return None
            index, image = self._newest
            dropped, self._newest, self._dropped = self._dropped, None, []
        return Grab(frame_id=self._grab_id(index), image=image,
                    skipped_ids=[self._grab_id(i) for i in dropped])

    def close(self) -> None:
        self._closing = True
        reader, self._reader = self._reader, None
        cap, self._cap = self._cap, None
        if reader is not None:
            reader.join(timeout=(self.config.read_timeout_ms / 1e3) + 1.0)
        if cap is not None:
            cap.release()
