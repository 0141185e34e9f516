"""The layer contract (docs/architecture.md): lint-imports keeps it and catches a break; no import cycle; small
modules; and the interfaces between the layers that replaced duck-typed probes (Source, Frame's typed fields)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import grimp
import pytest

from station.core.frame import Frame, Trigger
from station.core.verdict import Verdict
from station.service.daemon import Station, StationHooks, StationSettings
from station.sources import OnOverload, SourceBase
from station.sources.camera import REASON_CAMERA_SKIPPED

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500
LAYERS_CONTRACT = "station layers: a module imports only its own layer or lower ones"
TORCH_CONTRACT = "serving never imports the training stack (torch, torchvision, onnx, matplotlib)"


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "lint-imports"
    command = [str(exe)] if exe.exists() else [shutil.which("lint-imports") or "lint-imports"]
    # PYTHONPATH first: grimp must read the station/ under cwd, not the installed (editable) one.
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([*command, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _broken(output: str) -> set[str]:
    return {line.removesuffix(" BROKEN").strip() for line in output.splitlines() if line.endswith(" BROKEN")}


def test_lint_imports_keeps_every_contract() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout and LAYERS_CONTRACT in result.stdout and TORCH_CONTRACT in result.stdout


#: (what is added to station/core/decide.py, the contract it breaks); the lazy and TYPE_CHECKING forms count too
FORBIDDEN = [
    pytest.param("import torch\n", TORCH_CONTRACT, id="torch-in-core"),
    pytest.param("from station.service import daemon\n", LAYERS_CONTRACT, id="core-imports-service"),
    pytest.param("\n\ndef _late() -> None:\n    from station.service import daemon  # noqa: F401\n", LAYERS_CONTRACT,
                 id="lazy-import-upwards"),
    pytest.param("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from station.sources import Source\n",
                 LAYERS_CONTRACT, id="type-checking-import-upwards"),
]


@pytest.mark.parametrize(("added", "contract"), FORBIDDEN)
def test_lint_imports_fails_on_a_forbidden_import(tmp_path: Path, added: str, contract: str) -> None:
    shutil.copytree(ROOT / "station", tmp_path / "station", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    module = tmp_path / "station" / "core" / "decide.py"
    module.write_text(module.read_text(encoding="utf-8") + "\n" + added, encoding="utf-8")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert contract in _broken(result.stdout), result.stdout
    assert "station.core.decide" in result.stdout  # the report names the offending module


def _find_cycle(graph: grimp.ImportGraph, package: str) -> list[str] | None:
    """One import cycle among ``package``'s modules (a package's ``__init__`` is its own module), or None."""

    def imported_by(module: str) -> Iterator[str]:
        return iter(sorted(m for m in graph.find_modules_directly_imported_by(module)
                           if m == package or m.startswith(package + ".")))

    done: set[str] = set()
    for start in sorted(m for m in graph.modules if m == package or m.startswith(package + ".")):
        if start in done:
            continue
        path = [start]  # the depth-first path; an import of a module on it closes a cycle
        stack = [imported_by(start)]
        while stack:
            child = next(stack[-1], None)
            if child is None:
                stack.pop()
                done.add(path.pop())
            elif child in path:
                return [*path[path.index(child):], child]
            elif child not in done:
                path.append(child)
                stack.append(imported_by(child))
    return None


def test_no_import_cycle_in_station() -> None:
    # Imports inside functions count (grimp reads every import statement), and so do TYPE_CHECKING ones.
    graph = grimp.build_graph("station", exclude_type_checking_imports=False, cache_dir=None)
    assert _find_cycle(graph, "station") is None, " → ".join(_find_cycle(graph, "station") or [])
    # the check itself: one import back up from the bottom of core closes a cycle, and it is found
    graph.add_import(importer="station.core.frame", imported="station.core.verdict")
    cycle = _find_cycle(graph, "station")
    assert cycle is not None and cycle[0] == cycle[-1] and {"station.core.frame", "station.core.verdict"} <= set(cycle)


def test_no_module_over_500_lines() -> None:
    over = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "station").rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (split them by responsibility): {over}"


# -- the interfaces that replaced probes and side channels ------------------------------------------


class _DroppingSource(SourceBase):
    """Two frames as a newest-only camera hands them over: the first dropped, the second with its trigger."""

    finite = True
    on_overload: OnOverload = "wait"

    def describe(self) -> str:
        return "two frames"

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        import numpy as np

        yield Frame(0, "cam/7", "test", 0.0, 0.0, skip_reason=REASON_CAMERA_SKIPPED)
        yield Frame(1, "cam/8", "test", 0.0, 0.0, image=np.zeros((4, 4, 3), np.uint8),
                    trigger=Trigger(block_id=8, camera_timestamp=123))


class _PassPipeline:
    model: ClassVar[dict[str, str]] = {"name": "stand-in", "version": "1"}
    drift = None

    def process(self, frame: Frame) -> Verdict:
        return Verdict(frame=frame, verdict="pass", reasons=[], model=self.model)


def test_typed_frame_fields_reach_the_verdict_and_source_defaults_hold() -> None:
    published: list[dict[str, Any]] = []
    station = Station(_PassPipeline(), _DroppingSource(), StationSettings("cam1", "run"),  # type: ignore[arg-type]
                      hooks=StationHooks(sinks=[lambda _v, m: published.append(m)]))
    counters = station.run(threading.Event())
    assert counters.captured == counters.published == 2
    skipped, passed = published
    assert (skipped["verdict"], skipped["reasons"], skipped["trigger"]) == ("skipped", ["camera_skipped"], None)
    assert passed["verdict"] == "pass"
    # the wire form: every trigger key, in the schema's order, None where the camera does not say
    assert list(passed["trigger"].items()) == [("block_id", 8), ("count", None), ("encoder", None),
                                               ("camera_timestamp", 123)]
    # SourceBase's defaults: a source without a device is never degraded and reports no camera
    snapshot = station.snapshot()
    assert snapshot["camera"] is None and snapshot["state"] == "stopped" and snapshot["drift"] is None
    assert not station.source.degraded
