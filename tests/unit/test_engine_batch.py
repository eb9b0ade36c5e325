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


def messages(n=600, users=25, seed=4):
    """(value, key, partition, offset): two partitions, users with several triggers per batch,
    broken JSON, a wrong key, an event far in the future, and a replayed offset."""
    rng = np.random.default_rng(seed)
    types = ["session_start", "page_view", "add_to_cart", "search", "purchase"]
    offsets = {0: 0, 1: 0}
    out = []
    for i in range(n):
        u = f"u{rng.integers(users)}"
        part = hash_part(u)
        ts = T0 + i * 300_000
        doc = {"event_id": f"e{i}", "user_id": u, "type": types[rng.integers(5)], "ts": ts}
        value, key = orjson.dumps(doc), u.encode()
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
        elif r.decision is None:
            rows.append(("event", r.event.event_id, r.replayed))
        else:
            d = r.decision
            rows.append(("decision", d.decision_id, d.action, round(d.propensity, 9), d.explored,
                         d.blocked_by, r.replayed))
    return rows


def batched(eng, items, states, budgets, clocks, size):
    out = []
    for k in range(0, len(items), size):
        out += eng.step_batch(items[k:k + size], states, budgets, clocks)
    return out


def test_batches_decide_exactly_as_one_event_at_a_time():
    items = messages()
    # a binding budget (so the order in which decisions spend it matters) and exploration on
    kw = dict(budget_per_period=60.0, exploration="epsilon", epsilon_start=0.3, epsilon_end=0.3,
              caps=dataclasses.replace(SHIPPED.caps, min_gap_ms=0, max_coupons=1000))
    ref_states, ref_budgets, ref_clocks = {}, {}, {}
    ref = sequential(engine(trained_like_model(), **kw), items, ref_states, ref_budgets,
                     ref_clocks)
    decided = [r for r in ref if not isinstance(r, Exception) and r.decision]
    assert len(decided) > 100 and any(r.decision.blocked_by for r in decided)
    assert len({r.decision.action for r in decided}) > 2
    for size in (1, 7, 64, 600):
        states, budgets, clocks = {}, {}, {}
        got = batched(engine(trained_like_model(), **kw), items, states, budgets, clocks, size)
        assert summary(got) == summary(ref), size
        assert budgets == ref_budgets and clocks == ref_clocks
        assert rounded(states) == rounded(ref_states)


def rounded(states):
    """States with the logged Q-values to 4 decimals: a batched matrix product may sum in
    another order than a single row's and differ in the last bits (never in the decisions)."""
    def q4(d):
        return dataclasses.replace(d, q_values=tuple(round(v, 4) for v in d.q_values))
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

