"""Runs every benchmark module under bench/ in turn: `python -m bench [--small] [name ...]`."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
import traceback
from pathlib import Path


def main(argv: list[str]) -> int:
    small = "--small" in argv
    wanted = [a for a in argv if not a.startswith("-")]
    names = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                   if m.name.startswith("bench_"))
    if wanted:
        names = [n for n in names if n in wanted or n.removeprefix("bench_") in wanted]
    failed = []
    for name in names:
        print(f"\n=== {name}{' (small)' if small else ''} ===", flush=True)
        started = time.monotonic()
        try:
            module = importlib.import_module(f"bench.{name}")
            code = module.main(["--small"] if small else [])
        except Exception:  # one benchmark's failure does not cost the others' figures
            traceback.print_exc()
            code = 1
        print(f"=== {name}: exit {code} in {time.monotonic() - started:.1f}s ===", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"benchmarks that failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
