"""Pseudonymisation at ingress (issue 14 item 7): no raw user id past the handlers, except on
coupon-actions; the loop still decides, joins and erases by pseudonym. Dict tables, no broker.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib

import orjson
import pytest
from aiokafka.partitioner import murmur2

from streamagent.core.catalog import load_catalog
from streamagent.core.contracts import Conversion, encode
from streamagent.core.engine import DecisionEngine, initial_model
from streamagent.core.pseudonym import Pseudonyms
from streamagent.core.tables import BudgetShares, StreamClocks, UserCounts, UserStates
from streamagent.errors import ConfigError
from streamagent.metrics import Metrics
from streamagent.params import engine_params, join_params, shipped
from streamagent.stream.decide import DecideHandler, DecideTables, DecideTopics
from streamagent.stream.ingress import pseudonyms
from streamagent.stream.join import JoinHandler, JoinTopics

from .conftest import Msg

CAT = load_catalog()
T0 = 1_767_225_600_000
H = 3_600_000
KEY = b"k" * 32
PARTS = 4


def part(key: bytes, n: int = PARTS) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % n


def test_pseudonyms_are_keyed_stable_and_keep_the_partition():
    a, b = Pseudonyms(KEY, lambda k: part(k)), Pseudonyms(b"x" * 32, lambda k: part(k))
    ids = [f"user-{i}" for i in range(300)]
    names = [a.of(u) for u in ids]
    assert names == [Pseudonyms(KEY, lambda k: part(k)).of(u) for u in ids]  # stable
    assert len(set(names)) == len(ids)
    assert all(n.startswith("u-") and u not in n for u, n in zip(ids, names))
    assert sum(a.of(u) == b.of(u) for u in ids) == 0  # another key, other names
    for n in (4, 12):
        p = Pseudonyms(KEY, lambda k, n=n: part(k, n))
        assert all(part(p.of(u).encode(), n) == part(u.encode(), n) for u in ids)
    with pytest.raises(ValueError, match="at least 16"):
        Pseudonyms(b"short")


def test_settings_give_the_key_from_env_or_file(tmp_path):
    assert pseudonyms(shipped(), part) is None
    f = tmp_path / "key"
    f.write_bytes(KEY + b"\n")
    from_file = pseudonyms(shipped(pseudonym_key_file=f), part)
    from_env = pseudonyms(shipped(pseudonym_key=KEY.decode()), part)
    assert from_file.of("alice") == from_env.of("alice")
    with pytest.raises(ConfigError, match="not both"):
        pseudonyms(shipped(pseudonym_key=KEY.decode(), pseudonym_key_file=f), part)
    with pytest.raises(ConfigError, match="at least 16"):
        pseudonyms(shipped(pseudonym_key="short"), part)
    assert "kkkk" not in repr(shipped(pseudonym_key=KEY.decode()))  # a secret


class Loop:
    """Decide and join handlers on dict tables over PARTS partitions, with pseudonyms."""

    def __init__(self):
        s = shipped(pseudonym_key=KEY.decode(), epsilon_start=0.5, epsilon_end=0.5)
        self.ps = pseudonyms(s, lambda k: part(k))
        self.users, self.budgets, self.join_table, self.sent = {}, {}, {}, []

        async def send(topic, key, value):
            self.sent.append((topic, key, value))
        eng = DecisionEngine(CAT, engine_params(s, PARTS), initial_model(CAT, (64, 64), 7))
        self.decide = DecideHandler(
            eng, DecideTables(UserStates(self.users), BudgetShares(self.budgets),
                              UserCounts(self.budgets), StreamClocks(self.budgets)),
            DecideTopics("decision-log", "coupon-actions", "user-events.dlq"), send, Metrics(),
            s.trigger_types, partition_of=lambda k: part(k), pseudonyms=self.ps)
        self.join = JoinHandler(CAT, join_params(s), self.join_table,
                                JoinTopics("decision-log", "conversions", "rewards", "transitions",
                                           lambda t: t + ".dlq"), send, Metrics(), PARTS,
                                pseudonyms=self.ps)
        self.offs: dict = {}

    def msg(self, topic: str, key: bytes | None, value: bytes | None, p: int | None = None):
        p = part(key) if p is None else p
        off = self.offs.get((topic, p), 0)
        self.offs[(topic, p)] = off + 1
        return Msg(topic, p, off, key, value)

    def out(self, topic: str) -> list:
        return [(k, v) for t, k, v in self.sent if t == topic]


def event(user: str, i: int, typ: str, ts: int) -> bytes:
    # event ids are the producer's; here they do not name the user (a shop's that do would
    # pass through: only user ids are pseudonymised)
    eid = hashlib.sha1(f"{user}/{i}".encode()).hexdigest()
    return orjson.dumps({"event_id": eid, "user_id": user, "type": typ, "ts": ts,
                         "device": "ios"})


def test_no_raw_id_passes_the_handlers_except_on_coupon_actions():
    lp = Loop()
    users = [f"alice{i:03d}" for i in range(40)]
    evs = []
    for i, u in enumerate(users):
        evs.append(lp.msg("user-events", u.encode(), event(u, 0, "session_start", T0 + i)))
        evs.append(lp.msg("user-events", u.encode(), event(u, 1, "page_view", T0 + i + 10)))
    bad = [  # each names a raw user id; the dead letters must not
        lp.msg("user-events", b"alice000", b'{"user_id": "alice000", "broken'),  # not JSON
        lp.msg("user-events", b"alice001", event("alice002", 9, "page_view", T0)),  # key mismatch
        lp.msg("user-events", b"alice003", orjson.dumps({"user_id": "alice003", "type": 5})),
        lp.msg("user-events", b"alice004", orjson.dumps({"user_id": 4004, "ts": "x"}), p=0),
    ]
    asyncio.run(lp.decide.handle(evs + bad))
    decisions = lp.out("decision-log")
    assert len(decisions) == len(users)  # every trigger decided
    # four days on, a new user on every partition: the decision-log side of the windows moves
    late = {}
    for i in range(100):
        late.setdefault(part(f"late{i}".encode()), f"late{i}")
    asyncio.run(lp.decide.handle([lp.msg("user-events", u.encode(),
                                         event(u, 0, "session_start", T0 + 96 * H))
                                  for u in late.values()]))
    closing = lp.out("decision-log")[len(decisions):]
    # the join reads decision-log as the deciders wrote it, conversions with raw ids
    join_in = [lp.msg("decision-log", k, v) for k, v in decisions]
    docs = [orjson.loads(v) for _, v in decisions]
    raw_of = {lp.ps.of(u): u for u in users}
    convs = [lp.msg("conversions", raw_of[d["user_id"]].encode(),
                    encode(Conversion(order_id=f"o{i}", user_id=raw_of[d["user_id"]],
                                      ts=d["ts"] + H, amount=50.0,
                                      decision_id=d["decision_id"]).to_doc()))
             for i, d in enumerate(docs)]
    convs.append(lp.msg("conversions", b"alice005", b"alice005 bought"))  # not JSON
    hbs = [lp.msg("conversions", u.encode(), encode(Conversion(
        order_id=f"hb-{u}", user_id=u, ts=T0 + 96 * H, amount=0.0, heartbeat=True).to_doc()))
        for u in late.values()]
    asyncio.run(lp.join.handle(join_in + convs
                               + [lp.msg("decision-log", k, v) for k, v in closing] + hbs))

    rewards = [orjson.loads(v) for _, v in lp.out("rewards")]
    # one per decision whose window closed, joined by pseudonym, each with its order
    assert sorted(r["user_id"] for r in rewards) == sorted(raw_of)
    assert all(r["reward"] != 0 for r in rewards)
    assert len(lp.out("user-events.dlq")) == 4 and len(lp.out("conversions.dlq")) == 1
    # the partition of every pseudonymous record is its user's: decision-log lands where the
    # join reads the user's conversions
    assert all(part(k) == part(raw_of[orjson.loads(v)["user_id"]].encode())
               for k, v in decisions)

    def raw_in(blob: bytes) -> list[str]:
        return [u for u in users if u.encode() in blob]

    internal = [(t, k, v) for t, k, v in lp.sent if t != "coupon-actions"]
    for t, k, v in internal:
        blob = (k or b"") + (v or b"")
        if t.endswith(".dlq"):
            env = orjson.loads(v)
            blob += base64.b64decode(env["original_b64"]) + base64.b64decode(env["key_b64"] or "")
        assert not raw_in(blob), (t, k, v)
    for store in (lp.users, lp.budgets, lp.join_table):
        for k, v in store.items():
            kb = k if isinstance(k, bytes) else str(k).encode()
            assert not raw_in(kb + (v or b"")), (k, v)
    coupons = lp.out("coupon-actions")
    assert coupons, "no coupon went out at epsilon 0.5"
    assert all(orjson.loads(v)["user_id"] == k.decode() and k.decode() in users + [*late.values()]
               for k, v in coupons)
    withheld = [orjson.loads(v) for t, _, v in lp.sent if t.endswith(".dlq")]
    assert sum(bool(e.get("redacted")) for e in withheld) == 3  # unparseable or odd user_id
    assert all(e["original_hmac"] and e["original_b64"] == "" for e in withheld
               if e.get("redacted"))


def test_an_erasure_by_raw_id_deletes_the_pseudonymous_state():
    lp = Loop()
    asyncio.run(lp.decide.handle([
        lp.msg("user-events", b"bob", event("bob", 0, "session_start", T0)),
        lp.msg("user-events", b"bob", None)]))
    assert not lp.users
    tomb = [k for k, v in lp.out("decision-log") if v is None]
    assert tomb == [lp.ps.of("bob").encode()]
