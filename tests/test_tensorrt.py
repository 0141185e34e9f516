"""TensorRT serving: the engine cache's rules everywhere; the API checked against TensorRT 10.13's stubs and
TensorRT 11's own bindings in CI; parity with ONNX Runtime on a machine with a GPU, skipped with the reason
elsewhere."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from station.core.backends.engine_cache import EngineCache, EngineKey, StaleEngines, onnx_sources
from station.core.backends.gpu import GpuInfo, tensorrt_release
from station.core.bundle import load_bundle
from station.errors import BundleError, MissingDependencyError
from tests.conftest import run_station

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("autoencoder", "classifier")
ORIN = GpuInfo("Orin (nvgpu)", (8, 7), True, 8 << 30, "10.3.0.30")
FP32 = dict.fromkeys(ROLES, "fp32")


def _gpu_or_reason() -> tuple[GpuInfo | None, str]:
    from station.core.backends.gpu import probe

    try:
        return probe(), ""
    except MissingDependencyError as exc:
        return None, str(exc)


GPU, NO_GPU_REASON = _gpu_or_reason()
needs_gpu = pytest.mark.skipif(GPU is None, reason=f"needs a CUDA GPU with TensorRT and pycuda: {NO_GPU_REASON}")
needs_no_tensorrt = pytest.mark.skipif(GPU is not None, reason="TensorRT and a GPU are present here")


# -- engine cache ---------------------------------------------------------------


def _store(cache: EngineCache, key: EngineKey, plans: dict[str, bytes], precisions: dict[str, str]) -> None:
    cache.store(key, plans, {}, onnx_sources(cache.bundle, precisions))


def test_engine_key_names_gpu_compute_capability_tensorrt_precision_and_the_onnx_checksum(bundle: Path,
                                                                                           tmp_path: Path) -> None:
    root = shutil.copytree(bundle, tmp_path / "b")
    key = EngineKey.for_bundle(load_bundle(root), ORIN, FP32)
    assert key.dirname == f"orin-nvgpu-sm87-trt10.3.0.30-fp32-{key.onnx}" and len(key.onnx) == 12
    # The ONNX file the plan comes from is part of the key: another file (retrained) → another key.
    manifest = yaml.safe_load((root / "manifest.yaml").read_text())
    manifest["files"]["classifier.onnx"] = "0" * 64
    (root / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    assert EngineKey.for_bundle(load_bundle(root, verify_checksums=False), ORIN, FP32).onnx != key.onnx
    # A precision the bundle has no file for is refused, naming the command that makes it.
    with pytest.raises(BundleError, match="station export"):
        EngineKey.for_bundle(load_bundle(root, verify_checksums=False), ORIN, dict.fromkeys(ROLES, "fp16"))


def test_cache_returns_plans_only_for_their_own_key(bundle: Path, tmp_path: Path) -> None:
    b = load_bundle(shutil.copytree(bundle, tmp_path / "b"))
    cache = EngineCache(b)
    key = EngineKey.for_bundle(b, ORIN, FP32)
    _store(cache, key, {r: f"plan of {r}".encode() for r in ROLES}, FP32)
    found = cache.lookup(key, ROLES)
    assert found is not None and found.plans["classifier"].read_bytes() == b"plan of classifier"
    assert cache.available() == [key.dirname]
    meta = json.loads((cache.folder(key) / "engine.json").read_text())
    assert meta["models"]["classifier"]["onnx"] == "classifier.onnx"
    # Another precision, another GPU, another TensorRT: nothing to load, so the caller rebuilds or refuses.
    other_gpu = GpuInfo("NVIDIA H200", (9, 0), False, 141 << 30, "10.3.0.30")
    newer_trt = GpuInfo(ORIN.name, ORIN.compute_capability, True, ORIN.total_memory, "11.4.0.106")
    for other in (EngineKey(key.gpu, key.compute_capability, key.tensorrt, "int8", key.onnx),
                  EngineKey.for_bundle(b, other_gpu, FP32), EngineKey.for_bundle(b, newer_trt, FP32)):
        assert cache.lookup(other, ROLES) is None


def test_storing_plans_of_a_new_onnx_file_removes_those_of_the_old(bundle: Path, tmp_path: Path) -> None:
    b = load_bundle(shutil.copytree(bundle, tmp_path / "b"))
    cache = EngineCache(b)
    key = EngineKey.for_bundle(b, ORIN, FP32)
    old = EngineKey(key.gpu, key.compute_capability, key.tensorrt, key.precision, "a" * 12)
    other_precision = EngineKey(key.gpu, key.compute_capability, key.tensorrt, "int8", "b" * 12)
    for k in (old, other_precision, key):
        _store(cache, k, {r: b"x" for r in ROLES}, FP32)
    assert cache.available() == sorted([key.dirname, other_precision.dirname])


def test_cache_refuses_plans_built_from_another_model_or_filed_under_another_key(bundle: Path,
                                                                                   tmp_path: Path) -> None:
    root = shutil.copytree(bundle, tmp_path / "b")
    key = EngineKey.for_bundle(load_bundle(root), ORIN, FP32)
    _store(EngineCache(load_bundle(root)), key, {r: b"x" for r in ROLES}, FP32)
    meta_path = root / "engines" / key.dirname / "engine.json"
    meta = json.loads(meta_path.read_text())

    # A plan copied by hand into the folder of another key is refused, not loaded.
    meta["key"]["tensorrt"] = "10.0.0"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StaleEngines, match="records key"):
        EngineCache(load_bundle(root)).lookup(key, ROLES)

    # The bundle retrained (its classifier's checksum changed): the cached plan is stale.
    meta["key"]["tensorrt"] = ORIN.tensorrt_version
    meta["models"]["classifier"]["onnx_sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StaleEngines, match="retrained"):
        EngineCache(load_bundle(root)).lookup(key, ROLES)


def test_storing_again_replaces_the_whole_folder(bundle: Path, tmp_path: Path) -> None:
    b = load_bundle(shutil.copytree(bundle, tmp_path / "b"))
    cache = EngineCache(b)
    key = EngineKey.for_bundle(b, ORIN, FP32)
    _store(cache, key, {r: b"old" for r in ROLES}, FP32)
    _store(cache, key, {r: b"new" for r in ROLES}, FP32)
    found = cache.lookup(key, ROLES)
    assert found is not None and all(p.read_bytes() == b"new" for p in found.plans.values())
    assert sorted(p.name for p in cache.root.iterdir()) == [key.dirname]  # no temporary or old folders left


# -- without TensorRT -------------------------------------------------------------


@needs_no_tensorrt
def test_build_engine_without_tensorrt_exits_2_saying_what_to_install(bundle: Path) -> None:
    proc = run_station("build-engine", "--model", str(bundle))
    assert proc.returncode == 2, proc.stderr
    assert "station build-engine: error:" in proc.stderr
    assert "TensorRT is not installed" in proc.stderr and "station[tensorrt]" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_build_engine_calibration_points_to_station_export(bundle: Path) -> None:
    proc = run_station("build-engine", "--model", str(bundle), "--precision", "int8", "--calibration", "/x")
    assert proc.returncode == 2 and "station export --model" in proc.stderr and "--precision int8" in proc.stderr


def test_tensorrt_older_than_10_3_is_refused_naming_the_oldest_supported() -> None:
    assert tensorrt_release("10.3.0.30") == (10, 3) and tensorrt_release("11.4.0.106") == (11, 4)
    with pytest.raises(MissingDependencyError, match=r"8\.6\.2.*too old.*10\.3"):
        tensorrt_release("8.6.2.3")


@needs_no_tensorrt
def test_backend_tensorrt_without_a_gpu_is_refused_and_auto_falls_back(bundle: Path, eval_root: Path,
                                                                      tmp_path: Path) -> None:
    forced = run_station("replay", "--model", str(bundle), "--source", str(eval_root), "--backend", "tensorrt")
    assert forced.returncode == 2, forced.stderr
    assert "backend tensorrt: TensorRT is not installed" in forced.stderr

    out = tmp_path / "v.jsonl"
    auto = run_station("replay", "--model", str(bundle), "--source", str(eval_root), "--backend", "auto",
                       "--out", str(out))
    assert auto.returncode == 0, auto.stderr
    events = [json.loads(line) for line in auto.stderr.splitlines() if line.startswith("{")]
    (chosen,) = [e for e in events if e["event"] == "backend_chosen"]
    assert chosen["backend"] == "onnxruntime"
    assert chosen["reason"].startswith("auto: no TensorRT GPU here (TensorRT is not installed")
    assert len(out.read_text().splitlines()) == sum(1 for p in eval_root.rglob("*") if p.is_file())


# -- the TensorRT code against TensorRT's API -----------------------------------------


def _mypy(source: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "uses_tensorrt.py"
    path.write_text(source)
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                           "--cache-dir", str(tmp_path / "cache"), str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.skipif(not (ROOT / ".venv" / "tensorrt-stubs" / "tensorrt").is_dir(),
                    reason="TensorRT's stubs are not installed (deploy/test.sh runs deploy/tensorrt_stubs.py)")
def test_type_check_catches_a_misspelt_tensorrt_call(tmp_path: Path) -> None:
    good = ("import tensorrt as trt\n"
            "builder = trt.Builder(trt.Logger(trt.Logger.WARNING))\n"
            "config = builder.create_builder_config()\n"
            "config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)\n"
            "network = builder.create_network(0)\n"
            "plan = builder.build_serialized_network(network, config)\n")
    ok = _mypy(good, tmp_path)
    assert ok.returncode == 0, ok.stdout
    bad = _mypy(good.replace("build_serialized_network(network, config)", "build_serialized_netwrk(network)"),
                tmp_path)
    assert bad.returncode == 1
    assert '"Builder" has no attribute "build_serialized_netwrk"' in bad.stdout


TRT11 = ROOT / ".venv" / "tensorrt11"
TRT11_SNIPPET = (
    "import tensorrt as trt\n"
    "TENSORRT_10 = int(trt.__version__.split('.')[0]) < 11\n"
    "builder = trt.Builder(trt.Logger(trt.Logger.WARNING))\n"
    "config = builder.create_builder_config()\n"
    "network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))\n"
    "config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)\n"
    "plan = builder.build_serialized_network(network, config)\n"
)


def _trt11_check(source: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "uses_tensorrt.py"
    path.write_text(source)
    return subprocess.run([sys.executable, str(ROOT / "deploy" / "tensorrt11_check.py"), "--dir", str(TRT11),
                           str(path)], capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.skipif(not (TRT11 / "stubs" / "tensorrt").is_dir(),
                    reason="TensorRT 11's stubs are not made (deploy/test.sh runs deploy/tensorrt11_check.py)")
def test_tensorrt11_check_fails_a_name_11_removed_unless_it_is_in_a_10x_only_branch(tmp_path: Path) -> None:
    ok = _trt11_check(TRT11_SNIPPET, tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    removed = TRT11_SNIPPET + "config.set_flag(trt.BuilderFlag.INT8)\nconfig.int8_calibrator = None\n"
    bad = _trt11_check(removed, tmp_path)
    assert bad.returncode == 1, bad.stdout
    assert '"type[BuilderFlag]" has no attribute "INT8"' in bad.stdout
    assert '"IBuilderConfig" has no attribute "int8_calibrator"' in bad.stdout
    # The same names in the branch that only runs on TensorRT 10 are not 11's business ...
    legacy = TRT11_SNIPPET + "if TENSORRT_10:\n    config.set_flag(trt.BuilderFlag.INT8)\n"
    assert _trt11_check(legacy, tmp_path).returncode == 0
    # ... and TensorRT 10.13's stubs (the plain mypy run) still have them.
    assert _mypy(removed.replace("config.int8_calibrator = None\n", ""), tmp_path).returncode == 0


# -- on a GPU ---------------------------------------------------------------------

#: Largest differences from ONNX Runtime on the CPU running the same ONNX file, allowed per precision:
#: class probabilities (absolute) and the anomaly score (relative). docs/jetson.md states them.
TOLERANCES = {"fp32": (1e-3, 1e-3), "fp16": (2e-2, 2e-2), "int8": (1e-1, 1e-1)}


@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_matches_onnxruntime(bundle: Path, synth_root: Path, eval_root: Path, tmp_path: Path,
                                      precision: str) -> None:
    from station.core.backends import BackendSpec
    from station.core.folders import list_images
    from station.core.imageio import read_image
    from station.core.inspector import Inspector
    from station.core.preprocess import preprocess

    root = shutil.copytree(bundle, tmp_path / "b")
    if precision != "fp32":  # TensorRT builds the precision station export put in the graph
        proc = run_station("export", "--model", str(root), "--precision", precision, timeout=1800)
        assert proc.returncode == 0, proc.stderr
    proc = run_station("build-engine", "--model", str(root), "--precision", precision, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    assert "strongly typed" in proc.stderr
    b = load_bundle(root)
    # ONNX Runtime runs the same file: what the precision costs is the CPU parity test's (tests/test_export.py);
    # here, that TensorRT computes what the graph says.
    cpu = Inspector(b, BackendSpec("onnxruntime", precision=precision))
    gpu = Inspector(b, BackendSpec("tensorrt", precision=precision, build_engines=False))
    assert gpu.backend == "tensorrt"
    worst_p, worst_s = 0.0, 0.0
    for path in list_images(eval_root):
        inputs = preprocess(read_image(path), cpu.preprocess_spec)
        ref, got = cpu.inspect(inputs), gpu.inspect(inputs)
        worst_p = max(worst_p, float(np.abs(ref.probabilities - got.probabilities).max()))
        worst_s = max(worst_s, abs(ref.anomaly_score - got.anomaly_score) / max(abs(ref.anomaly_score), 1e-6))
    print(f"parity {precision}: max |Δp| {worst_p:.2e}, max relative Δscore {worst_s:.2e}")
    tol_p, tol_s = TOLERANCES[precision]
    assert worst_p <= tol_p and worst_s <= tol_s
