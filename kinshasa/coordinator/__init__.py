"""The coordinator: per-run ledger projection and Temporal revert workflows."""
