"""Topic contracts: the JSON Schema files in schemas/ and the typed records built from them.

Decoding is the only door into the core: raw bytes -> JSON -> schema check -> a frozen
record. Anything that fails raises :class:`InvalidMessage` with a bounded ``reason`` that the
wiring turns into a dead-letter record and a metric.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from functools import lru_cache
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


def schemas_dir() -> Path:
    """schemas/ at the repository root, or STREAMAGENT_SCHEMAS_DIR (for installed copies)."""
    env = os.environ.get("STREAMAGENT_SCHEMAS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "schemas"


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict:
    return orjson.loads((schemas_dir() / SCHEMA_FILES[name]).read_bytes())


@lru_cache(maxsize=None)
def validator(name: str):
    return fastjsonschema.compile(load_schema(name))


@dataclass(frozen=True, slots=True)
class UserEvent:
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


@dataclass(frozen=True, slots=True)
class Conversion:
    order_id: str
    user_id: str
    ts: int
    amount: float
    discount: float | None = None
    coupon_code: str | None = None
    decision_id: str | None = None
    heartbeat: bool | None = None
    schema_version: int = 1


_USER_EVENT_FIELDS = tuple(f.name for f in fields(UserEvent))
_CONVERSION_FIELDS = tuple(f.name for f in fields(Conversion))


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
    tags = doc.get("tags")
    kw = {k: doc[k] for k in _USER_EVENT_FIELDS if k in doc and doc[k] is not None}
    if tags is not None:
        kw["tags"] = tuple(tags)
    if "price" in kw:
        kw["price"] = float(kw["price"])
    if "amount" in kw:
        kw["amount"] = float(kw["amount"])
    return UserEvent(**kw)


def decode_conversion(raw: bytes | None, key=...) -> Conversion:
    doc = _parse(raw, "conversion")
    _check_key(key, doc["user_id"])
    kw = {k: doc[k] for k in _CONVERSION_FIELDS if k in doc and doc[k] is not None}
    kw["amount"] = float(kw["amount"])
    return Conversion(**kw)


def decode_decision(raw: bytes | None, key=...) -> dict:
    """A decision-log record, validated (the joiner trusts nothing it consumes)."""
    doc = _parse(raw, "decision-log")
    _check_key(key, doc["user_id"])
    return doc


def decode_transition(raw: bytes | None) -> dict:
    return _parse(raw, "transition")


def encode(doc: dict) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def dlq_envelope(*, source_topic: str, partition: int, offset: int, key: bytes | None,
                 value: bytes | None, reason: str, detail: str, failed_at_ms: int,
                 worker: str | None = None) -> dict:
    """The dead-letter record for a rejected message: the original bytes and why."""
    import base64

    return {
        "schema_version": 1, "source_topic": source_topic, "partition": max(partition, 0),
        "offset": max(offset, 0),
        "key_b64": base64.b64encode(key).decode() if key is not None else None,
        "reason": reason, "detail": detail[:1000],
        "original_b64": base64.b64encode(value or b"").decode(),
        "failed_at_ms": failed_at_ms, "worker": worker,
    }
