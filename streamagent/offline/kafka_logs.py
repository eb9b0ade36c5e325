"""Logged decisions from Kafka: decision-log joined with rewards by decision_id.

Both topics are read from a fixed range (by default everything up to each partition's end
when the read starts), so two evaluations over the same range see the same rows whatever
arrives meanwhile. Decisions whose attribution window has not closed have no reward yet and
are left out (counted in the notes); a decision or reward re-sent after a crash is identical
to the first copy, which is kept.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import orjson
from confluent_kafka import KafkaError, TopicPartition

from streamagent.core.ope import LoggedData
from streamagent.errors import OfflineDataError
from streamagent.offline.logs import from_docs
from streamagent.ops.kafka import KafkaClientConfig, make_consumer


@dataclass(frozen=True)
class KafkaRange:
    """Which decisions to read: event time ``since_ms <= ts < until_ms`` of the decision, and
    (on decision-log) offsets ``start_offset <= offset < end_offset`` on every partition."""

    since_ms: int | None = None
    until_ms: int | None = None
    start_offset: int | None = None
    end_offset: int | None = None

    def admits(self, ts: int) -> bool:
        return ((self.since_ms is None or ts >= self.since_ms)
                and (self.until_ms is None or ts < self.until_ms))


@dataclass
class KafkaLog:
    log: LoggedData
    notes: list[str] = field(default_factory=list)


def read_topic(kafka: KafkaClientConfig, topic: str, start_offset: int | None = None,
               end_offset: int | None = None, timeout: float = 60.0) -> list[bytes]:
    """The values on ``topic`` between the offsets, on every partition, up to each partition's
    end as it was when the read started."""
    # partition EOF events end a partition whose last offsets hold no message (a transaction
    # marker, a compacted record), which would otherwise be waited for until the timeout
    c = make_consumer(kafka, **{"enable.partition.eof": True})
    try:
        stop = _stop_offsets(c, topic, end_offset)
        start = {p: max(lo, start_offset or 0) for p, (lo, hi) in stop.items()}
        todo = {p for p, (_, hi) in stop.items() if start[p] < hi}
        c.assign([TopicPartition(topic, p, start[p]) for p in sorted(todo)])
        return _consume(c, topic, stop, todo, time.monotonic() + timeout)
    finally:
        c.close()


def _stop_offsets(c, topic: str, end_offset: int | None) -> dict[int, tuple[int, int]]:
    md = c.list_topics(topic, timeout=10)
    meta = md.topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        raise OfflineDataError(f"topic {topic!r} not found on the broker")
    out = {}
    for p in sorted(meta.partitions):
        lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        out[p] = (lo, hi if end_offset is None else min(hi, end_offset))
    return out


def _consume(c, topic: str, stop: dict, todo: set, deadline: float) -> list[bytes]:
    out: list[bytes] = []
    while todo:
        if time.monotonic() > deadline:
            raise OfflineDataError(f"reading {topic!r} timed out with partitions {sorted(todo)} "
                                   f"unfinished")
        for m in c.consume(1000, timeout=0.5):
            if m.error():
                if m.error().code() != KafkaError._PARTITION_EOF:
                    raise OfflineDataError(f"reading {topic!r}: {m.error()}")
                todo.discard(m.partition())
                continue
            p = m.partition()
            if p in todo and m.offset() < stop[p][1]:
                out.append(m.value())
            if m.offset() >= stop[p][1] - 1:
                todo.discard(p)
    return out


def _docs(raw: Sequence[bytes]) -> tuple[dict[str, dict], int]:
    """Documents by decision_id (first copy wins) and the number of unreadable ones."""
    out, bad = {}, 0
    for v in raw:
        if v is None:  # a tombstone: an erased user (docs/OPERATIONS.md, erasure), not a decision
            continue
        try:
            d = orjson.loads(v)
            out.setdefault(d["decision_id"], d)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            bad += 1
    return out, bad


def decision_doc(decision: dict, reward: dict) -> dict:
    """A decision-log record and its reward as a logged-decision row."""
    return {"schema_version": 1, "decision_id": decision["decision_id"],
            "user_id": decision["user_id"], "ts": decision["ts"],
            "action": decision["action"], "action_index": decision["action_index"],
            "propensity": decision.get("propensity"), "reward": reward["reward"],
            "features": decision["features"], "allowed": decision["allowed"]}


def read_kafka_log(kafka: KafkaClientConfig, decision_topic: str, rewards_topic: str, *,
                   rng: KafkaRange = KafkaRange(), actions: Sequence[str] | None = None,
                   feature_names: Sequence[str] | None = None, timeout: float = 60.0) -> KafkaLog:
    """Decisions in ``rng`` joined with their rewards, as a :class:`LoggedData`.

    ``actions`` names the action space (the catalog's actions); ``feature_names`` the
    features the decisions logged, if they have that many values (else they are called
    x0, x1, ... and a note says so: the logs come from another feature version).
    """
    decisions, bad_d = _docs(read_topic(kafka, decision_topic, rng.start_offset,
                                        rng.end_offset, timeout))
    rewards, bad_r = _docs(read_topic(kafka, rewards_topic, timeout=timeout))
    chosen = sorted((d for d in decisions.values() if rng.admits(int(d.get("ts", 0)))),
                    key=lambda d: (d["ts"], d["decision_id"]))
    joined = [decision_doc(d, rewards[d["decision_id"]]) for d in chosen if d["decision_id"] in rewards]
    notes = _notes(len(chosen), len(joined), bad_d, bad_r)
    if not joined:
        raise OfflineDataError(f"no decision on {decision_topic!r} in the range has a reward on "
                               f"{rewards_topic!r} yet")
    width = len(joined[0]["features"])
    names = feature_names if feature_names is not None and len(feature_names) == width else None
    if feature_names is not None and names is None:
        notes.append(f"the decisions carry {width} features, the live feature set "
                     f"{len(feature_names)}: they are called x0..x{width - 1}; fixed policies "
                     f"still evaluate, models need logs of their own feature set")
    if actions is not None and len(actions) != len(joined[0]["allowed"]):
        actions = None
    where = f"{decision_topic}+{rewards_topic}"
    return KafkaLog(from_docs(joined, actions, where=where, feature_names=names), notes)


def _notes(chosen: int, joined: int, bad_d: int, bad_r: int) -> list[str]:
    notes = []
    if joined < chosen:
        notes.append(f"{chosen - joined} of {chosen} decisions have no reward yet (attribution "
                     f"window still open): left out")
    if bad_d or bad_r:
        notes.append(f"unreadable records skipped: {bad_d} on decision-log, {bad_r} on rewards")
    return notes
