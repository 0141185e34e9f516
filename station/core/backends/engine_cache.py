"""TensorRT plans cached inside a bundle, keyed by what a plan is only valid for.

``<bundle>/engines/<gpu>-sm<cc>-trt<version>-<precision>-<onnx>/`` holds one
plan per model and ``engine.json``, which repeats the key and records the ONNX
file each plan was built from with its sha256. ``<precision>`` names the ONNX
files the plans came from (``fp16``: both models' ``*.fp16.onnx``; mixed:
``autoencoder-int8.classifier-fp16``) and ``<onnx>`` is a digest of their
checksums, so a model retrained or re-exported gets a folder of its own and
the old one is removed when the new one is stored. A plan is used only when
the folder's key is this GPU's key for the bundle's current files: a plan for
another GPU, TensorRT version, precision or ONNX file is never loaded. It is
rebuilt, or refused with a message saying which plans exist.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from station.core.atomic import swap_in_dir
from station.core.backends.gpu import GpuInfo
from station.core.backends.precision import ROLES, precision_label
from station.core.bundle import Bundle
from station.errors import BackendError

ENGINES = "engines"
META = "engine.json"


def onnx_sources(bundle: Bundle, precisions: dict[str, str]) -> dict[str, str]:
    """role → the bundle-relative ONNX file a plan of that precision is built from (BundleError if missing)."""
    return {role: bundle.model_path(role, precisions[role]).relative_to(bundle.root).as_posix() for role in ROLES}


@dataclass(frozen=True)
class EngineKey:
    gpu: str  # slug of the GPU's name
    compute_capability: str  # "sm87"
    tensorrt: str  # "10.13.0.35"
    precision: str  # "fp16", or per model "autoencoder-int8.classifier-fp16"
    onnx: str  # first 12 hex digits of a digest of the source ONNX files' sha256

    @classmethod
    def for_bundle(cls, bundle: Bundle, gpu: GpuInfo, precisions: dict[str, str]) -> EngineKey:
        sources = onnx_sources(bundle, precisions)
        h = hashlib.sha256()
        for role in ROLES:
            h.update(f"{role}:{bundle.manifest.files.get(sources[role], '')}\n".encode())
        major, minor = gpu.compute_capability
        return cls(gpu.slug, f"sm{major}{minor}", gpu.tensorrt_version, precision_label(precisions),
                   h.hexdigest()[:12])

    @property
    def dirname(self) -> str:
        return f"{self.gpu}-{self.compute_capability}-trt{self.tensorrt}-{self.precision}-{self.onnx}"


@dataclass(frozen=True)
class CachedEngines:
    key: EngineKey
    plans: dict[str, Path]  # role → plan file
    meta: dict[str, Any]


class StaleEngines(Exception):
    """A cache folder for this key exists but may not be used; the message says why."""


class EngineCache:
    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.root = bundle.root / ENGINES

    def folder(self, key: EngineKey) -> Path:
        return self.root / key.dirname

    def available(self) -> list[str]:
        """Names of the cache folders present, for messages."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / META).is_file())

    def lookup(self, key: EngineKey, roles: tuple[str, ...]) -> CachedEngines | None:
        """The plans for ``key``; None when there are none; StaleEngines when they may not be used."""
        folder = self.folder(key)
        meta_path = folder / META
        try:
            if not meta_path.is_file():
                return None
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except PermissionError as exc:
            raise BackendError(f"{folder}: cannot read the engine cache ({exc.strerror}); was it built by "
                               "another user? Rebuild it as the service's user, or chown it") from exc
        try:
            recorded = EngineKey(**meta["key"])
            models = meta["models"]
        except (ValueError, KeyError, TypeError) as exc:
            raise StaleEngines(f"{meta_path}: unreadable ({exc})") from exc
        if recorded != key:
            raise StaleEngines(f"{meta_path}: records key {recorded.dirname}, the folder is named {key.dirname}")
        plans: dict[str, Path] = {}
        for role in roles:
            entry = models.get(role)
            if entry is None:
                raise StaleEngines(f"{meta_path}: no plan for the {role}")
            onnx = str(entry.get("onnx"))
            expected = self.bundle.manifest.files.get(onnx)
            if expected is None or entry.get("onnx_sha256") != expected:
                raise StaleEngines(f"{folder / entry['plan']}: built from another {onnx} (the model was retrained "
                                   "or re-exported)")
            plan = folder / entry["plan"]
            if not plan.is_file():
                raise StaleEngines(f"{plan}: listed in {meta_path} but missing")
            plans[role] = plan
        return CachedEngines(key, plans, meta)

    def usable(self, key: EngineKey, roles: tuple[str, ...]) -> tuple[CachedEngines | None, str]:
        """The plans for ``key`` if they may be loaded, else None and why not (for the log and messages)."""
        try:
            cached = self.lookup(key, roles)
        except StaleEngines as exc:
            return None, str(exc)
        return cached, "" if cached is not None else "no plan"

    def store(self, key: EngineKey, plans: dict[str, bytes], details: dict[str, Any],
              sources: dict[str, str]) -> CachedEngines:
        """Write the plans and engine.json into a new folder, then swap it in: never half a cache.

        ``sources``: role → the ONNX file each plan was built from. Plans of the same GPU, TensorRT and
        precision built from other ONNX files (a model since retrained) are removed: never loadable again.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key.dirname}.", dir=self.root))
        tmp.chmod(0o755)  # mkdtemp makes 0700: the service's user must read what an installer built
        try:
            models: dict[str, Any] = {}
            for role, blob in plans.items():
                name = f"{role}.plan"
                (tmp / name).write_bytes(blob)
                onnx = sources[role]
                models[role] = {"plan": name, "onnx": onnx, "onnx_sha256": self.bundle.manifest.files.get(onnx),
                                "bytes": len(blob)}
            meta = {"key": asdict(key), "models": models, **details}
            (tmp / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            final = self.folder(key)
            swap_in_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        stale_prefix = key.dirname[: -len(key.onnx)]
        for other in self.root.iterdir():
            if other.name.startswith(stale_prefix) and other.name != key.dirname:
                shutil.rmtree(other, ignore_errors=True)
        return CachedEngines(key, {role: final / f"{role}.plan" for role in plans}, meta)
