"""A local SMTP sink for the dev stack and tests: accepts email on a port and stores each as a JSON file.

Run it with `python -m kinshasa.services.smtp_sink --dir .kinshasa/mail` (or `kinshasa service smtp-sink`).
Each delivery becomes one file `<arrival ns>-<random>.json` in the directory, written atomically, so a
reader never sees half a message and a message delivered twice shows up twice.

To simulate a mailbox that is temporarily unavailable, list its address in `<dir>/refuse.txt` (one per
line): the sink answers `450` to it at RCPT time until the line is removed.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from kinshasa.schemas.clock import utcnow

REFUSE_FILE = "refuse.txt"


@dataclass(frozen=True)
class StoredMail:
    """One delivery as the sink stored it."""

    path: Path
    received_at: str
    mail_from: str
    rcpt_tos: list[str]
    message_id: str | None
    subject: str | None
    headers: dict[str, str]
    body: str

    @classmethod
    def load(cls, path: Path) -> StoredMail:
        data = json.loads(path.read_text())
        return cls(path=path, **{k: data[k] for k in (
            "received_at", "mail_from", "rcpt_tos", "message_id", "subject", "headers", "body")})


class MailStore:
    """The sink's directory: one JSON file per delivery, plus the optional list of refused recipients."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def save(self, mail_from: str, rcpt_tos: list[str], raw: bytes) -> Path:
        message = message_from_bytes(raw, policy=default_policy)
        assert isinstance(message, EmailMessage)
        part = message.get_body(preferencelist=("plain", "html"))
        body = part.get_content() if part is not None else ""
        record: dict[str, Any] = {
            "received_at": utcnow().isoformat(),
            "mail_from": mail_from,
            "rcpt_tos": rcpt_tos,
            "message_id": message.get("Message-ID"),
            "subject": message.get("Subject"),
            "headers": {k: str(v) for k, v in message.items()},
            "body": body,
        }
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
        tmp = self.directory / f".{name}.tmp"
        tmp.write_text(json.dumps(record, ensure_ascii=False, indent=1))
        os.replace(tmp, self.directory / name)  # atomic: readers see the whole file or none
        return self.directory / name

    def messages(self) -> list[StoredMail]:
        """Every stored delivery, in arrival order."""
        return [StoredMail.load(p) for p in sorted(self.directory.glob("*.json"))]

    def by_message_id(self, message_id: str) -> list[StoredMail]:
        return [m for m in self.messages() if m.message_id == message_id]

    def refused(self) -> set[str]:
        try:
            lines = (self.directory / REFUSE_FILE).read_text().splitlines()
        except FileNotFoundError:
            return set()
        return {line.strip().lower() for line in lines if line.strip() and not line.startswith("#")}


class _Handler:
    """aiosmtpd hooks: refuse listed recipients, store everything else."""

    def __init__(self, store: MailStore) -> None:
        self.store = store

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if address.lower() in self.store.refused():
            return f"450 4.2.1 {address}: mailbox unavailable (listed in {REFUSE_FILE}); try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        if isinstance(raw, str):
            raw = raw.encode()
        self.store.save(str(envelope.mail_from), list(envelope.rcpt_tos), raw)
        return "250 Message accepted for delivery"


class SmtpSink:
    """The sink as an object: `start()` serves on a background thread, `stop()` ends it."""

    def __init__(self, directory: Path, host: str = "127.0.0.1", port: int = 2525) -> None:
        self.store = MailStore(directory)
        self.host = host
        self.port = port
        self._controller = Controller(_Handler(self.store), hostname=host, port=port)

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> SmtpSink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(directory: Path, host: str, port: int) -> None:
    """Run the sink in the foreground until SIGTERM or SIGINT."""
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    with SmtpSink(directory, host, port):
        print(f"smtp sink listening on {host}:{port}, storing mail in {directory}", flush=True)
        stopped.wait()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dir", type=Path, default=Path(".kinshasa/mail"), help="where to store messages")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525)
    args = parser.parse_args()
    serve(args.dir, args.host, args.port)


if __name__ == "__main__":
    main()
