"""Typed access to the tables: one small adapter per table, the only place that knows its keys
and encodings.

Each adapter wraps any MutableMapping: a Faust table in production, a dict in tests. The core
reads and writes records through them and never sees a key prefix or a byte.

- user-state (key: the user id as bytes): :class:`UserStates`.
- budget (bytes keys): :class:`BudgetShares` (each partition's share of the budget) and, beside
  it, :class:`StreamClocks` (each partition's event-time clock) and :class:`UserCounts` (users
  seen per partition, for the users gauge).
- join-state (str keys): :class:`JoinStore` (the reward join's per-user records, watermarks,
  due-time index and pending counter); :class:`streamagent.core.outbox.Outbox` keeps its own
  ``ob:`` keys in the same table.
"""
from __future__ import annotations

import heapq
from typing import Callable, Iterator, MutableMapping

import orjson

from streamagent.core.contracts import BudgetShare, JoinRecord
from streamagent.core.eventtime import StreamClock
from streamagent.core.state import UserState, last_ts_of


_DELETED = object()


class Encoded:
    """A value staged as its object: encoded to bytes only when it reaches the real table. A
    record read and rewritten by every input of a batch (a user's join record, a partition's
    clock) is then decoded once and encoded once per batch, not once per input."""

    __slots__ = ("obj", "encode")

    def __init__(self, obj, encode):
        self.obj, self.encode = obj, encode


class Staged(MutableMapping):
    """Writes kept aside over a base mapping: reads see them, the base does not until
    :meth:`apply`. A step that fails half-way is dropped with its staging, so it changes
    nothing (the join applies each input all-or-nothing); successful steps are applied to the
    batch's staging, and the batch's changes reach the table once per key."""

    def __init__(self, base: MutableMapping):
        self.base = base
        self.changes: dict = {}

    def __getitem__(self, key):
        v = self.changes.get(key, None)
        if v is _DELETED:
            raise KeyError(key)
        if v is not None:
            return v
        return self.base[key]

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key) -> bool:
        v = self.changes.get(key, None)
        if v is not None:
            return v is not _DELETED
        return key in self.base

    def __setitem__(self, key, value) -> None:
        self.changes[key] = value

    def __delitem__(self, key) -> None:
        if key not in self:
            raise KeyError(key)
        self.changes[key] = _DELETED

    def __iter__(self) -> Iterator:
        for k in self.base:
            if self.changes.get(k, None) is not _DELETED:
                yield k
        for k, v in self.changes.items():
            if v is not _DELETED and k not in self.base:
                yield k

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def apply(self, keys=None) -> None:
        """Write the staged changes (or those of ``keys``) to the base, then forget them."""
        into_stage = isinstance(self.base, Staged)
        for k in list(self.changes if keys is None else keys):
            v = self.changes.pop(k)
            if v is _DELETED:
                if k in self.base:
                    del self.base[k]
            elif isinstance(v, Encoded) and not into_stage:
                self.base[k] = v.encode(v.obj)
            else:
                self.base[k] = v


_MISSING = object()


class ReadCache(MutableMapping):
    """A batch's reads of a base mapping remembered, misses included; writes and deletes go
    through (and are remembered). The join reads each partition's watermarks, clocks and
    counters once per input, and a key that does not exist (an input with no clock of its own
    yet) cost a RocksDB lookup every time (measured: the store's reads were a fifth of the join
    agent's loop). Lives for one batch: other writers of the base are not seen."""

    def __init__(self, base: MutableMapping):
        self.base = base
        self.seen: dict = {}

    def __getitem__(self, key):
        v = self.seen.get(key, _MISSING)
        if v is _MISSING:
            if key in self.seen:
                raise KeyError(key)
            try:
                v = self.base[key]
            except KeyError:
                self.seen[key] = _MISSING
                raise
            self.seen[key] = v
        return v

    def __contains__(self, key) -> bool:
        try:
            self[key]
        except KeyError:
            return False
        return True

    def __setitem__(self, key, value) -> None:
        self.base[key] = value
        self.seen[key] = value

    def __delitem__(self, key) -> None:
        del self.base[key]
        self.seen[key] = _MISSING

    def __iter__(self) -> Iterator:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


# The expiry sweep looks at this many keys per input record of the partition (and at most
# STATE_SWEEP_KEYS per batch): a partition gains at most one user per record, so the sweep
# goes round its keys faster than they grow, and a small batch (low traffic) pays for a small
# sweep. A fixed number per batch made the sweep most of the work at low traffic (measured:
# 14% of the worker's loop at 1,000 events/s, batches of ~10).
SWEEP_KEYS_PER_RECORD = 2


def sweep_budget(max_keys: int, records: int) -> int:
    """Keys a partition's sweep looks at in a batch that brought it ``records`` records."""
    return min(max_keys, SWEEP_KEYS_PER_RECORD * records)


def scan(table: MutableMapping, partition: int, after=None, limit: int = 100, prefix=None,
         partition_of: Callable[[object], int] | None = None) -> list[tuple]:
    """Up to ``limit`` (key, value) pairs of one partition's keys, in key order, after the key
    ``after`` (None: from the first), only keys starting with ``prefix`` if given: a cursor
    that goes round a partition's keys a slice at a time (the expiry sweep).

    A table that knows its partitions' keys answers itself (``table.scan``: the worker's
    RocksDB tables, stream/faust_internals.py ``DirectTable``); any other mapping (dicts in
    tests, Faust's memory store) is filtered with ``partition_of(key)``.
    """
    own = getattr(table, "scan", None)
    if own is not None:
        return own(partition, after, limit, prefix, partition_of)
    return scan_mapping(table, partition, after, limit, prefix, partition_of)


def scan_mapping(table: MutableMapping, partition: int, after, limit: int, prefix,
                 partition_of: Callable[[object], int] | None) -> list[tuple]:
    """:func:`scan` over a mapping that keeps no partitions: every key is looked at."""
    keys = heapq.nsmallest(limit, (k for k in table
                                   if (after is None or k > after)
                                   and (prefix is None or k.startswith(prefix))
                                   and (partition_of is None or partition_of(k) == partition)))
    return [(k, table[k]) for k in keys]


_MISS = object()


class UserStates:
    """The user-state table: user id (bytes) -> UserState (its to_bytes blob).

    With ``cache_users`` > 0 it also keeps the decoded states of that many most recently used
    users (a write-through cache: every write still goes to the table, at once). A user's
    events come in bursts (a session's views, searches and carts within minutes), and reading
    a state back was a store lookup and a JSON decode every batch (18% of the decide worker's
    loop, docs/BENCHMARKS.md). States are immutable values, so a cached one is never changed
    behind the cache's back; only writes that bypass this adapter could make it stale: the
    worker calls :meth:`clear` whenever partitions move (a rebalance's recovery writes the
    store from the changelog)."""

    def __init__(self, table: MutableMapping[bytes, bytes], cache_users: int = 0):
        self.table = table
        self.cache_users = cache_users
        self._cache: dict[bytes, UserState | None] = {}  # least recently used first

    def get(self, key: bytes) -> UserState | None:
        if self.cache_users:
            state = self._cache.pop(key, _MISS)
            if state is not _MISS:
                self._cache[key] = state  # now the most recently used
                return state
        raw = self.table.get(key)
        state = UserState.from_bytes(raw) if raw else None
        if self.cache_users:
            self._remember(key, state)
        return state

    def put(self, key: bytes, state: UserState) -> None:
        self.table[key] = state.to_bytes()
        if self.cache_users:
            self._cache.pop(key, None)
            self._remember(key, state)

    def delete(self, key: bytes) -> bool:
        """Remove the user's state (a tombstone in the changelog); whether there was one."""
        self._cache.pop(key, None)
        if self.table.get(key) is None:
            return False
        del self.table[key]
        return True

    def clear(self) -> None:
        """Forget every cached state (the table is read again)."""
        self._cache.clear()

    def _remember(self, key: bytes, state: UserState | None) -> None:
        cache = self._cache
        cache[key] = state
        if len(cache) > self.cache_users:
            del cache[next(iter(cache))]

    def last_seen(self, partition: int, after: bytes | None, limit: int,
                  partition_of: Callable[[bytes], int] | None = None) -> list[tuple[bytes, int]]:
        """(user key, last event time) of up to ``limit`` users of the partition after
        ``after`` in key order (see :func:`scan`)."""
        return [(k, last_ts_of(v)) for k, v in scan(self.table, partition, after, limit, None,
                                                    partition_of) if v]


class BudgetShares:
    """The budget table's spend records: partition -> BudgetShare, stored as "period:spent",
    or, once the partition's pacing has run (core/pacing.py),
    "period:spent:shadow_price:integral:paced_ts". Without pacing the record stays in the
    two-field layout that releases before pacing read; the traffic profile and this period's
    counts follow as two comma-separated fields once the pacing has counted triggers."""

    def __init__(self, table: MutableMapping[bytes, bytes]):
        self.table = table

    @staticmethod
    def _key(partition: int) -> bytes:
        return f"p{partition}".encode()

    def get(self, partition: int) -> BudgetShare:
        raw = self.table.get(self._key(partition))
        if not raw:
            return BudgetShare()
        parts = raw.decode().split(":")
        if len(parts) == 2:
            return BudgetShare(int(parts[0]), float(parts[1]))
        period, spent, price, integral, paced_ts = parts[:5]
        profile, counts = (tuple(float(v) for v in f.split(",") if v) for f in
                           (parts[5:7] if len(parts) >= 7 else ("", "")))
        return BudgetShare(int(period), float(spent), float(price), float(integral),
                           int(paced_ts), profile, counts)

    def put(self, partition: int, share: BudgetShare) -> None:
        text = f"{share.period}:{share.spent!r}"
        if share.paced_ts != -1 or share.shadow_price or share.integral:
            text += f":{share.shadow_price!r}:{share.integral!r}:{share.paced_ts}"
            if share.profile or share.counts:
                text += (":" + ",".join(repr(v) for v in share.profile)
                         + ":" + ",".join(f"{v:g}" for v in share.counts))
        self.table[self._key(partition)] = text.encode()


class StreamClocks:
    """Each partition's event-time clock (core/eventtime.py), kept in the budget table (it moves
    with the partition, and the budget period follows it)."""

    def __init__(self, table: MutableMapping[bytes, bytes]):
        self.table = table

    @staticmethod
    def _key(partition: int) -> bytes:
        return b"clock:%d" % partition

    def get(self, partition: int) -> StreamClock:
        raw = self.table.get(self._key(partition))
        return StreamClock.from_doc(orjson.loads(raw)) if raw else StreamClock()

    def put(self, partition: int, clock: StreamClock) -> None:
        self.table[self._key(partition)] = orjson.dumps(clock.to_doc())


class UserCounts:
    """Users seen per partition, kept in the budget table (it moves with the partition)."""

    def __init__(self, table: MutableMapping[bytes, bytes]):
        self.table = table

    @staticmethod
    def _key(partition: int) -> bytes:
        return b"users:%d" % partition

    def get(self, partition: int) -> int:
        return int(self.table.get(self._key(partition)) or 0)

    def put(self, partition: int, n: int) -> None:
        self.table[self._key(partition)] = str(n).encode()


class DueCache:
    """What JoinStores keep of the due-time index between inputs (one per handler; a store
    is made per input): the buckets last decoded, by the bytes they were decoded from (a
    bucket is read by every input that moves the watermark within it: see
    JoinStore.take_due), and each bucket's earliest due time, by the dict it was computed
    for. Both are keyed by identity, so a changed bucket is never mistaken for a cached one."""

    def __init__(self):
        self.raw: dict[str, bytes] = {}
        self.doc: dict[str, dict[str, int]] = {}
        self.least: dict[str, tuple[dict[str, int], int]] = {}


class JoinStore:
    """The reward join's table.

    Keys: ``u:<user>`` the user's JoinRecord (orjson of its document); ``wm:<partition>`` the
    partition's watermark, ``wmd:<partition>`` / ``wmc:<partition>`` those of the decision and
    conversion inputs; ``clockd:<partition>`` / ``clockc:<partition>`` the event-time clocks
    of the decision and conversion inputs (``clock:<partition>``, one clock for both, is what
    releases before 2026-11-27 kept: read where an input has no clock of its own yet);
    ``due:<partition>:<bucket>`` the users with something due in that time bucket, with the
    event time each is due (an object; a list of users in earlier releases);
    ``pending:<partition>`` the count of open decisions.
    """

    INPUTS = {"decisions": "wmd", "conversions": "wmc"}
    CLOCKS = {"decisions": "clockd", "conversions": "clockc"}

    def __init__(self, table: MutableMapping[str, bytes], cache: "DueCache | None" = None):
        self.table = table
        c = cache if cache is not None else DueCache()
        self._due_raw, self._due_doc, self._due_min = c.raw, c.doc, c.least

    # ---------------------------------------------------------------- per-user records
    def _put(self, key: str, obj, encode) -> None:
        # on a staging, the object itself (encoded when the batch is written); else bytes
        self.table[key] = Encoded(obj, encode) if isinstance(self.table, Staged) else encode(obj)

    def record(self, user: str) -> JoinRecord:
        """The user's record; an empty one for a user not seen before."""
        raw = self.table.get("u:" + user)
        if isinstance(raw, Encoded):
            return raw.obj
        return JoinRecord.from_doc(orjson.loads(raw)) if raw else JoinRecord(user_id=user)

    def put_record(self, rec: JoinRecord) -> None:
        # orjson writes a dataclass as its fields in order, nested records and tuples
        # included: the bytes of orjson.dumps(rec.to_doc()) at two thirds of the cost (a
        # test holds them equal)
        self._put("u:" + rec.user_id, rec, orjson.dumps)

    def has_record(self, user: str) -> bool:
        return self.table.get("u:" + user) is not None

    def delete_record(self, user: str) -> None:
        if self.table.get("u:" + user) is not None:
            del self.table["u:" + user]

    def records(self, partition: int, after: str | None, limit: int,
                partition_of: Callable[[str], int] | None = None) -> list[tuple[str, dict]]:
        """(user, record document) of up to ``limit`` users of the partition after the user
        ``after``, in key order (see :func:`scan`; documents, not JoinRecords: the sweep needs
        three fields of each)."""
        of = None if partition_of is None else (lambda k: partition_of(k[2:]))
        start = None if after is None else "u:" + after
        return [(k[2:], orjson.loads(v)) for k, v in scan(self.table, partition, start, limit,
                                                          "u:", of) if v]

    # ---------------------------------------------------------------- watermarks
    def watermark(self, partition: int) -> int | None:
        """The partition's watermark (None before both inputs have been seen)."""
        return self._int(f"wm:{partition}")

    def set_watermark(self, partition: int, wm: int) -> None:
        self._put(f"wm:{partition}", wm, _int_bytes)

    def input_watermark(self, partition: int, input_: str) -> int | None:
        """The watermark of one input ("decisions" or "conversions") on the partition."""
        return self._int(f"{self.INPUTS[input_]}:{partition}")

    def set_input_watermark(self, partition: int, input_: str, wm: int) -> None:
        self._put(f"{self.INPUTS[input_]}:{partition}", wm, _int_bytes)

    # ---------------------------------------------------------------- event-time clocks
    def clock(self, partition: int, source: str) -> StreamClock:
        """The event-time clock of one input (``decisions`` or ``conversions``) on the
        partition; the old shared clock until the input has one of its own."""
        raw = self.table.get(f"{self.CLOCKS[source]}:{partition}")
        if raw is None:
            raw = self.table.get(f"clock:{partition}")
        if isinstance(raw, Encoded):
            return raw.obj
        return StreamClock.from_doc(orjson.loads(raw)) if raw else StreamClock()

    def put_clock(self, partition: int, source: str, clock: StreamClock) -> None:
        self._put(f"{self.CLOCKS[source]}:{partition}", clock, _doc_bytes)

    def event_time(self, partition: int) -> int | None:
        """Where the partition is in event time for expiry: the earlier of its inputs' clocks
        (an input with no clock yet left out; None before either has one). The earlier, so
        that a backlog on one input does not expire what the other has not caught up to."""
        times = [t for t in (self.clock(partition, s).stream_time for s in self.CLOCKS)
                 if t is not None]
        return min(times) if times else None

    # ---------------------------------------------------------------- due-time index
    def _due_key(self, partition: int, bucket: int) -> str:
        return f"due:{partition}:{bucket}"

    def add_due(self, partition: int, bucket: int, user: str, due: int,
                bucket_start: int = 0) -> None:
        """Index ``user`` as due at event time ``due`` in ``bucket`` (an earlier due time of
        the user already there stands). ``bucket_start``: the bucket's first time, the due
        time of the users of an index written before due times were kept."""
        key = self._due_key(partition, bucket)
        entries = self._due_entries(key, bucket_start)
        if entries.get(user, due + 1) > due:
            # a new dict: a staged one may belong to a lower staging that must stay intact
            new = {**entries, user: due}
            self._put(key, new, orjson.dumps)
            got = self._due_min.get(key)
            if got is not None and got[0] is entries:
                self._remember_min(key, new, min(got[1], due))

    def _due_entries(self, key: str, bucket_start: int) -> dict[str, int]:
        """The bucket's users and their due times. Earlier releases kept a list
        of users: each counts as due at the bucket's start, which is when those releases
        resolved them."""
        raw = self.table.get(key)
        if isinstance(raw, Encoded):
            return raw.obj
        if not raw:
            return {}
        if raw is self._due_raw.get(key):  # read in this batch already (same bytes object)
            return self._due_doc[key]
        doc = orjson.loads(raw)
        if isinstance(doc, list):
            doc = dict.fromkeys(doc, bucket_start)
        if len(self._due_raw) > 64:
            self._due_raw.clear()
            self._due_doc.clear()
        self._due_raw[key], self._due_doc[key] = raw, doc
        return doc

    def has_due(self, partition: int, bucket: int) -> bool:
        return self._due_key(partition, bucket) in self.table

    def take_due(self, partition: int, bucket: int, until: int | None = None,
                 bucket_start: int = 0) -> list[str]:
        """The users of the bucket (which must exist) due at or before event time ``until``
        (all of them if None), in the order they were indexed; they leave the bucket, and the
        bucket goes once it is empty."""
        key = self._due_key(partition, bucket)
        entries = self._due_entries(key, bucket_start)
        if until is None:
            del self.table[key]
            return list(entries)
        got = self._due_min.get(key)
        if got is not None and got[0] is entries:
            if until < got[1]:
                return []  # the common case: the watermark moved, nobody here is due yet
        elif until < self._remember_min(key, entries, min(entries.values())):
            return []
        users = [user for user, due in entries.items() if due <= until]
        if len(users) == len(entries):
            del self.table[key]
        elif users:
            rest = {u: due for u, due in entries.items() if due > until}
            self._put(key, rest, orjson.dumps)
            self._remember_min(key, rest, min(rest.values()))
        return users

    def _remember_min(self, key: str, entries: dict[str, int], least: int) -> int:
        """Remember the earliest due time of a bucket's entries (by the dict's identity)."""
        if len(self._due_min) > 256:
            self._due_min.clear()
        self._due_min[key] = (entries, least)
        return least

    def due_buckets(self, partition: int) -> list[int]:
        """Every bucket of the partition with users in it, in time order (scans the keys)."""
        prefix = f"due:{partition}:"
        return sorted(int(k[len(prefix):]) for k in list(self.table.keys())
                      if isinstance(k, str) and k.startswith(prefix))

    # ---------------------------------------------------------------- pending counter
    def pending(self, partition: int) -> int:
        return self._int(f"pending:{partition}") or 0

    def set_pending(self, partition: int, n: int) -> None:
        self._put(f"pending:{partition}", n, _int_bytes)

    def _int(self, key: str) -> int | None:
        raw = self.table.get(key)
        if isinstance(raw, Encoded):
            return raw.obj
        return int(raw) if raw else None


def _doc_bytes(obj) -> bytes:
    return orjson.dumps(obj.to_doc())


def _int_bytes(n: int) -> bytes:
    return str(n).encode()
