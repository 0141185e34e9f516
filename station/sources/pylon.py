"""Basler / GenICam cameras through pypylon (the ``camera`` extra).

Feature names differ between camera generations: SFNC 2 cameras (ace 2, and
the pylon emulator's newer nodes) say ``ExposureTime``, ``Gain`` and
``AcquisitionFrameRate``; older ones (ace GigE, the emulator's legacy nodes)
say ``ExposureTimeAbs``, ``GainAbs``/``GainRaw`` and
``AcquisitionFrameRateAbs``. Each setting tries the SFNC 2 name first, then
the older one, and says which it used in the log.

Every pixel format the camera offers (mono, Bayer, RGB/BGR, 10/12/16 bit) is
converted to BGR8 by pylon's own ImageFormatConverter, which demosaics Bayer
patterns and scales deep pixels the same way pylon Viewer shows them.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import structlog

from station.core.frame import Trigger
from station.errors import ConfigError, FrameError, MissingDependencyError, SourceError
from station.sources.camera import REASON_GRAB_FAILED, CameraLost, Grab
from station.sources.settings import PylonSourceConfig

log = structlog.get_logger("station.pylon")

_TRIGGER_SOURCES = {"software": "Software", "line1": "Line1", "line2": "Line2", "line3": "Line3", "line4": "Line4"}
_ACTIVATION = {"rising_edge": "RisingEdge", "falling_edge": "FallingEdge"}


def _import_pylon() -> tuple[Any, Any]:
    try:
        from pypylon import genicam, pylon
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise MissingDependencyError(
            "source.kind pylon needs pypylon: pip install 'station[camera]'") from exc
    return pylon, genicam


def _describe(exc: BaseException) -> str:
    """pylon's message without the C++ file and line it was thrown from."""
    return str(exc).split(" : ", 1)[0].strip()


class PylonCamera:
    """One Basler camera, opened by serial number (or the first one found)."""

    def __init__(self, config: PylonSourceConfig) -> None:
        self.config = config
        self.pylon, self.genicam = _import_pylon()
        self.name = f"pylon:{config.serial or 'first'}"
        self.finite = False
        self._camera: Any = None
        self._converter: Any = None
        self._serial = config.serial or "?"
        self._next_trigger = 0.0

    # -- features -----------------------------------------------------------

    def _node(self, *names: str) -> tuple[str, Any] | None:
        nodemap = self._camera.GetNodeMap()
        for name in names:
            node = nodemap.GetNode(name)
            if self.genicam.IsAvailable(node):
                return name, node
        return None

    def _set(self, key: str, value: Any, *names: str) -> None:
        """Write ``value`` to the first of ``names`` the camera has; the config key names the failure."""
        found = self._node(*names)
        if found is None:
            raise ConfigError(f"source.{key}: camera {self._serial} has none of the features {', '.join(names)}")
        name, node = found
        if not self.genicam.IsWritable(node):
            raise ConfigError(f"source.{key}: feature {name} of camera {self._serial} is not writable now")
        try:
            node.Value = value
        except self.genicam.GenericException as exc:
            allowed = ""
            if hasattr(node, "Symbolics"):
                allowed = f" (the camera offers: {', '.join(node.Symbolics)})"
            elif hasattr(node, "GetMin"):
                allowed = f" (range {node.GetMin()}..{node.GetMax()})"
            raise ConfigError(f"source.{key}: camera {self._serial} refused {name}={value!r}{allowed}") from exc
        log.debug("camera_feature_set", feature=name, value=value)

    def _set_if_present(self, value: Any, name: str) -> None:
        found = self._node(name)
        if found is not None and self.genicam.IsWritable(found[1]):
            found[1].Value = value

    def _configure(self) -> None:
        c = self.config
        if c.image_folder is not None:
            # The emulator's test-image source; a real camera has no such feature.
            self._set("image_folder", "Off", "TestImageSelector")
            self._set("image_folder", str(c.image_folder), "ImageFilename")
            self._set("image_folder", "On", "ImageFileMode")
        if c.width is not None:
            self._set("width", c.width, "Width")
        if c.height is not None:
            self._set("height", c.height, "Height")
        if c.pixel_format is not None:
            self._set("pixel_format", c.pixel_format, "PixelFormat")
        if c.exposure_us is not None:
            self._set_if_present("Off", "ExposureAuto")
            self._set("exposure_us", c.exposure_us, "ExposureTime", "ExposureTimeAbs")
        if c.gain_db is not None:
            self._set_if_present("Off", "GainAuto")
            self._set("gain_db", c.gain_db, "Gain", "GainAbs")
        if c.gain_raw is not None:
            self._set_if_present("Off", "GainAuto")
            self._set("gain_raw", c.gain_raw, "GainRaw")
        self._set_if_present("FrameStart", "TriggerSelector")
        if c.trigger == "free_run":
            self._set("trigger", "Off", "TriggerMode")
            if c.frame_rate_hz is not None:
                self._set_if_present(True, "AcquisitionFrameRateEnable")
                self._set("frame_rate_hz", c.frame_rate_hz, "AcquisitionFrameRate", "AcquisitionFrameRateAbs")
        else:
            self._set("trigger", "On", "TriggerMode")
            self._set("trigger", _TRIGGER_SOURCES[c.trigger], "TriggerSource")
            if c.trigger != "software":
                self._set("trigger_activation", _ACTIVATION[c.trigger_activation], "TriggerActivation")
        self._set_if_present(c.buffers, "MaxNumBuffer")

    # -- CameraDriver -------------------------------------------------------

    def open(self) -> None:
        pylon, genicam = self.pylon, self.genicam
        factory = pylon.TlFactory.GetInstance()
        try:
            if self.config.serial:
                info = pylon.DeviceInfo()
                info.SetSerialNumber(self.config.serial)
                device = factory.CreateDevice(info)
            else:
                devices = factory.EnumerateDevices()
                if not devices:
                    raise SourceError("no Basler camera found (check cabling, power and the pylon transport layer)")
                device = factory.CreateDevice(devices[0])
            camera = pylon.InstantCamera(device)
            camera.Open()
        except genicam.GenericException as exc:
            wanted = f"serial {self.config.serial}" if self.config.serial else "any camera"
            raise SourceError(f"cannot open Basler camera ({wanted}): {_describe(exc)}") from exc
        self._camera = camera
        self._serial = camera.GetDeviceInfo().GetSerialNumber()
        self.name = f"pylon:{self._serial}"
        try:
            self._configure()
            converter = pylon.ImageFormatConverter()
            converter.OutputPixelFormat = pylon.PixelType_BGR8packed
            converter.OutputBitAlignment.Value = "MsbAligned"
            self._converter = converter
            strategy = (pylon.GrabStrategy_LatestImageOnly if self.config.grab_strategy == "latest_image_only"
                        else pylon.GrabStrategy_OneByOne)
            camera.StartGrabbing(strategy)
        except ConfigError:
            self.close()
            raise
        except genicam.GenericException as exc:
            self.close()
            raise SourceError(f"camera {self._serial}: cannot start grabbing: {_describe(exc)}") from exc
        self._next_trigger = time.monotonic()
        log.info("pylon_open", serial=self._serial, model=camera.GetDeviceInfo().GetModelName(),
                 trigger=self.config.trigger, grab_strategy=self.config.grab_strategy)

    def _software_trigger(self, timeout_ms: int) -> None:
        # Paced here because a software-triggered station has no line signal to wait for.
        delay = self._next_trigger - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self._next_trigger = max(self._next_trigger + 1.0 / self.config.software_trigger_hz, time.monotonic())
        if self._camera.WaitForFrameTriggerReady(timeout_ms, self.pylon.TimeoutHandling_Return):
            self._camera.ExecuteSoftwareTrigger()

    def grab(self) -> Grab | None:
        camera, pylon, genicam = self._camera, self.pylon, self.genicam
        timeout_ms = self.config.grab_timeout_ms
        try:
            if self.config.trigger == "software":
                self._software_trigger(timeout_ms)
            result = camera.RetrieveResult(timeout_ms, pylon.TimeoutHandling_Return)
        except genicam.GenericException as exc:
            raise CameraLost(f"camera {self._serial}: {_describe(exc)}") from exc
        if not result.IsValid():
            if camera.IsCameraDeviceRemoved() or not camera.IsGrabbing():
                raise CameraLost(f"camera {self._serial} was removed")
            return None  # no trigger within the timeout: an idle line, not a fault
        try:
            block = int(result.BlockID)
            skipped = int(result.GetNumberOfSkippedImages())
            grab = Grab(
                frame_id=f"{self._serial}/{block}",
                skipped_ids=[f"{self._serial}/{block - skipped + k}" for k in range(skipped)],
                trigger=Trigger(block_id=block, camera_timestamp=int(result.TimeStamp)),
            )
            if result.GrabSucceeded():
                grab.image = self._converter.Convert(result).GetArray().copy()
            else:
                grab.error = FrameError(REASON_GRAB_FAILED,
                                        f"camera {self._serial}: {result.GetErrorDescription()} "
                                        f"(code {result.GetErrorCode():#x})")
            return grab
        finally:
            result.Release()

    def close(self) -> None:
        camera, self._camera = self._camera, None
        if camera is None:
            return
        for step in (camera.StopGrabbing, camera.Close, camera.DestroyDevice):
            # Closing a vanished camera must not fail the reconnect.
            with contextlib.suppress(self.genicam.GenericException):
                step()
