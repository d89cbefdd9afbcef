"""Compiling a model for a board with its tuning log applied."""
