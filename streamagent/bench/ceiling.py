"""The agents' handlers alone, with no Kafka and no Faust: the ceiling of a worker's own work.

``streamagent bench pipeline`` runs this beside the broker-backed systems (systems
``decide_core`` and ``join_core``), each in a process of its own, on the same inputs the
workers get: the decide backlog, and the decisions and orders the join system reads. The
handler is the one the worker runs (stream/decide.py ``DecideHandler``, stream/join.py
``JoinHandler``), built from the shipped settings as the worker builds it, with the worker's
batch sizes, user-state cache and expiry sweep, over in-memory tables. Left out is everything
around it: fetching and delivering records, RocksDB, changelog records, the outputs' producer,
commits. So its events per second bound what a worker of this build can reach on this
machine, whatever the framework underneath: a target above the ceiling cannot be met by
tuning Kafka or Faust, only by making the handler's own work cheaper.

Run as ``python -m streamagent.bench.ceiling decide|join ...``; it prints one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import bisect
import sys
import time
from typing import Callable, Iterator, MutableMapping

import orjson

from streamagent.stream.join import key_partition


class PartitionedTable(MutableMapping):
    """A dict that also keeps each partition's keys in order, so the expiry sweep's ``scan``
    costs what it costs on the worker's RocksDB tables (one partition, from a cursor), not a
    pass over every key (core/tables.py ``scan_mapping``, the fallback for plain dicts)."""

    def __init__(self, n_partitions: int, partition_of: Callable[[object], int],
                 prefix=None):
        """Only keys starting with ``prefix`` (all if None) are kept in order: the ones the
        sweep scans."""
        self.data: dict = {}
        self.partition_of, self.prefix = partition_of, prefix
        self.keys_of: list[list] = [[] for _ in range(n_partitions)]

    def _ordered(self, key) -> bool:
        return self.prefix is None or key.startswith(self.prefix)

    def __getitem__(self, key):
        return self.data[key]

    def __setitem__(self, key, value) -> None:
        if key not in self.data and self._ordered(key):
            bisect.insort(self.keys_of[self.partition_of(key)], key)
        self.data[key] = value

    def __delitem__(self, key) -> None:
        del self.data[key]
        if self._ordered(key):
            keys = self.keys_of[self.partition_of(key)]
            del keys[bisect.bisect_left(keys, key)]

    def __iter__(self) -> Iterator:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def scan(self, partition: int, after=None, limit: int = 100, prefix=None,
             partition_of=None) -> list[tuple]:
        if prefix != self.prefix:
            raise ValueError(f"this table keeps keys of prefix {self.prefix!r} in order, "
                             f"not {prefix!r}")
        keys = self.keys_of[partition]
        i = 0 if after is None else bisect.bisect_right(keys, after)
        return [(k, self.data[k]) for k in keys[i:i + limit]]


class _Msg:
    __slots__ = ("topic", "partition", "offset", "key", "value", "timestamp")

    def __init__(self, topic, partition, offset, key, value, timestamp):
        self.topic, self.partition, self.offset = topic, partition, offset
        self.key, self.value, self.timestamp = key, value, timestamp


def _messages(records: list[tuple[str, dict]], n_parts: int) -> list[_Msg]:
    """(topic, document) in arrival order -> records as a consumer hands them over (keyed by
    user, on the partition the Java client's partitioner gives the key, offsets per topic and
    partition)."""
    offsets: dict = {}
    now = time.time()
    out = []
    for topic, doc in records:
        key = doc["user_id"].encode()
        p = key_partition(key, n_parts)
        o = offsets.get((topic, p), 0)
        offsets[(topic, p)] = o + 1
        out.append(_Msg(topic, p, o, key, orjson.dumps(doc), now))
    return out


async def _drive(handler, msgs: list[_Msg], batch: int) -> None:
    for i in range(0, len(msgs), batch):
        await handler.handle(msgs[i:i + batch])


def _timed(handler, msgs: list[_Msg], batch: int) -> float:
    t0 = time.perf_counter()
    asyncio.run(_drive(handler, msgs, batch))
    return time.perf_counter() - t0


def decide_ceiling(events: list[dict], n_parts: int, sink: list | None = None) -> dict:
    """The decide handler over ``events`` (user-events documents, in order); ``sink`` gets
    the decision-log documents it sent."""
    from streamagent.config import Settings
    from streamagent.core.catalog import load_catalog
    from streamagent.core.engine import DecisionEngine
    from streamagent.core.tables import BudgetShares, StreamClocks, UserCounts, UserStates
    from streamagent.params import engine_params, load_model, worker_metrics
    from streamagent.stream.decide import DecideHandler, DecideTables, DecideTopics

    s = Settings()
    catalog = load_catalog(s.catalog_path)
    engine = DecisionEngine(catalog, engine_params(s, n_parts), load_model(s, catalog))
    of = lambda key: key_partition(key, n_parts)  # noqa: E731
    users = PartitionedTable(n_parts, of)
    budgets: dict = {}
    sent = [0]

    async def send(topic, key, value) -> None:
        sent[0] += 1
        if sink is not None and topic == s.topic_decision_log and value is not None:
            sink.append(orjson.loads(value))
    handler = DecideHandler(
        engine, DecideTables(UserStates(users, s.state_cache_users), BudgetShares(budgets),
                             UserCounts(budgets), StreamClocks(budgets)),
        DecideTopics(s.topic_decision_log, s.topic_coupon_actions, s.dlq(s.topic_user_events)),
        send, worker_metrics(s, catalog), s.trigger_types, sweep_keys=s.state_sweep_keys,
        partition_of=of)
    msgs = _messages([(s.topic_user_events, e) for e in events], n_parts)
    wall = _timed(handler, msgs, s.decide_batch_max)
    return {"events": len(msgs), "outputs": sent[0], "batch": s.decide_batch_max,
            "seconds": wall, "events_per_s": len(msgs) / wall,
            "us_per_event": wall / len(msgs) * 1e6}


def join_ceiling(records: list[tuple[str, dict]], n_parts: int) -> dict:
    """The join handler over ``records``: ("decisions" | "conversions", document), in order."""
    from streamagent.config import Settings
    from streamagent.core.catalog import load_catalog
    from streamagent.params import join_params, worker_metrics
    from streamagent.stream.join import JoinHandler, JoinTopics

    s = Settings()
    catalog = load_catalog(s.catalog_path)
    # the sweep scans the users' records ("u:<user>" keys), on their user's partition
    table = PartitionedTable(n_parts, lambda key: key_partition(key[2:].encode(), n_parts),
                             prefix="u:")
    sent = {s.topic_rewards: 0, s.topic_transitions: 0}

    async def send(topic, key, value) -> None:
        sent[topic] = sent.get(topic, 0) + 1
    handler = JoinHandler(catalog, join_params(s), table,
                          JoinTopics(s.topic_decision_log, s.topic_conversions, s.topic_rewards,
                                     s.topic_transitions, s.dlq),
                          send, worker_metrics(s, catalog), n_parts,
                          sweep_keys=s.state_sweep_keys)
    topic = {"decisions": s.topic_decision_log, "conversions": s.topic_conversions}
    msgs = _messages([(topic[t], doc) for t, doc in records], n_parts)
    wall = _timed(handler, msgs, s.join_batch_max)
    return {"input_records": len(msgs), "outputs": sum(sent.values()),
            "rewards": sent[s.topic_rewards], "transitions": sent[s.topic_transitions],
            "batch": s.join_batch_max,
            "seconds": wall, "records_per_s": len(msgs) / wall,
            "us_per_record": wall / len(msgs) * 1e6}


def join_inputs(decisions: list[dict], conversions: list[dict]) -> list[tuple[str, dict]]:
    """Decisions and orders merged in event-time order, as live topics deliver them."""
    both = [("decisions", d) for d in decisions] + [("conversions", c) for c in conversions]
    return sorted(both, key=lambda r: r[1]["ts"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m streamagent.bench.ceiling")
    p.add_argument("handler", choices=["decide", "join"])
    p.add_argument("--inputs", required=True,
                   help="JSON file: decide, a list of user events; join, a list of "
                        "[\"decisions\" | \"conversions\", document] in arrival order")
    p.add_argument("--partitions", type=int, default=4)
    a = p.parse_args(argv)
    with open(a.inputs, "rb") as f:
        inputs = orjson.loads(f.read())
    if a.handler == "decide":
        out = decide_ceiling(inputs, a.partitions)
    else:
        out = join_ceiling([(t, d) for t, d in inputs], a.partitions)
    sys.stdout.write(orjson.dumps(out).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
