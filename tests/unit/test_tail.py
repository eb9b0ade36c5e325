"""`streamagent tail -n N` prints the topic's newest N messages (it used to print the oldest):
the offsets it starts from and the messages it keeps, without a broker."""
from __future__ import annotations

from dataclasses import dataclass

from streamagent.ops.tail import newest, start_offsets


@dataclass(frozen=True)
class Msg:
    """Just what newest() orders by: (timestamp, partition, offset)."""

    ts: int
    part: int
    off: int

    def timestamp(self) -> tuple[int, int]:
        return 1, self.ts  # (TIMESTAMP_CREATE_TIME, ms), as confluent-kafka gives it

    def partition(self) -> int:
        return self.part

    def offset(self) -> int:
        return self.off


def test_each_partition_starts_n_back_from_its_end():
    assert start_offsets({0: (0, 100), 1: (0, 7)}, 10) == {0: 90, 1: 0}


def test_never_before_the_first_retained_offset():
    # retention deleted offsets 0..49; a compacted or trimmed log starts later
    assert start_offsets({0: (50, 55), 1: (80, 200)}, 10) == {0: 50, 1: 190}


def test_empty_partitions_and_zero_start_at_the_end():
    assert start_offsets({0: (0, 0), 1: (3, 3)}, 5) == {0: 0, 1: 3}
    assert start_offsets({0: (0, 40)}, 0) == {0: 40}
    assert start_offsets({0: (0, 40)}, -3) == {0: 40}


def test_newest_across_partitions_by_timestamp_oldest_first():
    # partition 0 holds old messages only; the newest three are all in partition 1
    read = [Msg(ts, 0, i) for i, ts in enumerate((1, 2, 3))] + \
           [Msg(ts, 1, i) for i, ts in enumerate((10, 11, 12, 13))]
    assert newest(read, 3) == [Msg(11, 1, 1), Msg(12, 1, 2), Msg(13, 1, 3)]


def test_newest_interleaves_partitions_and_breaks_ties_stably():
    read = [Msg(5, 1, 0), Msg(4, 0, 0), Msg(5, 0, 1), Msg(6, 1, 1)]
    assert newest(read, 3) == [Msg(5, 0, 1), Msg(5, 1, 0), Msg(6, 1, 1)]


def test_newest_with_fewer_messages_than_asked_or_none_asked():
    read = [Msg(2, 0, 1), Msg(1, 0, 0)]
    assert newest(read, 10) == [Msg(1, 0, 0), Msg(2, 0, 1)]
    assert newest(read, 0) == []


def test_the_oldest_are_not_what_is_printed():
    """The bug of issue 15: 100 messages, tail -n 10 printed offsets 0..9."""
    marks = {0: (0, 100)}
    starts = start_offsets(marks, 10)
    read = [Msg(1000 + off, 0, off) for off in range(starts[0], 100)]
    assert [m.off for m in newest(read, 10)] == list(range(90, 100))
