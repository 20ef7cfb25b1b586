"""Kinshasa's benchmark suite: each bench_*.py measures one figure against its baseline in the same run."""
