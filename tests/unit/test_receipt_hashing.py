"""Receipt hashing and chain checking as pure logic: canonical bytes, links, gaps, tampering."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime

import pytest

from kinshasa.kernel.receipts import (
    GENESIS_HASH,
    Receipt,
    ReceiptError,
    _check_source,
    canonical_bytes,
    check_chain,
    payload_digest,
    receipt_hash,
)

DIGEST = hashlib.sha256(b"payload").hexdigest()


def chain(n: int, component: str = "documents") -> list[Receipt]:
    rows, prev = [], GENESIS_HASH
    for seq in range(1, n + 1):
        source = ("kafka", "kinshasa.commands.documents", 0, seq)
        digest = payload_digest({"n": seq})
        h = receipt_hash(seq, prev, component, source, f"m-{seq}", digest)
        rows.append(Receipt(seq, component, source, f"m-{seq}", digest, prev, h, datetime.now(UTC)))
        prev = h
    return rows


def test_canonical_bytes_are_fixed_json() -> None:
    data = canonical_bytes(7, "ab" * 32, "gateway", ("command", "m-1"), "m-1", DIGEST)
    assert data == (f'[7,"{"ab" * 32}","gateway",["command","m-1"],"m-1","{DIGEST}"]').encode()


def test_hash_is_sha256_of_the_canonical_bytes() -> None:
    args = (1, GENESIS_HASH, "gateway", ("command", "m-1"), "m-1", DIGEST)
    assert receipt_hash(*args) == hashlib.sha256(canonical_bytes(*args)).hexdigest()
    assert receipt_hash(*args) == receipt_hash(*args)


@pytest.mark.parametrize("index,value", [
    (0, 2), (1, "f" * 64), (2, "coordinator"), (3, ("command", "m-2")), (4, "m-2"), (5, "0" * 64),
])
def test_every_field_changes_the_hash(index: int, value: object) -> None:
    args: list[object] = [1, GENESIS_HASH, "gateway", ("command", "m-1"), "m-1", DIGEST]
    original = receipt_hash(*args)  # type: ignore[arg-type]
    args[index] = value
    assert receipt_hash(*args) != original  # type: ignore[arg-type]


def test_fields_cannot_bleed_into_each_other() -> None:
    # With plain concatenation these two would hash the same.
    a = receipt_hash(1, GENESIS_HASH, "ab", ("c",), "m", DIGEST)
    b = receipt_hash(1, GENESIS_HASH, "a", ("bc",), "m", DIGEST)
    assert a != b
    assert receipt_hash(1, GENESIS_HASH, "x", ("1",), "m", DIGEST) != \
        receipt_hash(1, GENESIS_HASH, "x", (1,), "m", DIGEST)


def test_payload_digest_is_canonical_for_mappings() -> None:
    assert payload_digest({"b": 1, "a": "é"}) == payload_digest({"a": "é", "b": 1})
    assert payload_digest(b"abc") == hashlib.sha256(b"abc").hexdigest() == payload_digest("abc")


def test_source_parts_must_be_text_or_integers() -> None:
    assert _check_source(["kafka", "t", 0, 5]) == ("kafka", "t", 0, 5)
    with pytest.raises(ReceiptError, match="empty"):
        _check_source(())
    with pytest.raises(ReceiptError, match="str or int"):
        _check_source(("kafka", True))
    with pytest.raises(ReceiptError, match="str or int"):
        _check_source(("kafka", 1.5))


def test_intact_chain_is_ok() -> None:
    rows = chain(10)
    report = check_chain(rows)
    assert report.ok and report.checked == 10
    assert report.head_seq == 10 and report.head_hash == rows[-1].hash
    assert check_chain([]).ok


def test_removed_row_is_a_gap_and_a_broken_link_at_the_next() -> None:
    rows = chain(10)
    del rows[4]  # seq 5
    report = check_chain(rows)
    assert not report.ok
    assert (report.gaps, report.broken_links, report.bad_hashes) == ([5], [6], [])
    assert report.problems() == [
        "gap: receipt seq 5 is missing",
        "broken link: receipt seq 6 does not link to the hash of the receipt before it",
    ]


def test_removed_first_rows_break_the_link_to_genesis() -> None:
    report = check_chain(chain(5)[2:])
    assert (report.gaps, report.broken_links, report.bad_hashes) == ([1, 2], [3], [])


def test_altered_row_is_a_bad_hash_at_its_seq() -> None:
    rows = chain(10)
    rows[6] = dataclasses.replace(rows[6], message_id="forged")
    report = check_chain(rows)
    assert (report.gaps, report.broken_links, report.bad_hashes) == ([], [], [7])


def test_rehashed_row_breaks_the_next_link() -> None:
    rows = chain(5)
    r = dataclasses.replace(rows[1], payload_digest="1" * 64)
    rows[1] = dataclasses.replace(r, hash=receipt_hash(r.seq, r.prev_hash, r.component, r.source,
                                                       r.message_id, r.payload_digest))
    report = check_chain(rows)
    assert (report.gaps, report.broken_links, report.bad_hashes) == ([], [3], [])
