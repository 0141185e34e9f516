"""Drift watch and `station perturb`: a drifted line is told apart from a clean one, through a running station.

The station's heartbeats, STATUS= and metrics are read as a subscriber, systemd and Prometheus read them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml

from station.core.bundle import DriftQuantity
from station.core.drift import MOUTH_OFFSET, TAIL, Side, Z, band
from station.core.imageio import read_image
from station.core.preprocess import Normalisation, PreprocessSpec, canonical_view, locate_mouth
from tests.conftest import free_endpoint, run_station
from tests.stationproc import StationProcess, scrape_metrics
from tests.test_daemon_service import NotifySocket

DEFAULT_WINDOW = 200  # station/service/config.py DriftConfig.window
HEARTBEAT_SCHEMA = json.loads((Path(__file__).parents[1] / "station/schemas/heartbeat-1.schema.json").read_text())


def _port() -> int:
    return int(free_endpoint().rsplit(":", 1)[1])


@pytest.fixture(scope="session")
def clean_line(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """500 bottles (440 good, 15 of each class) of the default style, another seed than the bundle's (7)."""
    out = tmp_path_factory.mktemp("clean")
    proc = run_station("synth", "--out", str(out), "--seed", "123", "--train-good", "440", "--test-per-class", "15")
    assert proc.returncode == 0, proc.stderr
    shutil.rmtree(out / "bottle" / "ground_truth")  # masks, not bottles: the line shows 440 + 60 bottles
    return out / "bottle"


@pytest.fixture(scope="session")
def small_line(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The clean line's 60 test bottles (15 of each class): synth seeds each image by its own index, so
    these are the same files as ``clean_line``'s test/ folder, made in a tenth of the time."""
    out = tmp_path_factory.mktemp("small")
    proc = run_station("synth", "--out", str(out), "--seed", "123", "--train-good", "0", "--test-per-class", "15")
    assert proc.returncode == 0, proc.stderr
    return out / "bottle" / "test"


@pytest.fixture(scope="session")
def off_centre(small_line: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Those 60 bottles with the camera moved: all 10 % off centre."""
    out = tmp_path_factory.mktemp("off") / "off10"
    proc = run_station("perturb", "--data", str(small_line), "--out", str(out), "--seed", "5",
                       "--offset-fixed", "0.10", "--offset-angle", "30")
    assert proc.returncode == 0, proc.stderr
    return out


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.png") if "ground_truth" not in p.parts)


# -- station perturb ---------------------------------------------------------------------------


def test_perturb_moves_bottles_and_their_masks_alike_deterministically(synth_root: Path, tmp_path: Path) -> None:
    args = ["--seed", "3", "--offset-fixed", "0.10", "--gain", "0.2", "--gamma", "0.15", "--scale", "0.05",
            "--jpeg", "85"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, "3"), (b, "3"), (c, "4")):
        proc = run_station("perturb", "--data", str(synth_root), "--out", str(out), *args[:1], seed, *args[2:])
        assert proc.returncode == 0, proc.stderr
    originals = sorted(p.relative_to(synth_root) for p in synth_root.rglob("*.png"))
    assert sorted(p.relative_to(a) for p in a.rglob("*.png")) == originals  # layout and names kept
    assert all((a / r).read_bytes() == (b / r).read_bytes() for r in originals)  # same seed, same files
    assert any((a / r).read_bytes() != (c / r).read_bytes() for r in originals)  # another seed, another draw

    record = json.loads((a / ".perturb.json").read_text())
    rel = Path("test/broken_large/000.png")
    d = record["files"][rel.as_posix()]
    assert d["dx"] == pytest.approx(0.10) and d["dy"] == pytest.approx(0.0, abs=1e-9)

    # The mask went where its bottle went: the drawn shift, scaled about the centre.
    before = read_image(synth_root / rel)
    after = read_image(a / rel)
    side = before.shape[0]
    mask_before = read_image(synth_root / "ground_truth/broken_large/000_mask.png")
    mask_after = read_image(a / "ground_truth/broken_large/000_mask.png")
    assert set(np.unique(mask_after)) <= {0, 255}  # nearest-neighbour: still a mask
    ys, xs = np.nonzero(mask_before)
    ys2, xs2 = np.nonzero(mask_after)
    expected_x = (xs.mean() - (side - 1) / 2) * d["scale"] + (side - 1) / 2 + 0.10 * side
    expected_y = (ys.mean() - (side - 1) / 2) * d["scale"] + (side - 1) / 2
    assert xs2.mean() == pytest.approx(expected_x, abs=2) and ys2.mean() == pytest.approx(expected_y, abs=2)
    # The border the shift exposed continues the background: no black bar.
    exposed = after[:, : int(0.10 * side) - 5]
    assert exposed.mean() > 5 and abs(float(exposed.mean()) - float(after[:, :20].mean())) < 8


def test_perturb_fixed_offset_is_seen_by_the_mouth_finder(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "off"
    proc = run_station("perturb", "--data", str(synth_root / "train"), "--out", str(out), "--offset-fixed", "0.10")
    assert proc.returncode == 0, proc.stderr
    unit = Normalisation((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    spec = PreprocessSpec(900, 512, 128, 1.08, 0.15, 0.6, unit, unit)
    shifts = []
    for original in sorted((synth_root / "train" / "good").glob("*.png"))[:5]:
        m0 = locate_mouth(canonical_view(read_image(original), 900)[0], spec)
        m1 = locate_mouth(canonical_view(read_image(out / "good" / original.name), 900)[0], spec)
        shifts.append((m1.cx - m0.cx) / 900)
    assert float(np.median(shifts)) == pytest.approx(0.10, abs=0.01)


def test_perturb_refuses_contradicting_offsets(synth_root: Path, tmp_path: Path) -> None:
    proc = run_station("perturb", "--data", str(synth_root), "--out", str(tmp_path / "x"), "--offset", "0.05",
                       "--offset-fixed", "0.1")
    assert proc.returncode == 2
    assert "--offset-fixed" in proc.stderr and "Traceback" not in proc.stderr


# -- the bound ---------------------------------------------------------------------------------


def test_default_window_bound_holds_a_clean_line_and_catches_a_moved_one() -> None:
    """The bound's statistics, on the default window: 20 000 clean windows never cross it, moved ones do.

    Independent of any model: a reference of 60 values (a small training set), windows of 200 drawn
    from the same distribution (a skewed one, like the mouth offset's) or from one moved by 2.5 spreads
    (the band's edge sits 1.9 spreads from this reference's median: 1.2 to its 90th percentile, 0.7 widening).
    """
    rng = np.random.default_rng(0)
    draw = lambda size: np.hypot(rng.uniform(-1, 1, size), rng.uniform(-1, 1, size))  # noqa: E731
    ref_values = draw(60)
    med = float(np.median(ref_values))
    ref = DriftQuantity(side="both", n=60, median=med, scale=1.4826 * float(np.median(np.abs(ref_values - med))),
                        q_low=float(np.quantile(ref_values, TAIL)), q_high=float(np.quantile(ref_values, 1 - TAIL)),
                        source="test")
    b = band(ref, DEFAULT_WINDOW, TAIL, Z)
    assert b.low is not None and b.high is not None
    clean = np.median(draw((20_000, DEFAULT_WINDOW)), axis=1)
    assert ((clean < b.low) | (clean > b.high)).sum() == 0
    moved = np.median(draw((2_000, DEFAULT_WINDOW)) + 2.5 * ref.scale, axis=1)
    assert (moved > b.high).mean() > 0.99
    # A shorter window's median is less certain: its band is wider.
    short = band(ref, 50, TAIL, Z)
    assert short.high is not None and short.high > b.high


# -- the bundle --------------------------------------------------------------------------------


def test_train_records_the_drift_reference(bundle: Path) -> None:
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    drift = manifest["drift"]
    assert drift["tail"] == TAIL and drift["z"] == Z
    q = drift["quantities"]
    for name in ("mouth_offset", "mouth_radius", "brightness", "contrast", "anomaly_score"):
        assert q[name]["n"] >= 5 and q[name]["q_low"] <= q[name]["median"] <= q[name]["q_high"], name
    # Synth bottles sit within ±25 px of 900 of the centre; their radius is 290–350 px.
    assert q["mouth_offset"]["q_high"] < 0.05 and q["mouth_offset"]["side"] == "high"
    assert 0.3 < q["mouth_radius"]["median"] < 0.4
    assert q["anomaly_score"]["q_high"] <= manifest["anomaly"]["threshold"]
    # P(good) comes from held-out good images: too few in the tiny set, and it says so.
    assert "good_confidence" in q or "good_confidence" in drift["skipped"]


def test_a_bundle_without_drift_reference_runs_unwatched_and_says_so_once(bundle: Path, eval_root: Path,
                                                                          tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    manifest = yaml.safe_load((old / "manifest.yaml").read_text())
    del manifest["drift"]
    (old / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    port = _port()
    station = StationProcess(tmp_path, {"model": str(old), "source": {"path": str(incoming), "poll_interval_s": 0.05},
                                        "metrics": {"listen": f"127.0.0.1:{port}"}})
    try:
        station.wait_heartbeat(lambda h: h["state"] == "running")
        for n, image in enumerate(_images(eval_root)[:3]):
            shutil.copy(image, incoming / f"{n}.png")
        station.wait_verdicts(3)
        beat = station.wait_heartbeat(lambda h: h["counters"]["published"] == 3)
        m = scrape_metrics(port)
        rc, _, err = station.terminate()
    finally:
        station.close()
    assert rc == 0, err
    assert beat["drift"] is None and beat["state"] == "running"
    assert m["station_drift_watch"] == 0
    assert err.count("drift_watch_off") == 1 and "no drift reference" in err


def test_drift_window_is_validated(bundle: Path, tmp_path: Path) -> None:
    config = tmp_path / "station.yaml"
    config.write_text(yaml.safe_dump({"station_id": "cam1", "model": str(bundle), "source": {"path": str(tmp_path)},
                                      "drift": {"window": 5}}))
    proc = run_station("run", "--config", str(config), timeout=60)
    assert proc.returncode == 2
    assert "drift.window" in proc.stderr


# -- a running station -------------------------------------------------------------------------


def test_a_line_moved_off_centre_raises_drift_in_heartbeat_status_metrics_and_log(
        bundle: Path, off_centre: Path, tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path)
    port = _port()
    images = _images(off_centre)
    assert len(images) == 60
    station = StationProcess(tmp_path, {"model": str(bundle), "source": {"path": str(off_centre)},
                                        "metrics": {"listen": f"127.0.0.1:{port}"},
                                        "publish": {"wait_subscribers": 1}},
                             env={"NOTIFY_SOCKET": str(notify.path)})
    try:
        verdicts = station.wait_verdicts(len(images), timeout_s=180)
        beat = station.wait_heartbeat(lambda h: h["counters"]["published"] == len(images))
        m = scrape_metrics(port)
        statuses = notify.wait_for("DRIFT mouth_offset")
        rc, _, err = station.terminate()
    finally:
        station.close()
    assert rc == 0, err
    drift = beat["drift"]
    assert drift is not None, beat
    jsonschema.validate(beat, HEARTBEAT_SCHEMA)
    assert drift["quantity"] == MOUTH_OFFSET and drift["direction"] == "above"
    assert drift["bound"] < 0.06 < 0.09 < drift["value"] < 0.11
    assert drift["quantities"][0] == {k: v for k, v in drift.items() if k != "quantities"}
    # Within the window: the heartbeats said so before the 60th bottle (judged from a quarter window, 50).
    first = next(h for h in station.heartbeats if h.get("drift"))
    assert first["counters"]["published"] <= DEFAULT_WINDOW
    # A warning, not a stop: every bottle got its verdict and the state stayed running.
    assert len(verdicts) == 60 and all(v["verdict"] in ("pass", "fail") for v in verdicts)
    assert all(h["state"] in ("running", "stopping", "stopped") for h in station.heartbeats)
    assert m['station_drift{quantity="mouth_offset"}'] == 1
    assert 0.09 < m['station_drift_value{quantity="mouth_offset"}'] < 0.11
    assert m['station_drift_bound{quantity="mouth_offset",side="high"}'] == pytest.approx(drift["bound"], abs=1e-4)
    assert m['station_state{state="running"}'] == 1
    assert any("STATUS=running" in s and "DRIFT mouth_offset" in s for s in statuses)
    assert err.count('"drift_started"') >= 1
    assert sum('"drift_started"' in line and "mouth_offset" in line for line in err.splitlines()) == 1


def test_drift_clears_when_the_line_comes_back_and_logs_once_each_way(
        bundle: Path, off_centre: Path, small_line: Path, tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    station = StationProcess(tmp_path, {"model": str(bundle),
                                        "source": {"path": str(incoming), "poll_interval_s": 0.05},
                                        "drift": {"window": 20}})
    moved = _images(off_centre)[:30]
    back = _images(small_line)[:40]
    try:
        station.wait_heartbeat(lambda h: h["state"] == "running")
        for n, image in enumerate(moved):
            shutil.copy(image, incoming / f"a{n:03d}.png")
        station.wait_verdicts(len(moved), timeout_s=120)
        raised = station.wait_heartbeat(lambda h: h["counters"]["published"] == len(moved))
        for n, image in enumerate(back):
            shutil.copy(image, incoming / f"b{n:03d}.png")
        station.wait_verdicts(len(moved) + len(back), timeout_s=120)
        cleared = station.wait_heartbeat(lambda h: h["counters"]["published"] == len(moved) + len(back))
        rc, _, err = station.terminate()
    finally:
        station.close()
    assert rc == 0, err
    assert raised["drift"] is not None and raised["drift"]["quantity"] == MOUTH_OFFSET
    assert cleared["drift"] is None
    lines = [line for line in err.splitlines() if "mouth_offset" in line]
    assert sum('"drift_started"' in line for line in lines) == 1
    assert sum('"drift_cleared"' in line for line in lines) == 1


@pytest.mark.slow
def test_a_clean_line_of_500_bottles_never_raises_drift_at_the_default_window(
        bundle: Path, clean_line: Path, tmp_path: Path) -> None:
    images = _images(clean_line)
    assert len(images) == 500
    port = _port()
    station = StationProcess(tmp_path, {"model": str(bundle), "source": {"path": str(clean_line)},
                                        "metrics": {"listen": f"127.0.0.1:{port}"},
                                        "publish": {"wait_subscribers": 1}})
    try:
        station.wait_verdicts(len(images), timeout_s=900)
        station.wait_heartbeat(lambda h: h["counters"]["published"] == len(images))
        m = scrape_metrics(port)
        rc, _, err = station.terminate()
    finally:
        station.close()
    assert rc == 0, err
    for h in station.heartbeats:
        jsonschema.validate(h, HEARTBEAT_SCHEMA)
    assert [h["drift"] for h in station.heartbeats if h["drift"] is not None] == []
    assert "drift_started" not in err
    # Watched, not blind: a full default window of every quantity was judged against its bound.
    assert m["station_drift_watch"] == 1 and m["station_drift_window"] == DEFAULT_WINDOW
    for name in ("mouth_offset", "mouth_radius", "brightness", "contrast"):
        assert m[f'station_drift_samples{{quantity="{name}"}}'] == DEFAULT_WINDOW, name
        assert m[f'station_drift{{quantity="{name}"}}'] == 0
        value = m[f'station_drift_value{{quantity="{name}"}}']
        assert m.get(f'station_drift_bound{{quantity="{name}",side="low"}}', -1.0) < value, name
        assert value < m.get(f'station_drift_bound{{quantity="{name}",side="high"}}', 2.0), name
    assert m['station_drift_samples{quantity="anomaly_score"}'] > 0


def test_several_quantities_drift_worst_first_and_a_low_bound_counts(capsys: pytest.CaptureFixture[str]) -> None:
    """The watch itself: confidence drifting down and brightness up at once; the report ranks them."""
    from station.core.bundle import DriftManifest
    from station.core.drift import DriftWatch, Sample

    def ref(median: float, scale: float, side: Side) -> DriftQuantity:
        return DriftQuantity(side=side, n=100, median=median, scale=scale, q_low=median - 1.28 * scale,
                             q_high=median + 1.28 * scale, source="test")

    manifest = DriftManifest(tail=TAIL, z=Z, quantities={
        "mouth_offset": ref(0.02, 0.005, "high"), "brightness": ref(0.3, 0.02, "both"),
        "good_confidence": ref(0.95, 0.02, "low")})
    watch = DriftWatch(manifest, window=40, bundle_label="test")
    for _ in range(40):
        watch.observe(Sample(0.02, 0.35, 0.30, 0.17, 1.0, 0.95))
    assert watch.report() is None
    for _ in range(40):  # the lamp got brighter, the classifier less sure: brightness +4 s, P(good) −10 s
        watch.observe(Sample(0.02, 0.35, 0.38, 0.17, 1.0, 0.75))
    report = watch.report()
    assert report is not None
    assert [q["quantity"] for q in report["quantities"]] == ["good_confidence", "brightness"]
    assert report["quantity"] == "good_confidence" and report["direction"] == "below"
    assert report["value"] == pytest.approx(0.75) and report["bound"] < 0.95 - 1.28 * 0.02
    assert ", DRIFT good_confidence 0.75 < " in watch.status_text() and "(+1 more)" in watch.status_text()
    for _ in range(40):
        watch.observe(Sample(0.02, 0.35, 0.30, 0.17, 1.0, 0.95))
    assert watch.report() is None
    assert watch.snapshot()["raised"] == {"brightness": 1, "good_confidence": 1}
