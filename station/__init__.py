"""station: edge inspection-station daemon for bottling lines."""

__version__ = "0.1.0"
