"""The handlers' ceiling (bench/ceiling.py): the worker's handlers on in-memory tables."""
import random

from streamagent.bench.ceiling import PartitionedTable, decide_ceiling, join_ceiling, join_inputs
from streamagent.bench.pipeline import _conversions, _events
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
    j = join_ceiling(join_inputs(caught, _conversions(caught, every=4, seed=7)), 4)
    assert j["input_records"] == len(caught) + len(caught[::4]) and j["records_per_s"] > 0
