"""The pylon source against the Basler camera emulator (PYLON_CAMEMU), through the real pylon SDK."""

from __future__ import annotations

import os
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from station.errors import ConfigError
from station.sources.settings import PylonSourceConfig
from tests.conftest import free_endpoint, run_station
from tests.stationproc import StationProcess

pytest.importorskip("pypylon", reason="the pylon source needs the camera extra: pip install 'station[camera]'")

EMU = {"PYLON_CAMEMU": "1"}


@pytest.fixture(scope="module")
def camera_images(eval_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the emulated camera shows: the labelled set, flattened (the emulator cycles through a folder)."""
    folder = tmp_path_factory.mktemp("camemu")
    for cls in sorted(eval_root.iterdir()):
        for img in sorted(cls.iterdir()):
            shutil.copy(img, folder / f"{cls.name}_{img.name}")
    return folder


@pytest.fixture()
def emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("PYLON_CAMEMU", "1")
    yield


def _source(images: Path, **extra: Any) -> dict[str, Any]:
    return {"kind": "pylon", "image_folder": str(images), "width": 900, "height": 900,
            "pixel_format": "BayerRG8", "exposure_us": 2000, "trigger": "software",
            "software_trigger_hz": 20, **extra}


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    raise AssertionError(f"{name} not in the scraped metrics")


def test_sigterm_on_emulated_camera_gives_one_verdict_per_captured_frame(
        bundle: Path, camera_images: Path, tmp_path: Path) -> None:
    """The issue's done-when: `station run` on the emulated Basler camera, a subscriber, SIGTERM."""
    metrics_port = free_endpoint().rsplit(":", 1)[1]
    station = StationProcess(tmp_path, {"model": str(bundle), "source": _source(camera_images),
                                        "metrics": {"listen": f"127.0.0.1:{metrics_port}"}}, env=EMU)
    try:
        station.wait_verdicts(15)
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        rc, stopped, err = station.terminate()
        verdicts = list(station.verdicts)
    finally:
        station.close()
    assert rc == 0, err
    c = stopped["counters"]
    assert c["captured"] == c["published"] == len(verdicts) >= 15
    assert [v["seq"] for v in verdicts] == list(range(len(verdicts)))
    frame_ids = [v["frame_id"] for v in verdicts]
    assert len(set(frame_ids)) == len(frame_ids) and all(f.startswith("0815-0000/") for f in frame_ids)
    assert all(v["source"] == "pylon:0815-0000" for v in verdicts)
    # The Bayer frames were demosaiced into bottles the models could read.
    assert all(v["class"] is not None for v in verdicts), [v["reasons"] for v in verdicts if v["class"] is None]
    assert stopped["camera"]["state"] == "connected" and stopped["camera"]["connects"] == 1
    # Prometheus, scraped over HTTP while running.
    assert _metric(scraped, 'station_camera_state{state="connected"}') == 1.0
    assert _metric(scraped, 'station_state{state="running"}') == 1.0
    assert _metric(scraped, 'station_frames_total{outcome="captured"}') >= 1
    assert _metric(scraped, 'station_stage_latency_seconds_count{stage="autoencoder"}') >= 1
    assert 'station_stage_latency_seconds_bucket{le="0.05",stage="autoencoder"}' in scraped


def test_latest_image_only_turns_dropped_frames_into_skipped_frames(camera_images: Path, emulator: None) -> None:
    """pylon drops frames a slow consumer missed; each one still becomes a frame, marked camera_skipped."""
    from station.sources.camera import CameraSource
    from station.sources.pylon import PylonCamera

    config = PylonSourceConfig.model_validate(
        _source(camera_images, trigger="free_run", pixel_format="BGR8Packed", grab_strategy="latest_image_only"))
    source = CameraSource(PylonCamera(config))
    stop = threading.Event()
    frames = source.frames(stop)
    first = next(frames)
    assert first.image is not None
    # Be a slow consumer: let the camera deliver several frames before taking the next one.
    grabber = source.driver._camera.GetStreamGrabberNodeMap().GetNode("Statistic_Total_Buffer_Count")
    delivered = grabber.Value
    while grabber.Value < delivered + 4:
        stop.wait(0.005)
    batch = [next(frames)]
    while batch[-1].skip_reason is not None:
        batch.append(next(frames))
    stop.set()
    frames.close()
    skipped = [f for f in batch if f.skip_reason == "camera_skipped"]
    assert len(skipped) >= 3 and all(f.image is None for f in skipped)
    assert batch[-1].image is not None and batch[-1].skip_reason is None
    # the delivered frames carry pylon's block id and timestamp, published as the verdict's trigger
    for f in (first, batch[-1]):
        assert f.trigger is not None and f.trigger.block_id == int(f.frame_id.split("/")[1])
    # Block ids are consecutive: pylon's skipped count named exactly the frames that were dropped.
    blocks = [int(f.frame_id.split("/")[1]) for f in [first, *batch]]
    assert blocks == list(range(blocks[0], blocks[0] + len(blocks)))
    assert [f.seq for f in [first, *batch]] == list(range(len(batch) + 1))
    assert source.health_snapshot()["camera_skipped"] == len(skipped)


def test_absent_camera_is_degraded_not_fatal(bundle: Path, tmp_path: Path) -> None:
    source = {"kind": "pylon", "serial": "40000001", "reconnect_max_s": 0.2}
    station = StationProcess(tmp_path, {"model": str(bundle), "source": source}, env=EMU)
    try:
        beat = station.wait_heartbeat(lambda h: h["state"] == "degraded")
        rc, stopped, err = station.terminate()
    finally:
        station.close()
    assert rc == 0, err
    assert beat["camera"]["state"] == "disconnected"
    assert "40000001" in beat["camera"]["last_error"]
    assert stopped["counters"]["captured"] == stopped["counters"]["published"] == 0
    assert "camera_unavailable" in err


def test_a_pixel_format_the_camera_lacks_is_a_config_error(bundle: Path, tmp_path: Path) -> None:
    config = tmp_path / "station.yaml"
    config.write_text(f"station_id: cam1\nmodel: {bundle}\n"
                      "source: {kind: pylon, pixel_format: YUV422Packed}\n"
                      f"publish: {{endpoint: '{free_endpoint()}'}}\n")
    proc = run_station("run", "--config", str(config), env=EMU, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "source.pixel_format" in proc.stderr and "BayerRG8" in proc.stderr  # names what the camera offers


def test_both_sfnc_generations_and_failed_grabs(camera_images: Path, emulator: None) -> None:
    from station.sources.pylon import PylonCamera

    cam = PylonCamera(PylonSourceConfig.model_validate(_source(camera_images, trigger="free_run")))
    cam.open()
    try:
        nodemap = cam._camera.GetNodeMap()
        # A pre-SFNC-2 camera has only ExposureTimeAbs: the fallback name is used.
        cam._set("exposure_us", 3500.0, "ExposureTimeDoesNotExist", "ExposureTimeAbs")
        assert nodemap.GetNode("ExposureTimeAbs").Value == 3500.0
        with pytest.raises(ConfigError, match=r"source.gain_db: .* none of the features GainDb, GainX"):
            cam._set("gain_db", 1.0, "GainDb", "GainX")
        grab = cam.grab()
        assert grab is not None and grab.image is not None and grab.image.shape == (900, 900, 3)
        # The emulator can fail a buffer on demand: that frame becomes an error, not a gap.
        nodemap.GetNode("ForceFailedBufferCount").Value = 1
        nodemap.GetNode("ForceFailedBuffer").Execute()
        errors = []
        for _ in range(20):
            g = cam.grab()
            if g is not None and g.error is not None:
                errors.append(g.error)
                break
        assert errors and errors[0].reason == "grab_failed"
    finally:
        cam.close()
    assert os.environ["PYLON_CAMEMU"] == "1"


def test_hardware_trigger_waits_quietly_for_the_line(camera_images: Path, emulator: None) -> None:
    """The emulator cannot drive Line1; what can be checked: it is armed, and no trigger is no frame, no fault."""
    from station.sources.pylon import PylonCamera

    cam = PylonCamera(PylonSourceConfig.model_validate(
        _source(camera_images, trigger="line1", trigger_activation="falling_edge", grab_timeout_ms=50)))
    cam.open()
    try:
        nodemap = cam._camera.GetNodeMap()
        assert nodemap.GetNode("TriggerMode").Value == "On"
        assert nodemap.GetNode("TriggerSource").Value == "Line1"
        assert nodemap.GetNode("TriggerActivation").Value == "FallingEdge"
        assert [cam.grab() for _ in range(3)] == [None, None, None]
    finally:
        cam.close()
