"""Kinshasa: the deterministic ring that agents write through."""

__version__ = "0.1.0"
