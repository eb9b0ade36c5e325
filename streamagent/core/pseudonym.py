"""Keyed pseudonymisation of user ids at ingress (STREAMAGENT_PSEUDONYM_KEY[_FILE]).

With a key set, the workers replace every user id they read (the key and ``user_id`` of
user-events and conversions) by a pseudonym before anything is stored, logged or sent on:
state tables and their changelogs, decision-log, rewards, transitions, dead letters and logs
carry pseudonyms only. coupon-actions, the product's output to the shop's delivery system,
keeps the raw id: the shop must know whom to send the coupon.

A pseudonym is ``u-`` + 26 base32 characters of HMAC-SHA256(key, user id) — 130 bits: a
collision is not a concern, and without the key neither reversal nor a dictionary attack
(hashing guessed ids) is possible. It is **partition-preserving**: among ``u-<mac>``,
``u-<mac>.1``, ``u-<mac>.2``... the first whose key partition (murmur2, as the producers'
and Faust's) equals the raw id's is taken, so a user's pseudonymous records sit on the
partition its events arrive on, and everything keyed by pseudonym (decision-log, the join,
the expiry sweeps) stays co-partitioned without a repartition step (about ``partitions``
HMAC-free murmur2 calls per new id; ids are cached).

Rotation: a new key gives every user a new pseudonym, so users start afresh (no state, no
pending rewards; old states and join records expire by the TTL). See docs/RELIABILITY.md.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
from collections import OrderedDict
from typing import Callable

import orjson

PREFIX = "u-"
MIN_KEY_BYTES = 16


class Pseudonyms:
    def __init__(self, key: bytes, partition_of: Callable[[bytes], int] | None = None,
                 cache_size: int = 100_000):
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the pseudonymisation key has {len(key)} bytes; use at least "
                             f"{MIN_KEY_BYTES} random bytes (e.g. `openssl rand -hex 32`)")
        self._key = key
        self.partition_of = partition_of
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._size = cache_size

    def of(self, user_id: str) -> str:
        """The pseudonym of ``user_id`` (idempotent on pseudonyms is NOT promised: only raw
        ids come in at ingress)."""
        hit = self._cache.get(user_id)
        if hit is not None:
            self._cache.move_to_end(user_id)
            return hit
        mac = hmac.new(self._key, user_id.encode(), hashlib.sha256).digest()
        base = PREFIX + base64.b32encode(mac[:20]).decode().rstrip("=").lower()[:26]
        name = base
        if self.partition_of is not None:
            want, i = self.partition_of(user_id.encode()), 0
            while self.partition_of(name.encode()) != want:
                i += 1
                name = f"{base}.{i}"
        self._cache[user_id] = name
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return name

    def key(self, key: bytes | None) -> bytes | None:
        """A record key (a raw user id in UTF-8) as its pseudonym; other keys (None, not
        UTF-8) are hashed too, so no raw bytes pass."""
        if key is None:
            return None
        try:
            return self.of(key.decode()).encode()
        except UnicodeDecodeError:
            return self.of(key.hex()).encode()

    def record(self, key: bytes | None, value: bytes | None) -> tuple[bytes | None, bytes | None]:
        """An inbound (key, value) with its ids replaced: the key, and the JSON object's
        ``user_id`` when it is a string. A value that is no such object is left to the
        decoder, which rejects it (and :meth:`redact` keeps it out of the dead letters)."""
        new_key = self.key(key)
        if value is None:
            return new_key, None
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError:
            return new_key, value
        if isinstance(doc, dict) and isinstance(doc.get("user_id"), str):
            doc["user_id"] = self.of(doc["user_id"])
            return new_key, orjson.dumps(doc)
        return new_key, value

    def redact(self, key: bytes | None, value: bytes | None,
               detail: str) -> tuple[bytes | None, bytes | None, str]:
        """What a dead letter may hold of a rejected record: the key as its pseudonym; the
        value with its ``user_id`` pseudonymised if it is a JSON object whose user_id is a
        string, else nothing of it (its length and a keyed MAC say what it was: see
        :meth:`withheld`); the detail text with the raw key and user id replaced."""
        doc = None
        if value is not None:
            try:
                doc = orjson.loads(value)
            except orjson.JSONDecodeError:
                doc = None
        raw_ids = []
        if key is not None:
            raw_ids.append(key.decode(errors="replace"))
        if isinstance(doc, dict) and doc.get("user_id") is not None:
            raw_ids.append(str(doc["user_id"]))
        for raw in sorted(set(filter(None, raw_ids)), key=len, reverse=True):
            detail = detail.replace(raw, self.of(raw))
        new_key = self.key(key)
        if value is None:
            return new_key, None, detail
        if isinstance(doc, dict) and isinstance(doc.get("user_id"), str):
            doc["user_id"] = self.of(doc["user_id"])
            return new_key, orjson.dumps(doc), detail
        if isinstance(doc, dict) and "user_id" not in doc:
            return new_key, value, detail
        return new_key, None, detail  # unparseable or a non-string user_id: not kept

    def withheld(self, env: dict, value: bytes | None) -> dict:
        """Mark a dead letter whose original value was withheld: its length and a keyed MAC
        (a plain hash of a short id could be matched against guessed ids)."""
        env.update(redacted=True, original_len=len(value or b""),
                   original_hmac=hmac.new(self._key, value or b"", hashlib.sha256).hexdigest())
        return env
