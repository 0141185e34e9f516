"""The OpenCV source on a real encoded video file and a real stream served by ffmpeg on 127.0.0.1."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest

from station.errors import ConfigError
from station.sources.opencv import gstreamer_pipeline
from station.sources.uri import classify
from tests.conftest import free_endpoint, run_station
from tests.stationproc import StationProcess


@pytest.fixture(scope="module")
def video(eval_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """An MPEG-4 file, one bottle per frame, and the class of each frame."""
    path = tmp_path_factory.mktemp("video") / "line.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), 10, (900, 900))
    assert writer.isOpened()
    labels = []
    for cls in sorted(eval_root.iterdir()):
        for img in sorted(cls.iterdir()):
            writer.write(cv2.imread(str(img)))
            labels.append(cls.name)
    writer.release()
    return path, labels


def _listening(port: int) -> bool:
    """Whether 127.0.0.1:port listens, or has already taken its one client (ffmpeg's ``-listen 1`` then
    closes the listening socket: a station reconnecting every 0.5 s can take it between two looks).
    Read from /proc so as not to take that one client ourselves."""
    needle = f"0100007F:{port:04X}"
    for table in ("/proc/net/tcp",):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] == needle and fields[3] in ("0A", "01"):  # 0A: LISTEN, 01: ESTABLISHED
                return True
    return False


class StreamServer:
    """ffmpeg (from imageio-ffmpeg) serving the video in a loop as an MPEG-TS stream over HTTP."""

    def __init__(self, video: Path, port: int) -> None:
        self.video = video
        self.port = port
        self.url = f"http://127.0.0.1:{port}/line.ts"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start serving; return the monotonic time at which the port accepts connections."""
        import imageio_ffmpeg

        self.proc = subprocess.Popen(
            [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-re", "-stream_loop", "-1",
             "-i", str(self.video), "-c:v", "mpeg2video", "-q:v", "3", "-g", "5", "-f", "mpegts",
             "-listen", "1", self.url],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not _listening(self.port):
            assert self.proc.poll() is None, "ffmpeg exited"
            assert time.monotonic() < deadline, "ffmpeg did not start listening"
            time.sleep(0.01)
        return time.monotonic()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture()
def stream(video: tuple[Path, list[str]]) -> Iterator[StreamServer]:
    pytest.importorskip("imageio_ffmpeg", reason="the stream test serves with imageio-ffmpeg's ffmpeg (dev extra)")
    server = StreamServer(video[0], int(free_endpoint().rsplit(":", 1)[1]))
    yield server
    server.stop()


def test_video_file_every_frame_in_order_then_the_run_ends(bundle: Path, video: tuple[Path, list[str]],
                                                           tmp_path: Path) -> None:
    path, labels = video
    station = StationProcess(tmp_path, {"model": str(bundle), "source": {"kind": "opencv", "uri": str(path)},
                                        "publish": {"wait_subscribers": 1},
                                        "archive": {"path": "rejects", "min_free_bytes": 0}})
    try:
        station.wait_heartbeat(lambda h: h["state"] == "stopped", timeout_s=120)
        station.proc.wait(timeout=60)
        verdicts = list(station.verdicts)
    finally:
        station.close()
    assert station.proc.returncode == 0
    assert [v["frame_id"] for v in verdicts] == [f"{path}#{i}" for i in range(len(labels))]
    assert all(v["class"] is not None for v in verdicts), "every decoded frame was inspected"
    assert not any(v["verdict"] == "skipped" for v in verdicts), "a file is never read newest-only"
    # The archive holds every rejected bottle of the run, written before the process exited.
    archived = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "rejects").glob("*/*.json"))
    assert archived == [v["seq"] for v in verdicts if v["verdict"] == "fail"]


def test_stream_lost_is_degraded_and_recovers_within_2_s(bundle: Path, stream: StreamServer, tmp_path: Path) -> None:
    stream.start()
    source = {"kind": "opencv", "uri": stream.url, "reconnect_max_s": 0.5, "read_timeout_ms": 1000}
    station = StationProcess(tmp_path, {"model": str(bundle), "source": source})
    try:
        station.wait_verdicts(3)
        stream.stop()
        station.wait_heartbeat(lambda h: h["state"] == "degraded")
        before = len(station.verdicts)
        back = stream.start()
        beat = station.wait_heartbeat(lambda h: h["state"] == "running" and h["camera"]["connects"] == 2)
        recovered_s = time.monotonic() - back
        station.wait_verdicts(before + 3)
        rc, stopped, err = station.terminate()
        verdicts = list(station.verdicts)
    finally:
        station.close()
    assert rc == 0, err
    print(f"stream recovery: {recovered_s:.2f} s after the server listened again")
    # The heartbeat that saw it running again may come up to one interval (0.2 s) late.
    assert recovered_s < 2.0 + 0.2
    assert beat["camera"]["disconnects"] == 1
    assert "camera_lost" in err and "camera_connected" in err
    c = stopped["counters"]
    assert c["captured"] == c["published"] == len(verdicts)
    assert [v["seq"] for v in verdicts] == list(range(len(verdicts)))


def test_uri_kinds_and_gstreamer_appsink() -> None:
    assert classify("0") == classify("/dev/video2") == "device"
    assert classify("rtsp://10.0.0.5/stream1") == classify("http://cam/mjpg") == "stream"
    assert classify("v4l2src ! videoconvert ! appsink") == "gstreamer"
    assert classify("/data/line.mp4") == "file"
    assert gstreamer_pipeline("v4l2src ! videoconvert ! appsink") == (
        "v4l2src ! videoconvert ! appsink drop=true max-buffers=1 sync=false")
    mine = "v4l2src ! appsink drop=false max-buffers=8"
    assert gstreamer_pipeline(mine) == mine  # an explicit choice is left alone
    with pytest.raises(ConfigError, match="appsink"):
        gstreamer_pipeline("v4l2src ! fakesink")


def test_missing_or_undecodable_video_is_a_config_error(bundle: Path, tmp_path: Path) -> None:
    bad = tmp_path / "not-a-video.mp4"
    bad.write_bytes(b"\x00" * 1000)
    for uri, needle in ((str(tmp_path / "absent.mp4"), "does not exist"), (str(bad), "cannot decode")):
        config = tmp_path / "station.yaml"
        config.write_text(f"station_id: cam1\nmodel: {bundle}\nsource: {{kind: opencv, uri: '{uri}'}}\n"
                          f"publish: {{endpoint: '{free_endpoint()}'}}\n")
        proc = run_station("run", "--config", str(config), timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "source.uri" in proc.stderr and needle in proc.stderr
