"""A verdict sink that appends every verdict message to a JSON Lines file (replay --out, output.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

from station.errors import ConfigError


class JsonlSink:
    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Line-buffered: a reader tailing the file, or one after a kill, sees every verdict published.
            self._f: TextIO = path.open("w", encoding="utf-8", buffering=1)
        except OSError as exc:
            raise ConfigError(f"cannot write verdicts to {path}: {exc}") from exc

    def __call__(self, _verdict: Any, message: dict[str, Any]) -> None:
        self._f.write(json.dumps(message, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._f.close()
