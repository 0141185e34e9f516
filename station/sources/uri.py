"""What an OpenCV source's ``uri`` names; plain string rules, so the configuration can use them without cv2."""

from __future__ import annotations

import re


def classify(uri: str) -> str:
    """``device``, ``stream``, ``gstreamer`` or ``file``: decides buffering and what end-of-input means."""
    if uri.isdigit() or uri.startswith("/dev/video"):
        return "device"
    if re.match(r"^(rtsp|rtsps|rtmp|http|https|udp|tcp|srt)://", uri):
        return "stream"
    if "!" in uri:
        return "gstreamer"
    return "file"
