"""Model bundle: ``models/<name>/manifest.yaml`` plus the ONNX files it lists.

The manifest is the contract between training and serving: classes, input
view (polar unwrap), normalisation, interpolation, the anomaly threshold and how it was
chosen, the training data's fingerprint, headline metrics and a checksum of
every file. A bundle whose files do not match their checksums is refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from station.core.atomic import write_text_atomic
from station.core.defect_rule import TOP_CLASS, DefectRule
from station.core.folders import GOOD
from station.core.map_classifier import FEATURE_COUNTS
from station.core.preprocess import Lighting, Normalisation, PreprocessSpec, Sampling
from station.core.validation import load_yaml_model
from station.errors import BundleError

MANIFEST = "manifest.yaml"
BUNDLE_FORMAT = "station.bundle/1"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ViewManifest(_Strict):
    """The polar view both models see (see station/core/preprocess.py)."""

    kind: Literal["polar"] = "polar"
    angle_bins: int = Field(gt=0)
    radius_bins: int = Field(gt=0)
    radius_margin: float = Field(gt=1.0, le=2.0)
    min_radius_fraction: float = Field(default=0.15, gt=0, lt=1)
    max_radius_fraction: float = Field(default=0.6, gt=0, le=1)
    #: how the view is sampled for the mouth and the polar unwrap (station/core/preprocess.py,
    #: PreprocessSpec.sampling); bundles trained before "area-block" existed say "area"
    interpolation: Sampling = "area"
    #: how the mouth is lit and so located: front (a bright lip), back (a dark rim on a backlight) or
    #: auto (decided per frame); bundles from before there was a choice are front-lit
    lighting: Lighting = "front"


class InputManifest(_Strict):
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in v):
            raise ValueError("every std must be > 0")
        return v

    def normalisation(self) -> Normalisation:
        return Normalisation(self.mean, self.std)


#: precisions a model can be served at; all but fp32 are files made by `station export` (station/tools/convert.py)
PRECISIONS = ("fp32", "fp16", "int8")


class ConvertedModel(_Strict):
    """A precision-converted copy of a model's FP32 ONNX file, made by `station export`."""

    file: str  # named for its precision: classifier.int8.onnx
    #: the FP32 file's checksum it was made from: a retrained model makes the copy stale
    source_sha256: str
    #: how it was made: tool and versions, settings, calibration images and their fingerprint, when
    made: dict[str, Any] = Field(default_factory=dict)
    #: its last `station export --check` against FP32: the labelled folder, images, pass/fail agreement,
    #: accuracy and AUROC drops, ``ok`` (within the bounds), when; ``precision: auto`` serves an INT8
    #: autoencoder on the CPU only where ``ok`` (station/core/backends/precision.py)
    parity: dict[str, Any] | None = None


class ModelFile(_Strict):
    file: str
    arch: str
    inputs: tuple[str, ...] = ("input",)  # in the order the inspector feeds them
    output: str
    #: classifier: probabilities averaged over this many evenly spaced turns of the bottle (exact
    #: circular shifts of the polar view's rows), run as one batch; 1 for older bundles
    rotations: int = Field(default=1, ge=1, le=16)
    #: precision → the converted file (station export); FP32 is ``file`` itself
    converted: dict[str, ConvertedModel] = Field(default_factory=dict)

    @field_validator("converted")
    @classmethod
    def _converted_precisions(cls, v: dict[str, ConvertedModel]) -> dict[str, ConvertedModel]:
        unknown = sorted(set(v) - set(PRECISIONS[1:]))
        if unknown:
            raise ValueError(f"unknown precision {', '.join(unknown)}; converted files are {', '.join(PRECISIONS[1:])}")
        return v


class AnomalyManifest(_Strict):
    smoothing_sigma: float = Field(ge=0)
    top_k_fraction: float = Field(gt=0, le=1)
    #: radii beyond this × the rim radius are background and never score (None: no mask; older bundles)
    mask_radius: float | None = Field(default=None, gt=0)
    threshold: float
    threshold_method: str
    calibration_scores: str | None = None


#: where a bottle's class probabilities come from: the CNN classifier (classifier.onnx; bundles before
#: 2026-12-07), the map classifier (station/core/map_classifier.py) or both (geometric mean)
ClassSource = Literal["cnn", "map", "fused"]
CLASS_SOURCES: tuple[str, ...] = get_args(ClassSource)


class MapClassifierManifest(_Strict):
    """A multinomial logistic regression on the anomaly map's features, fitted at training."""

    feature_set: str
    #: the anomaly threshold at fitting: the features' unit (station/core/map_classifier.py)
    threshold: float = Field(gt=0)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: (n_features, n_classes), rows in the feature set's order, columns in the manifest's class order
    weights: tuple[tuple[float, ...], ...]
    bias: tuple[float, ...]
    #: what it was fitted on and how (images, L2 strength, training accuracy), for the engineer
    fit: dict[str, Any] = Field(default_factory=dict)

    @field_validator("std")
    @classmethod
    def _positive(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(s <= 0 for s in v):
            raise ValueError("every std must be > 0")
        return v


class DecisionManifest(_Strict):
    #: the classes' probabilities come from: see CLASS_SOURCES
    classes_from: ClassSource = "cnn"
    map_classifier: MapClassifierManifest | None = None
    class_confidence: float = Field(default=0.5, gt=0, le=1)
    #: what fails a bottle by its class (station/core/decide.py): the top class (older bundles decide so) or
    #: the defect classes' sum (bundles `station train` writes since 2026-12-08)
    defect_rule: DefectRule = TOP_CLASS
    #: the classifier's probabilities are softened (T > 1) by this temperature, fitted on held-out
    #: images at training (1: as the network gives them; older bundles)
    temperature: float = Field(default=1.0, gt=0, le=100)
    #: the anomaly score the classifier alone needs to fail a bottle (station/core/decide.py; 0: none)
    classifier_min_anomaly: float = Field(default=0.0, ge=0)
    #: the quantile of good bottles' anomaly scores it is (None: set by hand); `station calibrate`
    #: recomputes it from the line's good bottles with the threshold
    classifier_min_anomaly_quantile: float | None = Field(default=None, ge=0, le=1)
    #: how classifier_min_anomaly was chosen, for the engineer reading the manifest
    classifier_min_anomaly_method: str | None = None


class DriftQuantity(_Strict):
    """Reference statistics of one drift-watched quantity over the good training images (station/core/drift.py)."""

    side: Literal["high", "low", "both"]  # which way it may drift
    n: int = Field(ge=1)
    median: float
    scale: float = Field(gt=0)  # robust standard deviation (1.4826 × MAD), floored at the measurement's resolution
    q_low: float  # the ``tail`` quantile
    q_high: float  # the ``1 − tail`` quantile
    source: str


class DriftManifest(_Strict):
    """What drift watch compares the line with; the bounds follow from these and the station's window."""

    tail: float = Field(gt=0, lt=0.5)
    z: float = Field(gt=0)
    quantities: dict[str, DriftQuantity]
    #: quantities without a reference, and why (too few images of the kind it needs)
    skipped: dict[str, str] = Field(default_factory=dict)


class Manifest(_Strict):
    format: str = BUNDLE_FORMAT
    name: str
    version: str
    created_at: str
    classes: tuple[str, ...]
    canonical_size: int = Field(gt=0)
    view: ViewManifest
    inputs: dict[str, InputManifest]
    models: dict[str, ModelFile]
    anomaly: AnomalyManifest
    decision: DecisionManifest = DecisionManifest()
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    #: drift watch's reference (None: a bundle from before drift watch; the station then does not watch)
    drift: DriftManifest | None = None
    files: dict[str, str] = Field(default_factory=dict)  # relative path → sha256

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        if v != BUNDLE_FORMAT:
            raise ValueError(f"unsupported bundle format {v!r}, this station reads {BUNDLE_FORMAT!r}")
        return v

    @field_validator("classes")
    @classmethod
    def _classes_sane(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(v) < 2:
            raise ValueError("a classifier needs at least 2 classes")
        if len(set(v)) != len(v):
            raise ValueError("class names must be unique")
        if GOOD not in v:
            raise ValueError(f"the classes must include {GOOD!r}, the class that passes")
        return v

    @model_validator(mode="after")
    def _map_classifier_fits(self) -> Manifest:
        d = self.decision
        if d.classes_from == "cnn":
            return self
        mc = d.map_classifier
        if mc is None:
            raise ValueError(f"decision.classes_from is {d.classes_from!r} but decision.map_classifier is missing")
        if mc.feature_set not in FEATURE_COUNTS:
            raise ValueError(f"decision.map_classifier.feature_set {mc.feature_set!r}: this station computes "
                             f"{', '.join(FEATURE_COUNTS)}; retrain the bundle")
        n = FEATURE_COUNTS[mc.feature_set]
        if any(len(v) != n for v in (mc.mean, mc.std, mc.weights)) \
                or any(len(row) != len(self.classes) for row in mc.weights) or len(mc.bias) != len(self.classes):
            raise ValueError(f"decision.map_classifier: weights must be {n} features × {len(self.classes)} "
                             "classes, with a mean and std per feature and a bias per class")
        return self

    def preprocess_spec(self) -> PreprocessSpec:
        return preprocess_spec(self.canonical_size, self.view, self.inputs)


def preprocess_spec(canonical_size: int, view: ViewManifest, inputs: dict[str, InputManifest]) -> PreprocessSpec:
    """The preprocessing parameters a manifest records, as preprocess() takes them."""
    return PreprocessSpec(
        canonical_size=canonical_size,
        angle_bins=view.angle_bins,
        radius_bins=view.radius_bins,
        radius_margin=view.radius_margin,
        min_radius_fraction=view.min_radius_fraction,
        max_radius_fraction=view.max_radius_fraction,
        classifier=inputs["classifier"].normalisation(),
        autoencoder=inputs["autoencoder"].normalisation(),
        sampling=view.interpolation,
        lighting=view.lighting,
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Bundle:
    """A verified bundle on disk."""

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest

    def model_path(self, role: str, precision: str = "fp32") -> Path:
        """The ONNX file of ``role`` at ``precision``; BundleError saying how to make one that is missing."""
        model = self.manifest.models[role]
        if precision == "fp32":
            return self.root / model.file
        converted = model.converted.get(precision)
        if converted is None:
            raise BundleError(f"{self.root}: the {role} has no {precision} file; make it with station export "
                              f"--model {self.root} --precision {precision} (needs the train extra)")
        if converted.source_sha256 != self.manifest.files.get(model.file):
            raise BundleError(f"{self.root / converted.file}: made from an earlier {model.file} (the model was "
                              f"retrained); run station export --model {self.root} --precision {precision} again")
        return self.root / converted.file

    def has_precision(self, role: str, precision: str) -> bool:
        try:
            self.model_path(role, precision)
        except BundleError:
            return False
        return True

    def parity_ok(self, role: str, precision: str) -> bool:
        """Whether that converted file's recorded parity check (`station export --check`) met the bounds."""
        converted = self.manifest.models[role].converted.get(precision)
        return bool(converted is not None and converted.parity is not None and converted.parity.get("ok"))

    @property
    def label(self) -> str:
        return f"{self.manifest.name} {self.manifest.version}"


REQUIRED_ROLES = ("classifier", "autoencoder")


def load_bundle(root: Path, verify_checksums: bool = True) -> Bundle:
    """Read and verify ``root/manifest.yaml``; BundleError names the file and the problem."""
    if not root.exists():
        raise BundleError(f"model bundle {root} does not exist")
    if not root.is_dir():
        raise BundleError(f"model bundle {root} is not a directory")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: missing (is {root} a model bundle made by `station train`?)")
    manifest = load_yaml_model(manifest_path, Manifest, BundleError)
    for role in REQUIRED_ROLES:
        if role not in manifest.models:
            raise BundleError(f"{manifest_path}: models.{role}: required model is missing")
        if role not in manifest.inputs:
            raise BundleError(f"{manifest_path}: inputs.{role}: required input spec is missing")
    for role in REQUIRED_ROLES:
        path = root / manifest.models[role].file
        if not path.is_file():
            raise BundleError(f"{path}: model file listed in {manifest_path} is missing")
        if manifest.models[role].file not in manifest.files:
            raise BundleError(f"{manifest_path}: files: no checksum for {manifest.models[role].file}")
    if verify_checksums:
        for rel, expected in manifest.files.items():
            path = root / rel
            if not path.is_file():
                raise BundleError(f"{path}: listed in {manifest_path} but missing")
            actual = sha256_file(path)
            if actual != expected:
                raise BundleError(
                    f"{path}: checksum mismatch (manifest {expected[:12]}…, file {actual[:12]}…): "
                    "the file was changed or corrupted after the bundle was written"
                )
    return Bundle(root, manifest)


def write_manifest(root: Path, manifest: Manifest, name: str = MANIFEST) -> Path:
    """Write the manifest to ``name`` in ``root``, atomically and durably: a bundle is rewritten in place."""
    path = root / name
    data = manifest.model_dump(mode="json")
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False), fsync=True)
    return path


def checksums(root: Path, relpaths: list[str]) -> dict[str, str]:
    return {rel: sha256_file(root / rel) for rel in relpaths}
