"""The table adapters: typed records in and out, and the stored bytes they keep.

The stored formats are pinned here because a worker upgraded in place reads what the previous
version wrote into its tables (RocksDB and the changelog topics).
"""
import pytest

from streamagent.core.contracts import BudgetShare, JoinRecord, PendingConversion
from streamagent.core.state import UserState
from streamagent.core.tables import (BudgetShares, JoinStore, ReadCache, Staged, UserCounts,
                                     UserStates)


def test_user_states_store_the_state_blob():
    table: dict = {}
    states = UserStates(table)
    assert states.get(b"u1") is None
    s = UserState(user_id="u1", n_events=3)
    states.put(b"u1", s)
    assert table[b"u1"] == s.to_bytes() and states.get(b"u1") == s


class CountingGets(dict):
    """A dict that counts the ``get`` calls that reach it (UserStates reads with get)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def get(self, key, default=None):
        self.reads += 1
        return super().get(key, default)


def test_user_state_cache_writes_through_keeps_the_most_recent_and_forgets_on_clear():
    table = CountingGets()
    states = UserStates(table, cache_users=2)
    a, b, c = (UserState(user_id=u, n_events=1) for u in ("a", "b", "c"))
    states.put(b"a", a)
    states.put(b"b", b)
    assert table[b"a"] == a.to_bytes()  # written through at once
    assert states.get(b"a") is a and states.get(b"b") is b and table.reads == 0
    states.put(b"c", c)  # three users, room for two: "a" (least recently used) goes
    assert states.get(b"a") == a and table.reads == 1  # read back from the table
    assert states.get(b"a") is not None and table.reads == 1  # and cached again
    table[b"a"] = UserState(user_id="a", n_events=9).to_bytes()  # a write behind its back
    assert states.get(b"a").n_events == 1  # (stale until...)
    states.clear()  # ...partitions move: the worker clears it
    assert states.get(b"a").n_events == 9
    assert states.delete(b"a") and b"a" not in table and table.reads == 3
    assert states.get(b"a") is None and table.reads == 4  # deleted: read from the table
    assert states.get(b"nobody") is None and states.get(b"nobody") is None
    assert table.reads == 5  # the absence of "nobody" is cached too


def test_budget_shares_and_user_counts_share_the_budget_table():
    table: dict = {}
    shares, counts = BudgetShares(table), UserCounts(table)
    assert shares.get(3) == BudgetShare() and counts.get(3) == 0
    shares.put(3, BudgetShare(20_000, 12.5))
    counts.put(3, 7)
    assert table == {b"p3": b"20000:12.5", b"users:3": b"7"}  # the format of earlier versions
    assert shares.get(3) == BudgetShare(20_000, 12.5) and counts.get(3) == 7
    assert shares.get(4) == BudgetShare() and counts.get(4) == 0


def test_join_store_keys_and_records():
    table: dict = {}
    js = JoinStore(table)
    assert js.record("u") == JoinRecord(user_id="u")
    rec = JoinRecord(user_id="u", orders=("o1",), conversions=(
        PendingConversion(order_id="o1", ts=5, amount=10.0, discount=None, decision_id=None),))
    js.put_record(rec)
    assert js.record("u") == rec
    assert js.watermark(0) is None and js.input_watermark(0, "decisions") is None
    js.set_input_watermark(0, "decisions", 100)
    js.set_input_watermark(0, "conversions", 90)
    js.set_watermark(0, 90)
    assert (js.watermark(0), js.input_watermark(0, "decisions"),
            js.input_watermark(0, "conversions")) == (90, 100, 90)
    js.add_due(0, 7, "u", 75)
    js.add_due(0, 7, "u", 78)  # the earlier due time stands
    js.add_due(0, 7, "x", 76)
    js.add_due(0, 7, "u", 72)  # an earlier one replaces it
    js.add_due(0, 2, "v", 20)
    js.add_due(1, 1, "w", 10)
    assert js.due_buckets(0) == [2, 7] and js.has_due(0, 7) and not js.has_due(0, 3)
    # only those due by `until` leave the bucket; the bucket goes with its last user
    assert js.take_due(0, 7, until=71) == [] and js.has_due(0, 7)
    assert js.take_due(0, 7, until=72) == ["u"] and js.has_due(0, 7)
    assert js.take_due(0, 7) == ["x"] and js.due_buckets(0) == [2]
    assert js.pending(0) == 0
    js.set_pending(0, 4)
    assert js.pending(0) == 4
    assert set(table) == {"u:u", "wm:0", "wmd:0", "wmc:0", "due:0:2", "due:1:1", "pending:0"}
    assert table["wm:0"] == b"90" and table["due:0:2"] == b'{"v":20}'
    # an index written by a release before due times were kept: users due at the bucket's start
    table["due:0:3"] = b'["a","b"]'
    assert js.take_due(0, 3, until=29, bucket_start=30) == []
    js.add_due(0, 3, "c", 35, bucket_start=30)
    assert js.take_due(0, 3, until=30, bucket_start=30) == ["a", "b"]
    assert js.take_due(0, 3, until=40, bucket_start=30) == ["c"] and not js.has_due(0, 3)


class CountingDict(dict):
    """A dict that counts the reads that reach it."""

    def __init__(self, *a):
        super().__init__(*a)
        self.reads = 0

    def __getitem__(self, key):
        self.reads += 1
        return super().__getitem__(key)


def test_read_cache_reads_each_key_once_misses_included_and_writes_through():
    base = CountingDict({"a": b"1"})
    cache = ReadCache(base)
    assert cache.get("a") == b"1" and cache["a"] == b"1" and "a" in cache
    assert cache.get("nope") is None and "nope" not in cache
    with pytest.raises(KeyError):
        cache["nope"]
    assert base.reads == 2  # one for "a", one for the miss
    cache["b"] = b"2"
    del cache["a"]
    assert base == {"b": b"2"}  # written through
    assert cache.get("a") is None and cache["b"] == b"2" and base.reads == 2
    assert sorted(cache) == ["b"] and len(cache) == 1


def test_a_staging_over_a_read_cache_applies_to_the_base():
    base = CountingDict({"u:x": b"old"})
    stage = Staged(ReadCache(base))
    assert stage["u:x"] == b"old"
    stage["u:x"] = b"new"
    stage["u:y"] = b"y"
    del stage["u:x"]
    stage.apply()
    assert base == {"u:y": b"y"}
