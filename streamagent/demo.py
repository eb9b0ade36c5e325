"""`streamagent demo`: a local broker, a decide worker and a stream of shop events, live.

Everything runs in a fresh temporary directory on free loopback ports, so the demo never
collides with a broker or worker you already run, and it cleans up after itself.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from pathlib import Path

import orjson


def _bad_messages(n: int) -> list[tuple[bytes | None, bytes]]:
    """A few broken messages, to show that they land in the DLQ and nothing stops."""
    kinds = [
        (b"u-bad", b"{this is not json"),
        (b"u-bad", orjson.dumps({"event_id": "bad-neg", "user_id": "u-bad", "type": "page_view",
                                 "ts": 1767225600000, "price": -3})),
        (b"u-bad", orjson.dumps({"event_id": "bad-type", "user_id": "u-bad", "type": "teleport",
                                 "ts": 1767225600000})),
        (b"not-the-user", orjson.dumps({"event_id": "bad-key", "user_id": "u-bad",
                                        "type": "page_view", "ts": 1767225600000})),
    ]
    return [kinds[i % len(kinds)] for i in range(n)]


def run_demo(args) -> int:
    from confluent_kafka import Consumer
    from rich.console import Console, Group
    from rich.live import Live
    from rich.panel import Panel
    from rich.table import Table

    from streamagent.ops.broker import BrokerConfig, start, stop
    from streamagent.ops.local import free_port, free_port_pair, terminate
    from streamagent.ops.produce import make_producer, synthetic_events

    con = Console()
    tmp = Path(tempfile.mkdtemp(prefix="streamagent-demo-"))
    cfg = BrokerConfig(data_dir=tmp / "kafka", port=free_port_pair(), heap="768m")
    con.rule("[bold]streamagent demo")
    con.print(f"working dir {tmp}")
    start(cfg, log=lambda m: con.print(f"[dim]{m}[/dim]"))
    metrics_port = free_port()
    env = {**os.environ, "STREAMAGENT_KAFKA_BOOTSTRAP": cfg.bootstrap,
           "STREAMAGENT_DATA_DIR": str(tmp), "STREAMAGENT_METRICS_PORT": str(metrics_port),
           "STREAMAGENT_LOG_LEVEL": "warning"}
    worker_log = open(tmp / "worker.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "streamagent.cli", "worker"], env=env,
                              stdout=worker_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    con.print(f"decide worker pid {worker.pid}; metrics on http://127.0.0.1:{metrics_port}/metrics")
    stats = Counter()
    actions = Counter()
    blocked = Counter()
    recent: deque = deque(maxlen=8)
    dlq_recent: deque = deque(maxlen=4)
    done = threading.Event()
    rate = args.rate

    def producer_thread():
        p = make_producer(cfg.bootstrap, **{"linger.ms": 2})
        bad = _bad_messages(8)
        every = max(1, args.events // (len(bad) + 1))
        t0 = time.perf_counter()
        # ~30 s of event time between events: 20,000 events span a week, so frequency caps
        # and daily budget periods visibly roll over during the demo
        stream = synthetic_events(args.events, users=args.users, seed=args.seed, step_ms=60_000)
        for i, ev in enumerate(stream):
            due = t0 + i / rate
            while time.perf_counter() < due:
                time.sleep(0.001)
            p.produce("user-events", key=ev["user_id"].encode(), value=orjson.dumps(ev))
            stats["sent"] += 1
            if i and i % every == 0 and bad:
                k, v = bad.pop()
                p.produce("user-events", key=k, value=v)
                stats["bad_sent"] += 1
            p.poll(0)
        p.flush(30)
        done.set()

    cons = Consumer({"bootstrap.servers": cfg.bootstrap, "group.id": "demo-viewer",
                     "auto.offset.reset": "earliest", "enable.auto.commit": False})
    cons.subscribe(["decision-log", "user-events.dlq"])

    def view():
        top = Table.grid(padding=(0, 3))
        el = max(1e-9, time.monotonic() - t_start)
        top.add_row(f"events sent [bold]{stats['sent']:,}[/] ({stats['sent'] / el:,.0f}/s)",
                    f"decisions [bold]{stats['decisions']:,}[/] ({stats['decisions'] / el:,.0f}/s)",
                    f"coupons [bold]{stats['coupons']:,}[/]",
                    f"explored [bold]{stats['explored']:,}[/]",
                    f"dead-lettered [bold red]{stats['dlq']}[/] of {stats['bad_sent']} bad")
        mix = Table(title="action mix", expand=False)
        mix.add_column("action")
        mix.add_column("n", justify="right")
        for a, n in actions.most_common():
            mix.add_row(a, f"{n:,}")
        blk = Table(title="masked by", expand=False)
        blk.add_column("reason")
        blk.add_column("n", justify="right")
        for b, n in blocked.most_common():
            blk.add_row(b, f"{n:,}")
        last = Table(title="latest decisions", expand=True)
        for c in ("user", "trigger", "action", "propensity", "explored", "blocked by", "model"):
            last.add_column(c)
        for d in recent:
            last.add_row(d["user_id"], d["trigger_type"], d["action"], f"{d['propensity']:.3f}",
                         "yes" if d["explored"] else "", ",".join(d["blocked_by"]),
                         f"v{d['policy_version']}")
        dl = Table(title="dead-letter queue (latest)", expand=True)
        dl.add_column("reason")
        dl.add_column("detail")
        for e in dlq_recent:
            dl.add_row(e["reason"], e["detail"][:90])
        side = Table.grid(padding=(0, 2))
        side.add_row(mix, blk)
        return Panel(Group(top, side, last, dl), title="streamagent: live decisions")

    t_start = time.monotonic()
    threading.Thread(target=producer_thread, daemon=True).start()
    idle_since = None
    try:
        with Live(view(), console=con, refresh_per_second=4, transient=False) as live:
            while True:
                if worker.poll() is not None:
                    con.print(f"[red]the worker exited ({worker.returncode}); see {tmp / 'worker.log'}")
                    break
                msgs = cons.consume(500, timeout=0.25)
                for m in msgs:
                    if m.error():
                        continue
                    doc = orjson.loads(m.value())
                    if m.topic() == "decision-log":
                        stats["decisions"] += 1
                        actions[doc["action"]] += 1
                        stats["coupons"] += doc["action"] != "none"
                        stats["explored"] += doc["explored"]
                        for b in doc["blocked_by"]:
                            blocked[b] += 1
                        recent.append(doc)
                    else:
                        stats["dlq"] += 1
                        dlq_recent.append(doc)
                live.update(view())
                if done.is_set():
                    idle_since = idle_since or time.monotonic()
                    if msgs:
                        idle_since = time.monotonic()
                    if time.monotonic() - idle_since > 4:
                        break
    except KeyboardInterrupt:
        con.print("interrupted")
    finally:
        cons.close()
        terminate(worker, 60)
        if not args.keep_running:
            stop(cfg, log=lambda m: con.print(f"[dim]{m}[/dim]"))
    con.rule("summary")
    con.print(f"{stats['sent']:,} events -> {stats['decisions']:,} decisions "
              f"({stats['coupons']:,} coupons, {stats['explored']:,} explored); "
              f"{stats['dlq']} of {stats['bad_sent']} bad messages dead-lettered with a reason.")
    if args.keep_running:
        con.print(f"broker left running on {cfg.bootstrap} (data in {tmp}); "
                  f"stop it with: STREAMAGENT_DATA_DIR={tmp} streamagent kafka stop --port {cfg.port}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    ok = stats["decisions"] > 0 and stats["dlq"] == stats["bad_sent"]
    return 0 if ok else 1
