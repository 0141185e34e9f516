"""A bad-input corpus, made here, through a running station: one verdict per file, each with the right reason,
and the station still running with its counters matching."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np

from tests.stationproc import StationProcess

UNREADABLE, UNSUPPORTED, TOO_SMALL, NO_BOTTLE = ("unreadable_image", "unsupported_image", "image_too_small",
                                                "no_bottle_found")
INSPECTED = "inspected"  # converted by the documented rule (docs/preprocessing.md) and inspected

# Root reads any file whatever its mode: the station then runs without the capabilities that allow it.
DROP_READ_CAPS = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def make_corpus(bottle: Path, folder: Path) -> dict[str, str]:
    """Bad and odd inputs derived from one real bottle image; returns file name → expected outcome."""
    image = cv2.imread(str(bottle), cv2.IMREAD_COLOR)
    png = bottle.read_bytes()
    jpg = cv2.imencode(".jpg", image)[1].tobytes()
    rng = np.random.default_rng(0)
    expected: dict[str, str] = {}

    def put(name: str, outcome: str, data: bytes | None = None, array: np.ndarray | None = None) -> None:
        path = folder / name
        if array is not None:
            assert cv2.imwrite(str(path), array), name
        else:
            _write(path, data or b"")
        expected[name] = outcome

    put("zero_bytes.png", UNREADABLE, b"")
    put("truncated.png", UNREADABLE, png[: len(png) // 2])
    put("truncated.jpg", UNREADABLE, jpg[: len(jpg) // 2])
    put("random_bytes.png", UNREADABLE, rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    put("random_bytes.jpg", UNREADABLE, b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    put("text_named.png", UNREADABLE, b"this is not an image\n")
    put("gray8.png", INSPECTED, array=cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
    put("gray16.png", INSPECTED, array=cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257)
    put("bgr16.png", INSPECTED, array=image.astype(np.uint16) * 257)
    put("bgra.png", INSPECTED, array=cv2.cvtColor(image, cv2.COLOR_BGR2BGRA))
    put("float32.tiff", UNSUPPORTED, array=image.astype(np.float32) / 255)
    put("tiny.png", TOO_SMALL, array=cv2.resize(image, (32, 32)))
    put("non_square.png", INSPECTED, array=cv2.copyMakeBorder(image, 0, 0, 200, 200, cv2.BORDER_CONSTANT))
    put("huge.png", INSPECTED, array=cv2.resize(image, (4500, 4500), interpolation=cv2.INTER_LINEAR))
    put("black.png", NO_BOTTLE, array=np.zeros_like(image))
    if DROP_READ_CAPS or os.geteuid() != 0:
        put("unreadable_mode.png", UNREADABLE, png)
        os.chmod(folder / "unreadable_mode.png", 0)
    return expected


def test_every_bad_input_gets_one_verdict_with_its_reason(bundle: Path, eval_root: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    expected = make_corpus(sorted((eval_root / "good").iterdir())[0], corpus)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    station = StationProcess(tmp_path, {"model": str(bundle),
                                        "source": {"path": str(incoming), "poll_interval_s": 0.05},
                                        "inference": {"queue_size": 64}}, prefix=DROP_READ_CAPS)
    try:
        station.wait_heartbeat(lambda h: h["state"] == "running")
        for path in sorted(corpus.iterdir()):
            os.rename(path, incoming / path.name)  # whole files appear at once, as from a camera PC
        verdicts = station.wait_verdicts(len(expected), timeout_s=120)
        beat = station.wait_heartbeat(lambda h: h["counters"]["published"] == len(expected))
        assert beat["state"] == "running"  # the station kept going
        rc, stopped, err = station.terminate()
    finally:
        station.close()
    assert rc == 0, err[-2000:]
    by_file = {v["frame_id"]: v for v in verdicts}
    assert sorted(by_file) == sorted(expected) and len(verdicts) == len(expected)  # exactly one each
    for name, outcome in expected.items():
        v = by_file[name]
        if outcome == INSPECTED:
            assert v["class"] is not None and v["error"] is None, (name, v["reasons"], v["error"])
        else:
            assert v["verdict"] == "fail" and v["reasons"] == ["error", outcome], (name, v["reasons"], v["error"])
            assert v["error"]["detail"], name
    c = stopped["counters"]
    assert c["captured"] == c["published"] == len(expected)
    assert c["errors"] == sum(1 for o in expected.values() if o != INSPECTED)
    assert c["inspected"] == sum(1 for o in expected.values() if o == INSPECTED)


def test_the_corpus_keeps_the_same_reasons_through_replay(bundle: Path, eval_root: Path, tmp_path: Path) -> None:
    """Replay (the evaluation path) reads files the same way: same reasons, nothing skipped."""
    from tests.conftest import run_station

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    expected = make_corpus(sorted((eval_root / "good").iterdir())[0], corpus)
    if DROP_READ_CAPS:
        expected.pop("unreadable_mode.png")
        (corpus / "unreadable_mode.png").unlink()
    out = tmp_path / "v.jsonl"
    proc = run_station("replay", "--model", str(bundle), "--source", str(corpus), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    import json

    got = {m["frame_id"]: m for m in map(json.loads, out.read_text().splitlines())}
    assert sorted(got) == sorted(expected)
    for name, outcome in expected.items():
        assert (got[name]["class"] is not None) if outcome == INSPECTED else got[name]["reasons"] == ["error", outcome]
    shutil.rmtree(corpus)
