"""Tuning logs: the on-disk format, inspection and merging."""
