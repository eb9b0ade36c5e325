"""No join-state record may outgrow what the worker can send to its changelog.

Every table write goes to the table's changelog topic as one record, and the worker's producer
refuses a record over ``producer_max_request_size`` (Faust's default, 1,000,000 bytes): the
join agent then fails on every batch from that input on. The outbox (core/outbox.py) keeps
the outputs of each input under one key, and one input can close many attribution windows at
once (a watermark move past a crowd of decisions: here 1,500 users who all had two sessions
in the same two minutes), so its entry has to be split."""
import asyncio

from streamagent.core.catalog import load_catalog
from streamagent.core.contracts import Conversion, Decision, encode
from streamagent.core.features import N_FEATURES
from streamagent.metrics import Metrics
from streamagent.params import join_params, shipped
from streamagent.stream.join import JoinHandler, JoinTopics

from .conftest import Msg

CAT = load_catalog()
T0 = 1_767_225_600_000
H = 3_600_000
LIMIT = 1_000_000  # Faust's producer_max_request_size: the largest record the worker sends


def decision(i: int, user: str, ts: int) -> Decision:
    return Decision(decision_id=f"{i:032x}", user_id=user, ts=ts, action=CAT.actions[1],
                    action_index=1, propensity=0.5, explored=False, exploration="epsilon",
                    epsilon=0.1, policy_version=1, trigger_event_id=f"e-{i}",
                    trigger_type="session_start", q_values=(0.123456789,) * CAT.n_actions,
                    allowed=(True,) * CAT.n_actions, blocked_by=(),
                    features=(0.123456789,) * N_FEATURES, cost=1.0)


def test_one_input_closing_many_windows_writes_no_record_over_the_limit():
    table, sent = {}, []

    async def send(topic, key, value):
        sent.append(topic)

    h = JoinHandler(CAT, join_params(shipped()), table,
                    JoinTopics("decision-log", "conversions", "rewards", "transitions",
                               lambda t: t + ".dlq"), send, Metrics(), 1)
    users = [f"user-{i}" for i in range(1500)]
    # two sessions each, three hours apart: a reward each, and a transition from the first
    batch = [Msg("decision-log", 0, r * len(users) + i, u.encode(),
                 encode(decision(r * len(users) + i, u, T0 + r * 3 * H + i).to_doc()))
             for r in range(2) for i, u in enumerate(users)]
    later = T0 + 96 * H  # past every window: the next input closes all 1,500 at once
    batch.append(Msg("conversions", 0, 0, b"hb", encode(Conversion(
        order_id="hb", user_id="hb", ts=later, amount=0.0, heartbeat=True).to_doc())))
    batch.append(Msg("decision-log", 0, len(batch) - 1, b"late",
                     encode(decision(99_999, "late", later).to_doc())))
    written: dict[str, int] = {}

    class Recording(dict):
        def __setitem__(self, k, v):
            written[k] = max(written.get(k, 0), len(v))
            super().__setitem__(k, v)

    h.table = Recording(table)
    asyncio.run(h.handle(batch))
    assert sent.count("rewards") == 2 * len(users)
    biggest = max(written, key=written.get)
    assert written[biggest] < LIMIT, (f"{biggest} is {written[biggest]:,} bytes: the changelog "
                                      f"record would be refused")


def test_an_input_with_many_outputs_replays_them_all_and_ages_out_whole():
    from streamagent.core.outbox import KEEP_OFFSETS, Outbox

    store: dict = {}
    ob = Outbox(store)
    outputs = [("rewards", f"user-{i}", {"decision_id": f"{i:032x}", "features": [0.5] * 200})
               for i in range(3000)]
    ob.record("decision-log", 0, 7, outputs)
    assert max(len(v) for v in store.values()) < LIMIT
    assert [tuple(o) for o in ob.replayed_outputs("decision-log", 0, 7)] == outputs
    assert ob.is_replay("decision-log", 0, 7)
    ob.record("decision-log", 0, 7 + KEEP_OFFSETS, [])  # the input ages out, every part of it
    assert ob.replayed_outputs("decision-log", 0, 7) == []
    assert [k for k in store if k.startswith("ob:out:")] == []
