"""station.yaml's ``source`` section → a Source."""

from __future__ import annotations

from station.sources import Source
from station.sources.camera import Backoff, CameraSource
from station.sources.folder import WatchedFolderSource
from station.sources.settings import FolderSourceConfig, OpenCvSourceConfig, PylonSourceConfig


def build_source(config: FolderSourceConfig | PylonSourceConfig | OpenCvSourceConfig) -> Source:
    if isinstance(config, FolderSourceConfig):
        return WatchedFolderSource(config.path, config.poll_interval_s, config.process_existing,
                                   config.on_overload, rescan_s=config.rescan_s)
    backoff = Backoff(initial_s=min(0.1, config.reconnect_max_s), max_s=config.reconnect_max_s)
    if isinstance(config, PylonSourceConfig):
        from station.sources.pylon import PylonCamera

        return CameraSource(PylonCamera(config), backoff)
    from station.sources.opencv import OpenCvCamera

    return CameraSource(OpenCvCamera(config), backoff)
