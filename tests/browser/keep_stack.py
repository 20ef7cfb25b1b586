"""Start the browser tests' stack and keep it up until Ctrl-C or SIGTERM, for working on the console.

    python -m tests.browser.keep_stack .kinshasa/browser-stack.json
    KINSHASA_BROWSER_STACK=.kinshasa/browser-stack.json pytest tests/browser
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from tests.e2e.stack import running_stack


def _stop(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    # Started in the background, Ctrl-C never reaches it: `kill <pid>` stops the stack as cleanly.
    signal.signal(signal.SIGTERM, _stop)
    described = Path(sys.argv[1] if len(sys.argv) > 1 else ".kinshasa/browser-stack.json")
    with running_stack() as stack:
        described.parent.mkdir(parents=True, exist_ok=True)
        described.write_text(json.dumps({"gateway_url": stack.gateway_url, "data_dir": str(stack.data_dir)}))
        console = stack.gateway_url.removesuffix("/graphql") + "/console"
        print(f"stack up: console at {console}; described in {described}")
        try:
            while True:
                signal.pause()  # until SIGTERM (turned into KeyboardInterrupt) or Ctrl-C
        except KeyboardInterrupt:
            pass
        finally:
            described.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
