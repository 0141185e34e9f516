"""`station ui export`: reviewed rejects as an MVTec AD folder, back into calibration and training.

False rejects are good bottles: ``train/good`` (``--good-to test``: ``test/good``),
so ``station calibrate --good OUT/train/good`` recalibrates on exactly the
bottles the line rejected wrongly. Confirmed rejects go to ``test/<class>``
(``test/novel`` for a defect of no class, which training leaves out). The
image is the archive's clean canonical view, the one the models saw. OUT is
written beside itself and renamed into place, so it is either complete or absent.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from station.core.atomic import swap_in_dir
from station.core.folders import GOOD
from station.errors import EXIT_OK, ConfigError
from station.ui.rejects import resolve
from station.ui.reviews import FALSE_REJECT, open_existing


def export(reviews_path: Path, archive: Path, out: Path, good_to: str = "train") -> dict[str, int]:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out: {out} exists and is not empty; give a new folder")
    if not archive.is_dir():
        raise ConfigError(f"--archive: {archive} is not a folder")
    store = open_existing(reviews_path)
    try:
        reviews = store.all()
    finally:
        store.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    counts: dict[str, int] = {}
    listing: list[dict[str, object]] = []
    try:
        for entry_id, review in sorted(reviews.items()):
            image = resolve(archive, entry_id, ".jpg")
            if image is None:  # pruned by retention, or an unreadable frame that never had an image
                counts["missing_image"] = counts.get("missing_image", 0) + 1
                continue
            folder = f"{good_to}/{GOOD}" if review.outcome == FALSE_REJECT else f"test/{review.true_class}"
            name = entry_id.replace("/", "_") + ".jpg"
            (staging / folder).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image, staging / folder / name)
            counts[folder] = counts.get(folder, 0) + 1
            listing.append({"file": f"{folder}/{name}", **review.as_dict(), "seq": review.message.get("seq"),
                            "run_id": review.message.get("run_id"), "frame_id": review.message.get("frame_id")})
        (staging / "reviews.json").write_text(json.dumps(listing, indent=1), encoding="utf-8")
        swap_in_dir(staging, out)  # ``out`` is absent or empty (checked above)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return counts


def run_export(args: argparse.Namespace) -> int:
    counts = export(args.reviews, args.archive, args.out, args.good_to)
    for folder, n in sorted(counts.items()):
        print(f"{folder}: {n}")
    written = sum(n for k, n in counts.items() if k != "missing_image")
    print(f"ui export: {written} images in {args.out} (MVTec AD layout: station train --data {args.out}; "
          f"station calibrate --good {args.out}/{args.good_to}/{GOOD})", file=sys.stderr)
    return EXIT_OK
