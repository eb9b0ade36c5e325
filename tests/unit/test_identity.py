"""Identity beyond offsets (docs/RELIABILITY.md): an event is recognised by its id among the
user's recent ones, not only by the last applied (partition, offset); user-state blobs carry a
version and decode across releases."""
import dataclasses

import orjson
import pytest

from streamagent.core.catalog import load_catalog
from streamagent.core.contracts import BudgetShare
from streamagent.core.engine import DecisionEngine, initial_model
from streamagent.core.state import BLOB_VERSION, UserState, is_replay
from streamagent.params import engine_params, shipped, state_params

T0 = 1_767_225_600_000
CAT = load_catalog()

# The fields of each blob version. Adding or removing a UserState field needs a new
# BLOB_VERSION (and its layout in state._LAYOUTS); this list makes that impossible to forget.
V1_FIELDS = {
    "user_id", "first_ts", "last_ts", "last_partition", "last_offset", "n_events",
    "n_sessions", "n_purchases", "total_spend", "last_session_ts", "last_purchase_ts",
    "d_events", "d_sessions", "d_searches", "d_views", "d_spend", "d_purchases", "interest",
    "cart_items", "cart_value", "last_price", "device", "geo", "coupon_ts", "n_coupons",
    "n_redeemed", "last_coupon_ts", "explore_action", "explore_left", "decisions"}
V2_FIELDS = V1_FIELDS | {"event_ids"}


def coupon(x, allowed):
    """A policy that always gives coupon 1."""
    return 1, 1.0


def engine(k=None):
    s = shipped() if k is None else shipped(dedupe_events_per_user=k)
    return DecisionEngine(CAT, engine_params(s, 1), initial_model(CAT, (64, 64), 7))


def raw(i, typ="page_view", user="u1", ts=None):
    return orjson.dumps({"event_id": f"e{i}", "user_id": user, "type": typ,
                         "ts": T0 + i * 60_000 if ts is None else ts})


class User:
    """One user's events through DecisionEngine.step, state and budget kept as the worker
    keeps them (a replayed result changes nothing)."""

    def __init__(self, eng, user="u1"):
        self.eng, self.user, self.state, self.budget = eng, user, None, BudgetShare()

    def send(self, value, partition, offset, policy=None):
        r = self.eng.step(value, self.user.encode(), self.state, self.budget, partition, offset,
                          policy=policy)
        self.state, self.budget = r.state, r.budget
        return r


def test_a_duplicate_at_a_new_offset_is_applied_once_and_re_sends_its_decision():
    u = User(engine())
    first = u.send(raw(1, "session_start"), 0, 10, policy=coupon)
    assert first.decision.action_index == 1 and first.coupon_action is not None
    u.send(raw(2), 0, 11)
    before = u.state
    again = u.send(raw(1, "session_start"), 0, 12, policy=coupon)  # re-sent by a producer
    assert again.replayed
    assert again.decision == first.decision and again.coupon_action == first.coupon_action
    assert u.state == before  # applied once: one event counted, one coupon, one decision
    assert (u.state.n_events, u.state.n_coupons, len(u.state.decisions)) == (2, 1, 1)
    # the same from another partition (a migrated or repartitioned topic)
    assert u.send(raw(1, "session_start"), 3, 0).decision == first.decision
    assert u.state == before


def test_after_a_topic_is_recreated_new_events_are_applied():
    u = User(engine())
    for i in range(5):
        u.send(raw(i, "session_start" if i == 2 else "page_view"), 0, 1000 + i)
    old_decision = u.state.recent[-1]
    # the topic is recreated: offsets start again from 0, the events are new
    results = [u.send(raw(i, "session_start" if i == 11 else "page_view"), 0, i - 10)
               for i in range(10, 13)]
    assert not any(r.replayed for r in results)
    assert u.state.n_events == 8 and u.state.last_offset == 2
    d = results[1].decision
    assert d is not None and d.decision_id != old_decision.decision_id
    # a crash replay in the new topic is still recognised, and so is an event of the old
    # topic copied into the new one (a migration that re-sends the last events)
    state = u.state
    assert u.send(raw(11, "session_start"), 0, 1).decision == d
    assert u.send(raw(4), 0, 3).replayed
    assert u.state == state


def test_a_crash_replay_at_the_same_offsets_is_still_idempotent():
    eng = engine()
    users = {n: User(eng, n) for n in ("a", "b")}
    plan = [(n, i, "session_start" if i % 3 == 0 else "page_view")
            for i in range(12) for n in ("a", "b")]
    offsets = {n: 0 for n in users}
    first = []
    for n, i, typ in plan:
        first.append(users[n].send(raw(i, typ, n), 0, offsets[n]))
        offsets[n] += 1
    states = {n: u.state for n, u in users.items()}
    # after a crash the uncommitted tail is delivered again: same ids, same offsets
    offsets = {n: 6 for n in users}
    for (n, i, typ), before in list(zip(plan, first))[12:]:
        r = users[n].send(raw(i, typ, n), 0, offsets[n])
        offsets[n] += 1
        assert r.replayed and r.decision == before.decision
    assert {n: u.state for n, u in users.items()} == states


def test_the_id_memory_is_bounded_per_user():
    k = 8
    u = User(engine(k))
    sizes = []
    for i in range(100, 160):  # ids of one width
        u.send(raw(i), 0, i)
        assert len(u.state.event_ids) == min(i - 99, k)
        sizes.append(len(u.state.to_bytes()))
    assert u.state.event_ids == tuple(f"e{i}" for i in range(152, 160))
    assert sizes[-1] - sizes[k] <= 8  # only the digits of counters and floats still vary
    # documented limit: an id older than the memory is taken as a new event
    assert not u.send(raw(103), 0, 160).replayed and u.state.n_events == 61


def test_with_the_memory_off_only_offsets_count_and_blobs_keep_the_old_layout():
    u = User(engine(0))
    for i in range(3):
        u.send(raw(i), 0, 100 + i)
    assert u.state.event_ids == ()
    assert u.send(raw(1), 0, 101).replayed  # by offset
    assert u.send(raw(9), 0, 5).replayed  # a recreated topic looks like a replay, as before
    doc = orjson.loads(u.state.to_bytes())
    assert set(doc) == V1_FIELDS  # what releases before version 2 decode (cls(**doc))


def test_blob_versions_and_their_fields():
    assert BLOB_VERSION == 2 and {f.name for f in dataclasses.fields(UserState)} == V2_FIELDS, (
        "a UserState field was added or removed: bump BLOB_VERSION, add its layout to "
        "state._LAYOUTS and its fields to this test")
    u = User(engine())
    u.send(raw(1, "session_start"), 0, 1)
    u.send(raw(2, "add_to_cart"), 0, 2)
    doc = orjson.loads(u.state.to_bytes())
    assert doc["v"] == 2 and set(doc) == V2_FIELDS | {"v"} and doc["event_ids"] == ["e1", "e2"]
    assert UserState.from_bytes(u.state.to_bytes()) == u.state


def old_blob() -> bytes:
    """A user-state blob as releases before version 2 write it: no "v", no event_ids."""
    decision = {
        "schema_version": 1, "decision_id": "0f" * 16, "user_id": "u1", "ts": T0 + 60_000,
        "action": "pct10", "action_index": 1, "propensity": 0.9, "explored": False,
        "exploration": "epsilon", "epsilon": 0.1, "policy_version": 3,
        "trigger_event_id": "e1", "trigger_type": "session_start", "q_values": [0.1, 0.2],
        "allowed": [True, True], "blocked_by": [], "features": [1.0, 0.5], "cost": 4.0}
    doc = {
        "user_id": "u1", "first_ts": T0, "last_ts": T0 + 60_000, "last_partition": 0,
        "last_offset": 41, "n_events": 2, "n_sessions": 1, "n_purchases": 0,
        "total_spend": 0.0, "last_session_ts": T0 + 60_000, "last_purchase_ts": 0,
        "d_events": 1.99, "d_sessions": 1.0, "d_searches": 0.0, "d_views": 0.99,
        "d_spend": 0.0, "d_purchases": 0.0, "interest": [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        "cart_items": 0, "cart_value": 0.0, "last_price": 12.5, "device": "mobile", "geo": "DE",
        "coupon_ts": [T0 + 60_000], "n_coupons": 1, "n_redeemed": 0,
        "last_coupon_ts": T0 + 60_000, "explore_action": 1, "explore_left": 0,
        "decisions": [decision]}
    assert set(doc) == V1_FIELDS
    return orjson.dumps(doc)


def test_an_old_blob_decodes_and_keeps_its_replays_idempotent():
    s = UserState.from_bytes(old_blob())
    assert (s.user_id, s.last_offset, s.n_events, s.geo, s.coupon_ts) == \
        ("u1", 41, 2, "DE", (T0 + 60_000,))
    assert s.interest[1] == 1.0 and s.recent[0].trigger_event_id == "e1"
    assert s.event_ids == ()
    u = User(engine())
    u.state = s
    # the first events after the upgrade may be a crash replay of the old release's batch:
    # without ids, the offset says so, and the trigger's decision is re-sent
    r = u.send(raw(1, "session_start"), 0, 40)
    assert r.replayed and r.decision == s.recent[0] and u.state == s
    # new events are applied and start the id memory; the blob is then version 2
    r = u.send(raw(2), 0, 42)
    assert not r.replayed and u.state.event_ids == ("e2",) and u.state.n_events == 3
    assert orjson.loads(u.state.to_bytes())["v"] == 2


@pytest.mark.parametrize("version", [2, 3])
def test_a_blob_with_unknown_or_missing_fields_decodes(version):
    u = User(engine())
    u.send(raw(1, "session_start"), 0, 1)
    u.send(raw(2), 0, 2)
    doc = orjson.loads(u.state.to_bytes())
    # a later release added fields and dropped others
    doc.update(v=version, loyalty_tier="gold", segments=[1, 2], nested={"a": 1})
    del doc["geo"], doc["cart_value"]
    s = UserState.from_bytes(orjson.dumps(doc))
    assert s == dataclasses.replace(u.state, geo="", cart_value=0.0)
    # and one with only the key field
    assert UserState.from_bytes(orjson.dumps({"v": 9, "user_id": "u9"})) == UserState("u9")


def test_a_duplicate_of_a_first_trigger_later_in_the_same_batch():
    eng = engine()
    items = [(raw(1, "session_start"), b"u1", 0, 0), (raw(2, "page_view"), b"u1", 0, 1),
             (raw(1, "session_start"), b"u1", 0, 2), (raw(3, "add_to_cart"), b"u1", 0, 3),
             (raw(2, "page_view"), b"u1", 0, 4)]
    states, budgets, clocks = {}, {}, {}
    out = eng.step_batch(items, states, budgets, clocks)
    assert [r.replayed for r in out] == [False, False, True, False, True]
    assert out[2].decision == out[0].decision and out[2].state == out[1].state
    assert states[b"u1"].n_events == 3 and states[b"u1"].event_ids == ("e1", "e2", "e3")
    assert len(states[b"u1"].decisions) == 2


def test_the_setting_reaches_the_state_params():
    assert shipped().dedupe_events_per_user == 32
    assert state_params(shipped(dedupe_events_per_user=5)).dedupe_events == 5


def test_is_replay_rule():
    s = UserState("u", last_partition=2, last_offset=50, event_ids=("a", "b"))
    assert is_replay(s, 2, 51, "a") and is_replay(s, 0, 0, "b")  # a known id, anywhere
    assert not is_replay(s, 2, 49, "c")  # a new id at an old offset: offsets restarted
    assert not is_replay(s, 2, 51, "c")
    old = UserState("u", last_partition=2, last_offset=50)  # no id memory: offsets
    assert is_replay(old, 2, 50, "c") and not is_replay(old, 2, 51, "c")
    assert not is_replay(old, 1, 3, "c")
