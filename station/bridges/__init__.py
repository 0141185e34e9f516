"""Reference bridges from the verdict stream to plant systems: OPC UA, Modbus TCP, an MES recorder.

Each runs as ``station bridge <kind>``, reads the stream through VerdictFeed
(station/bridges/feed.py: CURVE, the welcome, gap detection) and serves or
stores what that protocol's clients expect.
"""
