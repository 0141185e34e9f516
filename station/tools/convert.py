"""`station export`: precision-converted copies of a bundle's ONNX files, and their parity with FP32.

Precision lives in the ONNX graph, so TensorRT builds a strongly typed network from it (the only kind
TensorRT 11 has) and ONNX Runtime serves the same file on the CPU:

- **fp16**: ONNX Runtime's float16 converter, inputs and outputs kept FP32 (the station feeds and reads
  float32 on both backends), and the nodes that lose most in FP16 kept FP32 (FP16_KEEP_FP32).
- **int8**: explicit quantization, symmetric INT8 Q/DQ nodes (``quantize_static``, QDQ format, QInt8
  activations and weights, weights per output channel, zero points 0 as TensorRT requires), with scales
  calibrated on images run through the station's own preprocessing, so the ranges measured are the ones
  serving sees; the classifier's anomaly-map input comes from the bundle's FP32 autoencoder. Images: the
  bundle's training images (``split.json``'s training part under ``training.data_root``, good and
  defective), or ``--calibration DIR``. An image that cannot be read or shows no bottle is refused, naming it.

Each file is written as ``<model>.<precision>.onnx``, checksummed in the manifest's ``files`` and recorded
under ``models.<model>.converted.<precision>`` with how it was made. Conversion needs ``onnx`` (the train
extra): an offline tool for the workstation that trained the bundle; the station only reads the files.

``parity`` runs each converted file against FP32 on a labelled set (pass/fail agreement, 4-class accuracy,
image AUROC), for ``station export --check DIR``, CI and docs/performance.md.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from station.core import report_format
from station.core.accuracy import auroc
from station.core.atomic import atomic_path
from station.core.backends import ROLES, BackendSpec
from station.core.bundle import Bundle, ConvertedModel, load_bundle, sha256_file, write_manifest
from station.core.decide import FAIL, decide
from station.core.folders import GOOD, NOVEL, label_of, list_images
from station.core.imageio import read_image
from station.core.inspector import Inspector
from station.core.pipeline import Pipeline
from station.core.preprocess import preprocess
from station.errors import ConfigError, DatasetError, FrameError, MissingDependencyError, StationError

CONVERTED = ("fp16", "int8")
#: images the INT8 scales are calibrated on, evenly spaced over the sorted list (every class its share)
CALIBRATION_IMAGES = 96
#: op types kept FP32 in an FP16 graph, besides ONNX Runtime's default list. The autoencoder's output is
#: a normalised difference of its input and its reconstruction (Sub, ReduceMean, Div, Sqrt, Abs): two
#: close values subtracted lose most of their digits in FP16, and the anomaly score is a top-k of exactly
#: those. Softmax sums exponentials; the classifier's convolutions and activations go FP16.
FP16_KEEP_FP32 = ("Sub", "Div", "Sqrt", "Abs", "Pow", "ReduceMean", "ReduceSum", "Softmax")
#: op types given Q/DQ nodes in an INT8 graph: the convolutions and the linear layer, where the time
#: goes. The autoencoder's tail (input minus reconstruction, normalised) stays FP32: quantised, the small
#: differences of a good bottle round to a few steps and its anomaly score moves by tens of per cent.
INT8_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: parity of a converted file with FP32 (issue 18): at least this pass/fail agreement, at most these
#: differences of 4-class accuracy (fraction) and image AUROC
MIN_AGREEMENT = 0.995
MAX_ACCURACY_DROP = 0.01
MAX_AUROC_DROP = 0.005


def converted_name(role: str, precision: str) -> str:
    return f"{role}.{precision}.onnx"


def _converters() -> tuple[Any, Any, Any]:
    try:
        import onnx
        from onnxruntime import quantization
        from onnxruntime.transformers import float16
    except ImportError as exc:
        raise MissingDependencyError(f"station export needs onnx ({exc}); install the train extra: "
                                     "pip install 'station[train]' (on the workstation that trains bundles)") from exc
    return onnx, quantization, float16


# -- calibration images ---------------------------------------------------------------


def training_images(bundle: Bundle) -> tuple[list[Path], str]:
    """The images the bundle was trained on (good and defective), from the manifest's training section."""
    training = bundle.manifest.training
    root = training.get("data_root")
    if not root:
        raise DatasetError(f"{bundle.root}: the manifest records no training data (training.data_root); "
                           "give --calibration DIR with good and defective bottles from the line")
    data = Path(root)
    if not data.is_dir():
        raise DatasetError(f"{bundle.root}: the training images are not here ({data}, the manifest's "
                           "training.data_root); give --calibration DIR with good and defective bottles")
    split = bundle.root / str(training.get("split") or "split.json")
    if split.is_file():
        rows = json.loads(split.read_text(encoding="utf-8")).get("train", [])
        paths = [data / row["path"] for row in rows]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise DatasetError(f"{missing[0]}: listed in {split} as a training image but missing "
                               f"({len(missing)} of {len(paths)} missing); give --calibration DIR")
        return sorted(paths), f"the bundle's training images ({split.name}: train, under {data})"
    return list_images(data), f"the bundle's training data folder {data}"


def calibration_paths(bundle: Bundle, folder: Path | None) -> tuple[list[Path], str]:
    if folder is None:
        found, source = training_images(bundle)
    else:
        found, source = (list_images(folder) if folder.is_dir() else []), str(folder)
        if not found:
            raise DatasetError(f"--calibration {folder}: no images found")
    if not found:
        raise DatasetError(f"{source}: no images to calibrate on")
    return found[:: max(1, len(found) // CALIBRATION_IMAGES)][:CALIBRATION_IMAGES], source


def calibration_feeds(bundle: Bundle, paths: list[Path]) -> dict[str, list[dict[str, np.ndarray]]]:
    """Each model's inputs by name, one inspection per image, as serving feeds them."""
    reference = Inspector(bundle, BackendSpec("onnxruntime", threads=1, precision="fp32"))
    feeds: dict[str, list[dict[str, np.ndarray]]] = {role: [] for role in ROLES}
    for path in paths:
        try:
            inputs = preprocess(read_image(path), reference.preprocess_spec)
        except FrameError as exc:
            raise DatasetError(f"calibration image {path}: {exc.detail} ({exc.reason}); remove it or "
                               "calibrate on another folder") from exc
        arrays = {"autoencoder": [inputs.autoencoder],
                  "classifier": reference.classifier_batches(inputs, reference.autoencoder.run(inputs.autoencoder))}
        for role in ROLES:
            names = bundle.manifest.models[role].inputs
            feeds[role].append({n: np.ascontiguousarray(a, np.float32)
                                for n, a in zip(names, arrays[role], strict=True)})
    return feeds


def _fingerprint(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


# -- conversion -------------------------------------------------------------------


def _to_fp16(src: Path, dst: Path) -> dict[str, Any]:
    onnx, _, float16 = _converters()
    model = float16.convert_float_to_float16(
        onnx.load(str(src)), keep_io_types=True,
        op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, *FP16_KEEP_FP32])
    onnx.save(model, str(dst))
    return {"method": "onnxruntime.transformers.float16.convert_float_to_float16", "keep_io_types": True,
            "kept_fp32_op_types": list(FP16_KEEP_FP32)}


class _Feeds:
    """ONNX Runtime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def edge_layers(model: Any) -> list[str]:
    """Names of the weighted layers nearest each input and each output: the first reached walking from the
    graph's inputs, and back from its outputs, through unweighted operators."""
    producer = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def walk(start: list[str], step: Any) -> set[str]:
        found: set[str] = set()
        seen: set[str] = set()
        todo = list(start)
        while todo:
            for node in step(todo.pop()):
                if node.name in seen:
                    continue
                seen.add(node.name)
                if node.op_type in INT8_OP_TYPES:
                    found.add(node.name)
                else:
                    todo.extend(node.output if step is forward else node.input)
        return found

    def forward(tensor: str) -> list[Any]:
        return consumers.get(tensor, [])

    def backward(tensor: str) -> list[Any]:
        node = producer.get(tensor)
        return [] if node is None else [node]

    return sorted(walk([i.name for i in model.graph.input], forward)
                  | walk([o.name for o in model.graph.output], backward))


def _to_int8(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    onnx, q, _ = _converters()
    settings: dict[str, Any] = {
        "quant_format": "QDQ", "activation_type": "QInt8", "weight_type": "QInt8", "per_channel": True,
        "op_types_to_quantize": list(INT8_OP_TYPES), "calibrate_method": "MinMax",
        "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True}}
    with tempfile.TemporaryDirectory(prefix="station-export-") as work:
        # Shape inference and graph folding first, as ONNX Runtime's quantizer expects: Q/DQ pairs then
        # sit around the fused operators, not around what the optimiser would fold away.
        pre = Path(work) / "pre.onnx"
        # (ONNX's own shape inference: the symbolic one gives up on the autoencoder's dynamic Slice.)
        q.shape_inference.quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        # The first and last weighted layers stay FP32, as is usual: the input image and what the last
        # layer outputs (the reconstruction subtracted from the input, the logits) are what the scores
        # are made of. Rounded to 256 steps, the test bundle's anomaly scores moved by up to 39 %
        # (median 9 %); with these layers FP32, by up to 21 % (median 4 %).
        keep = edge_layers(onnx.load(str(pre)))
        settings["fp32_nodes"] = keep
        q.quantize_static(
            str(pre), str(dst), _Feeds(feeds), quant_format=q.QuantFormat.QDQ, per_channel=True,
            activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
            op_types_to_quantize=list(INT8_OP_TYPES), nodes_to_exclude=keep,
            calibrate_method=q.CalibrationMethod.MinMax, extra_options=settings["extra_options"])
    return {"method": "onnxruntime.quantization.quant_pre_process + quantize_static", **settings}


def export(root: Path, precision: str, calibration: Path | None = None,
           progress: Callable[[str], None] = lambda _: None) -> Bundle:
    """Convert both models of the bundle at ``root`` to ``precision`` and record them in its manifest."""
    if precision not in CONVERTED:
        raise ConfigError(f"--precision: {precision!r}: export makes {', '.join(CONVERTED)} (fp32 is the bundle)")
    onnx, _, _ = _converters()
    bundle = load_bundle(root)
    made_common: dict[str, Any] = {
        "tool": "station export", "station": _version("station"), "onnxruntime": _version("onnxruntime"),
        "onnx": onnx.__version__, "made_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    feeds: dict[str, list[dict[str, np.ndarray]]] = {}
    if precision == "int8":
        paths, source = calibration_paths(bundle, calibration)
        progress(f"calibrating on {len(paths)} images from {source}")
        feeds = calibration_feeds(bundle, paths)
        made_common["calibration"] = {"source": source, "images": len(paths), "sha256": _fingerprint(paths),
                                      "preprocessing": "station.core.preprocess (the bundle's view and normalisation)"}
    converted: dict[str, ConvertedModel] = {}
    for role in ROLES:
        model = bundle.manifest.models[role]
        name = converted_name(role, precision)
        src = bundle.root / model.file
        with atomic_path(bundle.root / name) as tmp:
            progress(f"{role}: {model.file} → {name}")
            try:
                how = _to_fp16(src, tmp) if precision == "fp16" else _to_int8(src, tmp, feeds[role])
            except Exception as exc:  # the converters raise bare Exceptions and onnx's own errors
                raise StationError(f"{src}: converting to {precision} failed: {exc}") from exc
            tmp.chmod(0o644)
        converted[role] = ConvertedModel(file=name, source_sha256=bundle.manifest.files[model.file],
                                         made={**made_common, **how})
    m = bundle.manifest
    files = {**m.files, **{c.file: sha256_file(bundle.root / c.file) for c in converted.values()}}
    models = {role: m.models[role].model_copy(update={"converted": {**m.models[role].converted,
                                                                      precision: converted[role]}})
              for role in m.models}
    manifest = m.model_copy(update={"models": models, "files": files})
    write_manifest(bundle.root, manifest)
    return load_bundle(root)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# -- parity -----------------------------------------------------------------------


@dataclass
class _Run:
    failed: list[bool]
    predicted: list[str]
    scores: list[float]


def parity(bundle: Bundle, folder: Path, configs: dict[str, dict[str, str]],
           progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Each configuration (name → per-model precisions) against FP32 on the labelled images of ``folder``."""
    classes = bundle.manifest.classes
    paths = [p for p in list_images(folder) if label_of(p, folder, classes) is not None]
    if not paths:
        raise DatasetError(f"--check {folder}: no labelled images (subfolders named {', '.join(classes)})")
    labels = [str(label_of(p, folder, classes)) for p in paths]
    pipelines = {"fp32": Pipeline(bundle, BackendSpec("onnxruntime", threads=1, precision="fp32"))}
    for name, precisions in configs.items():
        pipelines[name] = Pipeline(bundle, BackendSpec("onnxruntime", threads=1, precision=precisions))
    runs = {name: _Run([], [], []) for name in pipelines}
    spec = pipelines["fp32"].inspector.preprocess_spec
    for i, path in enumerate(paths):
        try:
            inputs = preprocess(read_image(path), spec)
        except FrameError as exc:
            raise DatasetError(f"--check: {path}: {exc.detail}") from exc
        for name, pipeline in pipelines.items():
            scores = pipeline.inspector.inspect(inputs)
            decision = decide(scores, pipeline.policy)
            runs[name].failed.append(decision.verdict == FAIL)
            runs[name].predicted.append(decision.label)
            runs[name].scores.append(scores.anomaly_score)
        if (i + 1) % 50 == 0:
            progress(f"parity: {i + 1}/{len(paths)} images")
    classed = [i for i, label in enumerate(labels) if label != NOVEL]
    positive = [label != GOOD for label in labels]

    def figures(run: _Run) -> dict[str, Any]:
        accuracy = (sum(run.predicted[i] == labels[i] for i in classed) / len(classed)) if classed else None
        return {"accuracy": accuracy, "image_auroc": auroc(run.scores, positive)}

    ref = figures(runs["fp32"])
    out: dict[str, Any] = {"images": len(paths), "folder": str(folder), "fp32": ref, "configs": {}}
    for name in configs:
        run = runs[name]
        f = figures(run)
        agreement = float(np.mean([a == b for a, b in zip(run.failed, runs["fp32"].failed, strict=True)]))
        d_acc = None if ref["accuracy"] is None else ref["accuracy"] - f["accuracy"]
        d_auc = (None if ref["image_auroc"] is None or f["image_auroc"] is None
                 else ref["image_auroc"] - f["image_auroc"])
        ok = (agreement >= MIN_AGREEMENT and (d_acc is None or d_acc <= MAX_ACCURACY_DROP)
              and (d_auc is None or d_auc <= MAX_AUROC_DROP))
        rel = [abs(a - b) / max(abs(b), 1e-6) for a, b in zip(run.scores, runs["fp32"].scores, strict=True)]
        out["configs"][name] = {"precision": configs[name], "agreement": agreement, **f,
                                "accuracy_drop": d_acc, "auroc_drop": d_auc,
                                "max_relative_score_change": max(rel), "ok": ok}
    return out


def record_parity(bundle: Bundle, figures: dict[str, Any]) -> Bundle:
    """Write each per-file configuration's figures into its converted file's manifest entry."""
    m = bundle.manifest
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    models = dict(m.models)
    for name, c in figures["configs"].items():
        role, _, precision = name.partition("-")
        converted = models[role].converted.get(precision)
        if converted is None or set(c["precision"].values()) - {"fp32", precision}:
            continue  # not a one-file configuration
        record = {"folder": figures["folder"], "images": figures["images"], "checked_at": when,
                  **{k: c[k] for k in ("agreement", "accuracy", "image_auroc", "accuracy_drop", "auroc_drop",
                                       "max_relative_score_change", "ok")}}
        models[role] = models[role].model_copy(update={"converted": {
            **models[role].converted, precision: converted.model_copy(update={"parity": record})}})
    write_manifest(bundle.root, m.model_copy(update={"models": models}))
    return load_bundle(bundle.root)


def per_file_configs(bundle: Bundle) -> dict[str, dict[str, str]]:
    """One configuration per converted file: that model at its precision, the other at FP32."""
    return {f"{role}-{precision}": {**dict.fromkeys(ROLES, "fp32"), role: precision}
            for role in ROLES for precision in CONVERTED if bundle.has_precision(role, precision)}


def format_parity(p: dict[str, Any]) -> list[str]:
    def pct(v: float | None) -> str:
        return report_format.pct(v, 2)

    def num(v: float | None) -> str:
        return report_format.num(v, 4)

    ref = p["fp32"]
    lines = [f"parity on {p['images']} images of {p['folder']}: fp32 accuracy {pct(ref['accuracy'])}, "
             f"AUROC {num(ref['image_auroc'])}"]
    for name, c in p["configs"].items():
        lines.append(f"  {name:<22} pass/fail agreement {pct(c['agreement'])}, accuracy {pct(c['accuracy'])}, "
                     f"AUROC {num(c['image_auroc'])}, largest score change {100 * c['max_relative_score_change']:.2f} %"
                     f"  {'ok' if c['ok'] else 'FAILS'}")
    return lines
