"""Flashing: install a package on boards over SSH, verified, switched atomically, rolled back on failure."""

from .ssh import FlashResult, FlashTarget, flash

__all__ = ["FlashResult", "FlashTarget", "flash"]
