#!/usr/bin/env python3
"""Install TensorRT's type stubs where only mypy reads them, and patch what Python cannot parse.

TensorRT itself cannot be installed on a machine without NVIDIA's package index, so CI checks
station/core/backends/tensorrt*.py against the generated stubs of ``tensorrt-stubs`` (the TensorRT 10.13
API). The stubs are installed with ``--no-deps --target DIR`` rather than into the venv: they
ship a ``tensorrt/`` folder of ``.pyi`` files only, which Python would import as an empty namespace
package and so make TensorRT look installed. mypy finds them through ``mypy_path``.

Two kinds of generated line are not valid Python and are patched:
- a parameter named after a keyword (``in``) becomes ``in_``;
- a parameter without a default after one with a default gets ``= ...``.

Usage: deploy/tensorrt_stubs.py DIR   (pip runs from the interpreter running this script)
"""

from __future__ import annotations

import ast
import keyword
import re
import subprocess
import sys
from pathlib import Path

STUBS = "tensorrt-stubs==10.13.0.35.1"
_PARAM = re.compile(r"(?P<name>\b[A-Za-z_]\w*)\s*:")


def _split_params(params: str) -> list[str]:
    """Split a parameter list on top-level commas (annotations hold brackets with commas)."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(params):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(params[start:i])
            start = i + 1
    out.append(params[start:])
    return out


def patch_line(line: str) -> str:
    m = re.match(r"^(?P<head>\s*def \w+\()(?P<params>.*)(?P<tail>\)\s*(->.*)?:\s*)$", line)
    if not m:
        return line
    fixed, seen_default = [], False
    for p in _split_params(m["params"]):
        name = p.split(":")[0].split("=")[0].strip().lstrip("*")
        if keyword.iskeyword(name):
            p = p.replace(name, name + "_", 1)
        if "=" in p:
            seen_default = True
        elif seen_default and p.strip() and not p.strip().startswith("*") and p.strip() != "/":
            p = p.rstrip() + " = ..."
        fixed.append(p)
    return m["head"] + ",".join(fixed) + m["tail"]


def patch_file(path: Path) -> int:
    """Patch until the file parses; returns the number of lines changed."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    changed = 0
    for _ in range(10_000):
        try:
            ast.parse("".join(lines), filename=str(path))
            break
        except SyntaxError as exc:
            i = (exc.lineno or 1) - 1
            new = patch_line(lines[i].rstrip("\n")) + "\n"
            if new == lines[i]:
                raise SystemExit(f"{path}:{i + 1}: cannot patch: {lines[i].strip()}") from exc
            lines[i] = new
            changed += 1
    path.write_text("".join(lines), encoding="utf-8")
    return changed


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    target = Path(sys.argv[1])
    if not (target / "tensorrt" / "__init__.pyi").is_file():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "--no-deps", "--upgrade", "--target", str(target), STUBS], check=True)
    total = sum(patch_file(p) for p in sorted(target.glob("tensorrt*/**/*.pyi")))
    print(f"tensorrt stubs in {target}: {total} lines patched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
