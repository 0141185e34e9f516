#!/usr/bin/env bash
# Installs station as a systemd service:
#   $PREFIX/venv            the station and its serving dependencies (no torch)
#   $PREFIX/models/current  the model bundle given with --bundle
#   /etc/station/station.yaml  from deploy/station.example.yaml, never overwriting an existing one
#   $UNITDIR/station.service, station@.service, station-ui.service (the operator's page, docs/ui.md)
# With DESTDIR set, everything goes under DESTDIR (a package build or a test) and
# nothing is done to the running system: no user is created, systemd is not told.
#
#   sudo deploy/install.sh --bundle models/demo
#   DESTDIR=/tmp/root deploy/install.sh --extras ''
#
# On a GPU (docs/jetson.md):
#   --gpu                 also installs the units' drop-in systemd/gpu/gpu.conf (GPU device nodes, engines built at start)
#                         and, unless --extras is given, the tensorrt extra: TensorRT 10.3 up to 11.x from PyPI
#   --jetson              --gpu, and a venv that sees JetPack's TensorRT and pycuda (--system-site-packages);
#                         JetPack 6 or later (TensorRT >= 10.3, docs/jetson.md), checked after the install
#   --build-engines PREC  builds the bundle's TensorRT engines now, on this GPU (not with DESTDIR: an engine
#                         is only valid on the GPU it was built on)
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-/opt/station}
DESTDIR=${DESTDIR:-}
UNITDIR=${UNITDIR:-/etc/systemd/system}
CONFDIR=${CONFDIR:-/etc/station}
EXTRAS=camera
EXTRAS_GIVEN=
BUNDLE=
GPU=
SYSTEM_SITE=
ENGINES=

usage() {
  echo "usage: $0 [--prefix DIR] [--bundle MODEL_DIR] [--extras camera,tensorrt|''] [--gpu] [--jetson]" \
       "[--build-engines fp16|fp32|int8]" >&2
  exit 2
}
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX=${2:?}; shift 2 ;;
    --bundle) BUNDLE=${2:?}; shift 2 ;;
    --extras) EXTRAS=${2?}; EXTRAS_GIVEN=1; shift 2 ;;
    --gpu) GPU=1; shift ;;
    --jetson) GPU=1; SYSTEM_SITE=--system-site-packages; shift ;;
    --build-engines) ENGINES=${2:?}; shift 2 ;;
    -h|--help) usage ;;
    *) echo "install.sh: unknown argument $1" >&2; usage ;;
  esac
done
case "$PREFIX" in /*) ;; *) echo "install.sh: --prefix must be absolute, got $PREFIX" >&2; exit 2 ;; esac
case "$ENGINES" in ""|fp16|fp32|int8) ;; *) echo "install.sh: --build-engines takes fp16, fp32 or int8" >&2; exit 2 ;; esac
if [ -n "$ENGINES" ] && { [ -n "$DESTDIR" ] || [ -z "$BUNDLE" ]; }; then
  echo "install.sh: --build-engines needs --bundle and the target itself (no DESTDIR): engines are built for one GPU" >&2
  exit 2
fi
if [ -n "$BUNDLE" ] && [ ! -f "$BUNDLE/manifest.yaml" ]; then
  echo "install.sh: $BUNDLE is not a model bundle (no manifest.yaml); make one with station train" >&2; exit 2
fi

if [ -n "$GPU" ] && [ -z "$SYSTEM_SITE" ] && [ -z "$EXTRAS_GIVEN" ]; then
  # A discrete GPU: TensorRT from PyPI, a version the build path supports (pyproject's tensorrt extra).
  EXTRAS="$EXTRAS,tensorrt"
fi

root=$DESTDIR
venv=$root$PREFIX/venv
echo "install.sh: venv in $venv"
python3 -m venv $SYSTEM_SITE "$venv"
spec=$src
[ -n "$EXTRAS" ] && spec="$src[$EXTRAS]"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "$spec" 2> >(grep -v '^WARNING: Location' >&2)
if [ -n "$SYSTEM_SITE" ]; then
  # A Jetson: TensorRT comes from JetPack (seen through --system-site-packages); pycuda is built here
  # against JetPack's CUDA toolkit.
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "pycuda>=2024.1" \
    2> >(grep -v '^WARNING: Location' >&2)
fi
if [ -n "$GPU" ] && [ -z "$root" ]; then
  # The TensorRT the venv sees (PyPI's, or JetPack's) must be one the build path supports: 10.3 on.
  if ! "$venv/bin/python" -c 'from station.core.backends.gpu import tensorrt_module, tensorrt_release
t = tensorrt_module(); major, minor = tensorrt_release(str(t.__version__))
print(f"install.sh: TensorRT {t.__version__} (major {major}): engines are built strongly typed")'; then
    echo "install.sh: no supported TensorRT in $venv (see above and docs/jetson.md: JetPack 6 or later;" \
         "pip install 'station[tensorrt]' on a discrete GPU)" >&2
    exit 2
  fi
fi
if [ -n "$root" ]; then
  # A venv records its own path in its scripts and pyvenv.cfg; staged under DESTDIR it must
  # name the path it will have once installed.
  grep -rlIZ -- "$venv" "$venv/bin" "$venv/pyvenv.cfg" | xargs -0 -r sed -i "s|$venv|$PREFIX/venv|g"
fi

if [ -n "$BUNDLE" ]; then
  rm -rf "$root$PREFIX/models/current.new"
  install -d "$root$PREFIX/models"
  cp -r "$BUNDLE" "$root$PREFIX/models/current.new"
  rm -rf "$root$PREFIX/models/current"
  mv "$root$PREFIX/models/current.new" "$root$PREFIX/models/current"
fi

if [ -n "$ENGINES" ]; then
  echo "install.sh: building $ENGINES engines for this GPU"
  "$venv/bin/station" build-engine --model "$PREFIX/models/current" --precision "$ENGINES"
fi

install -d -m 0755 "$root$CONFDIR"
if [ -e "$root$CONFDIR/station.yaml" ]; then
  echo "install.sh: keeping the existing $CONFDIR/station.yaml"
else
  sed "s|/opt/station/|$PREFIX/|g" "$src/deploy/station.example.yaml" > "$root$CONFDIR/station.yaml"
  chmod 0644 "$root$CONFDIR/station.yaml"
fi

install -d "$root$UNITDIR"
for unit in station.service station@.service; do
  sed "s|/opt/station/|$PREFIX/|g" "$src/systemd/$unit" > "$root$UNITDIR/$unit"
  chmod 0644 "$root$UNITDIR/$unit"
  if [ -n "$GPU" ]; then
    install -d "$root$UNITDIR/$unit.d"
    sed "s|/opt/station/|$PREFIX/|g" "$src/systemd/gpu/gpu.conf" > "$root$UNITDIR/$unit.d/gpu.conf"
    chmod 0644 "$root$UNITDIR/$unit.d/gpu.conf"
  fi
done
# The operator's page: its own unit, never the GPU drop-in (it runs no model).
sed "s|/opt/station/|$PREFIX/|g" "$src/systemd/station-ui.service" > "$root$UNITDIR/station-ui.service"
chmod 0644 "$root$UNITDIR/station-ui.service"

if [ -z "$root" ]; then
  if [ "$(id -u)" -eq 0 ]; then
    if ! id station >/dev/null 2>&1; then
      # video and plugdev: USB3 Vision and V4L2 cameras on Debian.
      useradd --system --no-create-home --home-dir /var/lib/station --shell /usr/sbin/nologin station
      for group in video plugdev; do getent group "$group" >/dev/null && usermod -aG "$group" station; done
    fi
    # render: discrete GPUs' device group; the engine cache lives in the bundle, which the service writes.
    if [ -n "$GPU" ]; then
      getent group render >/dev/null && usermod -aG render station
      [ -d "$PREFIX/models" ] && chown -R station:station "$PREFIX/models"
    fi
    systemctl daemon-reload 2>/dev/null || true
  fi
  echo "install.sh: done. Edit $CONFDIR/station.yaml, then: systemctl enable --now station"
  echo "install.sh: the operator's page: systemctl enable --now station-ui (http://127.0.0.1:8080/, docs/ui.md)"
else
  echo "install.sh: staged under $root"
fi
