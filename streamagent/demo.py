"""`streamagent demo`: the whole loop, live, on a local broker.

A broker, a decide/join worker and a learner run as separate processes, and the simulated shop
(streamagent.ops.shop) plays its users through Kafka in fast-forwarded event time: sessions go
to user-events, the worker decides, the shop reads the coupons back, its users order (or not)
with a delay, conversions go back, rewards and transitions flow to the learner, and the new
model versions reach the worker without a restart. The terminal shows the profit per user per
day against the optimum of the shop's own MDP; the end writes a short report (markdown + PNG).

Everything runs in a fresh temporary directory on free loopback ports, so the demo never
collides with a broker or worker you already run, and it cleans up after itself.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import orjson

# The optimum of the simulator knows no frequency caps and no budget; the demo lifts both so
# the comparison is fair (production defaults keep them: see docs/CONFIGURATION.md).
DEMO_ENV = {
    "STREAMAGENT_CAP_MAX_COUPONS": "1000", "STREAMAGENT_CAP_MIN_GAP_HOURS": "0",
    "STREAMAGENT_BUDGET_PER_PERIOD": "100000000", "STREAMAGENT_ATTRIBUTION_WINDOW_HOURS": "24",
    "STREAMAGENT_TRANSITION_HORIZON_DAYS": "3", "STREAMAGENT_ALLOWED_LATENESS_MINUTES": "1", "STREAMAGENT_SNAPSHOT_INTERVAL_S": "3",
    "STREAMAGENT_LOG_LEVEL": "warning",
}


def _bad_messages() -> list[tuple[str, bytes | None, bytes]]:
    """A few broken messages, to show that they land in a DLQ and nothing stops."""
    ts = 1767225600000
    return [
        ("user-events", b"u-bad", b"{this is not json"),
        ("user-events", b"u-bad", orjson.dumps({"event_id": "bad-neg", "user_id": "u-bad",
                                                "type": "page_view", "ts": ts, "price": -3})),
        ("user-events", b"u-bad", orjson.dumps({"event_id": "bad-type", "user_id": "u-bad",
                                                "type": "teleport", "ts": ts})),
        ("user-events", b"not-the-user", orjson.dumps({"event_id": "bad-key", "user_id": "u-bad",
                                                       "type": "page_view", "ts": ts})),
        ("conversions", b"u-bad", orjson.dumps({"order_id": "bad-amount", "user_id": "u-bad",
                                                "ts": ts, "amount": "lots"})),
        ("conversions", b"u-bad", b"[1, 2, 3]"),
    ]


def run_demo(args) -> int:
    from confluent_kafka import Consumer
    from rich.console import Console, Group
    from rich.live import Live
    from rich.panel import Panel
    from rich.table import Table

    from streamagent.config import Settings
    from streamagent.core.catalog import load_catalog
    from streamagent.core.simulator import Shop, optimum, scenario
    from streamagent.ops.broker import BrokerConfig, start, stop
    from streamagent.ops.local import free_port, free_port_pair, terminate
    from streamagent.ops.shop import KafkaShop, shop_topics
    from streamagent.ops.topics import create_topics

    con = Console()
    tmp = Path(tempfile.mkdtemp(prefix="streamagent-demo-"))
    out_dir = Path(args.out)
    cfg = BrokerConfig(data_dir=tmp / "kafka", port=free_port_pair(), heap="768m")
    con.rule("[bold]streamagent demo")
    con.print(f"working dir {tmp}; {args.users} simulated users, {args.days} days, "
              f"scenario {args.scenario!r}")
    start(cfg, log=lambda m: con.print(f"[dim]{m}[/dim]"))
    wport, lport = free_port(), free_port()
    env = {**os.environ, **DEMO_ENV, "STREAMAGENT_KAFKA_BOOTSTRAP": cfg.bootstrap,
           "STREAMAGENT_DATA_DIR": str(tmp), "STREAMAGENT_METRICS_PORT": str(wport),
           "STREAMAGENT_LEARNER_METRICS_PORT": str(lport)}
    s = Settings(kafka_bootstrap=cfg.bootstrap)
    create_topics(s, log=lambda m: None)
    procs: dict[str, subprocess.Popen] = {}
    for name in ("worker", "learner"):
        logf = open(tmp / f"{name}.log", "wb")
        procs[name] = subprocess.Popen([sys.executable, "-m", "streamagent.cli", name], env=env,
                                       stdout=logf, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
    con.print(f"worker pid {procs['worker'].pid} (metrics http://127.0.0.1:{wport}/metrics), "
              f"learner pid {procs['learner'].pid} (metrics http://127.0.0.1:{lport}/metrics)")

    catalog = load_catalog()
    shop = Shop(scenario(args.scenario), catalog, args.users, seed=args.seed)
    ref = optimum(shop)
    topics = shop_topics(s)
    kshop = KafkaShop(shop, cfg.bootstrap, topics, s.partitions, decision_timeout_s=120)
    dlq = Consumer({"bootstrap.servers": cfg.bootstrap, "group.id": f"demo-dlq-{time.time_ns()}",
                    "auto.offset.reset": "earliest", "enable.auto.commit": False})
    dlq.subscribe([s.topic_user_events + s.dlq_suffix, s.topic_conversions + s.dlq_suffix])
    dlq_reasons: Counter = Counter()
    bad_sent = 0
    days: list = []
    t_start = time.monotonic()
    interactive = con.is_terminal

    def view():
        el = max(1e-9, time.monotonic() - t_start)
        d = days[-1] if days else None
        prof = np.array([r.expected_profit for r in days]) if days else np.zeros(1)
        last7 = float(prof[-7:].mean())
        top = Table.grid(padding=(0, 3))
        top.add_row(f"day [bold]{len(days)}[/]/{args.days}",
                    f"events [bold]{kshop.events_sent:,}[/] ({kshop.events_sent / el:,.0f}/s)",
                    f"decisions [bold]{kshop.decisions_seen:,}[/] "
                    f"({kshop.decisions_seen / el:,.0f}/s)",
                    f"model [bold]v{max(d.policy_versions) if d else 0}[/]",
                    f"DLQ [bold red]{sum(dlq_reasons.values())}[/] of {bad_sent} bad")
        t = Table(title="profit per user per day (expected, from the shop's true order "
                        "probabilities)", expand=True)
        for c in ("", "last day", "7-day mean", "of optimum"):
            t.add_column(c, justify="right")
        if d:
            t.add_row("streamagent", f"{d.expected_profit:.3f}", f"{last7:.3f}",
                      f"{last7 / ref['optimal']:.0%}")
        for k in ("optimal", "myopic_optimal", "never"):
            t.add_row(k.replace("_", " "), "", f"{ref[k]:.3f}", f"{ref[k] / ref['optimal']:.0%}")
        mix = ""
        if d:
            mix = (f"coupons {d.coupons / args.users:.0%} of sessions, explored "
                   f"{d.explored / args.users:.0%}, orders {d.orders}, "
                   f"{d.seconds:.1f} s per simulated day")
        return Panel(Group(top, t, mix), title="streamagent: the live loop")

    ok = True
    try:
        with Live(view(), console=con, refresh_per_second=2, transient=False,
                  auto_refresh=interactive) as live:
            for day in range(args.days):
                for p in procs.values():
                    if p.poll() is not None:
                        raise RuntimeError(f"a process exited ({p.returncode}); see its log in {tmp}")
                if day == 1:  # broken input: dead-lettered with a reason, nothing stops
                    for which, k, v in _bad_messages():
                        topic = s.topic_user_events if which == "user-events" else s.topic_conversions
                        kshop.producer.produce(topic, key=k, value=v)
                        bad_sent += 1
                    kshop.producer.flush(10)
                if day == 0:
                    kshop.timeout = 240.0  # the worker's first start (Faust, RocksDB) takes a while
                days.append(kshop.day(day))
                kshop.timeout = 120.0
                for m in dlq.consume(100, timeout=0.01):
                    if not m.error():
                        dlq_reasons[orjson.loads(m.value())["reason"]] += 1
                live.update(view())
                if not interactive and (day + 1) % 10 == 0:
                    r = days[-1]
                    con.print(f"day {day + 1}: {np.mean([x.expected_profit for x in days[-7:]]):.3f} "
                              f"per user per day (optimum {ref['optimal']:.3f}), "
                              f"model v{max(r.policy_versions)}")
        deadline = time.monotonic() + 20
        while sum(dlq_reasons.values()) < bad_sent and time.monotonic() < deadline:
            for m in dlq.consume(100, timeout=0.5):
                if not m.error():
                    dlq_reasons[orjson.loads(m.value())["reason"]] += 1
    except KeyboardInterrupt:
        con.print("interrupted")
        ok = False
    except Exception as exc:  # report, then shut down cleanly
        con.print(f"[red]demo stopped: {exc}")
        ok = False
    finally:
        dlq.close()
        kshop.close()
        for name in ("worker", "learner"):
            terminate(procs[name], 60)
        if not args.keep_running:
            stop(cfg, log=lambda m: con.print(f"[dim]{m}[/dim]"))
    if days:
        report = write_report(out_dir, args, days, ref, dlq_reasons, bad_sent,
                              time.monotonic() - t_start)
        con.rule("report")
        con.print(report, markup=False, highlight=False)
        con.print(f"wrote {out_dir / 'report.md'} and {out_dir / 'learning-curve.png'}")
    if args.keep_running:
        con.print(f"broker left running on {cfg.bootstrap} (data in {tmp}); stop it with: "
                  f"STREAMAGENT_DATA_DIR={tmp} streamagent kafka stop --port {cfg.port}")
    elif ok:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        con.print(f"logs kept in {tmp}")
    ok = ok and len(days) == args.days and sum(dlq_reasons.values()) == bad_sent
    return 0 if ok else 1


def write_report(out: Path, args, days, ref: dict, dlq_reasons: Counter, bad_sent: int,
                 seconds: float) -> str:
    out.mkdir(parents=True, exist_ok=True)
    prof = np.array([d.expected_profit for d in days])
    k = max(1, len(prof) // 4)
    tail = float(prof[-k:].mean())
    versions = max(max(d.policy_versions) for d in days)
    lines = [
        f"# streamagent demo: {args.users} users, {len(days)} simulated days, scenario "
        f"`{args.scenario}`",
        "",
        f"Wall clock {seconds:.0f} s; {sum(d.events for d in days):,} user events, "
        f"{len(days) * args.users:,} decisions, {sum(d.orders for d in days):,} orders; "
        f"the learner published {versions} model versions, hot-swapped by the worker.",
        "",
        "| policy | profit / user / day | of optimum |",
        "|---|---:|---:|",
        f"| streamagent, last {k} days | {tail:.3f} | {tail / ref['optimal']:.1%} |",
        f"| streamagent, first {k} days | {prof[:k].mean():.3f} | "
        f"{prof[:k].mean() / ref['optimal']:.1%} |",
    ]
    for name in ("optimal", "myopic_optimal", "never"):
        lines.append(f"| {name.replace('_', ' ')} (MDP, exact) | {ref[name]:.3f} | "
                     f"{ref[name] / ref['optimal']:.1%} |")
    lines += [
        "",
        f"Coupons in {sum(d.coupons for d in days) / (len(days) * args.users):.1%} of sessions; "
        f"discount given {sum(d.discount for d in days) / (len(days) * args.users):.3f} "
        f"per user per day.",
        f"Dead-lettered {sum(dlq_reasons.values())} of {bad_sent} broken messages: "
        + ", ".join(f"{r} {n}" for r, n in sorted(dlq_reasons.items())) + ".",
        "",
        "Profit is the expected profit of each (user state, coupon) under the shop's true order "
        "probabilities, which ranks policies like sampled profit with far less noise. A short "
        "demo shows the loop working and learning; `streamagent bench learning` measures how "
        "close the learner gets (docs/BENCHMARKS.md).",
        "",
        "![learning curve](learning-curve.png)",
    ]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    _plot(out / "learning-curve.png", prof, days, ref, args)
    return text


def _plot(path: Path, prof: np.ndarray, days, ref: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = np.arange(1, len(prof) + 1)
    ax.plot(x, prof, color="tab:blue", alpha=0.3, label="streamagent, daily")
    w = min(7, len(prof))
    sm = np.convolve(prof, np.ones(w) / w, mode="valid")
    ax.plot(np.arange(w, len(prof) + 1), sm, color="tab:blue", label=f"streamagent, {w}-day mean")
    styles = {"optimal": ("black", "--"), "myopic_optimal": ("tab:orange", ":"),
              "never": ("tab:gray", "-.")}
    for k, (c, ls) in styles.items():
        ax.axhline(ref[k], color=c, ls=ls, label=f"{k.replace('_', ' ')} (MDP)")
    ax2 = ax.twinx()
    ax2.step(x, [max(d.policy_versions) for d in days], color="tab:green", alpha=0.4,
             where="post")
    ax2.set_ylabel("model version", color="tab:green")
    ax.set_xlabel("simulated day")
    ax.set_ylabel("profit / user / day")
    ax.set_title(f"demo: {args.users} users, scenario {args.scenario}, through Kafka")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
