"""The handlers' ceiling (bench/ceiling.py): the worker's handlers on in-memory tables."""
import random

import pytest

from streamagent.bench.ceiling import PartitionedTable, decide_ceiling, join_ceiling, join_inputs
from streamagent.bench.pipeline import JOIN_SPAN_DAYS, _events, join_documents
from streamagent.core.tables import scan_mapping
from streamagent.stream.join import key_partition


def test_the_table_scans_a_partition_as_a_pass_over_every_key_would():
    of = lambda k: key_partition(k[2:].encode(), 3)  # noqa: E731
    t, plain = PartitionedTable(3, of, prefix="u:"), {}
    rng = random.Random(5)
    for i in range(400):
        k = f"u:user{rng.randrange(300)}"
        t[k] = plain[k] = str(i).encode()
        if i % 7 == 0 and plain:  # deletions keep the order too
            gone = rng.choice(sorted(plain))
            del t[gone], plain[gone]
        t[f"wm:{i % 3}"] = plain[f"wm:{i % 3}"] = b"1"  # keys the sweep never scans
    for p in range(3):
        after = None
        while True:
            want = scan_mapping(plain, p, after, 16, "u:", of)
            assert t.scan(p, after, 16, "u:") == want
            if len(want) < 16:
                break
            after = want[-1][0]


def test_the_ceilings_run_the_worker_s_handlers_on_the_benchmark_s_inputs():
    events = _events(3000, 200, seed=3, prefix="c")
    triggers = sum(e["type"] in ("session_start", "add_to_cart") for e in events)
    caught = []
    d = decide_ceiling(events, 4, sink=caught)
    assert d["events"] == 3000 and d["events_per_s"] > 0
    assert len(caught) == triggers  # one decision per trigger, as the worker sends them
    decisions, orders = join_documents(caught)
    assert [d["decision_id"] for d in decisions] == [d["decision_id"] for d in caught]
    span = max(d["ts"] for d in decisions) - min(d["ts"] for d in decisions)
    assert span == pytest.approx(JOIN_SPAN_DAYS * 86_400_000, rel=1e-6)
    j = join_ceiling(join_inputs(decisions, orders), 4)
    assert j["input_records"] == len(caught) + len(caught[::4]) and j["records_per_s"] > 0
    # the join does all its work: a decision whose window (72 h) ends before its partition's
    # watermark (the earlier of the two inputs' newest times there, less the hour of
    # lateness) gets its reward inside the run
    part = lambda doc: key_partition(doc["user_id"].encode(), 4)  # noqa: E731
    newest = {}
    for name, docs in (("d", decisions), ("c", orders)):
        for doc in docs:
            newest[name, part(doc)] = max(newest.get((name, part(doc)), 0), doc["ts"])
    wm = {p: min(newest["d", p], newest["c", p]) - 3_600_000 for p in range(4)}
    closed = sum(d["ts"] + 72 * 3_600_000 < wm[part(d)] for d in decisions)
    assert closed > len(decisions) // 2
    assert j["rewards"] == closed
    assert j["transitions"] > 0


def test_the_join_s_inputs_cover_more_than_its_window_whatever_the_decide_run_spans():
    caught = [{"decision_id": f"d{i}", "user_id": f"u{i % 7}", "ts": 1_000 + i * 10}
              for i in range(50)][::-1]  # read from the topic out of time order
    decisions, orders = join_documents(caught)
    assert [d["decision_id"] for d in decisions] == [d["decision_id"] for d in caught][::-1]
    assert min(d["ts"] for d in decisions) == 1_000
    assert max(d["ts"] for d in decisions) == 1_000 + JOIN_SPAN_DAYS * 86_400_000
    assert len(orders) == len(caught[::4]) and join_documents([]) == ([], [])
    more, orders = join_documents(caught, at_least=120)  # three copies of each decision
    assert len(more) == 150 and len(orders) == len(more[::4])
    assert len({d["decision_id"] for d in more}) == 150
    assert all(len(d["decision_id"]) == 32 for d in more)  # the schema's pattern
    assert len({d["user_id"] for d in more}) == 3 * 7
    assert [d["ts"] for d in more] == sorted(d["ts"] for d in more)
