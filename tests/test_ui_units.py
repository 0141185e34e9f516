"""`station ui` without a model: the archive's paths, the POST guard, reviews on disk, banners, the what-if rule.

A real `station ui` process is driven over raw HTTP (so a `../` reaches the
server as sent), fed by a real VerdictPublisher in the test process.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from station.contract.counters import Counters
from station.service.publish import VerdictPublisher
from station.ui.live import compact
from station.ui.reviews import ReviewStore
from station.ui.whatif import Rule, decide
from tests.conftest import free_endpoint, run_station
from tests.test_ui_support import TOKEN, UiProcess, fake_verdict, token_file

DAY = "2026-12-02"
STEM = "101500_00000003_broken_large_003_png"
JPEG = b"\xff\xd8\xff\xe0" + b"0" * 64 + b"\xff\xd9"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An archive as RejectArchive lays it out, one entry, and a secret beside it that must stay unreachable."""
    tmp_path = tmp_path_factory.mktemp("ui")
    root = tmp_path / "rejects"
    (root / DAY).mkdir(parents=True)
    message = {"seq": 3, "run_id": "r1", "frame_id": "broken_large/003.png", "verdict": "fail",
               "reasons": ["defect_class"], "captured_at": "2026-12-02T10:15:00.000Z",
               "class": {"label": "broken_large", "confidence": 0.9,
                         "scores": {"good": 0.1, "broken_large": 0.9, "broken_small": 0.0, "contamination": 0.0}},
               "anomaly": {"score": 0.02, "threshold": 0.05, "region": {"bbox": None, "area_px": 0,
                                                                       "area_fraction": 0.0}}}
    (root / DAY / f"{STEM}.jpg").write_bytes(JPEG)
    (root / DAY / f"{STEM}.json").write_text(json.dumps(message))
    (tmp_path / "secret.jpg").write_bytes(b"SECRET")
    (tmp_path / "secret.json").write_text('{"secret": true}')
    (root / DAY / "link_out.jpg").symlink_to(tmp_path / "secret.jpg")
    (root / DAY / "link_out.json").write_text(json.dumps({**message, "seq": 4}))
    return root


@pytest.fixture(scope="module")
def ui(archive: Path) -> Iterator[UiProcess]:
    tmp_path = archive.parent
    proc = UiProcess(free_endpoint(), "--archive", str(archive), "--reviews", str(tmp_path / "reviews.sqlite"),
                     "--review-token-file", str(token_file(tmp_path)))
    proc.wait("the archive indexed", lambda s: s["archive"]["count"] == 2)
    yield proc
    proc.close()


@pytest.mark.parametrize("path", [
    "/archive/../secret.jpg", "/archive/%2e%2e/secret.jpg", "/archive/2026-12-02/../../secret.jpg",
    "/archive/2026-12-02/..%2f..%2fsecret.jpg", f"/archive/{Path('/tmp').resolve()}/x.jpg", "/archive//etc/hostname",
    "/archive/2026-12-02/link_out.jpg", "/archive/2026-12-02/%00.jpg", f"/archive/{DAY}/{STEM}.json",
    "/static/../cli.py", "/static/%2e%2e/cli.py", "/api/rejects/../../secret",
])
def test_paths_outside_the_archive_are_404(ui: UiProcess, path: str) -> None:
    status, body, _ = ui.request("GET", path)
    assert status == 404, (path, body[:200])
    assert b"SECRET" not in body and b'"secret": true' not in body


def test_archive_images_and_page_are_served_with_a_strict_policy(ui: UiProcess) -> None:
    status, body, headers = ui.request("GET", f"/archive/{DAY}/{STEM}.jpg")
    assert status == 200 and body == JPEG and headers["content-type"] == "image/jpeg"
    status, body, headers = ui.request("GET", "/")
    assert status == 200 and b'src="/static/app.js"' in body
    assert "default-src 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    # Every file the page loads is in the package: no http(s):// reference to anywhere else.
    for name in ("index.html", "app.js", "rejects.js", "charts.js", "whatif.js", "dom.js", "app.css"):
        status, body, _ = ui.request("GET", "/" if name == "index.html" else f"/static/{name}")
        assert status == 200, name
        text = body.decode()
        assert "http://" not in text.replace('"http://www.w3.org/2000/svg"', "") and "https://" not in text, name


def test_posts_need_the_token_and_this_origin(ui: UiProcess, archive: Path) -> None:
    entry = f"{DAY}/{STEM}"
    good = {"Content-Type": "application/json", "X-Review-Token": TOKEN}
    body = {"outcome": "false_reject"}
    refused = [
        {**good, "X-Review-Token": "wrong-token-0000000000"},
        {"Content-Type": "application/json"},
        {**good, "Origin": "http://evil.example"},
        {**good, "Sec-Fetch-Site": "cross-site"},
        {**good, "Content-Type": "text/plain"},
    ]
    for headers in refused:
        status, reply, _ = ui.request("POST", f"/api/reviews/{entry}", body, headers)
        assert status == 403, (headers, reply)
    db = sqlite3.connect(archive.parent / "reviews.sqlite")
    assert db.execute("SELECT COUNT(*) FROM reviews").fetchone()[0] == 0
    status, reply = ui.review(entry, "confirmed", None)
    assert status == 400 and "true class" in reply["error"]
    status, reply = ui.review(entry, "confirmed", "broken_small")
    assert status == 200 and reply["review"]["true_class"] == "broken_small"
    assert db.execute("SELECT outcome, true_class FROM reviews").fetchall() == [("confirmed", "broken_small")]
    status, reply = ui.review("2026-12-02/nothing_here", "false_reject")
    assert status == 404


def test_without_a_token_the_page_is_read_only(archive: Path, tmp_path: Path) -> None:
    ui = UiProcess(free_endpoint(), "--archive", str(archive), "--reviews", str(tmp_path / "r.sqlite"))
    try:
        status, reply = ui.review(f"{DAY}/{STEM}", "false_reject")
        assert status == 403 and "read-only" in reply["error"]
        assert ui.get_json("/api/summary")["reviews"]["writable"] is False
    finally:
        ui.stop()


def test_reviews_persist_and_bad_ones_are_not_written(tmp_path: Path) -> None:
    path = tmp_path / "reviews.sqlite"
    store = ReviewStore(path)
    message = {"seq": 1, "class": {"scores": {"good": 0.5, "broken_large": 0.5}}}
    store.set("2026-12-02/a", "false_reject", "broken_large", message)
    with pytest.raises(ValueError):
        store.set("2026-12-02/b", "confirmed", "good", message)  # good is not a defect class
    with pytest.raises(ValueError):
        store.set("2026-12-02/c", "maybe", None, message)
    store.close()
    again = ReviewStore(path)
    reviews = again.all()
    assert list(reviews) == ["2026-12-02/a"]
    assert reviews["2026-12-02/a"].outcome == "false_reject" and reviews["2026-12-02/a"].true_class is None
    again.clear("2026-12-02/a")
    assert again.all() == {}


def test_whatif_rule_is_the_stations() -> None:
    row = {"verdict": "fail", "reasons": ["anomaly"], "label": "good", "confidence": 0.9, "score": 0.06,
           "error": None}
    assert decide(row, Rule(0.07)) == "pass"
    assert decide(row, Rule(0.06)) == "pass"  # fail only when strictly above
    assert decide(row, Rule(0.05)) == "fail"
    defect = {**row, "label": "contamination", "reasons": ["defect_class"], "score": 0.01, "confidence": 0.6}
    assert decide(defect, Rule(1.0)) == "fail"  # the class check as the station made it
    assert decide(defect, Rule(1.0, class_confidence=0.7, defect_rule="top_class")) == "pass"
    assert decide(defect, Rule(1.0, class_confidence=0.5, defect_rule="top_class")) == "fail"
    # the classifier alone needs the anomaly check's support (station/core/decide.py): 0.01 is under 0.02
    assert decide(defect, Rule(1.0, 0.5, classifier_min_anomaly=0.02, defect_rule="top_class")) == "pass"
    assert decide(defect, Rule(1.0, 0.5, classifier_min_anomaly=0.01, defect_rule="top_class")) == "fail"
    assert decide({**row, "error": "unreadable_image", "score": None}, Rule(99.0)) == "fail"


def test_whatif_defect_sum_weighs_the_defect_classes_of_the_published_scores_together() -> None:
    message = {"verdict": "pass", "reasons": [], "anomaly": {"score": 0.01},
               "class": {"label": "broken_large", "confidence": 0.35,
                         "scores": {"good": 0.2, "broken_large": 0.35, "broken_small": 0.3, "contamination": 0.15}}}
    row = compact(message)
    assert row["good_probability"] == 0.2 and row["defect_probability"] == pytest.approx(0.8)
    assert decide(row, Rule(1.0, class_confidence=0.5)) == "fail"  # defect_sum, the default: 0.8 ≥ 0.5
    assert decide(row, Rule(1.0, class_confidence=0.5, defect_rule="top_class")) == "pass"  # 0.35 < 0.5
    assert decide(row, Rule(1.0, class_confidence=0.85)) == "pass"
    good = compact({**message, "class": {"label": "good", "confidence": 0.6,
                                         "scores": {"good": 0.6, "broken_large": 0.4, "broken_small": 0.0,
                                                    "contamination": 0.0}}})
    assert decide(good, Rule(1.0, class_confidence=0.3)) == "pass"  # named good: P(good) outweighs the defects
    assert decide(compact({**message, "class": None}), Rule(1.0, class_confidence=0.01)) == "pass"


def test_drift_gaps_and_counters_from_a_real_publisher(tmp_path: Path) -> None:
    endpoint = free_endpoint()
    publisher = VerdictPublisher(endpoint, "line1", "run-a")
    ui = UiProcess(endpoint)
    counters = Counters()
    try:
        # The station attaches a subscriber, and greets it, when it next uses its socket (service() in its loop).
        ui.wait("the welcome", lambda s: publisher.service() or s["run_id"] == "run-a")
        for seq in range(3):
            publisher.publish(fake_verdict(seq, score=0.01 * seq), None)
        publisher.seq += 4  # four verdicts the page never gets: a gap, as a subscriber that fell behind sees one
        publisher.publish(fake_verdict(7, label="contamination", score=0.2), None)
        counters.captured = counters.published = 8
        counters.inspected, counters.passed, counters.failed = 8, 6, 2
        worst = {"quantity": "brightness", "value": 0.61, "bound": 0.55, "direction": "above",
                 "since": "2026-12-02T10:00:00.000Z"}
        publisher.heartbeat("running", counters.snapshot(), 5.0, extra={"drift": {**worst, "quantities": [worst]}})
        summary = ui.wait("the heartbeat", lambda s: s["run"]["published"] == 8 and s["drift"] is not None)
        kinds = {b["kind"]: b for b in summary["banners"]}
        assert "quantity: brightness, value: 0.61, bound: 0.55, direction: above" in kinds["drift"]["text"]
        assert kinds["drift"]["level"] == "warn"
        assert kinds["gap"] and summary["run"]["missed"] == 4
        # Counters are the station's (exact); the breakdown covers the verdicts the page saw.
        assert (summary["run"]["passed"], summary["run"]["failed"]) == (6, 2)
        assert summary["run"]["seen"]["failed_by_class"] == {"contamination": 1}
        assert summary["run"]["seen"]["failed_by_reason"] == {"anomaly": 1, "defect_class": 1}
        publisher.heartbeat("running", counters.snapshot(), 5.0, extra={"drift": None})  # back in its band
        summary = ui.wait("drift gone", lambda s: s["drift"] is None)
        assert not [b for b in summary["banners"] if b["kind"] == "drift"]
        # Any other shape a later station sends is still shown, all its fields, without a change here.
        publisher.heartbeat("running", counters.snapshot(), 5.0, extra={"drift": {"state": "ok", "z": 0.5}})
        summary = ui.wait("a generic drift", lambda s: s["drift"] is not None)
        assert [(b["level"], b["text"]) for b in summary["banners"] if b["kind"] == "drift"] == [
            ("info", "Drift: state: ok, z: 0.5")]
        camera = {"state": "disconnected", "connects": 1, "disconnects": 1, "last_error": "cable pulled"}
        publisher.heartbeat("degraded", counters.snapshot(), 0.0, extra={"camera": camera, "drift": None})
        summary = ui.wait("degraded", lambda s: s["state"] == "degraded")
        assert summary["camera"]["state"] == "disconnected"
        assert [b["text"] for b in summary["banners"] if b["kind"] == "degraded"] == [
            "Degraded: the camera is lost and being reconnected (cable pulled)."]
        publisher.close()
        summary = ui.wait("silence noticed", lambda s: s["contact"]["lost"], timeout_s=15)
        assert any(b["kind"] == "lost" for b in summary["banners"])
    finally:
        ui.close()


def test_whatif_api_takes_the_defect_rule_and_refuses_an_unknown_one() -> None:
    endpoint = free_endpoint()
    publisher = VerdictPublisher(endpoint, "line1", "run-a")
    ui = UiProcess(endpoint)
    try:
        ui.wait("the welcome", lambda s: publisher.service() or s["run_id"] == "run-a")
        # broken_large at 0.35 and 0.217 for each other class: it passed, the defect classes sum to 0.78
        publisher.publish(fake_verdict(0, label="broken_large", confidence=0.35), None)
        ui.wait("the verdict", lambda s: s["total"] == 1)
        by_sum = ui.get_json("/api/whatif?threshold=1&class_confidence=0.5")
        assert (by_sum["defect_rule"], by_sum["pass_to_fail"]) == ("defect_sum", 1)
        by_top = ui.get_json("/api/whatif?threshold=1&class_confidence=0.5&defect_rule=top_class")
        assert (by_top["defect_rule"], by_top["pass_to_fail"]) == ("top_class", 0)
        status, body, _ = ui.request("GET", "/api/whatif?threshold=1&defect_rule=top")
        assert status == 400 and b"defect_rule: top_class or defect_sum" in body
    finally:
        publisher.close()
        ui.close()


def test_bad_arguments_exit_2_naming_the_cause(tmp_path: Path) -> None:
    short = tmp_path / "short.token"
    short.write_text("abc")
    cases = [
        (["ui", "--connect", "tcp://127.0.0.1:1", "--listen", "nowhere"], "--listen"),
        (["ui", "--connect", "tcp://127.0.0.1:1", "--review-token-file", str(short), "--reviews", "r.sqlite"],
         "at least"),
        (["ui", "--connect", "tcp://127.0.0.1:1", "--review-token-file", str(token_file(tmp_path))], "--reviews"),
        (["ui", "export", "--reviews", str(tmp_path / "none.sqlite"), "--archive", str(tmp_path),
          "--out", str(tmp_path / "out")], "does not exist"),
    ]
    for args, needle in cases:
        proc = run_station(*args, timeout=60)
        assert proc.returncode == 2, (args, proc.stderr)
        assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_the_station_commands_never_import_the_ui(tmp_path: Path) -> None:
    code = ("import sys\nfrom station.cli import build_parser\nbuild_parser().parse_args(['run', '--config', 'x'])\n"
            "print(sorted(m for m in sys.modules if m.startswith('station.ui')))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
