"""Prometheus metrics of `station run`: what a scrape shows, and a port that is taken."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from tests.conftest import free_endpoint, run_station
from tests.stationproc import StationProcess, scrape_metrics


def test_scrape_counts_every_verdict_by_result_and_class(bundle: Path, eval_root: Path, tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    images = [p for cls in sorted(eval_root.iterdir()) for p in sorted(cls.iterdir())]
    (incoming / "corrupt.png").write_bytes(b"not an image")
    port = int(free_endpoint().rsplit(":", 1)[1])
    station = StationProcess(tmp_path, {"model": str(bundle),
                                        "source": {"path": str(incoming), "poll_interval_s": 0.05},
                                        "metrics": {"listen": f"127.0.0.1:{port}"},
                                        "publish": {"wait_subscribers": 1}})
    try:
        for n, image in enumerate(images):
            shutil.copy(image, incoming / f"{n:03d}.png")
        verdicts = station.wait_verdicts(len(images) + 1)
        station.wait_heartbeat(lambda h: h["counters"]["published"] == len(verdicts))
        m = scrape_metrics(port)
        rc, _, err = station.terminate()
    finally:
        station.close()
    assert rc == 0, err
    by_key: dict[str, int] = {}
    for v in verdicts:
        label = v["class"]["label"] if v["class"] else "none"
        key = f'station_verdicts_total{{class="{label}",result="{v["verdict"]}"}}'
        by_key[key] = by_key.get(key, 0) + 1
    assert {k: v for k, v in m.items() if k.startswith("station_verdicts_total")} == by_key
    assert m['station_verdict_reasons_total{reason="unreadable_image"}'] == 1
    assert m['station_frames_total{outcome="published"}'] == len(verdicts)
    inspected = sum(v["class"] is not None for v in verdicts)  # a burst of files may skip some (overload)
    assert m['station_stage_latency_seconds_count{stage="autoencoder"}'] == inspected
    assert m['station_stage_latency_seconds_count{stage="total"}'] == len(verdicts)
    assert m['station_queue_depth{queue="inspect"}'] == 0
    assert m['station_model_info{name="tiny",version="' + verdicts[0]["model"]["version"] + '"}'] == 1


def test_metrics_port_in_use_is_a_clear_config_error(bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "station.yaml"
        config.write_text(f"station_id: cam1\nmodel: {bundle}\nsource: {{path: in}}\n"
                          f"publish: {{endpoint: '{free_endpoint()}'}}\nmetrics: {{listen: '127.0.0.1:{port}'}}\n")
        proc = run_station("run", "--config", str(config), timeout=120)
    assert proc.returncode == 2
    assert f"metrics.listen: cannot serve metrics on 127.0.0.1:{port}" in proc.stderr
