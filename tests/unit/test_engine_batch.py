"""The batched decide path (DecisionEngine.step_batch) against one event at a time."""
import dataclasses

import numpy as np
import orjson
import torch

from streamagent.core.catalog import load_catalog
from streamagent.core.contracts import BudgetShare
from streamagent.core.engine import DecisionEngine, Model, initial_model
from streamagent.core.eventtime import StreamClock
from streamagent.core.qnet import ModelSnapshot, init_network
from streamagent.core import features as F
from streamagent.params import engine_params, shipped

T0 = 1_767_225_600_000
CAT = load_catalog()
SHIPPED = engine_params(shipped(), 2)


def trained_like_model(seed=3):
    """A network with random (non-zero) output weights, so decisions differ by user."""
    net = init_network(F.N_FEATURES, CAT.n_actions, (64, 64), seed)
    with torch.no_grad():
        net.net[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    return Model(ModelSnapshot.from_network(net, 5, 20_000, CAT.actions, F.FEATURE_NAMES))


def engine(model=None, **kw):
    return DecisionEngine(CAT, dataclasses.replace(SHIPPED, **kw),
                          model or initial_model(CAT, (64, 64), 7))


def messages(n=600, users=25, seed=4, duplicates=False, recreate_at=None):
    """(value, key, partition, offset): two partitions, users with several triggers per batch,
    broken JSON, a wrong key, an event far in the future, and a replayed offset.

    ``duplicates``: every 11th message re-sends, at a new offset, one of the user's two latest
    events (same event id; often a trigger, often in the same batch as the original).
    ``recreate_at``: from this message on, partition 0's offsets start again from 0 (the topic
    was recreated), with new event ids."""
    rng = np.random.default_rng(seed)
    types = ["session_start", "page_view", "add_to_cart", "search", "purchase"]
    offsets = {0: 0, 1: 0}
    sent: dict[str, list[bytes]] = {}
    out = []
    for i in range(n):
        u = f"u{rng.integers(users)}"
        part = hash_part(u)
        if i == recreate_at:
            offsets[0] = 0
        if duplicates and i % 11 == 3 and sent.get(u):
            out.append((sent[u][-1 - int(rng.integers(min(2, len(sent[u]))))], u.encode(),
                        part, offsets[part]))
            offsets[part] += 1
            continue
        ts = T0 + i * 300_000
        doc = {"event_id": f"e{i}", "user_id": u, "type": types[rng.integers(5)], "ts": ts}
        value, key = orjson.dumps(doc), u.encode()
        sent.setdefault(u, []).append(value)
        if i % 97 == 5:
            value = b"{not json"
        elif i % 89 == 7:
            key = b"someone-else"
        elif i % 113 == 9:
            value = orjson.dumps({**doc, "ts": ts + 400 * 86_400_000})
        out.append((value, key, part, offsets[part]))
        offsets[part] += 1
    return out


def hash_part(user):
    return int(user[1:]) % 2


def sequential(eng, items, states, budgets, clocks):
    out = []
    for value, key, part, off in items:
        try:
            r = eng.step(value, key, states.get(key), budgets.get(part) or BudgetShare(), part,
                         off, clock=clocks.get(part) or StreamClock())
        except Exception as exc:  # noqa: BLE001
            if hasattr(exc, "clock"):
                clocks[part] = exc.clock
            out.append(exc)
            continue
        states[key], budgets[part], clocks[part] = r.state, r.budget, r.clock
        out.append(r)
    return out


def summary(results):
    rows = []
    for r in results:
        if isinstance(r, Exception):
            rows.append(("error", type(r).__name__, getattr(r, "reason", "")))
            continue
        s = r.state  # what the result says was applied, and the budget and clock at that point
        seen = (s.n_events, s.last_partition, s.last_offset, s.event_ids, r.budget, r.clock)
        if r.decision is None:
            rows.append(("event", r.event.event_id, r.replayed) + seen)
        else:
            d = r.decision
            rows.append(("decision", d.decision_id, d.action, round(d.propensity, 9), d.explored,
                         d.blocked_by, r.replayed) + seen)
    return rows


def batched(eng, items, states, budgets, clocks, size):
    out = []
    for k in range(0, len(items), size):
        out += eng.step_batch(items[k:k + size], states, budgets, clocks)
    return out


# a binding budget (so the order in which decisions spend it matters) and exploration on
BINDING = dict(budget_per_period=60.0, exploration="epsilon", epsilon_start=0.3, epsilon_end=0.3,
               caps=dataclasses.replace(SHIPPED.caps, min_gap_ms=0, max_coupons=1000))


def test_batches_decide_exactly_as_one_event_at_a_time():
    items = messages()
    ref = same_in_batches(items)
    decided = [r for r in ref if not isinstance(r, Exception) and r.decision]
    assert len(decided) > 100 and any(r.decision.blocked_by for r in decided)
    assert len({r.decision.action for r in decided}) > 2


def test_duplicates_at_new_offsets_and_a_recreated_topic_batch_as_one_at_a_time():
    items = messages(duplicates=True, recreate_at=300)
    ref = same_in_batches(items)
    seen, dups, fresh = set(), [], []
    for i, r in enumerate(ref):
        if isinstance(r, Exception):
            continue
        eid = r.event.event_id
        if eid in seen:
            dups.append(r)
        elif i >= 300 and hash_part(r.event.user_id) == 0:
            fresh.append(r)
        seen.add(eid)
    # every re-sent duplicate is recognised, and the triggers among them re-send a decision...
    assert len(dups) > 20 and all(r.replayed for r in dups)
    assert sum(r.decision is not None for r in dups) > 5
    # ...and after the recreation partition 0's new events (offsets from 0) are applied
    assert len(fresh) > 100 and not any(r.replayed for r in fresh)


def same_in_batches(items, **kw):
    """Runs ``items`` one at a time, then in batches of several sizes: the results, states,
    budgets and clocks must agree. Returns the one-at-a-time results."""
    kw = {**BINDING, **kw}
    ref_states, ref_budgets, ref_clocks = {}, {}, {}
    ref = sequential(engine(trained_like_model(), **kw), items, ref_states, ref_budgets,
                     ref_clocks)
    for size in (1, 7, 64, 600):
        states, budgets, clocks = {}, {}, {}
        got = batched(engine(trained_like_model(), **kw), items, states, budgets, clocks, size)
        assert summary(got) == summary(ref), size
        assert budgets == ref_budgets and clocks == ref_clocks
        assert rounded(states) == rounded(ref_states)
    return ref


def rounded(states):
    """States with the logged Q-values to 4 decimals: a batched matrix product may sum in
    another order than a single row's and differ in the last bits (never in the decisions)."""
    def q4(d):
        return {**d, "q_values": [round(v, 4) for v in d["q_values"]]}
    return {k: dataclasses.replace(s, decisions=tuple(q4(d) for d in s.decisions))
            for k, s in states.items()}


def test_a_replayed_batch_re_sends_the_same_decisions():
    items = messages(60)  # at most 4 triggers per user: all still remembered in state
    eng = engine(trained_like_model())
    states, budgets, clocks = {}, {}, {}
    first = eng.step_batch(items, states, budgets, clocks)
    again = eng.step_batch(items, states, budgets, clocks)
    assert all(r.replayed for r in again if not isinstance(r, Exception))
    ids = lambda rs: [r.decision.decision_id for r in rs
                      if not isinstance(r, Exception) and r.decision]
    assert ids(again) == ids(first) and ids(first)

