"""tests/conftest.py under pytest-xdist: a shared fixture is built once per run however many workers need
it, and the files holding slow tests are handed out first. Each case is an inner pytest run on a few
generated files that import those helpers, as deploy/test.sh's run does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[1]

CONFTEST = '''
import os
import time

import pytest

from tests.conftest import pytest_collection_modifyitems, shared_once  # noqa: F401


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    def make(out):
        with open(os.environ["BUILDS"], "a") as log:
            log.write(os.environ.get("PYTEST_XDIST_WORKER", "main") + "\\n")
        time.sleep(1.0)  # the other workers arrive while it builds, and must wait, not build again
        (out / "data").write_text("made")
    return shared_once(tmp_path_factory, "data", make)
'''

USES_BUILT = '''
import os


def test_{n}(built):
    assert (built / "data").read_text() == "made"
    with open(os.environ["USERS"], "a") as log:
        log.write(os.environ.get("PYTEST_XDIST_WORKER", "main") + "\\n")
'''

INI = "[pytest]\nmarkers =\n    slow: slow\n"


def _pytest(folder: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """An inner run, as if started by hand: not a worker of this run, even when this run has workers."""
    outer = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST_", "PYTEST_CURRENT_TEST"))}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=folder,
                          capture_output=True, text=True, timeout=300,
                          env={**outer, "PYTHONPATH": str(REPO), **env})


def test_a_shared_fixture_is_built_once_for_all_workers(tmp_path: Path) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "pytest.ini").write_text(INI)
    (inner / "conftest.py").write_text(CONFTEST)
    for n in range(6):
        (inner / f"test_{n}.py").write_text(USES_BUILT.format(n=n))
    builds, users = tmp_path / "builds", tmp_path / "users"
    proc = _pytest(inner, "-n", "3", "--dist", "loadfile", "--basetemp", str(tmp_path / "bt"),
                   env={"BUILDS": str(builds), "USERS": str(users)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "6 passed" in proc.stdout
    assert len(set(users.read_text().split())) >= 2, users.read_text()  # it did run on several workers
    assert len(builds.read_text().split()) == 1, builds.read_text()


def test_under_xdist_the_files_with_slow_tests_are_collected_first_in_their_own_order(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text(INI)
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_collection_modifyitems  # noqa: F401\n")
    (tmp_path / "test_a.py").write_text("def test_a1(): pass\ndef test_a2(): pass\n")
    (tmp_path / "test_b.py").write_text("import pytest\n\n\n@pytest.mark.slow\ndef test_b1(): pass\n")
    (tmp_path / "test_c.py").write_text("def test_c2(): pass\ndef test_c1(): pass\ndef test_c3(): pass\n")

    def order(worker: str | None) -> list[str]:
        proc = _pytest(tmp_path, "--collect-only", "-q", env={"PYTEST_XDIST_WORKER": worker} if worker else {})
        assert proc.returncode == 0, proc.stdout[-3000:]
        return [line.split("::")[1] for line in proc.stdout.splitlines() if "::" in line]

    assert order(None) == ["test_a1", "test_a2", "test_b1", "test_c2", "test_c1", "test_c3"]
    assert order("gw0") == ["test_b1", "test_c2", "test_c1", "test_c3", "test_a1", "test_a2"]
