"""MVTec AD folder layout: class names and labelled-image discovery.

Torch-free: used by synth, training, replay and evaluation alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GOOD = "good"
#: The MVTec AD "bottle" classes, in the order the classifier's outputs use.
BOTTLE_CLASSES: tuple[str, ...] = ("good", "broken_large", "broken_small", "contamination")
DEFECT_CLASSES: tuple[str, ...] = BOTTLE_CLASSES[1:]
#: ``test/novel``: defects of kinds no class stands for (``station synth --novel``), there to test
#: whether the anomaly check catches what nobody labelled. Not a class: training never sees it.
NOVEL = "novel"
#: The kinds of novel defect; each image's kind is the part of its name after the index,
#: ``test/novel/007_stain.png`` (mask ``ground_truth/novel/007_stain_mask.png``).
NOVEL_KINDS: tuple[str, ...] = ("crack", "stain", "scratch", "bubble", "tint")

#: File suffixes treated as images when a folder is scanned.
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
)


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: str


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: Path) -> list[Path]:
    """Every image file under ``folder``, recursive, in a stable sorted order."""
    return sorted(p for p in folder.rglob("*") if is_image_file(p))


def list_candidate_files(folder: Path) -> list[Path]:
    """Every regular, non-hidden file under ``folder`` (recursive, sorted).

    Replay inspects these, not only files with an image suffix: a file that
    someone put in the folder and that cannot be read must still get a verdict.
    """
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def label_of(path: Path, root: Path, classes: tuple[str, ...]) -> str | None:
    """Ground-truth label of ``path`` if its first folder below ``root`` is a class name or ``novel``."""
    rel = path.relative_to(root)
    if len(rel.parts) >= 2 and (rel.parts[0] in classes or rel.parts[0] == NOVEL):
        return rel.parts[0]
    return None


def is_labelled_folder(root: Path, classes: tuple[str, ...]) -> bool:
    """A labelled replay folder is any folder whose subfolders are class names (and perhaps ``novel``).

    ``novel`` is allowed beside the classes so that a synthesised ``test/`` folder keeps its labelled
    summary; ``label_of`` labels its images ``novel``: scored as defects, kept out of the 4-class score.
    """
    subdirs = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return any(name in classes for name in subdirs) and all(name in classes or name == NOVEL for name in subdirs)


def novel_kind(path: Path) -> str | None:
    """The kind of a novel-defect image or mask from its name (``007_stain.png`` → ``stain``), else None."""
    parts = path.stem.removesuffix("_mask").split("_", 1)
    return parts[1] if len(parts) == 2 and parts[1] in NOVEL_KINDS else None


def labelled_pool(bottle_dir: Path, classes: tuple[str, ...] = BOTTLE_CLASSES) -> list[LabelledImage]:
    """The labelled images of an MVTec category folder: ``test/<class>/*`` plus ``train/good/*``."""
    pool: list[LabelledImage] = []
    for path in list_images(bottle_dir / "train" / GOOD):
        pool.append(LabelledImage(path, GOOD))
    test_dir = bottle_dir / "test"
    for cls in classes:
        for path in list_images(test_dir / cls):
            pool.append(LabelledImage(path, cls))
    return pool
