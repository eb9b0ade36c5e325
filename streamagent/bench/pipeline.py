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

import hashlib
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

from streamagent.metrics import scrape
from streamagent.params import join_group_id
from streamagent.ops.local import free_port, free_port_pair, terminate

if TYPE_CHECKING:
    from streamagent.ops.kafka import KafkaClientConfig

RESULTS = Path("bench-results")


def add_arguments(p) -> None:
    p.add_argument("--events", type=int, default=60_000, help="events in the backlog phase")
    p.add_argument("--users", type=int, default=5_000)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--latency-seconds", type=float, default=10.0, help="length of the paced phase")
    p.add_argument("--rate", type=float, default=0.0,
                   help="one paced phase at this many events/s for every system (default: "
                        "decide paced at each --load of its own peak, the baselines at 50%%)")
    p.add_argument("--load", default="0.25,0.5,0.75",
                   help="comma list of fractions of the decide worker's measured peak: a paced "
                        "phase at each, in the same worker process after its backlog")
    p.add_argument("--systems", default="plain,faust,count,decide,decide_core",
                   help="comma list of plain, faust (forward), count (faust, batched), decide, "
                        "decide2 (two decide workers sharing the partitions), join (the join "
                        "agent alone on the decide run's decisions and generated orders), learner "
                        "(ingest, then model freshness with a decide worker), decide_core and "
                        "join_core (the decide and join handlers alone on the same inputs, no "
                        "Kafka, no Faust: the ceiling of the workers' own work; "
                        "streamagent/bench/ceiling.py)")
    p.add_argument("--worker-role", choices=["all", "split"], default="all",
                   help="all (default, as the product ships): each decide worker runs both "
                        "agents in one process; split: the decide workers run the decide agent "
                        "only (STREAMAGENT_WORKER_ROLE=decide) beside one join worker (role "
                        "join), a deployment that gives the join its own process")
    p.add_argument("--transitions", type=int, default=20_000,
                   help="learner: transitions in its ingest backlog")
    p.add_argument("--freshness-seconds", type=float, default=90.0,
                   help="learner: length of the freshness phase (0: none)")
    p.add_argument("--freshness-rate", type=float, default=100.0,
                   help="learner: user events/s and transitions/s in the freshness phase")
    p.add_argument("--bootstrap", default=None,
                   help="use this broker (default: start a local one for the run)")
    p.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                   help="record the decide worker with py-spy for this long from its start "
                        "(the backlog phase) and write a flame graph next to --out")
    p.add_argument("--out", "--json", dest="out", default=str(RESULTS / "pipeline.json"),
                   help="where the figures go, as JSON (default: %(default)s)")


def _create(kafka: KafkaClientConfig, names: list[str], partitions: int) -> None:
    from confluent_kafka.admin import NewTopic

    from streamagent.ops.kafka import make_admin

    cfg = {"message.timestamp.type": "LogAppendTime"}
    a = make_admin(kafka)  # keep a reference: the futures die with the client
    futs = a.create_topics(
        [NewTopic(n, num_partitions=partitions, replication_factor=1, config=cfg) for n in names])
    for f in futs.values():
        f.result()


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


def _wait_idle(kafka: KafkaClientConfig, reads: list[tuple[str, str]], timeout: float,
               proc) -> float:
    """Wait until each (group, topic) of ``reads`` has committed everything (the join still
    works through the backlog's decisions after the last decision is out, and paced events
    would queue behind it in a shared process or on shared cores). Returns the seconds
    waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if all(_behind(kafka, group, t) == 0 for group, t in reads):
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
    from streamagent.ops.kafka import end_offsets

    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        n = end_offsets(kafka, topic)
        if n >= count:
            return n
        if proc.poll() is not None:
            raise RuntimeError(f"system under test exited with {proc.returncode}")
        time.sleep(0.5)
    return n


def _start(system: str, kafka: KafkaClientConfig, tin: str, tout: str, tmp: Path, partitions: int,
           profile: tuple[float, Path] | None = None,
           worker_role: str = "all") -> tuple[list, str]:
    """The system's processes (two decide workers for decide2: the same consumer group; with
    ``worker_role`` split, a join worker after them, ``role`` "join") and its app id."""
    app_id = f"bench-{system}-{uuid.uuid4().hex[:6]}"
    # the system under test reaches the broker as this process does (STREAMAGENT_KAFKA_*)
    env = {**os.environ, **kafka.env(), "BENCH_BOOTSTRAP": kafka.bootstrap, "BENCH_IN": tin,
           "BENCH_OUT": tout,
           "BENCH_APP_ID": app_id, "BENCH_DATA_DIR": str(tmp / app_id)}
    workers = 2 if system == "decide2" else 1
    if system == "plain":
        cmd = [sys.executable, "-m", "streamagent.bench.plain_loop"]
    elif system == "faust":
        cmd = [sys.executable, "-m", "streamagent.bench.forward_app"]
    elif system == "count":
        cmd = [sys.executable, "-m", "streamagent.bench.count_app"]
    else:
        cmd = [sys.executable, "-m", "streamagent.cli", "worker"]
        env.update({"STREAMAGENT_APP_ID": app_id,
                    "STREAMAGENT_TOPIC_USER_EVENTS": tin, "STREAMAGENT_TOPIC_DECISION_LOG": tout,
                    "STREAMAGENT_TOPIC_COUPON_ACTIONS": tout + "-coupons",
                    "STREAMAGENT_TOPIC_CONVERSIONS": tin + "-conversions",
                    "STREAMAGENT_PARTITIONS": str(partitions),
                    "STREAMAGENT_LOG_LEVEL": "warning"})
    roles = [None] * workers
    if cmd[-1] == "worker":
        roles = (["decide"] * workers + ["join"] if worker_role == "split"
                 else ["all"] * workers)
    procs = []
    for i, role in enumerate(roles):
        wenv, port = dict(env), 0
        if role is not None:  # each worker its own tables directory (as on two machines)
            wenv["STREAMAGENT_DATA_DIR"] = str(tmp / f"{app_id}-{i}")
            wenv["STREAMAGENT_WORKER_ROLE"] = role
            # /metrics, for the event loop's lag in each paced phase (loop_figures)
            port = free_port()
            wenv["STREAMAGENT_METRICS_PORT"] = str(port)
        log = open(tmp / f"{system}-{i}.log", "wb")
        procs.append(subprocess.Popen(cmd, env=wenv, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL))
        procs[-1].metrics_port = port
        procs[-1].role = role
    if profile and system == "decide":
        seconds, svg = profile
        # py-spy samples the running worker from outside (no change in the worker) and writes
        # the flame graph when its time is up; the worker runs on
        subprocess.Popen([_py_spy(), "record", "--pid", str(procs[0].pid), "--rate", "200",
                          "--duration", str(int(seconds)), "--output", str(svg)],
                         stdout=open(tmp / "py-spy.log", "wb"), stderr=subprocess.STDOUT)
    return procs, app_id


class _Procs:
    """The processes of one system: poll() is the first exit code, if any has exited."""

    def __init__(self, procs: list):
        self.procs = procs

    def poll(self):
        for p in self.procs:
            if p.poll() is not None:
                return p.returncode
        return None

    @property
    def returncode(self):
        return self.poll()

    def terminate(self) -> None:
        for p in self.procs:
            terminate(p)


class RssSampler:
    """The resident set size of processes, sampled from /proc twice a second in a thread."""

    def __init__(self, pids: list[int], every_s: float = 0.5):
        import threading

        self.pids, self.every_s = pids, every_s
        # (wall-clock time, as the broker's append stamps; MiB over the pids)
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def rss_mib(pid: int) -> float:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        except OSError:
            pass
        return float("nan")

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append((time.time(), sum(self.rss_mib(p) for p in self.pids)))

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        self._thread.join()
        return self.samples


def rss_figures(samples: list[tuple[float, float]], t_from: float, t_to: float) -> dict | None:
    """RSS over a drain: the median of its first and its last fifth, and their ratio (flat
    means a ratio near 1; the target is within 10%)."""
    xs = [(t, v) for t, v in samples if t_from <= t <= t_to and v == v]
    if len(xs) < 10:
        return None
    k = max(1, len(xs) // 5)
    first = float(np.median([v for _, v in xs[:k]]))
    last = float(np.median([v for _, v in xs[-k:]]))
    # the curve itself, a point per tenth of the drain (seconds from its start, MiB)
    step = max(1, len(xs) // 10)
    curve = [[round(t - t_from, 1), round(v, 1)] for t, v in xs[::step]]
    return {"first_fifth_mib": first, "last_fifth_mib": last, "max_mib": max(v for _, v in xs),
            "growth": last / first if first else float("nan"), "seconds": t_to - t_from,
            "curve": curve}


LOOP_LAG = "streamagent_stream_loop_lag_seconds"
EVENT_TO_DECISION = "streamagent_decision_event_to_decision_seconds"


def histogram_figures(before: dict[str, float], after: dict[str, float],
                      name: str) -> dict | None:
    """A worker histogram (seconds) over a phase, from two scrapes of its /metrics: p50 and
    p99 in ms, interpolated in the buckets as Prometheus does, and the samples."""
    buckets = []
    for key, v in after.items():
        if key.startswith(name + "_bucket{"):
            le = key.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), v - before.get(key, 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]

    def quantile(q: float) -> float:
        rank, lo, below = q * total, 0.0, 0.0
        for le, n in buckets:
            if n >= rank:
                if le == float("inf"):
                    return lo * 1000.0  # past the last finite bound: Prometheus says that bound
                return (lo + (le - lo) * (rank - below) / max(n - below, 1e-12)) * 1000.0
            lo, below = le, n
        return lo * 1000.0

    return {"p50": quantile(0.5), "p99": quantile(0.99), "samples": int(total)}


def loop_figures(before: dict[str, float], after: dict[str, float]) -> dict | None:
    """The worker's event-loop lag over a phase (histogram_figures) and its stalls counted."""
    figures = histogram_figures(before, after, LOOP_LAG)
    if figures is not None:
        stalls = "streamagent_stream_loop_stalls_total"
        figures["stalls"] = int(after.get(stalls, 0.0) - before.get(stalls, 0.0))
    return figures


def _keep_only_logs(tmp: Path) -> None:
    """Remove the run's broker data and table stores (hundreds of MiB), keep its logs."""
    import shutil

    for p in tmp.iterdir():
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


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
    return doc["trigger_event_id"] if system.startswith("decide") else doc["event_id"]


def run_system(system: str, kafka: KafkaClientConfig, backlog: list[dict], triggers: set[str],
               partitions: int, tmp: Path, rates, latency_s: float, users: int,
               log=print, profile: tuple[float, Path] | None = None,
               worker_role: str = "all") -> dict:
    """Drain the backlog, then one paced phase per (label, events/s) of ``rates(peak events/s)``,
    in the same processes, each after the system has caught up."""
    rid = uuid.uuid4().hex[:6]
    tin, tout = f"bench-{rid}-in", f"bench-{rid}-out"
    _create(kafka, [tin, tout, tout + "-coupons", tin + ".dlq"], partitions)
    _produce(kafka, tin, backlog)
    deciding = system.startswith("decide")
    expect = len(backlog) if not deciding else sum(
        1 for e in backlog if e["event_id"] in triggers)
    started, app_id = _start(system, kafka, tin, tout, tmp, partitions, profile, worker_role)
    proc = _Procs(started)
    # the deciding processes' memory (the join worker's is the join system's figure)
    rss = RssSampler([p.pid for p in started if getattr(p, "role", None) != "join"])
    split = any(getattr(p, "role", None) == "join" for p in started)
    # who must have read what before a paced phase: the join in its own group when split
    reads = [(app_id, tin), (join_group_id(app_id) if split else app_id, tout)]
    if system == "count":
        try:
            return _run_count(kafka, tout, len(backlog), proc, log)
        finally:
            rss.stop()
            proc.terminate()
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
                  "events_per_s": events_per_s, "wall_incl_startup_s": wall, "complete": got >= expect,
                  "output_topic": tout}
        if deciding and len(ts) > 1:
            result["rss"] = rss_figures(rss.samples, ts[0] / 1000.0, ts[-1] / 1000.0)
            if result["rss"]:
                r = result["rss"]
                log(f"  {system:7} RSS over the drain: {r['first_fifth_mib']:.0f} -> "
                    f"{r['last_fifth_mib']:.0f} MiB ({r['growth'] - 1:+.1%}, max {r['max_mib']:.0f})")
        by_load = {}
        for label, rate in (rates(events_per_s) if latency_s > 0 else []):
            if deciding:  # the same app id is the Faust consumer group
                waited = _wait_idle(kafka, reads, 300, proc)
                log(f"  {system:7} caught up with its inputs (join included) after {waited:.0f} s")
                result.setdefault("catch_up_s", waited)
            port = getattr(started[0], "metrics_port", 0)
            before = scrape(port) if port else {}
            by_load[label] = lat = _paced(system, kafka, tin, tout, rate, latency_s, users, proc)
            after = scrape(port) if port else {}
            loop = loop_figures(before, after) if port else None
            if lat:
                lat["loop_lag_ms"] = loop
                # the worker's own view: from the event's append to the decision's hand-over
                # to the producer (what the benchmark's figure adds is the delivery)
                lat["in_worker_ms"] = (histogram_figures(before, after, EVENT_TO_DECISION)
                                       if port else None)
                log(f"  {system:7} paced {rate:,.0f}/s ({rate / events_per_s:.0%} of its peak): "
                    f"p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms, p99 {lat['p99']:.0f} ms "
                    f"(n {lat['n']})" + (f"; event loop lag p50 {loop['p50']:.1f} ms, p99 "
                                         f"{loop['p99']:.0f} ms, {loop['stalls']} stalls"
                                         if loop else "")
                    + (f"; append to decision sent p50 {w['p50']:.0f} ms, p99 {w['p99']:.0f} ms"
                       if (w := lat.get("in_worker_ms")) else ""))
        result["latency_by_load"] = by_load
        # the table's column: at half of decide's peak (or the one --rate)
        result["latency_ms"] = by_load.get("50pct", by_load.get("rate"))
        return result
    finally:
        rss.stop()
        proc.terminate()


def _paced(system: str, kafka: KafkaClientConfig, tin: str, tout: str, rate: float,
           latency_s: float, users: int, proc) -> dict | None:
    """Send events at ``rate`` for ``latency_s`` and time each one's output: from the input's
    append to the output's (both the broker's LogAppendTime)."""
    tag = f"lat{uuid.uuid4().hex[:6]}"
    from streamagent.ops.kafka import end_offsets

    paced = _events(int(rate * latency_s), users, seed=99, prefix=tag)
    before = end_offsets(kafka, tout)
    _produce(kafka, tin, paced, rate=rate)
    want = len(paced) if not system.startswith("decide") else sum(
        1 for e in paced if e["type"] in ("session_start", "add_to_cart"))
    _wait_for(kafka, tout, before + want, 120, proc)
    ins = {orjson.loads(v)["event_id"]: t for t, v in _read(kafka, tin)}
    lat = []
    for t, v in _read(kafka, tout):
        if v is None:  # an erasure tombstone on decision-log: no decision
            continue
        eid = _out_event_id(system, v)
        if eid.startswith(tag) and eid in ins:
            lat.append((ins[eid], t - ins[eid]))
    figures = latency_figures(lat)
    return None if figures is None else {"rate_events_per_s": rate, "expected": want,
                                         **figures}


def latency_figures(pairs: list[tuple[float, float]]) -> dict | None:
    """Percentiles of (input append time, latency ms) pairs: over the whole phase, after its
    first quarter (is the tail the start's transient, a worker just done with a backlog, or
    the steady state?), and the p99 of each tenth of the phase in order."""
    if not pairs:
        return None
    a = np.array([x for _, x in sorted(pairs)], dtype=float)
    late = a[len(a) // 4:]
    return {"n": int(a.size),
            "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max()),
            "after_first_quarter": {"p50": float(np.percentile(late, 50)),
                                    "p95": float(np.percentile(late, 95)),
                                    "p99": float(np.percentile(late, 99))},
            "p99_by_tenth": [float(np.percentile(c, 99)) for c in np.array_split(a, 10)
                             if c.size]}


def _conversions(decisions: list[dict], every: int, seed: int) -> list[dict]:
    """An order for every ``every``-th decision's user, 1-48 h of event time after it (inside
    the attribution window); a third name the decision, as a redeemed coupon would."""
    rng = np.random.default_rng(seed)
    out = []
    for i, d in enumerate(decisions[::every]):
        doc = {"order_id": f"o{seed}-{i}", "user_id": d["user_id"],
               "ts": int(d["ts"]) + int(rng.integers(3_600_000, 48 * 3_600_000)),
               "amount": round(float(rng.uniform(10, 120)), 2)}
        if i % 3 == 0:
            doc["decision_id"] = d["decision_id"]
        out.append(doc)
    return out


JOIN_SPAN_DAYS = 30.0
JOIN_DECISIONS = 150_000


def join_documents(decisions: list[dict], span_days: float = JOIN_SPAN_DAYS,
                   at_least: int = 0) -> tuple[list, list]:
    """The join's inputs from the decide run's decisions: the decisions spread over
    ``span_days`` of event time, copied for more users until there are ``at_least`` (each
    copy's users suffixed ``~k``, its decision ids hashed with k; copies of a decision follow each other, so
    event-time order is kept), and an order for a quarter of them.

    The decide backlog covers a couple of days of event time, less than the attribution
    window (72 h): a join fed with it would only take records in and never close a window, so
    it would send no reward and no transition, and its records per second would leave out
    half of its work. Over 30 days most decisions close inside the run (one reward each) and
    most have their user's next decision (one transition each), as in a shop's steady state.
    The copies make the drain long enough (tens of seconds) for a rate read from the
    consumer group's commits, a few seconds apart under load, to mean something."""
    if not decisions:
        return [], []
    # read partition by partition: not in ts order
    ordered = sorted(decisions, key=lambda d: int(d["ts"]))
    t0, t1 = int(ordered[0]["ts"]), int(ordered[-1]["ts"])
    k = span_days * 86_400_000 / max(t1 - t0, 1)
    copies = max(1, -(-at_least // len(decisions)))
    spread = []
    for d in ordered:
        t = t0 + int((int(d["ts"]) - t0) * k)
        for c in range(copies):
            if copies == 1:
                spread.append({**d, "ts": t})
            else:
                did = hashlib.blake2b(f"{d['decision_id']}~{c}".encode(),
                                      digest_size=16).hexdigest()  # the schema's 32 hex
                spread.append({**d, "ts": t, "user_id": f"{d['user_id']}~{c}",
                               "decision_id": did})
    return spread, _conversions(spread, every=4, seed=7)


def join_backlog(kafka: KafkaClientConfig, decisions_topic: str) -> tuple[list, list]:
    """The join's inputs (join_documents) from every decision of the decide run."""
    return join_documents([orjson.loads(v) for _, v in _read(kafka, decisions_topic)
                           if v is not None], at_least=JOIN_DECISIONS)


def run_ceiling(handler: str, inputs: list, partitions: int, tmp: Path, log=print) -> dict:
    """The decide or join handler alone on ``inputs`` (bench/ceiling.py), in its own process."""
    path = tmp / f"{handler}-core-inputs.json"
    path.write_bytes(orjson.dumps(inputs))
    done = subprocess.run([sys.executable, "-m", "streamagent.bench.ceiling", handler,
                           "--inputs", str(path), "--partitions", str(partitions)],
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=900)
    path.unlink()
    if done.returncode:
        raise RuntimeError(f"the {handler} ceiling failed: {done.stderr.decode()[-2000:]}")
    r = orjson.loads(done.stdout.splitlines()[-1])
    if handler == "decide":
        log(f"  decide_core (handler alone, no Kafka): {r['events']} events -> "
            f"{r['events_per_s']:,.0f} events/s ({r['us_per_event']:.0f} us an event)")
    else:
        log(f"  join_core (handler alone, no Kafka): {r['input_records']} records -> "
            f"{r['records_per_s']:,.0f} input records/s ({r['us_per_record']:.0f} us a record; "
            f"{r['rewards']} rewards and {r['transitions']} transitions out)")
    return r


def run_join(kafka: KafkaClientConfig, backlog: tuple[list, list], partitions: int, tmp: Path,
             log=print, profile: tuple[float, Path] | None = None) -> dict:
    """The join agent alone: a worker with no user events reads a backlog of decisions (the
    decide run's decision-log) and conversions; input records per second from the consumer
    group's committed offsets (committed every 0.5 s here), between 10% and 90% of the backlog,
    so neither start-up nor the last commit counts."""
    rid = uuid.uuid4().hex[:6]
    tdec, tconv, tev = f"bench-{rid}-decisions", f"bench-{rid}-conversions", f"bench-{rid}-events"
    outs = [f"bench-{rid}-rewards", f"bench-{rid}-transitions"]
    _create(kafka, [tdec, tconv, tev, tdec + ".dlq", tconv + ".dlq", tev + ".dlq",
                    f"bench-{rid}-coupons", *outs], partitions)
    decisions, conversions = backlog  # join_backlog
    _produce(kafka, tdec, decisions)
    _produce(kafka, tconv, conversions)
    n = len(decisions) + len(conversions)
    app_id = f"bench-join-{rid}"
    env = {**os.environ, **kafka.env(), "STREAMAGENT_APP_ID": app_id,
           "STREAMAGENT_DATA_DIR": str(tmp / app_id),
           "STREAMAGENT_TOPIC_USER_EVENTS": tev, "STREAMAGENT_TOPIC_DECISION_LOG": tdec,
           "STREAMAGENT_TOPIC_CONVERSIONS": tconv,
           "STREAMAGENT_TOPIC_COUPON_ACTIONS": f"bench-{rid}-coupons",
           "STREAMAGENT_TOPIC_REWARDS": outs[0], "STREAMAGENT_TOPIC_TRANSITIONS": outs[1],
           "STREAMAGENT_PARTITIONS": str(partitions), "STREAMAGENT_COMMIT_INTERVAL_S": "0.5",
           "STREAMAGENT_METRICS_PORT": "0", "STREAMAGENT_LOG_LEVEL": "warning",
           "STREAMAGENT_WORKER_ROLE": "join"}
    proc = subprocess.Popen([sys.executable, "-m", "streamagent.cli", "worker"], env=env,
                            stdout=open(tmp / "join.log", "wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    rss = RssSampler([proc.pid])
    if profile:
        subprocess.Popen([_py_spy(), "record", "--pid", str(proc.pid), "--rate", "200",
                          "--duration", str(int(profile[0])), "--output", str(profile[1]),
                          *profile[2:]],
                         stdout=open(tmp / "py-spy-join.log", "wb"), stderr=subprocess.STDOUT)
    try:
        points: list[tuple[float, int]] = []  # (time, records committed)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 600:
            group = join_group_id(app_id)  # the join worker's consumer group
            done = n - _behind(kafka, group, tdec) - _behind(kafka, group, tconv)
            points.append((time.time(), done))
            if done >= n:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"join worker exited with {proc.returncode}")
            time.sleep(0.25)
        rate = _rate(points, n)
        lo, hi = _window(points, n)
        from streamagent.ops.kafka import end_offsets

        # offsets are committed only once the outputs before them are delivered
        rewards, transitions = (end_offsets(kafka, t) for t in outs)
        result = {"input_records": n, "decisions": len(decisions), "conversions": len(conversions),
                  "records_per_s": rate, "complete": bool(points and points[-1][1] >= n),
                  "rewards": rewards, "transitions": transitions}
        if lo and hi:
            result["rss"] = rss_figures(rss.samples, lo[0], hi[0])
        log(f"  join    backlog: {len(decisions)} decisions + {len(conversions)} conversions "
            f"-> {rate:,.0f} input records/s ({rewards} rewards and {transitions} transitions "
            f"out)")
        return result
    finally:
        rss.stop()
        terminate(proc)


def _transitions(n: int, seed: int, prefix: str) -> list[dict]:
    """Synthetic transitions of the product's shape (features of its length, its actions):
    what the learner does per record does not depend on the values."""
    from streamagent.core.catalog import load_catalog
    from streamagent.core.features import FEATURE_NAMES

    na = load_catalog(None).n_actions
    nf = len(FEATURE_NAMES)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        out.append({"schema_version": 1, "decision_id": f"{prefix}-{i}",
                    "user_id": f"u{int(rng.integers(5000)):05d}", "ts": 1_767_225_600_000 + i,
                    "features": rng.random(nf).round(4).tolist(),
                    "action_index": int(rng.integers(na)),
                    "reward": float(rng.choice([0.0, 0.0, 0.0, 12.5])), "propensity": 0.5,
                    "policy_version": 0, "next_features": rng.random(nf).round(4).tolist(),
                    "next_allowed": [True] * na, "next_ts": 1_767_225_600_000 + i + 86_400_000,
                    "dt_ms": 86_400_000, "done": False})
    return out


def _window(points: list[tuple], total: float) -> tuple:
    """The first (time, units done, ...) points at 10% and at 90% of ``total`` (None if not
    reached): neither start-up nor the tail counts between them."""
    lo = next((p for p in points if p[1] >= 0.1 * total), None)
    hi = next((p for p in points if p[1] >= 0.9 * total), None)
    return lo, hi


def _rate(points: list[tuple], total: float, col: int = 1) -> float:
    """Units (column ``col`` of the points) per second between 10% and 90% of ``total``."""
    lo, hi = _window(points, total)
    if not lo or not hi or hi[0] <= lo[0]:
        return float("nan")
    return (hi[col] - lo[col]) / (hi[0] - lo[0])


def run_learner(kafka: KafkaClientConfig, partitions: int, tmp: Path, n: int, rate: float,
                seconds: float, users: int, log=print) -> dict:
    """The learner alone, then the loop's last leg.

    1. Ingest: ``n`` transitions in a backlog; transitions/s and gradient steps/s from the
       learner's own counters (/metrics), between 10% and 90% of the backlog.
    2. Freshness: a decide worker follows the learner's models while user events and
       transitions both arrive at ``rate``/s for ``seconds``. Each model version names the
       input offsets it has seen (meta ``trained_through``); a transition's freshness is from
       its append to the first decision made with the first version trained on it.
    """
    rid = uuid.uuid4().hex[:6]
    names = {k: f"bench-{rid}-{k}" for k in ("transitions", "models", "candidates", "events",
                                            "decisions", "coupons", "conversions", "rewards")}
    _create(kafka, [names["transitions"], names["events"], names["decisions"], names["coupons"],
                    names["conversions"], names["rewards"], names["transitions"] + ".dlq",
                    names["events"] + ".dlq", names["decisions"] + ".dlq",
                    names["conversions"] + ".dlq"], partitions)
    app_id, port = f"bench-learn-{rid}", free_port()
    common = {**os.environ, **kafka.env(), "STREAMAGENT_APP_ID": app_id,
              "STREAMAGENT_TOPIC_TRANSITIONS": names["transitions"],
              "STREAMAGENT_TOPIC_MODEL_UPDATES": names["models"],
              "STREAMAGENT_TOPIC_MODEL_CANDIDATES": names["candidates"],
              "STREAMAGENT_TOPIC_USER_EVENTS": names["events"],
              "STREAMAGENT_TOPIC_DECISION_LOG": names["decisions"],
              "STREAMAGENT_TOPIC_COUPON_ACTIONS": names["coupons"],
              "STREAMAGENT_TOPIC_CONVERSIONS": names["conversions"],
              "STREAMAGENT_TOPIC_REWARDS": names["rewards"],
              "STREAMAGENT_PARTITIONS": str(partitions), "STREAMAGENT_LOG_LEVEL": "warning"}
    _produce(kafka, names["transitions"], _transitions(n, seed=5, prefix=f"t{rid}"))
    learner = subprocess.Popen(
        [sys.executable, "-m", "streamagent.cli", "learner"],
        env={**common, "STREAMAGENT_DATA_DIR": str(tmp / f"{app_id}-learner"),
             "STREAMAGENT_LEARNER_METRICS_PORT": str(port), "STREAMAGENT_LOG_LEVEL": "info"},
        stdout=open(tmp / "learner.log", "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    worker = None
    try:
        points: list[tuple[float, float, float]] = []  # (time, transitions, gradient steps)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 600:
            if learner.poll() is not None:
                raise RuntimeError(f"learner exited with {learner.returncode}")
            m = scrape(port)
            if not m:  # not answering yet
                time.sleep(0.5)
                continue
            done = m.get("streamagent_learning_transitions_total", 0.0)
            points.append((time.time(), done, m.get("streamagent_learning_updates_total", 0.0)))
            if done >= n:
                break
            time.sleep(0.5)
        per_s, steps_per_s = _rate(points, n), _rate(points, n, col=2)
        log(f"  learner ingest: {n} transitions -> {per_s:,.0f} transitions/s, "
            f"{steps_per_s:,.0f} gradient steps/s")
        result = {"transitions": n, "transitions_per_s": per_s,
                  "gradient_steps_per_s": steps_per_s,
                  "steps_final": points[-1][2] if points else 0}
        if seconds <= 0 or rate <= 0:
            return result
        # freshness: a worker deciding with the learner's models, both inputs paced
        worker = subprocess.Popen(
            [sys.executable, "-m", "streamagent.cli", "worker"],
            env={**common, "STREAMAGENT_DATA_DIR": str(tmp / f"{app_id}-worker"),
                 "STREAMAGENT_METRICS_PORT": "0"},
            stdout=open(tmp / "learner-worker.log", "wb"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        import threading

        # warm up: the worker's first decision is out before the clock starts
        _produce(kafka, names["events"], _events(200, users, seed=97, prefix=f"w{rid}"))
        if _wait_for(kafka, names["decisions"], 1, 120, worker) < 1:
            raise RuntimeError("the freshness worker made no decision in 120 s")

        count = int(rate * seconds)
        feed = threading.Thread(target=_produce, args=(kafka, names["transitions"],
                                                       _transitions(count, seed=6,
                                                                    prefix=f"fresh{rid}"), rate))
        feed.start()
        _produce(kafka, names["events"], _events(count, users, seed=98, prefix=f"fr{rid}"),
                 rate=rate)
        feed.join()
        time.sleep(45.0)  # the last transitions' version: SNAPSHOT_INTERVAL_S (30 s) and a decision
        result["freshness_s"] = _freshness(kafka, names)
        f = result["freshness_s"]
        if f:
            log(f"  model freshness (transition append -> first decision by a version trained on "
                f"it), {f['n']} transitions: p50 {f['p50']:.1f} s, p99 {f['p99']:.1f} s, "
                f"max {f['max']:.1f} s")
        return result
    finally:
        if worker is not None:
            terminate(worker)
        terminate(learner)


def _freshness(kafka: KafkaClientConfig, names: dict) -> dict | None:
    """Per paced transition (decision id "fresh..."): its append time to the first decision-log
    record of the first model version whose ``trained_through`` covers it (or of a later one)."""
    from streamagent.core.qnet import ModelSnapshot
    from streamagent.ops.tail import read_all

    versions = []  # (version, trained_through)
    for m in read_all(kafka, names["models"], idle=2.0, max_wait=60):
        if m.value():
            snap = ModelSnapshot.from_bytes(m.value())
            versions.append((snap.version, {int(k): v for k, v in
                                            (snap.meta.get("trained_through") or {}).items()}))
    first_use: dict[int, int] = {}
    for m in read_all(kafka, names["decisions"], idle=2.0, max_wait=300):
        if m.value():
            v = orjson.loads(m.value())["policy_version"]
            first_use[v] = min(first_use.get(v, 1 << 62), m.timestamp()[1])
    lat = []
    for m in read_all(kafka, names["transitions"], idle=2.0, max_wait=300):
        if not orjson.loads(m.value())["decision_id"].startswith("fresh"):
            continue
        p, off, appended = m.partition(), m.offset(), m.timestamp()[1]
        seen = [v for v, tt in versions if tt.get(p, 0) > off]
        used = [t for v, t in first_use.items() if seen and v >= min(seen)]
        if used:
            lat.append((min(used) - appended) / 1000.0)
    a = np.array(lat)
    if not a.size:
        return None
    return {"n": int(a.size), "p50": float(np.percentile(a, 50)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max()),
            "versions": len(versions)}


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
    """The stable keys of the JSON report (``decide.events_per_s``,
    ``decide.latency_ms.p99_at_50pct``, ``decide.rss.growth``, ...)."""
    names = {"plain": "plain", "faust": "faust_forward", "count": "faust_count",
             "decide": "decide", "decide2": "decide_2_workers"}
    out: dict = {}
    for system, r in results.items():
        key = names.get(system, system)
        if system in ("join", "learner"):
            continue
        if system == "join_core":
            out["join_core.records_per_s"] = r["records_per_s"]
            continue
        out[f"{key}.events_per_s"] = r.get("events_per_s")
        for label, lat in (r.get("latency_by_load") or {}).items():
            for q in ("p50", "p95", "p99"):
                if lat and q in lat:
                    out[f"{key}.latency_ms.{q}_at_{label}"] = lat[q]
        if r.get("rss"):
            out[f"{key}.rss.growth"] = r["rss"]["growth"]
            out[f"{key}.rss.last_fifth_mib"] = r["rss"]["last_fifth_mib"]
    count = (results.get("count") or {}).get("events_per_s")
    if count and "decide" in results:
        out["decide.vs_faust_count"] = results["decide"]["events_per_s"] / count
    if count and "decide_core" in results:  # the handler's own ceiling against the target's
        out["decide_core.vs_faust_count"] = results["decide_core"]["events_per_s"] / count
    if "join" in results:
        out["join.records_per_s"] = results["join"]["records_per_s"]
        if results["join"].get("rss"):
            out["join.rss.growth"] = results["join"]["rss"]["growth"]
    if "learner" in results:
        lr = results["learner"]
        out["learner.transitions_per_s"] = lr["transitions_per_s"]
        out["learner.gradient_steps_per_s"] = lr["gradient_steps_per_s"]
        for q in ("p50", "p99", "max"):
            if lr.get("freshness_s"):
                out[f"model_freshness_s.{q}"] = lr["freshness_s"][q]
    if "decide2" in results and "decide" in results:
        out["decide_2_workers.vs_decide"] = (results["decide2"]["events_per_s"]
                                             / results["decide"]["events_per_s"])
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
        for needs in ("join", "join_core"):
            if needs in systems and "decide" not in systems:
                raise SystemExit(f"--systems {needs} reads the decide run's decisions: add decide")
        order = ["decide"] + [s for s in systems if s != "decide"] if "decide" in systems else systems
        loads = [float(x) for x in args.load.split(",") if x.strip()]
        # the baselines are paced once, at half of decide's peak (or the one --rate)
        fixed: list = [("rate", args.rate)] if args.rate else []
        join_in = None  # the join's inputs (join_backlog), for join and join_core
        for system in order:
            if system == "decide_core":
                results[system] = run_ceiling("decide", backlog, args.partitions, tmp,
                                              log=con.print)
                continue
            if system in ("join", "join_core") and join_in is None:  # read once for both
                join_in = join_backlog(kafka, results["decide"]["output_topic"])
            if system == "join_core":
                from streamagent.bench.ceiling import join_inputs

                results[system] = run_ceiling("join", join_inputs(*join_in), args.partitions,
                                              tmp, log=con.print)
                continue
            if system == "join":
                results["join"] = run_join(
                    kafka, join_in, args.partitions, tmp,
                    log=con.print, profile=(args.profile, Path(args.out).with_name(
                        "join-flame.svg")) if args.profile else None)
                continue
            if system == "learner":
                results["learner"] = run_learner(kafka, args.partitions, tmp, args.transitions,
                                                 args.freshness_rate, args.freshness_seconds,
                                                 args.users, log=con.print)
                continue
            if system == "decide2":  # throughput only: does a second worker add any?
                rates = lambda peak: []  # noqa: E731
            elif args.rate:
                rates = lambda peak: fixed  # noqa: E731
            elif system == "decide":
                rates = lambda peak: [(f"{f * 100:g}pct", max(50.0, round(peak * f, -1)))  # noqa: E731
                                      for f in loads]
            else:
                rates = lambda peak: fixed  # noqa: E731
            r = run_system(system, kafka, backlog, triggers, args.partitions, tmp, rates,
                           args.latency_seconds, args.users, log=con.print,
                           profile=profile if system == "decide" else None,
                           worker_role=args.worker_role)
            if system == "decide" and not args.rate:
                half = (r.get("latency_by_load") or {}).get("50pct")
                fixed = [("50pct", half["rate_events_per_s"] if half else
                          max(50.0, round(r["events_per_s"] / 2, -1)))]
            results[system] = r
    finally:
        if broker_cfg:
            stop(broker_cfg, log=lambda m: con.print(f"[dim]{m}[/dim]"))
        _keep_only_logs(tmp)
        con.print(f"[dim]the systems' logs: {tmp}[/dim]")
    table = Table(title="pipeline benchmark (one process each, same broker, same run)")
    for col in ("system", "events/s", "vs faust forward", "vs faust count", "paced at /s",
                "p50 ms", "p95 ms", "p99 ms", "RSS drift"):
        table.add_column(col, justify="right")
    base = results.get("faust", {}).get("events_per_s")
    ceiling = results.get("count", {}).get("events_per_s")
    for name, r in results.items():
        if name in ("join", "learner", "join_core"):
            continue
        loads = list((r.get("latency_by_load") or {}).items()) or [("", None)]
        for i, (label, lat) in enumerate(loads):
            lat = lat or {}
            rss = r.get("rss")
            head = ([name, f"{r['events_per_s']:,.0f}",
                     f"{r['events_per_s'] / base:.0%}" if base else "-",
                     f"{r['events_per_s'] / ceiling:.0%}" if ceiling else "-"] if i == 0
                    else ["", "", "", ""])
            paced = (f"{lat['rate_events_per_s']:,.0f}"
                     + (f" ({label.replace('pct', '%')})" if label.endswith("pct") else "")
                     if lat else "-")
            table.add_row(*head, paced,
                          *(f"{lat[k]:.0f}" if lat else "-" for k in ("p50", "p95", "p99")),
                          f"{rss['growth'] - 1:+.1%}" if rss and i == 0 else "")
    con.print(table)
    if "join" in results:
        j = results["join"]
        con.print(f"join: {j['records_per_s']:,.0f} input records/s ({j['decisions']} decisions + "
                  f"{j['conversions']} conversions in, {j['rewards']} rewards + "
                  f"{j['transitions']} transitions out)")
    if "join_core" in results:
        con.print(f"join_core (the join handler alone, no Kafka): "
                  f"{results['join_core']['records_per_s']:,.0f} input records/s")
    if "learner" in results:
        lr = results["learner"]
        f = lr.get("freshness_s")
        con.print(f"learner: {lr['transitions_per_s']:,.0f} transitions/s, "
                  f"{lr['gradient_steps_per_s']:,.0f} gradient steps/s; model freshness "
                  + (f"p50 {f['p50']:.1f} s, p99 {f['p99']:.1f} s, max {f['max']:.1f} s"
                     if f else "not measured"))
    doc = {"events": args.events, "users": args.users, "partitions": args.partitions,
           "cpus": os.cpu_count(), "worker_role": args.worker_role, "results": results,
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
