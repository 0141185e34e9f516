#!/usr/bin/env python3
"""Check station's TensorRT code against the real TensorRT 11 API: a name 11.x does not have fails CI.

TensorRT 11 removed the weakly typed builder (BuilderFlag.FP16/INT8, the INT8 calibrators,
IBuilderConfig.int8_calibrator, Builder.platform_has_fast_*). mypy already checks the code against
TensorRT 10.13's published stubs (deploy/tensorrt_stubs.py); this script makes stubs of 11.x from
NVIDIA's own bindings and runs mypy again with them first on the path:

1. ``pip download --no-deps`` the ``tensorrt-cu12-bindings`` wheel (PyPI, pinned below). It holds the
   compiled extension ``tensorrt_bindings/tensorrt.so`` and no stubs. Its libraries (libnvinfer.so.11
   and friends) are not on PyPI, so it cannot be imported as it is.
2. The extension needs only a handful of C symbols from those libraries (``nm -D --undefined-only``:
   the ``create*_INTERNAL`` factories, the plugin registries, the parser version); everything else
   TensorRT exposes is reached through C++ vtables at run time. So three stand-in libraries of the same
   names, each defining those functions as returning NULL, are compiled with the C compiler (gcc), and
   the extension imports: pybind11 registers every class, method, property and enum value, none of them
   called.
3. pybind11-stubgen (pinned, from PyPI) writes ``.pyi`` stubs of that imported module, in the layout
   of tensorrt-stubs (``tensorrt/`` re-exporting ``tensorrt_bindings.tensorrt``); lines Python cannot
   parse (a parameter named ``in``) are patched as for 10.13.
4. mypy runs on station with ``MYPYPATH`` set to those stubs (searched before pyproject's
   ``mypy_path``) and ``--always-false TENSORRT_10``: code under ``if TENSORRT_10:`` is the branch that
   only runs on 10.x and is not checked against 11; everything else must exist in 11.

Everything is kept under DIR (default ``.venv/tensorrt11``) and reused: the wheel is downloaded once, at
test-setup time, never at station run time.

Usage: deploy/tensorrt11_check.py [--dir DIR] [--prepare-only] [FILE ...]   (default: the station package)
Exit status: mypy's (1 when a name is missing), 2 when the stubs cannot be made.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BINDINGS = "tensorrt-cu12-bindings==11.4.0.106"
STUBGEN = "pybind11-stubgen==3.0.0"
#: bumped when the way the stubs are made changes, so a cached copy is remade
STUBS_FORMAT = "2"
#: the name a 10.x-only branch tests (``if TENSORRT_10:``); mypy treats it as False for the 11 check
LEGACY_FLAG = "TENSORRT_10"
#: the C symbols tensorrt.so takes from TensorRT's libraries (nm -D --undefined-only), by library
STAND_INS = {
    "libnvinfer.so.11": ["createInferBuilder_INTERNAL", "createInferRefitter_INTERNAL",
                         "createInferRuntime_INTERNAL", "getBuilderPluginRegistry", "getPluginRegistry"],
    "libnvinfer_plugin.so.11": ["initLibNvInferPlugins"],
    "libnvonnxparser.so.11": ["createNvOnnxParser_INTERNAL", "createNvOnnxParserRefitter_INTERNAL",
                              "getNvOnnxParserVersion"],
}


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", *args], check=True)


def prepare(work: Path) -> Path:
    """The TensorRT 11 stubs under ``work``, made once; returns the folder to put on MYPYPATH."""
    stubs = work / "stubs"
    stamp = stubs / "MADE_FROM"
    if stamp.is_file() and stamp.read_text().strip() == f"{BINDINGS} {STUBS_FORMAT}":
        return stubs
    work.mkdir(parents=True, exist_ok=True)
    wheels = work / "wheel"
    if not any(wheels.glob("tensorrt_cu12_bindings-*.whl")):
        _pip("download", "--no-deps", "--only-binary", ":all:", "-d", str(wheels), BINDINGS)
    (wheel,) = wheels.glob("tensorrt_cu12_bindings-*.whl")
    bindings = work / "bindings"
    shutil.rmtree(bindings, ignore_errors=True)
    with zipfile.ZipFile(wheel) as z:
        z.extractall(bindings)
    libs = work / "stand-in-libs"
    libs.mkdir(exist_ok=True)
    for lib, symbols in STAND_INS.items():
        source = libs / f"{lib}.c"
        source.write_text("".join(f"void *{s}(void) {{ return 0; }}\n" for s in symbols))
        cc = os.environ.get("CC", "cc")
        if shutil.which(cc) is None:
            raise SystemExit(f"tensorrt11_check: no C compiler ({cc}) to make the stand-in {lib}; install gcc")
        subprocess.run([cc, "-shared", "-fPIC", "-o", str(libs / lib), str(source)], check=True)
    missing = _undefined(bindings / "tensorrt_bindings" / "tensorrt.so") - {s for v in STAND_INS.values() for s in v}
    if missing:
        raise SystemExit(f"tensorrt11_check: {wheel.name} needs symbols the stand-ins lack: {sorted(missing)}")
    tools = work / "stubgen"
    if not (tools / "pybind11_stubgen").is_dir():
        _pip("install", "--no-deps", "--target", str(tools), STUBGEN)
    out = work / "stubs.new"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "LD_LIBRARY_PATH": str(libs), "PYTHONPATH": f"{bindings}{os.pathsep}{tools}"}
    # Invalid expressions (C++ types pybind11 could not name) become "...": the names are what is checked.
    subprocess.run([sys.executable, "-m", "pybind11_stubgen", "--ignore-all-errors", "-o", str(out),
                    "tensorrt_bindings"], check=True, env=env, capture_output=True, text=True)
    package = out / "tensorrt_bindings"
    # The tensorrt package re-exports the bindings, as tensorrt-stubs lays it out for 10.13.
    (out / "tensorrt").mkdir()
    shutil.copy(package / "__init__.pyi", out / "tensorrt" / "__init__.pyi")
    sys.path.insert(0, str(ROOT / "deploy"))
    from tensorrt_stubs import patch_file

    for pyi in sorted(out.glob("**/*.pyi")):
        patch_file(pyi)
    add_buffer_protocol(package / "tensorrt.pyi")
    (out / "MADE_FROM").write_text(f"{BINDINGS} {STUBS_FORMAT}\n")
    shutil.rmtree(stubs, ignore_errors=True)
    out.rename(stubs)
    return stubs


def add_buffer_protocol(pyi: Path) -> list[str]:
    """Give ``__buffer__`` to the classes whose docstring says they expose Python's buffer protocol.

    Python shows a type's buffer protocol as ``__buffer__`` only from 3.12 on, so stubs made on 3.11 lack
    it and ``bytes(plan)`` (an IHostMemory) would fail the check though TensorRT 11 supports it.
    """
    import ast

    lines = pyi.read_text(encoding="utf-8").splitlines(keepends=True)
    added = []
    tree = ast.parse("".join(lines))
    for node in sorted((n for n in tree.body if isinstance(n, ast.ClassDef)), key=lambda n: -n.lineno):
        doc = ast.get_docstring(node) or ""
        has = any(isinstance(b, ast.FunctionDef) and b.name == "__buffer__" for b in node.body)
        if "buffer protocol" in doc and not has and isinstance(node.body[0], ast.Expr):
            end = node.body[0].end_lineno or node.body[0].lineno
            lines.insert(end, "    def __buffer__(self, flags: int, /) -> memoryview: ...\n")
            added.append(node.name)
    pyi.write_text("".join(lines), encoding="utf-8")
    return added


def _undefined(extension: Path) -> set[str]:
    """The extension's undefined dynamic symbols that are not versioned (glibc, libstdc++) nor Python's."""
    out = subprocess.run(["nm", "-D", "--undefined-only", str(extension)], check=True, capture_output=True,
                         text=True).stdout
    names = {line.split()[-1] for line in out.splitlines() if line.strip()}
    return {n for n in names if "@" not in n and not n.startswith(("Py", "_Py", "_ITM", "__", "dl", "pthread"))}


def check(stubs: Path, files: list[str], cache: Path) -> subprocess.CompletedProcess[str]:
    """mypy on ``files`` (default: the station package) against the TensorRT 11 stubs."""
    env = {**os.environ, "MYPYPATH": str(stubs)}
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                           "--always-false", LEGACY_FLAG, "--cache-dir", str(cache), *files],
                          capture_output=True, text=True, env=env, cwd=ROOT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=ROOT / ".venv" / "tensorrt11")
    parser.add_argument("--prepare-only", action="store_true", help="make the stubs, check nothing")
    parser.add_argument("files", nargs="*")
    args = parser.parse_args()
    try:
        stubs = prepare(args.dir)
    except subprocess.CalledProcessError as exc:
        print(f"tensorrt11_check: {' '.join(map(str, exc.cmd))} failed: {exc.stderr or ''}", file=sys.stderr)
        return 2
    if args.prepare_only:
        print(f"TensorRT 11 stubs in {stubs}")
        return 0
    result = check(stubs, args.files, args.dir / "mypy-cache")
    sys.stdout.write(result.stdout.replace("Success:", "TensorRT 11 API check:"))
    sys.stderr.write(result.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
