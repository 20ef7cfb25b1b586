"""The conformance kit's two failures: a check the service failed, and a run that could not start."""

from __future__ import annotations


class CheckFailed(Exception):
    """The service broke the contract in one check; the message says how, for the report's detail column."""


class SetupError(Exception):
    """The kit cannot start checking (no broker, no declaration, no topics); the message says what to do."""
