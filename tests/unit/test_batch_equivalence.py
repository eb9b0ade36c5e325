"""Issue 13 item 6: the decide handler on the same input, one event at a time and in batches
cut anywhere, sends byte-identical decision-log and coupon-actions records and leaves
byte-identical user state, budget and clocks (dict tables, no broker)."""
from __future__ import annotations

import asyncio
import dataclasses

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamagent.core.engine import DecisionEngine
from streamagent.core.tables import BudgetShares, StreamClocks, UserCounts, UserStates
from streamagent.metrics import Metrics
from streamagent.stream.decide import DecideHandler, DecideTables, DecideTopics

from .conftest import Msg
from .test_engine_batch import BINDING, CAT, SHIPPED, hash_part, messages, trained_like_model

ITEMS = messages(n=240, users=12, seed=11, duplicates=True)
MODEL = trained_like_model()


def play(cuts: list[int], cache_users: int = 0) -> tuple[list, dict, dict]:
    """Run ITEMS through a fresh handler in batches ending at ``cuts``: (sent records except
    dead letters, which carry the wall clock; the users table; the budget table).
    ``cache_users``: the user-state cache's size (core/tables.py UserStates)."""
    users, budgets, sent = {}, {}, []

    async def send(topic, key, value):
        if not topic.endswith(".dlq"):
            sent.append((topic, key, value))
    eng = DecisionEngine(CAT, dataclasses.replace(SHIPPED, **BINDING), MODEL)
    h = DecideHandler(eng, DecideTables(UserStates(users, cache_users), BudgetShares(budgets),
                                        UserCounts(budgets), StreamClocks(budgets)),
                      DecideTopics("decision-log", "coupon-actions", "user-events.dlq"), send,
                      Metrics(), ("session_start", "add_to_cart"),
                      partition_of=lambda key: hash_part(key.decode()))
    msgs = [Msg("user-events", part, off, key, value) for value, key, part, off in ITEMS]
    start = 0
    for end in sorted(set(cuts)) + [len(msgs)]:
        if end > start:
            asyncio.run(h.handle(msgs[start:end]))
            start = end
    return sent, users, budgets


ONE_AT_A_TIME = play(list(range(1, len(ITEMS))))


def test_the_reference_run_decides_explores_and_hits_the_budget():
    sent, users, _ = ONE_AT_A_TIME
    docs = [orjson.loads(v) for t, _, v in sent if t == "decision-log"]
    assert len(docs) > 60 and any(d["explored"] for d in docs)
    assert any(d["blocked_by"] for d in docs) and any(t == "coupon-actions" for t, _, _ in sent)
    assert len(users) == 12


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(1, len(ITEMS) - 1), max_size=30))
def test_any_batch_boundaries_give_byte_identical_records_and_state(cuts):
    sent, users, budgets = play(cuts)
    ref_sent, ref_users, ref_budgets = ONE_AT_A_TIME
    assert sent == ref_sent
    assert users == ref_users
    assert budgets == ref_budgets


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(1, len(ITEMS) - 1), max_size=30), st.sampled_from([3, 1000]))
def test_the_user_state_cache_changes_nothing(cuts, cache_users):
    """Decoded states kept between batches (3: fewer than the 12 users, so they are evicted
    and read back; 1000: all kept) give the same records and tables as reading every time."""
    sent, users, budgets = play(cuts, cache_users)
    ref_sent, ref_users, ref_budgets = ONE_AT_A_TIME
    assert sent == ref_sent
    assert users == ref_users
    assert budgets == ref_budgets
