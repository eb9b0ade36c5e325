"""Topic contracts: the JSON Schema files in streamagent/schemas/ and the typed records built
from them.

Decoding is the only door into the core: raw bytes -> JSON -> schema check -> a frozen
record. Anything that fails raises :class:`InvalidMessage` with a bounded ``reason`` that the
wiring turns into a dead-letter record and a metric.

Every record that crosses a topic or a table is a frozen dataclass here. ``to_doc()`` gives
the JSON document, ``from_doc(doc)`` the record back. A record's field order is the key order
of its document, and the bytes on a topic depend on it: do not reorder fields.
"""
from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, fields
from functools import lru_cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import fastjsonschema
import orjson

from streamagent.errors import InvalidMessage

SCHEMA_FILES = {
    "user-event": "user-event.v1.json",
    "conversion": "conversion.v1.json",
    "coupon-action": "coupon-action.v1.json",
    "decision-log": "decision-log.v1.json",
    "dlq-envelope": "dlq-envelope.v1.json",
    "reward": "reward.v1.json",
    "transition": "transition.v1.json",
}

EVENT_TYPES = ("session_start", "page_view", "search", "add_to_cart", "remove_from_cart",
               "purchase", "session_end")


SCHEMAS_DIR_ENV = "STREAMAGENT_SCHEMAS_DIR"


def schemas_dir() -> Traversable:
    """The schema files: package data (streamagent/schemas/), so a plain ``pip install`` finds
    them wherever it runs, with no setting (the repository's top-level schemas/ is a symlink
    to them: one copy). STREAMAGENT_SCHEMAS_DIR overrides, to try a changed contract without
    reinstalling."""
    env = os.environ.get(SCHEMAS_DIR_ENV)
    if env:
        return Path(env)
    return resources.files("streamagent") / "schemas"


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict:
    return orjson.loads((schemas_dir() / SCHEMA_FILES[name]).read_bytes())


@lru_cache(maxsize=None)
def validator(name: str):
    return fastjsonschema.compile(load_schema(name))


@lru_cache(maxsize=None)
def _field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _plain(value):
    """A field value as JSON data: a nested record as its document, a tuple as a list."""
    if isinstance(value, tuple):
        # the tuples of these records are homogeneous: one of plain values (features,
        # Q-values, masks) converts in one call, not one call per element
        if not value or not isinstance(value[0], (tuple, _Record)):
            return list(value)
        return [_plain(v) for v in value]
    if isinstance(value, _Record):
        return value.to_doc()
    return value


def _frozen(value, record=None):
    """A JSON value as a field value: a list as a tuple (records are immutable), a nested
    document (or a list of them) as the given record type."""
    if isinstance(value, list):
        if record is None and (not value or not isinstance(value[0], list)):
            return tuple(value)  # plain values: one call (see _plain)
        return tuple(_frozen(v, record) for v in value)
    if record is not None and value is not None:
        return record.from_doc(value)
    return value


_SCALARS = frozenset((str, int, float, bool, type(None)))
_CODECS: dict = {}


def _codec(cls):
    """(to_doc, from_doc) of a record class, written out once per class: the generic versions
    (a comprehension and a helper call per field) were a third of the reward join's time, which
    decodes and re-encodes each user's record with its pending decisions for every input. Same
    results as :meth:`_Record._from_doc_generic` and ``_plain`` per field (a test holds them
    equal), and a document missing a field takes the generic path (the field's default)."""
    got = _CODECS.get(cls)
    if got is not None:
        return got
    names = _field_names(cls)
    nested = cls._nested
    env = {"cls": cls, "_plain": _plain, "_frozen": _frozen, "_SCALARS": _SCALARS,
           "_generic": cls._from_doc_generic, **{f"_R{i}": nested.get(n) for i, n in enumerate(names)}}
    to_lines = ["def to_doc(self):"]
    to_lines += [f"    v{i} = self.{n}" for i, n in enumerate(names)]
    to_lines.append("    return {" + ", ".join(
        f"{n!r}: (v{i} if v{i}.__class__ in _SCALARS else _plain(v{i}))"
        for i, n in enumerate(names)) + "}")
    from_lines = ["def from_doc(doc):", "    try:"]
    from_lines += [f"        v{i} = doc[{n!r}]" for i, n in enumerate(names)]
    from_lines += ["    except KeyError:", "        return _generic(doc)"]
    args = []
    for i, n in enumerate(names):
        if nested.get(n) is not None:
            args.append(f"{n}=_frozen(v{i}, _R{i})")
        else:
            args.append(f"{n}=(v{i} if v{i}.__class__ is not list else _frozen(v{i}))")
    from_lines.append("    return cls(" + ", ".join(args) + ")")
    exec("\n".join(to_lines) + "\n\n" + "\n".join(from_lines), env)  # noqa: S102
    _CODECS[cls] = got = (env["to_doc"], env["from_doc"])
    return got


@lru_cache(maxsize=None)
def _evolver(cls):
    """``evolve(record, changes)`` of a record class, written out once per class: a new record
    with ``changes`` (a dict of field values) and every other field as it was, what
    ``dataclasses.replace`` does at a third of its cost. The reward join replaces pending
    decisions and records several times per input, and a frozen dataclass's __init__ sets
    each field through ``object.__setattr__``: this sets the slots directly (no record class
    has a __post_init__ to skip, and every one has slots)."""
    names = _field_names(cls)
    slots = [cls.__dict__.get(n) for n in names]
    if not all(type(d).__name__ == "member_descriptor" for d in slots):
        raise TypeError(f"{cls.__name__} is not a dataclass with slots")
    env = {"cls": cls, "_new": object.__new__, "_names": frozenset(names),
           **{f"_s{i}": d.__set__ for i, d in enumerate(slots)}}
    src = ["def evolve(self, changes):",
           "    if not changes.keys() <= _names:",
           "        raise TypeError(f'{cls.__name__} has no field(s) '"
           "f'{sorted(changes.keys() - _names)}')",
           "    g = changes.get",
           "    new = _new(cls)"]
    src += [f"    _s{i}(new, g({n!r}, self.{n}))" for i, n in enumerate(names)]
    src.append("    return new")
    exec("\n".join(src), env)  # noqa: S102
    return env["evolve"]


class _Record:
    """to_doc(): every field, in field order; from_doc(doc): the record, lists as tuples.

    Values are taken as they are (no float() of an int): a record re-encodes to the bytes it
    was decoded from.
    """

    __slots__ = ()
    _nested: dict = {}  # field name -> record type of the documents it holds

    def to_doc(self) -> dict:
        return _codec(type(self))[0](self)

    @classmethod
    def from_doc(cls, doc: dict):
        return _codec(cls)[1](doc)

    def evolve(self, **changes):
        """A copy with ``changes``: ``dataclasses.replace(self, **changes)``, faster."""
        return _evolver(type(self))(self, changes)

    @classmethod
    def _from_doc_generic(cls, doc: dict):
        return cls(**{name: _frozen(doc[name], cls._nested.get(name))
                      for name in _field_names(cls) if name in doc})


class _InputRecord(_Record):
    """A record producers write: fields at their defaults are left out of the document
    (absent means the default), and null means absent."""

    __slots__ = ()

    def to_doc(self) -> dict:
        doc = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.default is MISSING or value != f.default:
                doc[f.name] = _plain(value)
        return doc

    @classmethod
    def _present(cls, doc: dict) -> dict:
        return {name: _frozen(doc[name]) for name in _field_names(cls)
                if doc.get(name) is not None}


# ------------------------------------------------------------------ topic records: inputs
@dataclass(frozen=True, slots=True)
class UserEvent(_InputRecord):
    event_id: str
    user_id: str
    type: str
    ts: int
    item_id: str | None = None
    category: str | None = None
    price: float | None = None
    quantity: int | None = None
    amount: float | None = None
    coupon_code: str | None = None
    query: str | None = None
    geo: str | None = None
    device: str | None = None
    tags: tuple[str, ...] | None = None
    schema_version: int = 1

    @classmethod
    def from_doc(cls, doc: dict) -> "UserEvent":
        kw = cls._present(doc)
        for name in ("price", "amount"):
            if name in kw:
                kw[name] = float(kw[name])
        return cls(**kw)


@dataclass(frozen=True, slots=True)
class Conversion(_InputRecord):
    """An order; or, with heartbeat=True, only a sign that event time has reached ts."""

    order_id: str
    user_id: str
    ts: int
    amount: float
    discount: float | None = None
    coupon_code: str | None = None
    decision_id: str | None = None
    heartbeat: bool | None = None
    schema_version: int = 1

    @classmethod
    def from_doc(cls, doc: dict) -> "Conversion":
        kw = cls._present(doc)
        kw["amount"] = float(kw["amount"])
        return cls(**kw)


# ------------------------------------------------------------------ topic records: outputs
@dataclass(frozen=True, slots=True, kw_only=True)
class Decision(_Record):
    """A decision-log record: every decision, 'no coupon' included."""

    schema_version: int = 1
    decision_id: str
    user_id: str
    ts: int
    action: str
    action_index: int
    propensity: float
    explored: bool
    exploration: str
    epsilon: float | None = None
    policy_version: int
    trigger_event_id: str
    trigger_type: str
    q_values: tuple[float, ...]
    allowed: tuple[bool, ...]
    blocked_by: tuple[str, ...]
    features: tuple[float, ...]
    cost: float
    # the budget pacing's shadow price (core/pacing.py) the decision was taken with: the
    # policy scored each action by q_values[a] - shadow_price x cost(a); None (left out of the
    # document): pacing off
    shadow_price: float | None = None

    def to_doc(self) -> dict:
        doc = _Record.to_doc(self)
        if self.shadow_price is None:
            del doc["shadow_price"]  # the bytes of a record without pacing stay as they were
        return doc


@dataclass(frozen=True, slots=True, kw_only=True)
class CouponOffer(_Record):
    """The coupon of a coupon action."""

    id: str
    kind: str
    value: float
    min_spend: float
    expires_ts: int
    code: str
    conditions: dict | None = None  # in the schema; never set by the engine, left out if None

    def to_doc(self) -> dict:
        doc = _Record.to_doc(self)
        if self.conditions is None:
            del doc["conditions"]
        return doc


@dataclass(frozen=True, slots=True, kw_only=True)
class CouponAction(_Record):
    """A coupon-actions record: a coupon to deliver to a user."""

    schema_version: int = 1
    decision_id: str
    user_id: str
    ts: int
    coupon: CouponOffer
    policy_version: int
    trigger_event_id: str
    _nested = {"coupon": CouponOffer}


@dataclass(frozen=True, slots=True, kw_only=True)
class Reward(_Record):
    """A rewards record: exactly one per decision, when its attribution window closes."""

    schema_version: int = 1
    decision_id: str
    user_id: str
    ts: int
    closed_at: int
    reward: float
    converted: bool
    orders: int
    amount: float
    discount: float
    outcome: str  # converted | default
    action_index: int
    policy_version: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Transition(_Record):
    """A transitions record: (s, a, r, s', dt) of one decision; done: no next decision."""

    schema_version: int = 1
    decision_id: str
    user_id: str
    ts: int
    features: tuple[float, ...]
    action_index: int
    reward: float
    propensity: float
    policy_version: int
    next_features: tuple[float, ...] | None
    next_allowed: tuple[bool, ...] | None
    next_ts: int | None
    dt_ms: int | None
    done: bool
    allowed: tuple[bool, ...] | None = None  # the mask at this decision (optional)


# ------------------------------------------------------------------ table records
@dataclass(frozen=True, slots=True, kw_only=True)
class PendingDecision(_Record):
    """A decision in the reward join, from arrival until its transition is out."""

    decision_id: str
    ts: int
    deadline: int  # end of the attribution window
    action_index: int
    propensity: float
    policy_version: int
    # The decision's features and mask, as the JSON text of [features, allowed]. Text, because
    # a user's record is decoded and re-encoded with every input of the user while it waits
    # out the attribution window: as lists, every pending decision's 33 floats were turned into
    # Python objects and back each time (with 30 pending, about half of the record's cost).
    # Only the transition reads them (unpacked()). Records of earlier releases hold them as
    # lists in ``features`` and ``allowed`` (``vectors`` empty), read as they are.
    vectors: str = ""
    features: tuple[float, ...] | None = None
    allowed: tuple[bool, ...] | None = None
    closed: bool = False  # the window has closed and the reward is out
    reward: float = 0.0
    orders: int = 0  # attributed conversions
    amount: float = 0.0
    discount: float = 0.0

    @staticmethod
    def pack(features, allowed) -> str:
        """The ``vectors`` text of a decision's features and mask."""
        return orjson.dumps([features, allowed]).decode()

    def unpacked(self) -> tuple[tuple[float, ...], tuple[bool, ...] | None]:
        """(features, allowed) of the decision, from either layout."""
        if not self.vectors:
            return self.features, self.allowed
        features, allowed = orjson.loads(self.vectors)
        return tuple(features), (tuple(allowed) if allowed is not None else None)


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingConversion(_Record):
    """A conversion in the reward join, waiting for the watermark to reach its ts."""

    order_id: str
    ts: int
    amount: float
    discount: float | None
    decision_id: str | None  # the decision it names (by decision_id or coupon code), if any


@dataclass(frozen=True, slots=True, kw_only=True)
class JoinRecord(_Record):
    """One user's record in the reward join. Kept with nothing pending (the order and
    decision ids remembered are the duplicate memory) until it expires: nothing pending and
    ``last_ts`` older than the partition's event time minus the TTL (core/join.py)."""

    user_id: str
    decisions: tuple[PendingDecision, ...] = ()  # sorted by (ts, decision_id)
    conversions: tuple[PendingConversion, ...] = ()
    orders: tuple[str, ...] = ()  # order ids seen, newest last
    ids: tuple[str, ...] = ()  # decision ids seen, newest last
    # the latest ts of the user's decisions and orders (0: a record of an older release)
    last_ts: int = 0
    _nested = {"decisions": PendingDecision, "conversions": PendingConversion}


@dataclass(frozen=True, slots=True)
class BudgetShare:
    """Spend of one partition's share of the budget in one event-time period, and the state of
    the partition's budget pacing (core/pacing.py; all at their defaults when pacing is off)."""

    period: int = -1
    spent: float = 0.0
    shadow_price: float = 0.0  # lambda: the price of a unit of budget, in Q units
    integral: float = 0.0  # the controller's integral term (carried across periods)
    paced_ts: int = -1  # event time of the controller's last update (-1: never)
    # the pacing's traffic profile (share of a period's triggers per slice, from the periods
    # before) and this period's triggers per slice; empty: none yet (core/pacing.py)
    profile: tuple[float, ...] = ()
    counts: tuple[float, ...] = ()


@lru_cache(maxsize=None)
def _integer_fields(schema: str) -> tuple[str, ...]:
    """The schema's top-level fields of type integer (or integer-or-null)."""
    out = []
    for name, prop in load_schema(schema).get("properties", {}).items():
        t = prop.get("type")
        if t == "integer" or (isinstance(t, list) and "integer" in t):
            out.append(name)
    return tuple(out)


def _parse(raw: bytes | None, schema: str) -> dict:
    if raw is None:
        raise InvalidMessage("bad_json", "empty value (tombstone)")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage("bad_json", str(exc)[:300]) from None
    if not isinstance(doc, dict):
        raise InvalidMessage("not_an_object", f"got {type(doc).__name__}")
    try:
        validator(schema)(doc)
    except fastjsonschema.JsonSchemaException as exc:
        raise InvalidMessage("schema", str(exc.message)[:300]) from None
    # JSON Schema counts 1767225600000.0 as an integer; the records must hold an int (a float
    # ts became "490896.0" in the join's due-index keys, which it could not read back)
    for name in _integer_fields(schema):
        if type(doc.get(name)) is float:
            if abs(doc[name]) > 2 ** 53:  # beyond, a float is no exact integer
                raise InvalidMessage("schema", f"{name} {doc[name]!r} is not an exact integer")
            doc[name] = int(doc[name])
    return doc


def _check_key(key: bytes | None, user_id: str) -> None:
    # Producers must key by user_id: that is what puts a user's events, state and decisions
    # on one partition. A missing or mismatched key would silently split a user's state over
    # partitions, so reject it. (Callers that hold no key at all, e.g. unit tests, pass ... )
    if key is ...:
        return
    if key is None:
        raise InvalidMessage("key_mismatch", "message has no key; key it by user_id")
    if key != user_id.encode():
        raise InvalidMessage("key_mismatch", f"key {key[:64]!r} != user_id {user_id[:64]!r}")


def decode_user_event(raw: bytes | None, key=...) -> UserEvent:
    doc = _parse(raw, "user-event")
    _check_key(key, doc["user_id"])
    return UserEvent.from_doc(doc)


def decode_conversion(raw: bytes | None, key=...) -> Conversion:
    doc = _parse(raw, "conversion")
    _check_key(key, doc["user_id"])
    return Conversion.from_doc(doc)


def decode_decision(raw: bytes | None, key=...) -> Decision:
    """A decision-log record, validated (the joiner trusts nothing it consumes)."""
    doc = _parse(raw, "decision-log")
    _check_key(key, doc["user_id"])
    return Decision.from_doc(doc)


def decode_transition(raw: bytes | None) -> Transition:
    return Transition.from_doc(_parse(raw, "transition"))


def encode(doc: dict) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


# The smallest size limit a dead letter passes on its way out: the worker's producer
# (Faust's producer_max_request_size, aiokafka's max_request_size: 1,000,000 bytes, key and
# value together) and librdkafka's default message.max.bytes (the same 1,000,000; the learner
# sends its dead letters with confluent-kafka). The input may have been up to the broker's
# limit (1 MiB by default), and base64 adds a third: so the envelope keeps at most
# DLQ_ORIGINAL_MAX bytes of the original value and DLQ_KEY_MAX of its key, with the full
# length and sha256 of what it cut, and dead letters are keyed by ``dlq_key``.
DLQ_MAX_BYTES = 1_000_000
DLQ_ORIGINAL_MAX = 512 * 1024  # base64: 699,052 characters
DLQ_KEY_MAX = 1024


def dlq_key(key: bytes | None) -> bytes | None:
    """The key a dead letter is sent with: the original key, or, beyond ``DLQ_KEY_MAX`` bytes,
    the hex sha256 of it (the envelope has the key's first bytes, length and the same hash)."""
    import hashlib

    if key is None or len(key) <= DLQ_KEY_MAX:
        return key
    return hashlib.sha256(key).hexdigest().encode()


def dlq_envelope(*, source_topic: str, partition: int, offset: int, key: bytes | None,
                 value: bytes | None, reason: str, detail: str, failed_at_ms: int,
                 worker: str | None = None) -> dict:
    """The dead-letter record for a rejected message: the original bytes and why.

    A value longer than ``DLQ_ORIGINAL_MAX`` bytes (a key longer than ``DLQ_KEY_MAX``) is
    cut to that many bytes, and the envelope says so: ``truncated`` true, with
    ``original_len``/``original_sha256`` (``key_len``/``key_sha256``) of the whole. Encoded,
    the envelope stays well under ``DLQ_MAX_BYTES``, whatever the input."""
    import base64
    import hashlib

    value = value or b""
    env = {
        "schema_version": 1, "source_topic": source_topic, "partition": max(partition, 0),
        "offset": max(offset, 0),
        "key_b64": base64.b64encode(key[:DLQ_KEY_MAX]).decode() if key is not None else None,
        "reason": reason, "detail": detail[:1000],
        "original_b64": base64.b64encode(value[:DLQ_ORIGINAL_MAX]).decode(),
        "failed_at_ms": failed_at_ms, "worker": worker,
    }
    if len(value) > DLQ_ORIGINAL_MAX:
        env.update(truncated=True, original_len=len(value),
                   original_sha256=hashlib.sha256(value).hexdigest())
    if key is not None and len(key) > DLQ_KEY_MAX:
        env.update(truncated=True, key_len=len(key), key_sha256=hashlib.sha256(key).hexdigest())
    return env
