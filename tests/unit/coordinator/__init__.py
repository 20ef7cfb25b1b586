"""Coordinator unit tests: pure logic and the ledger store."""
