#!/usr/bin/env bash
# One run on a GPU machine: what is there (TensorRT's major version and the build path it takes), the
# bundle's FP16 and INT8 files exported if missing, engines of all three precisions built from them, parity
# with ONNX Runtime, and station bench on both backends, printed as one report (for a GPU change's note).
#
#   deploy/gpu-check.sh [MODEL_DIR]      default: models/demo, trained here first if missing (needs torch)
#
# Needs: an NVIDIA GPU and driver; TensorRT's Python package and pycuda (the tensorrt extra, or JetPack's).
# What it cannot run it says, and goes on with the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models/demo}
REPORT=${REPORT:-runs/gpu-check}
FRAMES=${FRAMES:-300}
mkdir -p "$REPORT"
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ ! -x .venv/bin/python ]; then
    # --system-site-packages: a Jetson's TensorRT and pycuda come from JetPack, not from PyPI.
    python3 -m venv --system-site-packages .venv
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' || exit 1
  fi
  py=.venv/bin/python
fi
station() { "$py" -m station.cli "$@"; }
section() { printf '\n== %s\n' "$*"; }

section "machine"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>&1 \
  || cat /etc/nv_tegra_release 2>/dev/null || echo "no nvidia-smi"
"$py" - <<'PY'
import importlib, platform
print("python", platform.python_version(), platform.machine())
for name in ("tensorrt", "pycuda.driver", "onnxruntime", "torch"):
    try:
        m = importlib.import_module(name)
        print(f"{name}: {getattr(m, '__version__', 'present')}")
    except Exception as exc:
        print(f"{name}: not available ({exc})")
from station.core.backends import choose
c = choose("auto")
print(f"backend auto -> {c.name}: {c.reason}")
try:
    import tensorrt as trt
    from station.core.backends.gpu import tensorrt_release
    major, minor = tensorrt_release(str(trt.__version__))
    note = ("the flag is a no-op there: TensorRT 11 has only strongly typed networks" if major >= 11
            else "TensorRT 10.x: no BuilderFlag.FP16/INT8, no calibrator")
    print(f"TensorRT major version {major} ({trt.__version__}); build path: strongly typed network "
          f"(NetworkDefinitionCreationFlag.STRONGLY_TYPED) from the bundle's fp32/fp16/int8 ONNX file; {note}")
except Exception as exc:
    print(f"TensorRT build path: none ({exc})")
PY

if [ ! -f "$MODEL/manifest.yaml" ]; then
  section "bundle: training $MODEL on synthetic bottles"
  station synth --out runs/gpu-check/data --seed 0 >/dev/null && \
    station train --data runs/gpu-check/data/bottle --out "$MODEL" --seed 0 | tail -3 || exit 1
fi
station synth --out "$REPORT/eval" --seed 2 --train-good 0 --test-per-class 30 >/dev/null

status=0
section "station export fp16, int8 (needs the train extra; skipped where the bundle has them)"
for p in fp16 int8; do
  if grep -q "file: classifier.$p.onnx" "$MODEL/manifest.yaml"; then
    echo "$p: in the bundle already"
  else
    station export --model "$MODEL" --precision "$p" --check "$REPORT/eval/bottle/test" || status=1
  fi
done

section "build-engine fp16, fp32, int8 (strongly typed, from the ONNX file of each precision)"
for p in fp16 fp32 int8; do
  /usr/bin/time -f "$p build: %e s" "$py" -m station.cli build-engine --model "$MODEL" --precision "$p" || status=1
done

section "parity with ONNX Runtime on the same files (tests/test_tensorrt.py)"
"$py" -m pytest -q -rs -s tests/test_tensorrt.py -k matches_onnxruntime 2>&1 | grep -E "parity|passed|failed|SKIPPED|Error" \
  || status=1

section "bench"
for b in onnxruntime tensorrt; do
  echo "-- backend $b"
  station bench --model "$MODEL" --backend "$b" --frames "$FRAMES" --json "$REPORT/bench-$b.json" || status=1
done

section "replay through the daemon on auto"
station replay --model "$MODEL" --source "$REPORT/eval/bottle/test" --backend auto 2>/dev/null | tail -4 || status=1

section "result"
[ "$status" -eq 0 ] && echo "gpu-check: all steps ran" || echo "gpu-check: some steps failed (see above)"
exit "$status"
