"""The join agent's handler on a dict table: all-or-nothing inputs, replay, dead letters."""
import asyncio

import orjson
import pytest
from aiokafka.partitioner import murmur2

from streamagent.core.catalog import load_catalog
from streamagent.core.contracts import Conversion, Decision, encode
from streamagent.core.join import Joiner
from streamagent.core.tables import JoinStore, Staged
from streamagent.metrics import Metrics
from streamagent.params import join_params, shipped
from streamagent.stream.join import JoinHandler, JoinTopics

from .conftest import Msg

CAT = load_catalog()
S = shipped()
T0 = 1_767_225_600_000
H = 3_600_000
N_PARTS = 1


def did(name):
    return f"{int(name[1:]):032x}"


def decision(name, user, ts, action=1):
    return Decision(decision_id=did(name), user_id=user, ts=ts, action=CAT.actions[action],
                    action_index=action, propensity=0.5, explored=False, exploration="epsilon",
                    epsilon=0.1, policy_version=1, trigger_event_id=f"e-{name}",
                    trigger_type="session_start", q_values=(0.0,) * CAT.n_actions,
                    allowed=(True,) * CAT.n_actions, blocked_by=(), features=(0.5,) * 33,
                    cost=1.0)


def make():
    table, sent = {}, []

    async def send(topic, key, value):
        sent.append((topic, key, orjson.loads(value)))
    h = JoinHandler(CAT, join_params(S), table,
                    JoinTopics("decision-log", "conversions", "rewards", "transitions",
                               lambda t: t + ".dlq"), send, Metrics(), N_PARTS)
    return h, table, sent


def msgs(items):
    offs = {"decision-log": 0, "conversions": 0}
    out = []
    for topic, rec in items:
        out.append(Msg(topic, 0, offs[topic], rec.user_id.encode(), encode(rec.to_doc())))
        offs[topic] += 1
    return out


def stream():
    return msgs([
        ("decision-log", decision("d1", "alice", T0)),
        ("decision-log", decision("d2", "poison", T0 + 1000)),
        ("decision-log", decision("d3", "bob", T0 + 2000)),
        ("conversions", Conversion(order_id="o1", user_id="alice", ts=T0 + H, amount=80.0,
                                   decision_id=did("d1"))),
        ("conversions", Conversion(order_id="o2", user_id="poison", ts=T0 + H, amount=80.0,
                                   decision_id=did("d2"))),
        # four days later, on both inputs: every earlier attribution window (72 h) has closed
        ("decision-log", decision("d4", "carol", T0 + 96 * H)),
        ("conversions", Conversion(order_id="hb", user_id="hb", ts=T0 + 96 * H, amount=0.0,
                                   heartbeat=True)),
    ])


def test_a_poison_record_changes_nothing_and_the_others_still_get_their_rewards(monkeypatch):
    original = Joiner._on_decision

    def poisoned(self, partition, d):
        out = original(self, partition, d)  # writes the record, due index, ... then fails
        if d.user_id == "poison":
            raise ZeroDivisionError("a bug half-way through the join")
        return out
    monkeypatch.setattr(Joiner, "_on_decision", poisoned)
    h, table, sent = make()
    asyncio.run(h.handle(stream()))
    # the poisoned decision left nothing behind (its user's order is kept, joined to nothing)
    assert not JoinStore(table).record("poison").decisions
    assert JoinStore(table).pending(0) == 1  # d1, d3 closed, d4 open; d2 never counted
    rewards = {d["decision_id"]: d for t, _, d in sent if t == "rewards"}
    assert set(rewards) == {did("d1"), did("d3")}
    assert rewards[did("d1")]["converted"] and not rewards[did("d3")]["converted"]
    dlq = [d for t, _, d in sent if t == "decision-log.dlq"]
    assert len(dlq) == 1 and dlq[0]["reason"] == "processing_error"
    # the order of the poisoned decision finds nothing to join: counted, not a crash
    assert h.m.registry.get_sample_value("streamagent_stream_processing_errors_total",
                                         {"stage": "join"}) == 1


def run_in_batches(size):
    """stream() through a new handler in batches of ``size``: (handler, table, sent)."""
    h, table, sent = make()
    items = stream()
    for k in range(0, len(items), size):
        asyncio.run(h.handle(items[k:k + size]))
    return h, table, sent


def test_batches_of_any_size_give_the_same_outputs_and_table():
    def run(size):
        _, table, sent = run_in_batches(size)
        return table, sorted((t, orjson.dumps(d, option=orjson.OPT_SORT_KEYS)) for t, _, d in sent)
    assert run(1) == run(4) == run(100)


def test_a_replayed_batch_re_sends_exactly_its_outputs():
    h, table, sent = make()
    items = stream()
    asyncio.run(h.handle(items))
    first = sorted((t, d.get("decision_id")) for t, _, d in sent if t in ("rewards", "transitions"))
    before = dict(table)
    sent.clear()
    asyncio.run(h.handle(items))
    again = sorted((t, d.get("decision_id")) for t, _, d in sent if t in ("rewards", "transitions"))
    assert again == first and dict(table) == before


def test_a_replayed_input_re_sends_the_very_bytes_it_sent():
    """The outbox keeps each output as the bytes sent (a fragment of its JSON)."""
    raw = []
    h, table, _ = make()

    async def send(topic, key, value):
        raw.append((topic, key, value))
    h.send = send
    items = stream()
    asyncio.run(h.handle(items))
    first = sorted(r for r in raw if r[0] in ("rewards", "transitions"))
    assert len(first) >= 3  # the rewards of d1, d2 and d3
    raw.clear()
    asyncio.run(h.handle(items))
    assert sorted(r for r in raw if r[0] in ("rewards", "transitions")) == first


def test_outcomes_are_counted_once_per_batch_whatever_its_size():
    def counts(size):
        r = run_in_batches(size)[0].m.registry
        return ({o: r.get_sample_value("streamagent_reward_join_events_total", {"outcome": o})
                 for o in ("decisions", "conversions", "rewarded", "defaulted",
                           "attributed_conversion", "heartbeat")},
                {d: r.get_sample_value("streamagent_reward_transitions_total", {"done": d})
                 for d in ("true", "false")})
    one = counts(1)
    assert one == counts(3) == counts(100)
    assert one[0]["decisions"] == 4 and one[0]["heartbeat"] == 1
    assert one[0]["rewarded"] + one[0]["defaulted"] == 3


def test_a_conversion_on_the_wrong_partition_is_dead_lettered():
    h, table, sent = make()
    h.n_parts = 4
    c = Conversion(order_id="o1", user_id="carol", ts=T0, amount=5.0)
    right = (murmur2(b"carol") & 0x7FFFFFFF) % 4
    asyncio.run(h.handle([Msg("conversions", (right + 1) % 4, 0, b"carol", encode(c.to_doc()))]))
    assert [d["reason"] for t, _, d in sent if t == "conversions.dlq"] == ["wrong_partition"]


def test_staged_reads_its_own_writes_and_applies_them_once():
    base = {"a": 1, "b": 2}
    st = Staged(base)
    st["a"] = 10
    del st["b"]
    st["c"] = 3
    assert st["a"] == 10 and "b" not in st and sorted(st) == ["a", "c"] and base == {"a": 1, "b": 2}
    with pytest.raises(KeyError):
        del st["zzz"]
    st.apply()
    assert base == {"a": 10, "c": 3} and st.changes == {}
