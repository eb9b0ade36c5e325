"""What the agents do to every consumed record before their handlers see it: pseudonymise it
(core/pseudonym.py) and check that no offset was skipped (:class:`OffsetWatch`).


Each consumed record is rewritten once, before the handler looks at it: the key and the
payload's ``user_id`` become pseudonyms, and the raw key is kept beside them only for what
must carry it (coupon-actions) and for redacting dead letters.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from streamagent.core.contracts import dlq_envelope
from streamagent.core.pseudonym import Pseudonyms
from streamagent.errors import ConfigError

if TYPE_CHECKING:
    from streamagent.config import Settings


def pseudonyms(s: "Settings", partition_of: Callable[[bytes], int]) -> Pseudonyms | None:
    """Settings -> the worker's pseudonymiser, or None when no key is set. Raises ConfigError
    on a bad key or file."""
    key = s.pseudonym_key.get_secret_value().encode() if s.pseudonym_key else None
    if s.pseudonym_key_file is not None:
        if key:
            raise ConfigError("set STREAMAGENT_PSEUDONYM_KEY or STREAMAGENT_PSEUDONYM_KEY_FILE, "
                              "not both")
        try:
            key = Path(s.pseudonym_key_file).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise ConfigError(f"STREAMAGENT_PSEUDONYM_KEY_FILE={s.pseudonym_key_file}: "
                              f"{exc.strerror}") from None
    if key is None:
        return None
    try:
        return Pseudonyms(key, partition_of)
    except ValueError as exc:
        raise ConfigError(f"STREAMAGENT_PSEUDONYM_KEY: {exc}") from None


@dataclass(frozen=True)
class Inbound:
    """A consumed record as the handlers see it (the ``Message`` protocol of decide.py)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float | None
    raw_key: bytes | None  # as consumed (a raw user id when pseudonymising)
    raw_value: bytes | None


def pseudonymise(batch: Sequence, ps: Pseudonyms | None, topics: frozenset[str] | None = None):
    """The batch with ids replaced (``topics``: only records of these; None: all). Without
    pseudonyms, the batch as it is."""
    if ps is None:
        return batch
    out = []
    for m in batch:
        if topics is not None and m.topic not in topics:
            out.append(m)
            continue
        key, value = ps.record(m.key, m.value)
        out.append(Inbound(m.topic, m.partition, m.offset, key, value, m.timestamp,
                           m.key, m.value))
    return out


def raw_key(msg) -> bytes | None:
    return msg.raw_key if isinstance(msg, Inbound) else msg.key


def envelope(msg, ps: Pseudonyms | None, *, reason: str, detail: str, failed_at_ms: int,
             worker: str) -> dict:
    """The dead-letter envelope of a rejected record: the original bytes, or for a record
    rewritten at ingress, the redacted original (no raw id in key, value or detail)."""
    if ps is None or not isinstance(msg, Inbound):  # not rewritten: nothing raw in it
        return dlq_envelope(source_topic=msg.topic, partition=msg.partition, offset=msg.offset,
                            key=msg.key, value=msg.value, reason=reason, detail=detail,
                            failed_at_ms=failed_at_ms, worker=worker)
    key, value = msg.raw_key, msg.raw_value
    r_key, r_value, r_detail = ps.redact(key, value, detail)
    env = dlq_envelope(source_topic=msg.topic, partition=msg.partition, offset=msg.offset,
                       key=r_key, value=r_value, reason=reason, detail=r_detail,
                       failed_at_ms=failed_at_ms, worker=worker)
    return ps.withheld(env, value) if r_value is None and value is not None else env


log = logging.getLogger("streamagent.decide")


class OffsetWatch:
    """Counts the offsets a stream skips: records of a partition the agent never got.

    Within one assignment (one consumer generation) a partition's records reach the agent in
    offset order, one after the other; a jump forward means records were never handed over
    (what a Faust race did after a restart's recovery: stream/faust_internals.py). Jumps
    back (a replay after a rebalance) are not counted, and the memory is dropped when the
    generation changes. A transactional producer's commit markers take one offset each, so
    topics written in transactions count one per transaction.
    """

    def __init__(self, counter, generation: Callable[[], int]):
        self.counter, self.generation = counter, generation
        self.last: dict[tuple[str, int], int] = {}
        self.gen: int | None = None

    def see(self, messages: Sequence) -> int:
        """Look at a batch in consumption order; returns the offsets it skipped."""
        gen = self.generation()
        if gen != self.gen:
            self.last.clear()
            self.gen = gen
        skipped = 0
        for msg in messages:
            tp = (msg.topic, msg.partition)
            prev = self.last.get(tp)
            if prev is not None and msg.offset > prev + 1:
                gap = msg.offset - prev - 1
                skipped += gap
                self.counter.labels(msg.topic).inc(gap)
                log.warning("%s[%d]: offsets %d to %d were never handed to the agent",
                            msg.topic, msg.partition, prev + 1, msg.offset - 1)
            if prev is None or msg.offset > prev:
                self.last[tp] = msg.offset
        return skipped
