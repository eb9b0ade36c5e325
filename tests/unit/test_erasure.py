"""Bounded state and erasure on dict tables: erasure requests, the TTL on event time, replays.

The worker's RocksDB path of the sweep (DirectTable.scan) is checked at the end against a
real RocksDB store; the broker path is tests/integration/test_erasure_kafka.py.
"""
from __future__ import annotations

import asyncio

import orjson
import pytest
from aiokafka.partitioner import murmur2

from streamagent.core.catalog import load_catalog
from streamagent.core.contracts import Conversion, Decision, encode
from streamagent.core.engine import DecisionEngine, initial_model
from streamagent.core.features import FEATURE_NAMES
from streamagent.core.state import UserState, expired, last_ts_of
from streamagent.core.tables import (BudgetShares, JoinStore, StreamClocks, UserCounts,
                                     UserStates, scan)
from streamagent.metrics import Metrics
from streamagent.params import engine_params, join_params, shipped
from streamagent.stream.decide import DecideHandler, DecideTables, DecideTopics
from streamagent.stream.join import JoinHandler, JoinTopics

from .conftest import Msg

CAT = load_catalog()
T0 = 1_767_225_600_000
H = 3_600_000
DAY = 24 * H


# ------------------------------------------------------------------------------- decide side
class Decide:
    """A decide handler on dict tables, one partition, recording what it sends."""

    def __init__(self, sweep_keys: int = 0, **settings):
        s = shipped(**settings)
        self.users, self.budgets, self.sent = {}, {}, []
        eng = DecisionEngine(CAT, engine_params(s, 1), initial_model(CAT, (64, 64), 7))

        async def send(topic, key, value):
            self.sent.append((topic, key, None if value is None else orjson.loads(value)))
        self.h = DecideHandler(
            eng, DecideTables(UserStates(self.users), BudgetShares(self.budgets),
                              UserCounts(self.budgets), StreamClocks(self.budgets)),
            DecideTopics("decision-log", "coupon-actions", "user-events.dlq"), send, Metrics(),
            s.trigger_types, sweep_keys=sweep_keys, partition_of=lambda key: 0)
        self.offset = 0

    def msg(self, user: str, typ: str | None, ts: int = 0, eid: str | None = None) -> Msg:
        """An event (``typ`` None: the user's erasure request, a null value)."""
        value = None if typ is None else orjson.dumps(
            {"event_id": eid or f"{user}-{self.offset}", "user_id": user, "type": typ, "ts": ts})
        m = Msg("user-events", 0, self.offset, user.encode(), value)
        self.offset += 1
        return m

    def run(self, msgs: list[Msg], batch: int = 10_000) -> None:
        for i in range(0, len(msgs), batch):
            asyncio.run(self.h.handle(msgs[i:i + batch]))

    def state(self, user: str) -> UserState | None:
        return UserStates(self.users).get(user.encode())

    def metric(self, name: str, **labels) -> float:
        return self.h.m.registry.get_sample_value(name, labels) or 0.0


def test_an_erasure_deletes_the_users_state_and_sends_a_decision_log_tombstone():
    d = Decide()
    first = []
    for u in ("a", "b", "c"):
        first += [d.msg(u, "session_start", T0), d.msg(u, "page_view", T0 + 1000)]
    d.run(first)
    assert d.state("b").n_events == 2
    # one batch: b's event, the erasure, then a new event of b: in that order
    d.run([d.msg("b", "page_view", T0 + 2000), d.msg("b", None),
           d.msg("b", "session_start", T0 + 3000, eid="b-again")])
    assert d.state("a").n_events == 2 and d.state("c").n_events == 2
    b = d.state("b")
    assert b.n_events == 1 and b.event_ids == ("b-again",)  # a new user: nothing from before
    assert ("decision-log", b"b", None) in d.sent
    tomb = d.sent.index(("decision-log", b"b", None))
    after = [x for x in d.sent[tomb:] if x[0] == "decision-log" and x[2] is not None]
    assert [x[2]["trigger_event_id"] for x in after] == ["b-again"]
    assert d.metric("streamagent_state_erasures_total", table="user-state") == 1
    assert d.metric("streamagent_state_users") == 3  # a, c, and b anew
    # an erasure of a user with nothing, and a replayed one: nothing more goes
    d.run([d.msg("nobody", None), d.msg("b", None), d.msg("b", None)])
    assert d.state("b") is None and set(d.users) == {b"a", b"c"}
    assert d.metric("streamagent_state_erasures_total", table="user-state") == 4
    assert d.metric("streamagent_state_users") == 2


def test_a_tombstone_without_a_key_is_still_dead_lettered():
    d = Decide()
    d.run([Msg("user-events", 0, 0, None, None)])
    assert d.sent[0][0] == "user-events.dlq" and d.sent[0][2]["reason"] == "bad_json"
    assert d.metric("streamagent_state_erasures_total", table="user-state") == 0


def shop(days: int = 40) -> list[tuple[str, str | None, int]]:
    """(user, type, ts): u0..u5 active on day 0, three regulars every day (they move the
    partition's clock), u0..u3 back on days 5, 15, 30 and 39, u5 erased on day 20."""
    out = []
    for i in range(6):
        out += [(f"u{i}", "session_start", T0 + i), (f"u{i}", "page_view", T0 + 1000 + i)]
    back = {5: "u0", 15: "u1", 30: "u2", 39: "u3"}
    for day in range(1, days):
        for r in range(3):
            out.append((f"r{r}", "session_start", T0 + day * DAY + r * H))
        if day in back:
            out.append((back[day], "session_start", T0 + day * DAY + 5 * H))
        if day == 20:
            out.append(("u5", None, 0))
    return out


def play(sweep_keys: int, batch: int, ttl_days: float = 10) -> Decide:
    d = Decide(sweep_keys, user_state_ttl_days=ttl_days)
    d.run([d.msg(u, t, ts) for u, t, ts in shop()], batch)
    return d


def user_keys(d: Decide) -> set[bytes]:
    return {k for k in d.users if k[:1] in (b"u", b"r")}


def test_the_sweep_deletes_users_idle_past_the_ttl_on_event_time_and_keeps_the_others():
    d = play(sweep_keys=1000, batch=4)
    # the clock: day 39; TTL 10 days. u0 (last seen day 5), u4 (day 0) idle; u5 erased;
    # u1 (day 15) and u2 (day 30) came back, u1 as a new user: its day-0 state had expired
    assert user_keys(d) == {b"r0", b"r1", b"r2", b"u2", b"u3"}
    clock = StreamClocks(d.budgets).get(0).stream_time
    assert clock > T0 + 38 * DAY
    for k in user_keys(d):
        assert not expired(UserStates(d.users).get(k).last_ts, clock, 10 * DAY)
    # u1, u2, u3 found their state expired when they came back (day 15, 30, 39: each after
    # more than 10 days); u0 (day 5) did not
    assert d.state("u1") is None  # came back on day 15, then idle again past the TTL
    assert d.metric("streamagent_state_expired_total", table="user-state") >= 5
    assert d.metric("streamagent_state_users") == 5
    assert d.metric("streamagent_state_erasures_total", table="user-state") == 1


def test_a_user_back_after_the_ttl_is_decided_as_new_whether_or_not_the_sweep_ran():
    runs = {(k, b): play(k, b) for k, b in ((0, 10_000), (0, 1), (1, 1), (3, 7), (1000, 4))}
    decisions = {key: [x for x in d.sent if x[0] == "decision-log"] for key, d in runs.items()}
    first = next(iter(decisions.values()))
    for key, ds in decisions.items():
        assert ds == first, f"sweep_keys, batch = {key}: other decisions"
    # u2 came back on day 30, 30 days after its last event: decided as a new user (no
    # tenure, one session); u0, back on day 5, was not
    tenure = FEATURE_NAMES.index("tenure")
    back = {x[1]: x[2]["features"] for x in first if x[2] and x[2]["ts"] > T0 + DAY}
    assert back[b"u2"][tenure] == 0.0 and back[b"u3"][tenure] == 0.0
    assert back[b"u0"][tenure] > 0.0
    # the states left are the same in every run, the swept runs have no expired entry left
    never = runs[(0, 10_000)]
    clock = StreamClocks(never.budgets).get(0).stream_time
    alive = {k: v for k, v in never.users.items()
             if k[:1] in (b"u", b"r") and not expired(last_ts_of(v), clock, 10 * DAY)}
    for key, d in runs.items():
        assert {k: v for k, v in d.users.items() if k in alive} == alive, key
    assert {k: v for k, v in runs[(1000, 4)].users.items() if k[:1] in (b"u", b"r")} == alive
    assert user_keys(never) == {b"r0", b"r1", b"r2", b"u0", b"u1", b"u2", b"u3", b"u4"}
    assert never.state("u0").n_events == 3 and never.state("u2").n_events == 1


def test_a_returning_user_within_the_ttl_keeps_the_state_and_ttl_0_keeps_everyone():
    d = play(sweep_keys=1000, batch=5, ttl_days=0)
    assert user_keys(d) == {b"r0", b"r1", b"r2", b"u0", b"u1", b"u2", b"u3", b"u4"}
    assert d.state("u3").n_events == 3  # day 0 (two events) and day 39
    assert d.metric("streamagent_state_expired_total", table="user-state") == 0


def test_a_replayed_batch_with_an_erasure_ends_in_the_same_tables():
    d = Decide()
    msgs = [d.msg("a", "session_start", T0), d.msg("b", "session_start", T0 + 1),
            d.msg("a", None), d.msg("a", "session_start", T0 + 2, eid="a-new")]
    d.run(msgs)
    users = dict(d.users)
    last = [x for x in d.sent if x[1] == b"a"][-1]
    d.sent.clear()
    d.run(msgs)  # a crash replays the uncommitted batch
    # a's event before the erasure is no replay any more (its state and ids went with the
    # erasure): applied and decided again, then erased again; the end is the same
    assert dict(d.users) == users
    assert [x for x in d.sent if x[1] == b"a"][-1] == last
    assert d.sent.count(("decision-log", b"a", None)) == 1


def test_last_ts_of_reads_the_blob_field_without_decoding():
    s = UserState(user_id='x"last_ts":5', first_ts=3, last_ts=1_767_225_600_123)
    assert last_ts_of(s.to_bytes()) == 1_767_225_600_123
    assert last_ts_of(UserState(user_id="y", last_ts=-4).to_bytes()) == -4


def test_expired_is_off_with_ttl_0_and_before_the_partition_has_a_clock():
    assert not expired(0, T0, 0)
    assert not expired(0, None, DAY)
    assert expired(T0 - DAY - 1, T0, DAY) and not expired(T0 - DAY, T0, DAY)


def test_scan_goes_round_one_partitions_keys():
    table = {f"k{i:02}".encode(): b"v" for i in range(20)}
    part = lambda k: (murmur2(k) & 0x7FFFFFFF) % 2  # noqa: E731
    mine = sorted(k for k in table if part(k) == 1)
    got, after = [], None
    while True:
        chunk = scan(table, 1, after, 3, None, part)
        got += [k for k, _ in chunk]
        if len(chunk) < 3:
            break
        after = chunk[-1][0]
    assert got == mine


# ---------------------------------------------------------------------------------- join side
def decision(n: int, user: str, ts: int) -> Decision:
    return Decision(decision_id=f"{n:032x}", user_id=user, ts=ts, action=CAT.actions[1],
                    action_index=1, propensity=0.5, explored=False, exploration="epsilon",
                    epsilon=0.1, policy_version=1, trigger_event_id=f"e-{n}",
                    trigger_type="session_start", q_values=(0.0,) * CAT.n_actions,
                    allowed=(True,) * CAT.n_actions, blocked_by=(), features=(0.5,) * 33,
                    cost=1.0)


class Join:
    def __init__(self, sweep_keys: int = 0, **settings):
        self.table, self.sent = {}, []

        async def send(topic, key, value):
            self.sent.append((topic, key, orjson.loads(value)))
        self.h = JoinHandler(CAT, join_params(shipped(**settings)), self.table,
                             JoinTopics("decision-log", "conversions", "rewards", "transitions",
                                        lambda t: t + ".dlq"), send, Metrics(), 1,
                             sweep_keys=sweep_keys)
        self.offs = {"decision-log": 0, "conversions": 0}

    def msgs(self, items) -> list[Msg]:
        out = []
        for topic, user, rec in items:
            value = None if rec is None else encode(rec.to_doc())
            out.append(Msg(topic, 0, self.offs[topic], user.encode(), value))
            self.offs[topic] += 1
        return out

    def run(self, items, batch: int = 10_000) -> None:
        ms = self.msgs(items)
        for i in range(0, len(ms), batch):
            asyncio.run(self.h.handle(ms[i:i + batch]))

    def metric(self, name: str, **labels) -> float:
        return self.h.m.registry.get_sample_value(name, labels) or 0.0


def heartbeat(ts: int):
    return ("conversions", "hb", Conversion(order_id=f"hb{ts}", user_id="hb", ts=ts, amount=0.0,
                                            heartbeat=True))


def test_a_decision_log_tombstone_erases_the_users_join_record_and_emits_nothing():
    j = Join()
    j.run([("decision-log", "alice", decision(1, "alice", T0)),
           ("decision-log", "bob", decision(2, "bob", T0 + 1000)),
           ("conversions", "alice", Conversion(order_id="o1", user_id="alice", ts=T0 + H,
                                               amount=80.0, decision_id=f"{1:032x}")),
           heartbeat(T0 + H)])
    assert "u:alice" in j.table and JoinStore(j.table).pending(0) == 2
    j.sent.clear()
    j.run([("decision-log", "alice", None)])
    assert "u:alice" not in j.table and j.sent == []
    assert JoinStore(j.table).pending(0) == 1
    assert j.metric("streamagent_state_erasures_total", table="join-state") == 1
    # the windows close: bob gets his reward, alice (erased, her order with her) nothing
    j.run([("decision-log", "carol", decision(3, "carol", T0 + 96 * H)), heartbeat(T0 + 96 * H)])
    rewarded = {doc["user_id"] for t, _, doc in j.sent if t == "rewards"}
    assert rewarded == {"bob"}
    assert "u:alice" not in j.table  # the due-time index's entry for her did not bring it back
    assert not any(t.endswith(".dlq") for t, _, _ in j.sent)


def test_join_records_with_nothing_pending_expire_after_the_ttl_and_pending_ones_stay():
    def play_join(sweep_keys: int, batch: int) -> Join:
        j = Join(sweep_keys, user_state_ttl_days=30)
        items = [("decision-log", "old", decision(1, "old", T0)),
                 ("conversions", "buyer", Conversion(order_id="o9", user_id="buyer", ts=T0,
                                                     amount=5.0))]
        for day in range(1, 60):
            items.append(heartbeat(T0 + day * DAY))
            user = f"d{day}"
            items.append(("decision-log", user, decision(100 + day, user, T0 + day * DAY)))
        # "old" comes back with the id of its first decision: forgotten, so a new decision
        items.append(("decision-log", "old", decision(1, "old", T0 + 59 * DAY + H)))
        # the sweep looks at two keys per record (core/tables.py sweep_budget): an hour of
        # heartbeats at the end lets it go round every user once more
        items += [heartbeat(T0 + 59 * DAY + 2 * H + i) for i in range(40)]
        j.run(items, batch)
        return j

    swept, kept = play_join(1000, 3), play_join(0, 3)
    assert swept.sent == kept.sent  # the sweep changes no output
    for j in (swept, kept):  # the old id was forgotten with the expired record, swept or not
        assert j.metric("streamagent_reward_join_events_total", outcome="duplicate_decision") == 0
    users = {k[2:] for k in swept.table if k.startswith("u:")}
    # each input's clock lags its newest record by two of its records (core/eventtime.py):
    # both at day 57, so records idle more than 30 days by then (nothing pending) went
    assert "buyer" not in users and "d5" not in users and "d26" not in users
    assert {"old", "d58", "d40"} <= users
    assert swept.metric("streamagent_state_expired_total", table="join-state") >= 20
    assert {k[2:] for k in kept.table if k.startswith("u:")} > users


# --------------------------------------------------------------------- RocksDB (the worker's)
class Event:  # what Faust's stores read of the current event
    def __init__(self, p):
        self.message = type("M", (), {"partition": p})()


def test_direct_table_changelog_records_restore_the_same_keys(tmp_path):
    """Recovery writes a changelog record's key bytes into RocksDB as they are: DirectTable
    must send the store's serialized key (JSON for the join's str keys), and a deletion a
    tombstone under it."""
    faust = pytest.importorskip("faust")
    pytest.importorskip("rocksdict")
    from streamagent.stream.faust_internals import DirectTable, acting_as

    def app_table(name):
        app = faust.App(name, broker="kafka://127.0.0.1:1", store="rocksdb://",
                        datadir=str(tmp_path / name), web_enabled=False)
        return app, app.Table("join-state", default=None, partitions=1, key_type=str,
                              value_type=bytes)

    class Rec:
        def __init__(self, key, value, offset):
            self.message = type("M", (), {"key": key, "value": value, "partition": 0,
                                          "offset": offset, "tp": ("cl", 0)})()

    async def main():
        app, table = app_table("live")
        live = DirectTable(table, app)
        with acting_as(Event(0)):
            live["u:alice"], live["u:bob"], live["wm:0"] = b"a", b"b", b"7"
            del live["u:bob"]
        assert (b'"u:bob"', None, 0) in live.pending  # a tombstone under the stored key
        app2, table2 = app_table("restored")
        table2.data.set_persisted_offset = lambda tp, off: None
        table2.data.apply_changelog_batch([Rec(k, v, i) for i, (k, v, _) in
                                           enumerate(live.pending)], None, None)
        restored = DirectTable(table2, app2)
        with acting_as(Event(0)):
            assert restored.get("u:alice") == b"a" and restored.get("wm:0") == b"7"
            assert restored.get("u:bob") is None
        for t in (table, table2):
            for db in t.data._dbs.values():
                db.close()

    asyncio.run(main())


def test_direct_table_scans_one_rocksdb_partition_from_a_cursor(tmp_path):
    faust = pytest.importorskip("faust")
    pytest.importorskip("rocksdict")
    from streamagent.stream.faust_internals import DirectTable, acting_as

    async def main():
        app = faust.App("erasure-scan-test", broker="kafka://127.0.0.1:1", store="rocksdb://",
                        datadir=str(tmp_path), web_enabled=False)
        raw = app.Table("bytes-keys", default=None, partitions=2, key_type=bytes,
                        value_type=bytes)
        text = app.Table("str-keys", default=None, partitions=2, key_type=str, value_type=bytes)
        users, join = DirectTable(raw, app), DirectTable(text, app)
        for p in (0, 1):
            ev = Event(p)
            with acting_as(ev):
                for i in range(5):
                    users[f"p{p}-u{i}".encode()] = b"%d" % i
                    join[f"u:p{p}-{i}"] = b"x"
                    join[f"wm:{p}{i}"] = b"1"
        assert [k for k, _ in users.scan(1, None, 3)] == [b"p1-u0", b"p1-u1", b"p1-u2"]
        assert [k for k, _ in users.scan(1, b"p1-u2", 3)] == [b"p1-u3", b"p1-u4"]
        assert users.scan(0, b"p0-u4", 3) == []
        assert [k for k, _ in join.scan(0, None, 10, "u:")] == [f"u:p0-{i}" for i in range(5)]
        assert [k for k, _ in join.scan(0, "u:p0-3", 10, "u:")] == ["u:p0-4"]
        with acting_as(Event(1)):
            del users[b"p1-u3"]
        assert [k for k, _ in users.scan(1, b"p1-u2", 3)] == [b"p1-u4"]
        assert users.pending[-1] == (b"p1-u3", None, 1)  # the changelog tombstone
        for t in (raw, text):
            for db in t.data._dbs.values():
                db.close()

    asyncio.run(main())


def test_the_erase_command_takes_user_ids_and_refuses_an_empty_one():
    from streamagent.cli import build_parser, cmd_erase
    from streamagent.errors import StreamagentError
    from streamagent.ops.kafka import plaintext
    from streamagent.ops.produce import send_erasures

    args = build_parser().parse_args(["erase", "u-1", "u-2"])
    assert args.fn is cmd_erase and args.user_id == ["u-1", "u-2"] and args.topic is None
    with pytest.raises(StreamagentError, match="empty user id"):
        send_erasures(plaintext("127.0.0.1:1"), "user-events", ["u-1", ""])
