"""Event-time bounds: what "too far in the future" and "too late" mean, and the partition clock
that shared state follows.

A user's own history is no clock: a customer may come back after a year. The reference is the
stream's own event time on the partition, estimated so that no single record can move it: the
median of the last ``WINDOW`` timestamps seen on that partition (it ignores up to two outliers
among five records, and lags the newest record by two arrivals, so partitions with sparse
traffic are judged fairly too). A record more than
``future_ms`` ahead of it (or, for inputs with a past bound, more than ``past_ms`` behind it) is
dead-lettered; with the optional wall-clock bound, a record more than ``wall_future_ms`` ahead
of the worker's clock is too (for live traffic; off by default so that fast-forwarded replays
and the simulator work).

Rejected timestamps are still observed: one outlier cannot move the median, but when a
partition's traffic really jumps (a replay of another month on the same topics, a partition
that was idle), the median follows after ``WINDOW // 2 + 1`` records and the stream goes on.
A brand-new partition has no reference until it has seen ``MIN_SAMPLES`` records: there only
the wall-clock bound (if on) applies.

``stream_time`` is the monotone robust progress (the largest median seen): budget periods
follow it, never a single record's timestamp.
"""
from __future__ import annotations

from dataclasses import dataclass

from streamagent.errors import InvalidMessage

WINDOW = 5  # timestamps kept per partition: a median robust to two outliers
MIN_SAMPLES = 3  # fewer seen: no relative bound yet (the wall-clock bound still applies)


@dataclass(frozen=True)
class TimeBounds:
    future_ms: int
    past_ms: int | None  # None: no past bound (late records are handled by the join's rules)
    wall_future_ms: int | None  # None: no wall-clock bound


@dataclass(frozen=True, slots=True)
class StreamClock:
    """One partition's (and input's) event-time progress. A value: observe() returns a new one."""

    recent: tuple[int, ...] = ()  # the last WINDOW timestamps seen, accepted or not, oldest first
    stream_time: int | None = None  # monotone: the largest reference seen so far

    def reference(self) -> int | None:
        """The partition's robust event time: the median of the recent timestamps."""
        if len(self.recent) < MIN_SAMPLES:
            return None
        s = sorted(self.recent)
        return s[len(s) // 2]

    def observe(self, ts: int) -> "StreamClock":
        recent = (self.recent + (ts,))[-WINDOW:]
        clock = StreamClock(recent, self.stream_time)
        ref = clock.reference()  # None until MIN_SAMPLES: no progress from one record alone
        if ref is not None and (self.stream_time is None or ref > self.stream_time):
            clock = StreamClock(recent, ref)
        return clock

    def to_doc(self) -> dict:
        return {"recent": list(self.recent), "stream_time": self.stream_time}

    @classmethod
    def from_doc(cls, doc: dict) -> "StreamClock":
        return cls(tuple(int(t) for t in doc["recent"]), doc.get("stream_time"))


class OutOfBounds(InvalidMessage):
    """A record's timestamp is outside the event-time bounds; it belongs on the dead-letter
    topic. ``clock`` is the partition clock having seen it: keep it (that is how a partition
    whose traffic really jumped recovers)."""

    def __init__(self, reason: str, detail: str, clock: StreamClock):
        super().__init__(reason, detail)
        self.clock = clock


def admit(clock: StreamClock, ts: int, bounds: TimeBounds,
          now_ms: int | None = None) -> StreamClock:
    """The clock having seen ``ts``; raises OutOfBounds (carrying that clock) if ``ts`` is
    outside the bounds."""
    ref = clock.reference()
    seen = clock.observe(ts)
    if ref is not None and ts > ref + bounds.future_ms:
        raise OutOfBounds("ts_too_far_ahead",
                          f"ts {ts} is more than {bounds.future_ms} ms ahead of the partition's "
                          f"event time {ref} (median of its recent records)", seen)
    if ref is not None and bounds.past_ms is not None and ts < ref - bounds.past_ms:
        raise OutOfBounds("ts_too_far_behind",
                          f"ts {ts} is more than {bounds.past_ms} ms behind the partition's "
                          f"event time {ref} (median of its recent records)", seen)
    if bounds.wall_future_ms is not None and now_ms is not None \
            and ts > now_ms + bounds.wall_future_ms:
        raise OutOfBounds("ts_too_far_ahead",
                          f"ts {ts} is more than {bounds.wall_future_ms} ms ahead of the "
                          f"wall clock {now_ms}", seen)
    return seen
