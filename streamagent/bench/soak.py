"""The soak: millions of events through one worker and the learner, with a user population that
churns, watching memory and state size (issue 14: "table sizes level off").

`streamagent bench soak` (or `make soak`, or `python -m streamagent.bench.soak`) starts a local broker of its own in a temporary directory (or uses
``--bootstrap``: a broker you run, reached with your STREAMAGENT_KAFKA_* security settings),
then one decide+join worker and the learner, each its own process, as in production. It
produces ``--events`` user events (default 2,000,000) with orders that follow some sessions,
paced at ``--rate`` and held back while the worker lags more than ``--max-lag`` messages.

The users churn in event time: ``--active-users`` are active at any moment, each stays for an
exponentially distributed lifetime (mean ``--lifetime-days``) and then never comes back, and
a new user takes the place. Event time advances ``--days`` over the run, far faster than wall
time, and the user-state TTL (``--ttl-days``, STREAMAGENT_USER_STATE_TTL_DAYS) is short, so the
TTL keeps expiring the users who left. Without it the tables would hold every user ever seen
(about ``active + active * days / lifetime``); with it, about
``active * (1 + ttl / lifetime)``.

Every ``--sample-seconds`` it records: worker and learner RSS (/proc), the size of the
worker's RocksDB directory (per table), the worker's user-state gauge, events processed,
decisions, expiries, pending rewards and the worker's input lag (its /metrics), and the size
of the changelog topics on the broker (own broker only). It writes every sample to
``<out>.csv``, the summary to ``<out>.json`` and a plot to ``--png``, and prints the summary:
RSS in the first quarter of the run against the last, the RocksDB size trend, the users level.
"""
from __future__ import annotations

import csv
import heapq
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import orjson

from streamagent.metrics import scrape

from streamagent.units import DAY_MS

RESULTS = Path("bench-results")
T0 = 1_767_225_600_000  # 2026-01-01
MINUTE_MS = 60_000
# what happens after a session starts (as streamagent.sim.synthetic): views and searches,
# sometimes a cart, rarely a purchase, then the session ends
_FOLLOW = (("page_view", 0.55), ("search", 0.2), ("add_to_cart", 0.15), ("purchase", 0.04),
           ("session_end", 0.06))


def add_arguments(p) -> None:
    p.add_argument("--events", type=int, default=2_000_000, help="user events to produce")
    p.add_argument("--rate", type=float, default=2000.0,
                   help="events/s to produce at most (0: as fast as the worker keeps up)")
    p.add_argument("--max-lag", type=int, default=20_000,
                   help="hold production back while the worker is this many messages behind "
                        "on its inputs (user-events, and decision-log and conversions), as of "
                        "the last sample: with --rate 0 the producer can run far ahead before "
                        "the first one")
    p.add_argument("--active-users", type=int, default=10_000,
                   help="users active at any moment of event time")
    p.add_argument("--lifetime-days", type=float, default=4.0,
                   help="mean event time a user stays active before leaving for good")
    p.add_argument("--days", type=float, default=60.0, help="event time the run covers")
    p.add_argument("--ttl-days", type=float, default=3.0,
                   help="STREAMAGENT_USER_STATE_TTL_DAYS for the worker")
    p.add_argument("--order-rate", type=float, default=0.05,
                   help="share of sessions followed by an order (on conversions)")
    p.add_argument("--train-every", type=int, default=16,
                   help="STREAMAGENT_TRAIN_EVERY for the learner: the soak watches state and "
                        "memory, and a learner training every 2 transitions (the default) "
                        "takes half the CPU of a 2-core machine from the worker")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--sample-seconds", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--bootstrap", default=None,
                   help="use this broker (default: start a local one for the run)")
    p.add_argument("--out", default=str(RESULTS / "soak.json"),
                   help="summary JSON (or a directory: soak.json in it); the samples go next "
                        "to it as .csv")
    p.add_argument("--png", default="docs/img/soak.png", help="the plot ('' for none)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (broker data, tables, logs)")


# ----------------------------------------------------------------------------- the shop


class ChurningShop:
    """User events and orders, in event-time order, from a population that churns."""

    def __init__(self, n_events: int, active: int, lifetime_days: float, days: float,
                 order_rate: float, seed: int, prefix: str):
        self.n, self.order_rate, self.prefix = n_events, order_rate, prefix
        self.rng = random.Random(seed)
        self.step_ms = days * DAY_MS / n_events
        # users leaving per event, on average: active / lifetime, in events
        self.leave_per_event = active * self.step_ms / (lifetime_days * DAY_MS)
        self.active = [self._new_user() for _ in range(active)]
        self.in_session: set[str] = set()
        self.orders: list[tuple[int, str, str]] = []  # (ts, user, order id), a heap
        self.users_seen = len(self.active)
        self.events_made = self.orders_made = 0
        self.ts = T0

    def _new_user(self) -> str:
        n = getattr(self, "_next", 0)
        self._next = n + 1
        return f"{self.prefix}u{n:08d}"

    def _churn(self) -> None:
        leaving = int(self.leave_per_event)
        if self.rng.random() < self.leave_per_event - leaving:
            leaving += 1
        for _ in range(leaving):
            i = self.rng.randrange(len(self.active))
            self.in_session.discard(self.active[i])
            self.active[i] = self._new_user()
            self.users_seen += 1

    def records(self) -> Iterator[tuple[str, str, dict]]:
        """("event" | "order", user, document), in event-time order."""
        rng = self.rng
        kinds, weights = zip(*_FOLLOW)
        for i in range(self.n):
            self.ts = ts = T0 + int(i * self.step_ms)
            while self.orders and self.orders[0][0] <= ts:
                ots, user, oid = heapq.heappop(self.orders)
                self.orders_made += 1
                yield "order", user, {"order_id": oid, "user_id": user, "ts": ots,
                                      "amount": round(rng.uniform(10, 250), 2)}
            self._churn()
            u = rng.choice(self.active)
            if u not in self.in_session:
                typ = "session_start"
                self.in_session.add(u)
                if rng.random() < self.order_rate:
                    heapq.heappush(self.orders, (ts + rng.randrange(5, 120) * MINUTE_MS, u,
                                                 f"{self.prefix}o{i}"))
            else:
                typ = rng.choices(kinds, weights)[0]
                if typ == "session_end":
                    self.in_session.discard(u)
            ev = {"event_id": f"{self.prefix}e{i}", "user_id": u, "type": typ, "ts": ts,
                  "device": ("mobile", "desktop", "tablet")[i % 3]}
            if typ in ("page_view", "add_to_cart"):
                ev.update(item_id=f"sku-{rng.randrange(5000)}", category=rng.choice(
                    ("shoes", "books", "electronics", "grocery", "toys")),
                          price=round(rng.uniform(3, 150), 2))
            elif typ == "purchase":
                ev["amount"] = round(rng.uniform(10, 250), 2)
            self.events_made += 1
            yield "event", u, ev

    def expected_users(self, ttl_days: float, lifetime_days: float) -> dict:
        active = len(self.active)
        return {"with_ttl": round(active * (1 + ttl_days / lifetime_days)),
                "without_ttl": self.users_seen}


# ----------------------------------------------------------------------------- probes


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        return None
    return None


def dir_mb(path: Path, match: str | None = None) -> float:
    """Bytes of the files under ``path`` (in directories whose name contains ``match``)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        if match is not None and match not in root:
            continue
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total / 1e6


def total(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


@dataclass
class Run:
    env: dict
    tmp: Path
    worker_port: int
    learner_port: int
    broker_dir: Path | None
    samples: list[dict] = field(default_factory=list)
    produced: int = 0
    orders: int = 0
    lag: float = 0.0
    started: float = field(default_factory=time.monotonic)
    # the worker's error and dead-letter counters by label, at the last sample
    problems: dict = field(default_factory=dict)


def sample(run: Run, shop: ChurningShop, worker, learner) -> dict:
    wm, lm = scrape(run.worker_port), scrape(run.learner_port)
    tables = run.tmp / "data" / "tables"
    app = run.env["STREAMAGENT_APP_ID"]
    uev = run.env["STREAMAGENT_TOPIC_USER_EVENTS"]
    inputs = (uev, run.env["STREAMAGENT_TOPIC_CONVERSIONS"], run.env["STREAMAGENT_TOPIC_DECISION_LOG"])
    row = {
        "t_s": round(time.monotonic() - run.started, 1),
        "produced": run.produced,
        "orders": run.orders,
        "processed": int(total(wm, "streamagent_ingest_events_total")),
        "decisions": int(total(wm, "streamagent_decision_decisions_total")),
        "event_day": round((shop.ts - T0) / DAY_MS, 2),
        "users_seen": shop.users_seen,
        "users_gauge": int(wm.get("streamagent_state_users", -1)),
        "expired_user_state": int(wm.get('streamagent_state_expired_total{table="user-state"}', 0)),
        "expired_join_state": int(wm.get('streamagent_state_expired_total{table="join-state"}', 0)),
        "pending_rewards": int(wm.get("streamagent_reward_pending_decisions", 0)),
        "lag": int(wm.get(f'streamagent_stream_consumer_lag_messages{{topic="{uev}"}}', 0)),
        # the join's inputs too: it works through decision-log and conversions after decide
        "lag_all": int(sum(wm.get(f'streamagent_stream_consumer_lag_messages{{topic="{t}"}}', 0)
                           for t in inputs)),
        "worker_rss_mb": rss_mb(worker.pid),
        "learner_rss_mb": rss_mb(learner.pid),
        "rocksdb_mb": round(dir_mb(tables), 2),
        "rocksdb_user_state_mb": round(dir_mb(tables, "user-state"), 2),
        "rocksdb_join_state_mb": round(dir_mb(tables, "join-state"), 2),
        "learned": int(lm.get("streamagent_learning_transitions_total", 0)),
        "model_version": int(lm.get("streamagent_learning_model_version", 0)),
        "errors": int(total(wm, "streamagent_stream_processing_errors_total")),
        "dead_letters": int(total(wm, "streamagent_ingest_dead_letters_total")),
    }
    run.problems = {k: v for k, v in wm.items() if v and k.startswith((
        "streamagent_stream_processing_errors_total", "streamagent_ingest_dead_letters_total"))}
    if run.broker_dir is not None:
        kraft = run.broker_dir / "kraft"
        row["changelog_user_state_mb"] = round(dir_mb(kraft, f"{app}-user-state-changelog"), 1)
        row["changelog_join_state_mb"] = round(dir_mb(kraft, f"{app}-join-state-changelog"), 1)
    run.lag = row["lag_all"]
    return row


# ----------------------------------------------------------------------------- the run


def _proc(cmd: str, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "streamagent.cli", cmd], env=env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)


def _wait_log(proc: subprocess.Popen, log: Path, marker: bytes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{log.name}: exited {proc.returncode}:\n{_tail(log)}")
        if marker in log.read_bytes():
            return
        time.sleep(0.5)
    raise RuntimeError(f"{log.name}: not ready in {timeout:.0f} s:\n{_tail(log)}")


def _tail(log: Path, n: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def produce(run: Run, kafka, shop: ChurningShop, rate: float, max_lag: int,
            stop: threading.Event) -> None:
    from streamagent.ops.kafka import make_producer, send

    uev, conv = run.env["STREAMAGENT_TOPIC_USER_EVENTS"], run.env["STREAMAGENT_TOPIC_CONVERSIONS"]
    p = make_producer(kafka)
    t0 = time.monotonic()
    for kind, user, doc in shop.records():
        if stop.is_set():
            break
        send(p, uev if kind == "event" else conv, user.encode(), orjson.dumps(doc))
        if kind == "order":
            run.orders += 1
            continue
        run.produced += 1
        if run.produced % 500 == 0:
            while run.lag > max_lag and not stop.is_set():  # the worker is behind: wait
                p.poll(0.2)
            if rate:
                ahead = t0 + run.produced / rate - time.monotonic()
                if ahead > 0:  # (poll returns early when a delivery report comes)
                    time.sleep(ahead)
                    p.poll(0)
                elif ahead < -5:  # held back by the lag: no catching up in a burst
                    t0 = time.monotonic() - run.produced / rate
    p.flush(120)


def main(args) -> int:
    from streamagent.ops.local import interrupt_on_termination

    # a SIGTERM or SIGHUP too: stop, clean up, write what was sampled
    with interrupt_on_termination():
        return _main(args)


def _main(args) -> int:
    from streamagent.ops.broker import BrokerConfig, start, stop
    from streamagent.ops.kafka import kafka_client
    from streamagent.ops.local import free_port, free_port_pair, terminate

    if Path(args.out).is_dir():  # a directory: the usual file names in it (checked up front,
        args.out = str(Path(args.out) / "soak.json")  # not after an hour of soak)
    tmp = Path(tempfile.mkdtemp(prefix="sa-soak-"))
    rid = uuid.uuid4().hex[:6]
    broker_cfg = None
    if args.bootstrap:
        from streamagent.config import Settings

        kafka = kafka_client(Settings(), bootstrap=args.bootstrap)
    else:
        broker_cfg = BrokerConfig(data_dir=tmp / "kafka", port=free_port_pair(), heap="1g",
                                  default_partitions=args.partitions)
        start(broker_cfg, log=lambda m: print(m, flush=True))
        kafka = broker_cfg.client()
    prefix = f"soak-{rid}"
    env = {**os.environ, **kafka.env(),
           "STREAMAGENT_APP_ID": f"sa-{prefix}",
           "STREAMAGENT_DATA_DIR": str(tmp / "data"),
           "STREAMAGENT_PARTITIONS": str(args.partitions),
           **{f"STREAMAGENT_TOPIC_{t.upper().replace('-', '_')}": f"{prefix}-{t}" for t in (
               "user-events", "conversions", "coupon-actions", "decision-log", "rewards",
               "transitions", "model-updates", "model-candidates")},
           "STREAMAGENT_USER_STATE_TTL_DAYS": str(args.ttl_days),
           # shorter than the TTL, as docs/RELIABILITY.md asks; the join's records are
           # pending (so kept) for the attribution window and until the next decision or the
           # transition horizon: both well under the TTL too
           "STREAMAGENT_CAP_WINDOW_DAYS": str(min(1.0, args.ttl_days / 2)),
           "STREAMAGENT_ATTRIBUTION_WINDOW_HOURS": str(min(24.0, args.ttl_days * 8)),
           "STREAMAGENT_TRANSITION_HORIZON_DAYS": str(min(2.0, args.ttl_days / 1.5)),
           "STREAMAGENT_TRAIN_EVERY": str(args.train_every),
           "STREAMAGENT_METRICS_PORT": str(free_port()),
           "STREAMAGENT_LEARNER_METRICS_PORT": str(free_port()),
           "STREAMAGENT_LOG_LEVEL": "warning"}
    run = Run(env, tmp, int(env["STREAMAGENT_METRICS_PORT"]),
              int(env["STREAMAGENT_LEARNER_METRICS_PORT"]), broker_cfg.data_dir if broker_cfg else None)
    shop = ChurningShop(args.events, args.active_users, args.lifetime_days, args.days,
                        args.order_rate, args.seed, prefix=f"{rid}-")
    worker = learner = None
    halt = threading.Event()
    print(f"soak: {args.events:,} events over {args.days:g} days of event time, "
          f"{args.active_users:,} users active (mean stay {args.lifetime_days:g} days), "
          f"TTL {args.ttl_days:g} days, at most {args.rate:g} events/s; broker "
          f"{kafka.bootstrap}; work dir {tmp}", flush=True)
    try:
        worker = _proc("worker", {**env, "STREAMAGENT_LOG_LEVEL": "info"}, tmp / "worker.log")
        _wait_log(worker, tmp / "worker.log", b"Worker]: Ready", 180)
        learner = _proc("learner", {**env, "STREAMAGENT_LOG_LEVEL": "info"}, tmp / "learner.log")
        _wait_log(learner, tmp / "learner.log", b"learner: model v", 180)
        producer = threading.Thread(target=produce, name="soak-producer", daemon=True,
                                    args=(run, kafka, shop, args.rate, args.max_lag, halt))
        run.started = time.monotonic()
        producer.start()
        drained_at = done_at = None
        last = None
        while True:
            time.sleep(args.sample_seconds)
            for name, proc, log in (("worker", worker, "worker.log"),
                                    ("learner", learner, "learner.log")):
                if proc.poll() is not None:
                    raise RuntimeError(f"the {name} exited {proc.returncode}:\n"
                                       f"{_tail(tmp / log)}")
            row = sample(run, shop, worker, learner)
            run.samples.append(row)
            keep_sample(Path(args.out).with_suffix(".csv"), row, first=len(run.samples) == 1)
            rate = ((row["processed"] - last["processed"]) / (row["t_s"] - last["t_s"])
                    if last else 0.0)
            last = row
            print(f"[{row['t_s']:6.0f} s] day {row['event_day']:5.1f}  produced "
                  f"{row['produced']:>9,}  processed {row['processed']:>9,} ({rate:5.0f}/s)  "
                  f"lag {row['lag']:>6,} (all {row['lag_all']:>6,})  users {row['users_gauge']:>7,} of "
                  f"{row['users_seen']:>7,} seen  RSS worker {row['worker_rss_mb'] or 0:5.0f} MB"
                  f" learner {row['learner_rss_mb'] or 0:5.0f} MB  RocksDB "
                  f"{row['rocksdb_mb']:6.1f} MB", flush=True)
            if not producer.is_alive():
                done_at = done_at or time.monotonic()
                if row["processed"] + row["dead_letters"] >= run.produced and not row["lag_all"]:
                    drained_at = drained_at or time.monotonic()
                if drained_at and time.monotonic() - drained_at >= 3 * args.sample_seconds:
                    break  # a few samples at rest after the last event
                if time.monotonic() - done_at > 900:
                    print("the worker did not catch up within 15 min of the last event",
                          flush=True)
                    break
    except KeyboardInterrupt:
        print("interrupted: writing what was sampled", flush=True)
    finally:
        halt.set()
        for proc in (worker, learner):
            if proc is not None:
                terminate(proc, 60)
        if broker_cfg is not None:
            stop(broker_cfg, log=lambda m: print(m, flush=True))
    summary = summarise(run, shop, args)
    summary["problems"] = run.problems
    write(run, summary, args)
    report(summary)
    if run.problems:  # what the worker said about them
        said = [line for line in (tmp / "worker.log").read_text(errors="replace").splitlines()
                if any(w in line for w in ("WARNING", "ERROR", "CRITICAL"))]
        print("errors and dead letters by label:", run.problems)
        print("the worker's last warnings:\n" + "\n".join(said[-40:]), flush=True)
    if args.keep:
        print(f"kept {tmp}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


# ----------------------------------------------------------------------------- results


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 1) if xs else None


def _slope_per_million(rows: list[dict], key: str) -> float | None:
    """Least-squares slope of ``key`` against events processed, per million events."""
    pts = [(r["processed"] / 1e6, r[key]) for r in rows if r.get(key) is not None]
    if len(pts) < 3:
        return None
    n = len(pts)
    mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
    var = sum((x - mx) ** 2 for x, _ in pts)
    return round(sum((x - mx) * (y - my) for x, y in pts) / var, 2) if var else None


def _rocksdb_options() -> dict | None:
    try:
        from streamagent.stream.app import ROCKSDB_OPTIONS
    except ImportError:  # a release before the worker set its own
        return None
    return dict(ROCKSDB_OPTIONS)


def summarise(run: Run, shop: ChurningShop, args) -> dict:
    rows = run.samples
    n = max((r["processed"] for r in rows), default=0)
    q1 = [r for r in rows if r["processed"] <= n / 4]
    q4 = [r for r in rows if r["processed"] >= 3 * n / 4]
    half = [r for r in rows if r["processed"] >= n / 2]
    out: dict = {
        "params": {k: getattr(args, k) for k in (
            "events", "rate", "max_lag", "active_users", "lifetime_days", "days", "ttl_days",
            "order_rate", "train_every", "partitions", "sample_seconds", "seed")},
        "cpus": os.cpu_count(),
        "rocksdb_options": _rocksdb_options(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "events_produced": run.produced, "orders_produced": run.orders,
        "events_processed": n, "samples": len(rows),
        "wall_s": rows[-1]["t_s"] if rows else 0.0,
        "users_seen": shop.users_seen,
        "users_expected": shop.expected_users(args.ttl_days, args.lifetime_days),
    }
    for key in ("worker_rss_mb", "learner_rss_mb", "rocksdb_mb", "rocksdb_user_state_mb",
                "rocksdb_join_state_mb", "users_gauge", "changelog_user_state_mb",
                "changelog_join_state_mb"):
        if not any(r.get(key) is not None for r in rows):
            continue
        out[key] = {"first_quarter_mean": _mean(r.get(key) for r in q1),
                    "last_quarter_mean": _mean(r.get(key) for r in q4),
                    "max": max((r[key] for r in rows if r.get(key) is not None), default=None),
                    "end": rows[-1].get(key),
                    "slope_per_million_events_second_half": _slope_per_million(half, key)}
    if rows:
        last = rows[-1]
        out.update({k: last[k] for k in ("decisions", "expired_user_state",
                                          "expired_join_state", "errors", "dead_letters",
                                          "learned", "model_version")})
        busy = [r for r in rows if r["produced"] < run.produced]
        out["events_per_s"] = round(n / rows[-1]["t_s"], 1) if rows[-1]["t_s"] else None
        out["max_lag"] = max((r["lag"] for r in busy), default=0)
    return out


def keep_sample(path: Path, row: dict, first: bool) -> None:
    """Append the sample to the CSV as it comes (a run stopped from outside keeps its data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w" if first else "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if first:
            w.writeheader()
        w.writerow(row)


def write(run: Run, summary: dict, args) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    csv_path = out.with_suffix(".csv")
    if run.samples:
        keys = list(dict.fromkeys(k for r in run.samples for k in r))
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(run.samples)
    print(f"wrote {out} and {csv_path}")
    if args.png and run.samples:
        plot(run.samples, summary, Path(args.png))
        print(f"wrote {args.png}")


def plot(rows: list[dict], summary: dict, png: Path) -> None:
    from streamagent.extras import require

    require("demo", "matplotlib", what="the soak's plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["processed"] / 1e6 for r in rows]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)

    def panel(a, title: str, ylabel: str, series: list[tuple[str, str, str]]):
        for key, style, label in series:
            a.plot(x, [r[key] for r in rows], style, label=label)
        a.set_ylabel(ylabel)
        a.set_ylim(bottom=0)
        a.set_title(title)
        return a

    panel(ax[0][0], "process memory", "RSS (MB)", [
        ("worker_rss_mb", "-", "worker"), ("learner_rss_mb", "-", "learner")]).legend()
    panel(ax[0][1], "worker's RocksDB directory", "MB on disk", [
        ("rocksdb_mb", "-", "all tables"), ("rocksdb_user_state_mb", "-", "user-state"),
        ("rocksdb_join_state_mb", "-", "join-state")]).legend()
    a = panel(ax[1][0], "user-state entries", "users", [
        ("users_gauge", "-", "users in user-state (gauge)"),
        ("users_seen", "--", "users seen so far")])
    a.axhline(summary["users_expected"]["with_ttl"], color="grey", lw=0.8,
              label="expected level with the TTL")
    a.set_xlabel("events processed (millions)")
    a.legend()
    a = panel(ax[1][1], "lag and event time", "messages behind", [
        ("lag", "-", "decide's lag (user-events)"),
        ("lag_all", "-", "all inputs (join's included)")])
    a.set_xlabel("events processed (millions)")
    a2 = a.twinx()
    a2.plot(x, [r["event_day"] for r in rows], color="C2", label="event time (day)")
    a2.set_ylabel("event-time day produced")
    a.legend(loc="upper left")
    a2.legend(loc="upper right")
    p = summary["params"]
    fig.suptitle(f"soak: {summary['events_processed']:,} events, {p['active_users']:,} active "
                 f"users churning (mean stay {p['lifetime_days']:g} d), TTL {p['ttl_days']:g} d "
                 f"of event time, {p['days']:g} days; {summary['wall_s'] / 60:.0f} min on "
                 f"{summary['cpus']} cores", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def report(s: dict) -> None:
    def f(v) -> str:
        return "-" if v is None else f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.1f}"

    def line(label: str, key: str, unit: str) -> str:
        d = s.get(key)
        if not d:
            return f"  {label:22} -"
        return (f"  {label:22} first quarter {f(d['first_quarter_mean']):>8} {unit}, last "
                f"quarter {f(d['last_quarter_mean']):>8} {unit} (max {f(d['max'])}, end "
                f"{f(d['end'])}; second half: {f(d['slope_per_million_events_second_half'])} "
                f"{unit} per million events)")

    print(f"\nsoak summary: {s['events_processed']:,} events processed of "
          f"{s['events_produced']:,} produced (+{s['orders_produced']:,} orders) in "
          f"{s['wall_s'] / 60:.1f} min ({s.get('events_per_s')} events/s), "
          f"{s.get('decisions', 0):,} decisions, model v{s.get('model_version', 0)}, "
          f"{s.get('errors', 0)} errors, {s.get('dead_letters', 0)} dead letters")
    for label, key, unit in (("worker RSS", "worker_rss_mb", "MB"),
                             ("learner RSS", "learner_rss_mb", "MB"),
                             ("RocksDB, all tables", "rocksdb_mb", "MB"),
                             ("RocksDB, user-state", "rocksdb_user_state_mb", "MB"),
                             ("RocksDB, join-state", "rocksdb_join_state_mb", "MB"),
                             ("users gauge", "users_gauge", ""),
                             ("changelog user-state", "changelog_user_state_mb", "MB"),
                             ("changelog join-state", "changelog_join_state_mb", "MB")):
        print(line(label, key, unit))
    e = s["users_expected"]
    print(f"  users seen {s['users_seen']:,}; expected level with the TTL about "
          f"{e['with_ttl']:,}; expired by the TTL: user-state {s.get('expired_user_state', 0):,}, "
          f"join-state {s.get('expired_join_state', 0):,}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m streamagent.bench.soak",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
