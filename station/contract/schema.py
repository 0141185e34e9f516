"""The shipped JSON Schemas, generated from the message models: ``python -m station.contract.schema --write``.

``station/schemas/<name>-1.schema.json`` are what integrators validate against; a test fails when the
files and the models differ, so a change to a model comes with its regenerated schema in the same commit.
Without ``--write`` the command checks and exits 1 naming the files that differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from station.contract.messages import HeartbeatMessage, VerdictMessage, WelcomeMessage

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
DRAFT = "https://json-schema.org/draft/2020-12/schema"

#: file name → (model, $id, description)
SCHEMAS: dict[str, tuple[type[BaseModel], str, str]] = {
    "verdict-1.schema.json": (
        VerdictMessage, "station.verdict/1",
        "Payload of the ZeroMQ multipart message [\"verdict.<station_id>\", payload]; one per captured frame."),
    "heartbeat-1.schema.json": (
        HeartbeatMessage, "station.heartbeat/1",
        "Payload of the ZeroMQ multipart message [\"heartbeat.<station_id>\", payload]; every "
        "heartbeat_interval_s, and a last one with state stopped (docs/verdicts.md)."),
    "welcome-1.schema.json": (
        WelcomeMessage, "station.welcome/1",
        "The single-frame message \"welcome.<station_id> <payload>\" a (re)connecting subscriber gets first: "
        "the last verdict, the next seq, the state and counters (docs/verdicts.md)."),
}


def schema_of(model: type[BaseModel], schema_id: str, description: str) -> dict[str, Any]:
    # Serialization mode: the schema describes the bytes published, where every defaulted field is written.
    body = model.model_json_schema(by_alias=True, mode="serialization")
    return {"$schema": DRAFT, "$id": schema_id, **body, "description": description}


def render(name: str) -> str:
    model, schema_id, description = SCHEMAS[name]
    return json.dumps(schema_of(model, schema_id, description), indent=2, ensure_ascii=False) + "\n"


def stale(folder: Path = SCHEMA_DIR) -> list[Path]:
    """The schema files that differ from what the models generate (or are missing)."""
    out = []
    for name in SCHEMAS:
        path = folder / name
        if not path.is_file() or path.read_text(encoding="utf-8") != render(name):
            out.append(path)
    return out


def write(folder: Path = SCHEMA_DIR) -> list[Path]:
    written = []
    for path in stale(folder):
        path.write_text(render(path.name), encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m station.contract.schema", description=__doc__)
    parser.add_argument("--write", action="store_true", help="regenerate the schema files that differ")
    parser.add_argument("--dir", type=Path, default=SCHEMA_DIR, help="where the schema files are")
    args = parser.parse_args(argv)
    if args.write:
        for path in write(args.dir):
            print(f"wrote {path}")
        return 0
    differ = stale(args.dir)
    for path in differ:
        print(f"{path} differs from the models; run python -m station.contract.schema --write", file=sys.stderr)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
