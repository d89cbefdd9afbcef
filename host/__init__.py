"""edgetune's workstation side: the ``edgetune`` command and the library behind it."""

from device_agent import __version__

__all__ = ["__version__"]
