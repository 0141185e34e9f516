"""Config fuzzing: whatever station.yaml holds, the station exits 2 with a message naming the key,
never a traceback. Hypothesis mutates a valid config of every source kind."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from station.errors import ConfigError
from station.service.config import load_config
from tests.conftest import run_station

VALID: list[dict[str, Any]] = [
    {"station_id": "line1-cam1", "model": "models/current",
     "source": {"kind": "folder", "path": "incoming", "poll_interval_s": 0.2},
     "publish": {"endpoint": "tcp://127.0.0.1:5556", "heartbeat_interval_s": 1.0, "wait_subscribers": 0,
                 "curve": {"secret_key": "keys/s.key_secret", "allowed_clients": "keys/clients"}},
     "metrics": {"listen": "127.0.0.1:9108"},
     "archive": {"path": "rejects", "max_count": 100, "max_age_days": 7.0},
     "inference": {"backend": "auto", "precision": "fp16", "workers": 0, "queue_size": 8},
     "decision": {"class_confidence": 0.5, "anomaly_threshold": 5.0, "defect_rule": "top_class"},
     "output": {"jsonl": "v.jsonl"}, "log_level": "info"},
    {"station_id": "cam2", "model": "/opt/station/models/current",
     "source": {"kind": "pylon", "serial": "0815", "pixel_format": "BayerRG8", "exposure_us": 200.0,
                "trigger": "line1", "trigger_activation": "falling_edge", "grab_strategy": "latest_image_only"}},
    {"station_id": "cam3", "model": "m",
     "source": {"kind": "opencv", "uri": "rtsp://10.0.0.5/stream", "latest_only": True, "fps": 30.0,
                "fourcc": "MJPG"}},
]

junk = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _paths(node: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((*prefix, k))
            out.extend(_paths(v, (*prefix, k)))
    return out


def _set(config: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _delete(config: dict[str, Any], path: tuple[str, ...]) -> None:
    node = config
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]


@st.composite
def mutated(draw: st.DrawFn) -> tuple[dict[str, Any], tuple[str, ...]]:
    config = copy.deepcopy(draw(st.sampled_from(VALID)))
    path = draw(st.sampled_from(_paths(config)))
    how = draw(st.sampled_from(["replace", "unknown_key", "delete"]))
    if how == "unknown_key":
        parent = path[:-1]
        name = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=3, max_size=12))
        path = (*parent, name + "_x")  # never a real key
        _set(config, path, draw(junk))
    elif how == "delete":
        _delete(config, path)
    else:
        _set(config, path, draw(junk))
    return config, path


def _check(tmp_path: Path, config: Any, text: str | None = None) -> ConfigError | None:
    path = tmp_path / "station.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(config))
    try:
        load_config(path)
    except ConfigError as exc:
        return exc
    return None  # the mutation happened to be valid (a string where a string goes, an optional key removed)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=mutated())
def test_every_mutation_is_accepted_or_refused_naming_its_key(tmp_path: Path,
                                                              case: tuple[dict[str, Any], tuple[str, ...]]) -> None:
    config, path = case
    error = _check(tmp_path, config)
    if error is not None:
        message = str(error)
        # The key itself, or the section above it when the section as a whole is what is wrong
        # (a source whose kind was broken cannot say which of its keys were meant).
        named = [".".join(path[:n]) for n in range(len(path), 0, -1)]
        assert any(f"{key}:" in message or f"{key}." in message for key in named), (path, message)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_arbitrary_text_is_refused_with_a_config_error(tmp_path: Path, text: str) -> None:
    error = _check(tmp_path, None, text)
    assert error is not None  # no random text is a complete config: station_id, model and source are required
    assert str(tmp_path / "station.yaml") in str(error)


@pytest.mark.parametrize("mutation", [
    {"inference": {"workers": -1}},
    {"source": {"kind": "pylon", "trigger": "line9"}},
    {"publish": {"curve": {"secret_key": "k"}}},
    {"archive": {"max_bytes": "lots"}},
])
def test_the_cli_exits_2_without_a_traceback(tmp_path: Path, mutation: dict[str, Any]) -> None:
    config = {**copy.deepcopy(VALID[0]), **mutation}
    (tmp_path / "station.yaml").write_text(yaml.safe_dump(config))
    proc = run_station("run", "--config", str(tmp_path / "station.yaml"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "station run: error:" in proc.stderr
    assert next(iter(mutation)) in proc.stderr
