"""Poison messages land in the DLQ with their error, never block their partition, and reprocess once fixed.

The notifier runs in-process against real Kafka and a real SMTP sink. Every message below is sent to the
first partition of its commands topic, so they share it. Two poison messages go in among good ones: bytes that
are no envelope (dead-lettered at once) and an email whose mailbox the sink refuses with 450 (retried,
then dead-lettered). The good emails behind them are delivered. Once the mailbox accepts mail again,
`POST /admin/dlq/reprocess` delivers the refused email exactly once, however often it is asked.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Producer
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.infra.kafka import KafkaBroker
from kinshasa.infra.process import free_port
from kinshasa.schemas.envelope import Envelope
from kinshasa.services import notifier
from kinshasa.services.kit.runtime import ServiceTopics
from kinshasa.services.smtp_sink import REFUSE_FILE, SmtpSink
from kinshasa.topics.producer import Outgoing, envelope_message
from tests.integration.services.helpers import (
    Running,
    command,
    make_runtime,
    new_entity_id,
    read_topic,
    wait_for,
)

TOKEN = "dlq-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def send_to_first_partition(bootstrap: str, messages: list[Outgoing]) -> None:
    """Publish `messages` in order, all on partition 0 whatever their keys."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for message in messages:
        producer.produce(message.topic, message.value, message.key, partition=0, headers=message.headers)
    assert producer.flush(30) == 0, "messages left unsent"


# An empty database: the service under test installs its own tables.
pytestmark = pytest.mark.schema()


def email(to: str, subject: str) -> tuple[str, Envelope]:
    email_id = new_entity_id()
    return email_id, command(
        "notifier", "send_email", {"to": to, "subject": subject, "body": "hello"}, email_id, run_id="run-dlq"
    )


async def test_poison_goes_to_the_dlq_and_reprocesses_once(
    kafka: KafkaBroker, database_url: str, engine: AsyncEngine, tmp_path: Path, unique: str
) -> None:
    topics = ServiceTopics.for_service("notifier", f"t{unique}")
    mail_dir = tmp_path / "mail"
    mail_dir.mkdir()
    (mail_dir / REFUSE_FILE).write_text("poison@example.org\n")
    smtp_port = free_port()
    _, before = email("first@example.org", "before")
    poison_id, poison = email("poison@example.org", "refused for now")
    _, after = email("after@example.org", "after")

    with SmtpSink(mail_dir, port=smtp_port) as sink:
        running = Running(
            make_runtime(
                notifier.notifier, kafka, database_url, tmp_path, topics, token=TOKEN, smtp_port=smtp_port
            )
        )
        await running.started()
        try:
            # One partition: the poison messages sit in front of the good ones.
            await asyncio.to_thread(send_to_first_partition, kafka.bootstrap, [
                envelope_message(topics.commands, before),
                Outgoing(topics.commands, b"notifier:garbage", b"{not an envelope"),
                envelope_message(topics.commands, poison),
                envelope_message(topics.commands, after),
            ])
            await wait_for(lambda: len(sink.store.messages()) == 2, 60, "the good emails")
            assert [m.rcpt_tos for m in sink.store.messages()] == [
                ["first@example.org"],
                ["after@example.org"],
            ]

            async with httpx.AsyncClient(base_url=running.runtime.admin_url or "") as client:
                listing = (await client.get("/admin/dlq", headers=AUTH)).json()
                assert listing["count"] == 2
                invalid, refused = listing["entries"]
                assert invalid["reason"] == "invalid" and invalid["attempts"] == 1
                assert refused["message_id"] == str(poison.message_id)
                assert refused["reason"] == "handler_failed" and refused["attempts"] == 3
                assert "SMTPRecipientsRefused" in refused["error"] and "450" in refused["error"]

                dlq_topic = await asyncio.to_thread(read_topic, kafka.bootstrap, topics.dlq)
                assert len(dlq_topic) == 2
                assert all(b"kinshasa.dlq.error" in {k.encode() for k in h} for _, _, h in dlq_topic)

                # Not fixed yet: reprocessing fails again and the entry stays.
                still = (
                    await client.post(
                        "/admin/dlq/reprocess", headers=AUTH, json={"message_ids": [refused["message_id"]]}
                    )
                ).json()
                assert still["results"][0]["outcome"] == "failed" and still["count"] == 2

                (mail_dir / REFUSE_FILE).unlink()  # the mailbox is back
                for attempt in range(2):
                    done = (
                        await client.post(
                            "/admin/dlq/reprocess",
                            headers=AUTH,
                            json={"message_ids": [refused["message_id"]]},
                        )
                    ).json()
                    expected = "reprocessed" if attempt == 0 else "already_reprocessed"
                    assert done["results"][0]["outcome"] == expected
                    assert done["count"] == 1  # the garbage stays for an operator
                assert [m.rcpt_tos for m in sink.store.messages()].count(["poison@example.org"]) == 1
                delivered = (await client.get(f"/entities/email/{poison_id}")).json()
                assert delivered["status"] == "sent" and delivered["to"] == "poison@example.org"
                emails = (await client.get("/entities/email", params={"run_id": "run-dlq"})).json()
                assert len(emails) == 3

                metrics = (await client.get("/metrics", headers=AUTH)).text
                assert 'kinshasa_dlq_size{component="notifier"} 1.0' in metrics
        finally:
            await running.shutdown()

    events = await asyncio.to_thread(read_topic, kafka.bootstrap, topics.events)
    types = sorted(h["type"].decode() for _, _, h in events)
    assert types == ["notifier.send_email.applied"] * 3
