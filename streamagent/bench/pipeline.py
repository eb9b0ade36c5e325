"""`streamagent bench pipeline`: one decide worker against two baselines, on one broker, in one run.

For each system (a plain confluent-kafka consume->produce loop, a Faust agent that only
forwards, a Faust agent that only counts with the decide agent's batching (the ceiling of the
Faust path), and the streamagent decide worker) the benchmark:

1. pre-loads the same seeded stream of N user events into a fresh input topic, starts the
   system as its own process and measures sustained throughput while it drains the backlog
   (from its first output to its last; start-up is excluded);
2. then, with the system caught up, sends events at a paced rate (half the decide worker's
   measured peak by default) and measures latency from each event's append to the broker to
   its output's append (the topics use LogAppendTime, so both stamps are the broker's).

The decide worker only writes on trigger events, so its events/s is its decision rate times
the events per decision in the stream.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import orjson

from streamagent.ops.local import free_port_pair, terminate

if TYPE_CHECKING:
    from streamagent.ops.kafka import KafkaClientConfig

RESULTS = Path("bench-results")


def add_arguments(p) -> None:
    p.add_argument("--events", type=int, default=60_000, help="events in the backlog phase")
    p.add_argument("--users", type=int, default=5_000)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--latency-seconds", type=float, default=10.0, help="length of the paced phase")
    p.add_argument("--rate", type=float, default=0.0,
                   help="paced-phase events/s (default: half the decide worker's peak)")
    p.add_argument("--systems", default="plain,faust,count,decide",
                   help="comma list of plain, faust (forward), count (faust, batched), decide")
    p.add_argument("--bootstrap", default=None,
                   help="use this broker (default: start a local one for the run)")
    p.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                   help="record the decide worker with py-spy for this long from its start "
                        "(the backlog phase) and write a flame graph next to --out")
    p.add_argument("--out", default=str(RESULTS / "pipeline.json"))


def _create(kafka: KafkaClientConfig, names: list[str], partitions: int) -> None:
    from confluent_kafka.admin import NewTopic

    from streamagent.ops.kafka import make_admin

    cfg = {"message.timestamp.type": "LogAppendTime"}
    a = make_admin(kafka)  # keep a reference: the futures die with the client
    futs = a.create_topics(
        [NewTopic(n, num_partitions=partitions, replication_factor=1, config=cfg) for n in names])
    for f in futs.values():
        f.result()


def _end_offsets(kafka: KafkaClientConfig, topic: str) -> int:
    from confluent_kafka import TopicPartition

    from streamagent.ops.kafka import make_consumer

    c = make_consumer(kafka)
    try:
        md = c.list_topics(topic, timeout=10)
        total = 0
        for p in md.topics[topic].partitions:
            _, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            total += hi
        return total
    finally:
        c.close()


def _behind(kafka: KafkaClientConfig, group: str, topic: str) -> int:
    """Messages of ``topic`` the consumer group has not committed yet."""
    from confluent_kafka import TopicPartition

    from streamagent.ops.kafka import make_consumer

    c = make_consumer(kafka, group=group)
    try:
        md = c.list_topics(topic, timeout=10)
        tps = [TopicPartition(topic, p) for p in md.topics[topic].partitions]
        behind = 0
        for tp in c.committed(tps, timeout=10):
            _, hi = c.get_watermark_offsets(tp, timeout=10)
            behind += hi - max(0, tp.offset)
        return behind
    finally:
        c.close()


def _wait_idle(kafka: KafkaClientConfig, group: str, topics: list[str], timeout: float,
               proc) -> float:
    """Wait until the group has committed everything on ``topics`` (the decide worker's join
    agent still works through the backlog's decisions after the last decision is out, and
    paced events would queue behind it). Returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if all(_behind(kafka, group, t) == 0 for t in topics):
            break
        if proc.poll() is not None:
            raise RuntimeError(f"system under test exited with {proc.returncode}")
        time.sleep(1.0)
    return time.monotonic() - t0


def _read(kafka: KafkaClientConfig, topic: str) -> list[tuple[int, bytes]]:
    from streamagent.ops.tail import read_all

    return [(m.timestamp()[1], m.value()) for m in read_all(kafka, topic, idle=2.0,
                                                              max_wait=300)]


def _wait_for(kafka: KafkaClientConfig, topic: str, count: int, timeout: float, proc) -> int:
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        n = _end_offsets(kafka, topic)
        if n >= count:
            return n
        if proc.poll() is not None:
            raise RuntimeError(f"system under test exited with {proc.returncode}")
        time.sleep(0.5)
    return n


def _start(system: str, kafka: KafkaClientConfig, tin: str, tout: str, tmp: Path, partitions: int,
           profile: tuple[float, Path] | None = None):
    app_id = f"bench-{system}-{uuid.uuid4().hex[:6]}"
    # the system under test reaches the broker as this process does (STREAMAGENT_KAFKA_*)
    env = {**os.environ, **kafka.env(), "BENCH_BOOTSTRAP": kafka.bootstrap, "BENCH_IN": tin,
           "BENCH_OUT": tout,
           "BENCH_APP_ID": app_id, "BENCH_DATA_DIR": str(tmp / app_id)}
    if system == "plain":
        cmd = [sys.executable, "-m", "streamagent.bench.plain_loop"]
    elif system == "faust":
        cmd = [sys.executable, "-m", "streamagent.bench.forward_app"]
    elif system == "count":
        cmd = [sys.executable, "-m", "streamagent.bench.count_app"]
    else:
        cmd = [sys.executable, "-m", "streamagent.cli", "worker"]
        env.update({"STREAMAGENT_APP_ID": app_id,
                    "STREAMAGENT_DATA_DIR": str(tmp / app_id),
                    "STREAMAGENT_TOPIC_USER_EVENTS": tin, "STREAMAGENT_TOPIC_DECISION_LOG": tout,
                    "STREAMAGENT_TOPIC_COUPON_ACTIONS": tout + "-coupons",
                    "STREAMAGENT_TOPIC_CONVERSIONS": tin + "-conversions",
                    "STREAMAGENT_PARTITIONS": str(partitions),
                    "STREAMAGENT_METRICS_PORT": "0", "STREAMAGENT_LOG_LEVEL": "warning"})
    log = open(tmp / f"{system}.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    if profile and system == "decide":
        seconds, svg = profile
        # py-spy samples the running worker from outside (no change in the worker) and writes
        # the flame graph when its time is up; the worker runs on
        subprocess.Popen([_py_spy(), "record", "--pid", str(proc.pid), "--rate", "200",
                          "--duration", str(int(seconds)), "--output", str(svg)],
                         stdout=open(tmp / "py-spy.log", "wb"), stderr=subprocess.STDOUT)
    return proc, app_id


def _py_spy() -> str:
    import shutil

    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        raise SystemExit("--profile needs py-spy: pip install 'streamagent[bench]'")
    return exe


def _events(n: int, users: int, seed: int, prefix: str) -> list[dict]:
    from streamagent.sim.synthetic import synthetic_events

    out = []
    for ev in synthetic_events(n, users=users, seed=seed):
        ev["event_id"] = f"{prefix}-{ev['event_id']}"
        out.append(ev)
    return out


def _produce(kafka: KafkaClientConfig, topic: str, events: list[dict], rate: float = 0.0) -> None:
    from streamagent.ops.kafka import make_producer, send

    p = make_producer(kafka, **({"linger.ms": 0} if rate else {}))
    t0 = time.perf_counter()
    for i, ev in enumerate(events):
        if rate:
            # sleep until the event is due, never spin: on two cores a pacing loop that
            # polled while waiting took a whole core from the system under test (measured:
            # the benchmark process at 89% of a core, the decide worker at 75%, at 1,500/s)
            wait = t0 + i / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            p.poll(0)
        send(p, topic, ev["user_id"].encode(), orjson.dumps(ev))
    p.flush(60)


def _out_event_id(system: str, value: bytes) -> str:
    doc = orjson.loads(value)
    return doc["trigger_event_id"] if system == "decide" else doc["event_id"]


def run_system(system: str, kafka: KafkaClientConfig, backlog: list[dict], triggers: set[str],
               partitions: int, tmp: Path, rate: float, latency_s: float, users: int,
               log=print, profile: tuple[float, Path] | None = None) -> dict:
    rid = uuid.uuid4().hex[:6]
    tin, tout = f"bench-{rid}-in", f"bench-{rid}-out"
    _create(kafka, [tin, tout, tout + "-coupons", tin + ".dlq"], partitions)
    _produce(kafka, tin, backlog)
    expect = len(backlog) if system != "decide" else sum(
        1 for e in backlog if e["event_id"] in triggers)
    proc, app_id = _start(system, kafka, tin, tout, tmp, partitions, profile)
    if system == "count":
        try:
            return _run_count(kafka, tout, len(backlog), proc, log)
        finally:
            terminate(proc)
    try:
        t0 = time.monotonic()
        got = _wait_for(kafka, tout, expect, 600, proc)
        wall = time.monotonic() - t0
        outs = _read(kafka, tout)
        ts = sorted(t for t, _ in outs)
        span = (ts[-1] - ts[0]) / 1000.0 if len(ts) > 1 else float("nan")
        per_output = len(backlog) / max(1, len(outs))
        events_per_s = (len(outs) - 1) / span * per_output if span > 0 else float("nan")
        log(f"  {system:7} backlog: {len(outs)} outputs in {span:.2f}s -> {events_per_s:,.0f} events/s")
        result = {"outputs": len(outs), "expected_outputs": expect, "span_s": span,
                  "events_per_s": events_per_s, "wall_incl_startup_s": wall, "complete": got >= expect}
        if latency_s > 0 and rate > 0:
            if system == "decide":  # the same app id is the Faust consumer group
                waited = _wait_idle(kafka, app_id, [tin, tout], 300, proc)
                log(f"  {system:7} caught up with its inputs (join included) {waited:.0f} s "
                    f"after the last decision")
                result["catch_up_s"] = waited
            paced = _events(int(rate * latency_s), users, seed=99, prefix=f"lat{rid}")
            before = len(outs)
            _produce(kafka, tin, paced, rate=rate)
            paced_triggers = {e["event_id"] for e in paced if e["type"] in
                              ("session_start", "add_to_cart")}
            want = len(paced) if system != "decide" else len(paced_triggers)
            _wait_for(kafka, tout, before + want, 120, proc)
            ins = {orjson.loads(v)["event_id"]: t for t, v in _read(kafka, tin)}
            lat = []
            for t, v in _read(kafka, tout):
                if v is None:  # an erasure tombstone on decision-log: no decision
                    continue
                eid = _out_event_id(system, v)
                if eid.startswith(f"lat{rid}") and eid in ins:
                    lat.append(t - ins[eid])
            a = np.array(lat, dtype=float)
            result["latency_ms"] = ({"rate_events_per_s": rate, "n": int(a.size),
                                     "p50": float(np.percentile(a, 50)),
                                     "p95": float(np.percentile(a, 95)),
                                     "p99": float(np.percentile(a, 99)), "max": float(a.max())}
                                    if a.size else None)
            if a.size:
                log(f"  {system:7} paced {rate:,.0f}/s: p50 {result['latency_ms']['p50']:.0f} ms, "
                    f"p95 {result['latency_ms']['p95']:.0f} ms, p99 {result['latency_ms']['p99']:.0f} ms")
        return result
    finally:
        terminate(proc)


def _run_count(kafka: KafkaClientConfig, tout: str, n: int, proc, log) -> dict:
    """The counting agent: one output per batch with its size; throughput over the events
    counted after its first batch, from that output's append to the last one's."""
    t0 = time.monotonic()
    outs: list = []
    while time.monotonic() - t0 < 600:
        outs = sorted((t, orjson.loads(v)["n"]) for t, v in _read(kafka, tout))
        if sum(k for _, k in outs) >= n or proc.poll() is not None:
            break
        time.sleep(1.0)
    counted = sum(k for _, k in outs)
    span = (outs[-1][0] - outs[0][0]) / 1000.0 if len(outs) > 1 else float("nan")
    events_per_s = (counted - outs[0][1]) / span if span > 0 else float("nan")
    log(f"  count   backlog: {counted} events in {len(outs)} batches, {span:.2f}s -> "
        f"{events_per_s:,.0f} events/s")
    return {"outputs": len(outs), "events_counted": counted, "span_s": span,
            "events_per_s": events_per_s, "wall_incl_startup_s": time.monotonic() - t0,
            "complete": counted >= n, "mean_batch": counted / max(1, len(outs))}


def figures(results: dict) -> dict:
    """The stable keys of the JSON report (``decide.events_per_s``, ...)."""
    names = {"plain": "plain", "faust": "faust_forward", "count": "faust_count",
             "decide": "decide"}
    out: dict = {}
    for system, r in results.items():
        key = names.get(system, system)
        out[f"{key}.events_per_s"] = r.get("events_per_s")
        lat = r.get("latency_ms") or {}
        for q in ("p50", "p95", "p99"):
            if q in lat:
                out[f"{key}.latency_ms.{q}_at_50pct"] = lat[q]
    count = (results.get("count") or {}).get("events_per_s")
    if count and "decide" in results:
        out["decide.vs_faust_count"] = results["decide"]["events_per_s"] / count
    return out


def main(args) -> int:
    from streamagent.extras import require

    require("bench", "rich", what="streamagent bench pipeline")
    from rich.console import Console
    from rich.table import Table

    from streamagent.ops.broker import BrokerConfig, start, stop

    con = Console()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="sa-bench-"))
    broker_cfg = None
    if args.bootstrap:  # the user's broker, reached with their STREAMAGENT_KAFKA_* security
        from streamagent.config import Settings
        from streamagent.ops.kafka import kafka_client

        kafka = kafka_client(Settings(), bootstrap=args.bootstrap)
    else:
        broker_cfg = BrokerConfig(data_dir=tmp / "kafka", port=free_port_pair(), heap="1g")
        start(broker_cfg, log=lambda m: con.print(f"[dim]{m}[/dim]"))
        kafka = broker_cfg.client()
    try:
        backlog = _events(args.events, args.users, seed=1, prefix="b")
        triggers = {e["event_id"] for e in backlog if e["type"] in ("session_start", "add_to_cart")}
        con.print(f"backlog: {len(backlog)} events, {len(triggers)} triggers, {args.users} users, "
                  f"{args.partitions} partitions, broker {kafka.bootstrap}")
        results: dict = {}
        profile = None
        if args.profile:
            profile = (args.profile, Path(args.out).with_name("decide-flame.svg"))
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        order = ["decide"] + [s for s in systems if s != "decide"] if "decide" in systems else systems
        rate = args.rate
        for system in order:
            if system == "decide" and not rate:
                # peak first, then pace the latency phase at half of it
                r = run_system(system, kafka, backlog, triggers, args.partitions, tmp, 0, 0,
                               args.users, log=con.print, profile=profile)
                rate = max(50.0, round(r["events_per_s"] / 2, -1))
                lat = run_system(system, kafka, backlog, triggers, args.partitions, tmp, rate,
                                 args.latency_seconds, args.users, log=con.print)
                r["latency_ms"] = lat.get("latency_ms")
            else:
                r = run_system(system, kafka, backlog, triggers, args.partitions, tmp, rate,
                               args.latency_seconds, args.users, log=con.print)
            results[system] = r
    finally:
        if broker_cfg:
            stop(broker_cfg, log=lambda m: con.print(f"[dim]{m}[/dim]"))
    table = Table(title="pipeline benchmark (one process each, same broker, same run)")
    for col in ("system", "events/s", "vs faust forward", "vs faust count", "p50 ms", "p95 ms",
                "p99 ms", "paced at /s"):
        table.add_column(col, justify="right")
    base = results.get("faust", {}).get("events_per_s")
    ceiling = results.get("count", {}).get("events_per_s")
    for name, r in results.items():
        lat = r.get("latency_ms") or {}
        table.add_row(name, f"{r['events_per_s']:,.0f}",
                      f"{r['events_per_s'] / base:.0%}" if base else "-",
                      f"{r['events_per_s'] / ceiling:.0%}" if ceiling else "-",
                      *(f"{lat[k]:.0f}" if lat else "-" for k in ("p50", "p95", "p99")),
                      f"{lat.get('rate_events_per_s', 0):,.0f}" if lat else "-")
    con.print(table)
    doc = {"events": args.events, "users": args.users, "partitions": args.partitions,
           "cpus": os.cpu_count(), "results": results,
           "decide_vs_faust_forward": (results["decide"]["events_per_s"] / base)
           if base and "decide" in results else None,
           "figures": figures(results),
           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    con.print(f"wrote {out}")
    if profile:
        con.print(f"flame graph of the decide worker's first {args.profile:.0f} s: {profile[1]}")
    return 0
