"""Per-user state as a value: ``apply(state, event, params) -> state``.

Time-decayed aggregates are kept at a reference time (the user's latest event time) as
sum_i w_i * 2^-((T - t_i) / half_life). An event older than T is added with its own decay
weight instead of rewinding T, so the sums do not depend on arrival order, and everything
runs on event time: a month replayed in minutes gives the same state as live traffic.
"""
from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import orjson

from streamagent.core.contracts import Decision, UserEvent

N_CATEGORY_BUCKETS = 8
RECENT_DECISIONS = 4  # decisions kept for re-emission when a crash replays their triggers
# The layout of UserState.to_bytes. Version 1 (no "v" key): every field but event_ids;
# version 2 ("v": 2): every field. Any layout decodes: fields missing from it take their
# defaults and fields unknown here are ignored, so workers of two releases can share the
# tables during a rolling deploy. Adding or removing a field needs a new version.
BLOB_VERSION = 2


class EncodedDoc(Mapping):
    """A decision-log document kept with its JSON bytes (those sent to the decision-log).

    A user's state keeps its recent decisions, features and Q-values included: about three
    quarters of the state's JSON. Kept as dicts they were encoded again at every write of the
    state (measured: 4.5 µs a write with four decisions, 1.1 µs with their bytes copied in
    as they are), and as bytes they take a quarter of a dict's memory in the state cache. It
    reads as the document (a Mapping, decoded on first use, and only a replay reads one) and
    compares equal to it; a state read back from its table holds plain dicts, which encode
    the same.
    """

    __slots__ = ("raw", "_doc")

    def __init__(self, raw: bytes, doc: dict | None = None):
        # a copy of exactly its size: the bytes orjson.dumps returns keep the whole buffer it
        # wrote into (measured: 8.2 KB of memory held for a 763-byte document, 0.8 KB copied;
        # the document as a dict takes 3 KB)
        self.raw, self._doc = bytes(memoryview(raw)), doc

    @property
    def doc(self) -> dict:
        if self._doc is None:
            self._doc = orjson.loads(self.raw)
        return self._doc

    def __getitem__(self, key):
        return self.doc[key]

    def __iter__(self):
        return iter(self.doc)

    def __len__(self) -> int:
        return len(self.doc)

    def __eq__(self, other) -> bool:
        if isinstance(other, EncodedDoc):
            return self.raw == other.raw or self.doc == other.doc
        return self.doc == other if isinstance(other, Mapping) else NotImplemented

    __hash__ = None  # as a dict's

    def __repr__(self) -> str:
        return f"EncodedDoc({self.doc!r})"


def _fragment(obj):
    """orjson's default= hook: an EncodedDoc goes in as its bytes."""
    if isinstance(obj, EncodedDoc):
        return orjson.Fragment(obj.raw)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


@dataclass(frozen=True)
class StateParams:
    half_life_ms: int
    cap_window_ms: int
    # how many of a user's most recent applied event ids are remembered, to recognise an event
    # seen before whatever its offset (0: none, the offset check alone)
    dedupe_events: int
    # a state whose last event is more than this far behind its partition's event time has
    # expired: the user counts as new (see expired); 0: never
    ttl_ms: int


@dataclass(frozen=True, slots=True)
class UserState:
    user_id: str
    first_ts: int = 0
    last_ts: int = 0
    # Identity of what was applied, so that an event is never applied twice (at-least-once
    # delivery, re-sent duplicates): the (partition, offset) of the last applied event and the
    # ids of the last StateParams.dedupe_events applied events, oldest first. See is_replay.
    last_partition: int = -1
    last_offset: int = -1
    event_ids: tuple[str, ...] = ()
    n_events: int = 0
    n_sessions: int = 0
    n_purchases: int = 0
    total_spend: float = 0.0
    last_session_ts: int = 0
    last_purchase_ts: int = 0
    # decayed aggregates, referenced to last_ts
    d_events: float = 0.0
    d_sessions: float = 0.0
    d_searches: float = 0.0
    d_views: float = 0.0
    d_spend: float = 0.0
    d_purchases: float = 0.0
    interest: tuple[float, ...] = (0.0,) * N_CATEGORY_BUCKETS
    cart_items: int = 0
    cart_value: float = 0.0
    last_price: float = 0.0
    device: str = ""
    geo: str = ""
    # coupons
    coupon_ts: tuple[int, ...] = ()  # issue times inside the cap window
    n_coupons: int = 0
    n_redeemed: int = 0
    last_coupon_ts: int = 0
    # an exploration run in progress: its action, and how many more decisions it lasts
    explore_action: int = 0
    explore_left: int = 0
    # recent decisions, newest last, as their decision-log documents: only a replay reads one
    # (find_decision), so they are not decoded into Decisions with every read of the state
    # (that took about a tenth of the decide worker's loop)
    decisions: tuple[Mapping, ...] = field(default=())  # dicts or EncodedDocs

    @property
    def recent(self) -> tuple[Decision, ...]:
        """The recent decisions, decoded."""
        return tuple(Decision.from_doc(d) for d in self.decisions)

    def to_bytes(self) -> bytes:
        doc = {name: getattr(self, name) for name in self.__slots__}
        if self.event_ids:
            doc["v"] = BLOB_VERSION
        else:
            # Without ids, version 1 says it all: the layout that releases before version 2
            # decode (they accept exactly their own fields). With dedupe_events 0 those
            # releases can therefore share the tables with this one: a rolling upgrade.
            del doc["event_ids"]
        return orjson.dumps(doc, default=_fragment)

    @classmethod
    def from_bytes(cls, raw: bytes) -> "UserState":
        doc = orjson.loads(raw)
        if _LAYOUTS.get(doc.pop("v", 1)) != len(doc):
            return cls._from_other_layout(doc)
        # a layout this release writes: its fields are known (the hot path, no key checks)
        doc["interest"] = tuple(doc["interest"])
        doc["coupon_ts"] = tuple(doc["coupon_ts"])
        if "event_ids" in doc:  # version 1 has none
            doc["event_ids"] = tuple(doc["event_ids"])
        doc["decisions"] = tuple(doc["decisions"])
        return cls(**doc)

    @classmethod
    def _from_other_layout(cls, doc: dict) -> "UserState":
        """A blob of a release with other fields: those missing here take their defaults,
        those unknown here are ignored."""
        doc = {k: v for k, v in doc.items() if k in _FIELDS}
        for name in ("interest", "coupon_ts", "event_ids"):
            if name in doc:
                doc[name] = tuple(doc[name])
        if "decisions" in doc:
            doc["decisions"] = tuple(doc["decisions"])
        return cls(**doc)


_FIELDS = frozenset(UserState.__slots__)
# how many fields each version this release writes has (version 1: all but event_ids)
_LAYOUTS = {1: len(_FIELDS) - 1, BLOB_VERSION: len(_FIELDS)}


def category_bucket(category: str) -> int:
    # crc32 rather than hash(): Python's str hash is salted per process, and every worker
    # (and every replay) must bucket a category the same way.
    return zlib.crc32(category.encode()) % N_CATEGORY_BUCKETS


def decay(dt_ms: int, half_life_ms: int) -> float:
    return 0.5 ** (dt_ms / half_life_ms) if dt_ms > 0 else 1.0


def is_replay(state: UserState, partition: int, offset: int, event_id: str) -> bool:
    """Whether an event was applied to this user's state before (docs/RELIABILITY.md). Reads
    only ``last_partition``, ``last_offset`` and ``event_ids`` of ``state``.

    1. Its id is among the user's recent event ids: yes, whatever its partition and offset (a
       crash replay, or a duplicate re-sent at a new offset).
    2. The user has no id memory (a state written by a release without it, or
       ``dedupe_events`` 0): the offset check, yes if it is at or before the last applied
       offset of the same partition.
    3. Otherwise no: an id not seen is a new event, even at an offset at or before the last
       one, which is what a recreated topic or a migrated cluster delivers (offsets restart).
       Limit: a crash replay is recognised as long as the user had at most ``dedupe_events``
       events in the replayed stretch (the events since the last commit).
    """
    if event_id in state.event_ids:
        return True
    return (not state.event_ids and partition == state.last_partition
            and offset <= state.last_offset)


def expired(last_ts: int, stream_time: int | None, ttl_ms: int) -> bool:
    """Whether an entry last active at ``last_ts`` has expired by the partition's event time
    ``stream_time`` (the monotone robust time of its StreamClock; None before it has one).

    Event time only, so a replay expires the same users. The rule is applied when a user's
    state is read (an expired one is dropped and the user starts anew) and by the sweep that
    deletes expired entries (stream/decide.py); since the partition's event time only moves
    forward, everything the sweep deletes would have been dropped on its next read anyway, and
    what a user's next event sees does not depend on when the sweep ran.
    """
    return ttl_ms > 0 and stream_time is not None and last_ts < stream_time - ttl_ms


_LAST_TS = re.compile(rb'"last_ts":(-?\d+)')


def last_ts_of(raw: bytes) -> int:
    """A state blob's ``last_ts`` without decoding the rest (the expiry sweep reads many).
    ``user_id`` is the only field before it that holds text, and a quote inside JSON text is
    escaped, so the first match is the field itself."""
    m = _LAST_TS.search(raw, 0, 4096)
    return int(m.group(1)) if m else UserState.from_bytes(raw).last_ts


def remember(event_ids: tuple[str, ...], event_id: str, p: StateParams) -> tuple[str, ...]:
    """The recent event ids once ``event_id`` is applied: the last ``p.dedupe_events``."""
    k = p.dedupe_events
    return (event_ids + (event_id,))[-k:] if k else ()


_STATE_FIELDS = tuple(f.name for f in fields(UserState))
_set = object.__setattr__


def evolve(state: UserState, changes: dict) -> UserState:
    """``dataclasses.replace(state, **changes)`` at a third of its cost (this runs for every
    event and decision; UserState has no __post_init__ to skip)."""
    new = object.__new__(UserState)
    for name in _STATE_FIELDS:
        _set(new, name, changes[name] if name in changes else getattr(state, name))
    return new


def apply(state: UserState, ev: UserEvent, p: StateParams,
          partition: int = -1, offset: int = -1) -> UserState:
    """Fold one event into the user's state. Pure: the caller writes the result back."""
    if ev.ts >= state.last_ts:
        k, w, ref = decay(ev.ts - state.last_ts, p.half_life_ms), 1.0, ev.ts
    else:  # late event: keep the reference time, add it with its own decay
        k, w, ref = 1.0, decay(state.last_ts - ev.ts, p.half_life_ms), state.last_ts
    t = ev.type
    interest = state.interest
    if k != 1.0:
        interest = tuple(x * k for x in interest)
    if ev.category:
        b = category_bucket(ev.category)
        bump = w * (2.0 if t in ("add_to_cart", "purchase") else 1.0)
        interest = interest[:b] + (interest[b] + bump,) + interest[b + 1:]
    changes: dict = dict(
        first_ts=min(state.first_ts, ev.ts) if state.n_events else ev.ts,
        last_ts=ref, n_events=state.n_events + 1,
        d_events=state.d_events * k + w,
        d_sessions=state.d_sessions * k + (w if t == "session_start" else 0.0),
        d_searches=state.d_searches * k + (w if t == "search" else 0.0),
        d_views=state.d_views * k + (w if t == "page_view" else 0.0),
        d_spend=state.d_spend * k, d_purchases=state.d_purchases * k,
        interest=interest,
    )
    if partition >= 0:  # without a position (tests, the learning benchmark) none is kept
        changes.update(last_partition=partition, last_offset=offset,
                       event_ids=remember(state.event_ids, ev.event_id, p))
    if ev.device:
        changes["device"] = ev.device
    if ev.geo:
        changes["geo"] = ev.geo
    if ev.price is not None:
        changes["last_price"] = ev.price
    if t == "session_start":
        changes.update(n_sessions=state.n_sessions + 1,
                       last_session_ts=max(state.last_session_ts, ev.ts))
    elif t == "add_to_cart":
        q = ev.quantity or 1
        changes.update(cart_items=state.cart_items + q,
                       cart_value=state.cart_value + q * (ev.price or 0.0))
    elif t == "remove_from_cart":
        q = ev.quantity or 1
        changes.update(cart_items=max(0, state.cart_items - q),
                       cart_value=max(0.0, state.cart_value - q * (ev.price or 0.0)))
    elif t == "purchase":
        amount = ev.amount if ev.amount is not None else state.cart_value
        changes.update(n_purchases=state.n_purchases + 1, total_spend=state.total_spend + amount,
                       last_purchase_ts=max(state.last_purchase_ts, ev.ts),
                       d_spend=changes["d_spend"] + w * amount,
                       d_purchases=changes["d_purchases"] + w,
                       cart_items=0, cart_value=0.0)
        if ev.coupon_code:
            changes["n_redeemed"] = state.n_redeemed + 1
    return evolve(state, changes)


def coupons_in_window(state: UserState, ts: int, window_ms: int) -> int:
    return sum(1 for c in state.coupon_ts if ts - window_ms < c <= ts)


def record_decision(state: UserState, decision: Decision, coupon_issued: bool,
                    p: StateParams, doc: Mapping | None = None) -> UserState:
    """Remember a decision (and the coupon it issued) in the user's state; ``doc``: its
    document (a dict or an EncodedDoc), if the caller has it already."""
    ts = decision.ts
    coupon_ts = state.coupon_ts
    doc = decision.to_doc() if doc is None else doc
    changes: dict = {"decisions": (state.decisions + (doc,))[-RECENT_DECISIONS:]}
    if coupon_issued:
        coupon_ts = tuple(c for c in coupon_ts if c > ts - p.cap_window_ms) + (ts,)
        changes.update(coupon_ts=coupon_ts, n_coupons=state.n_coupons + 1,
                       last_coupon_ts=max(state.last_coupon_ts, ts))
    return evolve(state, changes)


def find_decision(state: UserState, trigger_event_id: str) -> Decision | None:
    for d in reversed(state.decisions):
        if d["trigger_event_id"] == trigger_event_id:
            return Decision.from_doc(d)
    return None
