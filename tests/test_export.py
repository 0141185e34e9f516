"""`station export`: FP16 and INT8 (Q/DQ) copies of a bundle's models, recorded in the manifest, served by
ONNX Runtime where configured, and compared with FP32 on an independent labelled set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
import yaml
from onnx import numpy_helper

from station.core.backends import BackendSpec, parse_precision, resolve_precision
from station.core.bundle import load_bundle, sha256_file
from station.core.inspector import Inspector
from station.errors import BundleError, ConfigError
from station.tools.convert import MAX_ACCURACY_DROP, MAX_AUROC_DROP, MIN_AGREEMENT
from tests.conftest import run_station

ROLES = ("autoencoder", "classifier")


@pytest.fixture(scope="module")
def exported(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture bundle with both converted precisions, made through the command line."""
    root = shutil.copytree(bundle, tmp_path_factory.mktemp("exported") / "b")
    for precision in ("fp16", "int8"):
        proc = run_station("export", "--model", str(root), "--precision", precision, timeout=900)
        assert proc.returncode == 0, proc.stderr
    return root


def test_export_writes_checksummed_files_named_for_their_precision_and_how_they_were_made(exported: Path) -> None:
    manifest = yaml.safe_load((exported / "manifest.yaml").read_text())
    for role in ROLES:
        converted = manifest["models"][role]["converted"]
        assert set(converted) == {"fp16", "int8"}
        for precision, entry in converted.items():
            assert entry["file"] == f"{role}.{precision}.onnx"
            assert manifest["files"][entry["file"]] == sha256_file(exported / entry["file"])
            assert entry["source_sha256"] == manifest["files"][f"{role}.onnx"]
            assert entry["made"]["tool"] == "station export" and entry["made"]["onnxruntime"]
        calibration = converted["int8"]["made"]["calibration"]
        # The bundle's own training images (split.json), good and defective, through station.core.preprocess.
        train_rows = json.loads((exported / "split.json").read_text())["train"]
        assert calibration["images"] == len(train_rows) and "split.json" in calibration["source"]
        assert converted["fp16"]["made"]["keep_io_types"] is True
    load_bundle(exported)  # every checksum verifies


def test_int8_files_hold_symmetric_int8_qdq_nodes_and_fp16_files_fp16_weights(exported: Path) -> None:
    for role in ROLES:
        model = onnx.load(str(exported / f"{role}.int8.onnx"))
        quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
        assert quantize, f"{role}: no Q/DQ nodes"
        inits = {i.name: i for i in model.graph.initializer}
        for node in quantize:
            zero_point = inits[node.input[2]]
            assert zero_point.data_type == onnx.TensorProto.INT8  # QInt8, as TensorRT takes it
            assert not numpy_helper.to_array(zero_point).any()  # symmetric: zero point 0
        fp16 = onnx.load(str(exported / f"{role}.fp16.onnx"))
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in fp16.graph.initializer)
        # Inputs and outputs stay float32: the station feeds and reads the same arrays at every precision.
        assert {i.type.tensor_type.elem_type for i in fp16.graph.input} == {onnx.TensorProto.FLOAT}


def test_onnxruntime_serves_the_precision_asked_for_per_model(exported: Path, bundle: Path) -> None:
    b = load_bundle(exported)
    inspector = Inspector(b, BackendSpec("onnxruntime", threads=1,
                                         precision={"autoencoder": "int8", "classifier": "fp16"}))
    assert inspector.autoencoder.name == "autoencoder.int8.onnx"
    assert inspector.classifier.name == "classifier.fp16.onnx"
    # auto: what measured best and passed parity, where the bundle has it (docs/performance.md): FP32 on
    # the CPU; FP16 on a GPU, else FP32 with the command that makes the files.
    assert resolve_precision("auto", "onnxruntime", b)[0] == {"autoencoder": "fp32", "classifier": "fp32"}
    assert resolve_precision("auto", "tensorrt", b)[0] == {"autoencoder": "fp16", "classifier": "fp16"}
    plain, why = resolve_precision("auto", "tensorrt", load_bundle(bundle))
    assert plain == {"autoencoder": "fp32", "classifier": "fp32"} and "station export --precision fp16" in why
    with pytest.raises(BundleError, match="station export"):
        load_bundle(bundle).model_path("classifier", "fp16")
    with pytest.raises(ConfigError, match="unknown model"):
        parse_precision("clasifier=fp16")


def test_a_retrained_model_makes_its_converted_files_stale(exported: Path, tmp_path: Path) -> None:
    root = shutil.copytree(exported, tmp_path / "b")
    manifest = yaml.safe_load((root / "manifest.yaml").read_text())
    manifest["models"]["autoencoder"]["converted"]["int8"]["source_sha256"] = "0" * 64
    (root / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    with pytest.raises(BundleError, match="retrained"):
        load_bundle(root).model_path("autoencoder", "int8")


def test_a_bad_calibration_image_is_refused_naming_it(bundle: Path, synth_root: Path, tmp_path: Path) -> None:
    root = shutil.copytree(bundle, tmp_path / "b")
    folder = shutil.copytree(synth_root / "test", tmp_path / "calib")
    (folder / "good" / "007_truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    proc = run_station("export", "--model", str(root), "--precision", "int8", "--calibration", str(folder))
    assert proc.returncode == 2, proc.stderr
    assert "007_truncated.png" in proc.stderr and "Traceback" not in proc.stderr
    assert not yaml.safe_load((root / "manifest.yaml").read_text())["models"]["classifier"].get("converted")


def test_without_the_training_images_export_asks_for_a_calibration_folder(bundle: Path, tmp_path: Path) -> None:
    root = shutil.copytree(bundle, tmp_path / "b")
    manifest = yaml.safe_load((root / "manifest.yaml").read_text())
    manifest["training"]["data_root"] = str(tmp_path / "gone")
    (root / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    proc = run_station("export", "--model", str(root), "--precision", "int8")
    assert proc.returncode == 2, proc.stderr
    assert "training.data_root" in proc.stderr and "--calibration" in proc.stderr


def test_parity_with_fp32_on_an_independent_labelled_set(exported: Path, eval_root: Path) -> None:
    """Each converted file against FP32 (that model converted, the other FP32), on the CPU.

    The fixture bundle is trained for seconds (2 epochs, 20 autoencoder steps): its class probabilities
    are nearly flat, so this small set can hold the FP16 files to the issue's bounds, and the INT8 ones
    only to what such a model allows; the figures on a trained bundle are in docs/performance.md.
    """
    from station.tools.convert import parity, per_file_configs

    figures = parity(load_bundle(exported), eval_root, per_file_configs(load_bundle(exported)))
    configs = figures["configs"]
    assert set(configs) == {f"{r}-{p}" for r in ROLES for p in ("fp16", "int8")}
    assert figures["images"] == sum(1 for p in eval_root.rglob("*.png"))
    for name in ("autoencoder-fp16", "classifier-fp16"):
        c = configs[name]
        assert c["agreement"] >= MIN_AGREEMENT, (name, c)
        assert c["accuracy_drop"] <= MAX_ACCURACY_DROP and c["auroc_drop"] <= MAX_AUROC_DROP, (name, c)
        assert c["ok"]
    # INT8 is measured and judged by the same bounds (the classifier's misses them on a bundle trained for real,
    # the autoencoder's depends on the model: docs/performance.md, so `auto` serves it only where the bundle's
    # own check passed); the autoencoder's verdicts at least agree here.
    assert configs["autoencoder-int8"]["agreement"] >= MIN_AGREEMENT, configs["autoencoder-int8"]
    for c in configs.values():  # the figures are the ones the bounds are read against
        assert 0 <= c["agreement"] <= 1 and c["ok"] == (c["agreement"] >= MIN_AGREEMENT
                                                        and c["accuracy_drop"] <= MAX_ACCURACY_DROP
                                                        and c["auroc_drop"] <= MAX_AUROC_DROP)


def test_export_check_prints_the_parity_and_exits_by_it(exported: Path, eval_root: Path, tmp_path: Path) -> None:
    root = shutil.copytree(exported, tmp_path / "b")
    proc = run_station("export", "--model", str(root), "--precision", "fp16", "--check", str(eval_root),
                       timeout=900)
    lines = [line for line in proc.stdout.splitlines() if "agreement" in line]
    assert len(lines) == 4, proc.stdout  # one per converted file, the INT8 ones made before
    failing = [line for line in lines if line.rstrip().endswith("FAILS")]
    assert proc.returncode == (1 if failing else 0), proc.stdout + proc.stderr
    # Each file's check is recorded with it, and `auto` serves the INT8 autoencoder on the CPU only if it passed.
    b = load_bundle(root)
    for line in lines:
        role, _, precision = line.split()[0].partition("-")
        recorded = b.manifest.models[role].converted[precision].parity
        assert recorded is not None and recorded["ok"] == (not line.rstrip().endswith("FAILS"))
        assert recorded["images"] == sum(1 for p in eval_root.rglob("*.png"))
    ae_ok = b.parity_ok("autoencoder", "int8")
    assert resolve_precision("auto", "onnxruntime", b)[0]["autoencoder"] == ("int8" if ae_ok else "fp32")
    # The same bundle with the check recorded as failed, and as passed: auto follows the record.
    for ok in (False, True):
        manifest = yaml.safe_load((root / "manifest.yaml").read_text())
        manifest["models"]["autoencoder"]["converted"]["int8"]["parity"]["ok"] = ok
        (root / "manifest.yaml").write_text(yaml.safe_dump(manifest))
        chosen, why = resolve_precision("auto", "onnxruntime", load_bundle(root))
        assert chosen == {"autoencoder": "int8" if ok else "fp32", "classifier": "fp32"}, why
