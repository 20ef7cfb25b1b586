"""The SMTP sink as a process: stores each delivery as JSON, refuses listed mailboxes, stops on SIGTERM."""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from kinshasa.infra.process import free_port, port_open
from kinshasa.services.smtp_sink import REFUSE_FILE, MailStore

REPO = Path(__file__).resolve().parents[3]


def test_sink_process_stores_and_refuses(tmp_path: Path) -> None:
    port = free_port()
    mail = tmp_path / "mail"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kinshasa.services", "smtp-sink", "--dir", str(mail), "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while not port_open(port):
            assert proc.poll() is None and time.monotonic() < deadline, "sink did not start"
            time.sleep(0.05)
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = "a@example.org", "b@example.org", "Hello"
        message["Message-ID"] = "<m1@test>"
        message.set_content("body text")
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.send_message(message)
        (mail / REFUSE_FILE).write_text("b@example.org\n")
        with (
            pytest.raises(smtplib.SMTPRecipientsRefused),
            smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp,
        ):
            smtp.send_message(message)
        [stored] = MailStore(mail).messages()
        assert (stored.message_id, stored.subject, stored.rcpt_tos) == (
            "<m1@test>",
            "Hello",
            ["b@example.org"],
        )
        assert stored.body.strip() == "body text"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
