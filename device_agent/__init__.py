"""edgetune's board side: probe the board, serve TVM RPC, advertise over mDNS, install packages.

This package never imports ``host``; the formats both sides share live in :mod:`device_agent.schema`.
"""

__version__ = "0.1.0"
