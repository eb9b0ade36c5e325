"""The `streamagent` command. Subcommands: kafka, topics, worker, learner, produce, erase,
simulate, tail, config, model, bench, demo, evaluate, train-offline."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from streamagent.errors import StreamagentError

# PyPI's torch wheel brings triton (GPU kernels), and torch imports it with its optimisers;
# at exit triton's bindings print hundreds of lines of "nanobind: leaked ..." into every
# learner's log. streamagent runs torch on the CPU and compiles nothing: its processes do
# without triton (torch checks for it and carries on without).
sys.modules.setdefault("triton", None)


def version() -> str:
    """The installed distribution's version (what pip and bug reports see), else the
    package's own, for a source tree that was never installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("streamagent")
    except PackageNotFoundError:
        from streamagent import __version__

        return __version__


def _settings():
    from streamagent.config import Settings

    return Settings()


def _broker_cfg(args, s):
    from streamagent.ops.broker import BrokerConfig

    return BrokerConfig(data_dir=Path(args.data_dir) if args.data_dir else s.broker_dir,
                        port=args.port or s.kafka_port)


def cmd_kafka(args) -> int:
    from streamagent.ops import broker

    s = _settings()
    cfg = _broker_cfg(args, s)
    if args.action == "start":
        broker.start(cfg)
        print(f"export STREAMAGENT_KAFKA_BOOTSTRAP={cfg.bootstrap}")
    elif args.action == "stop":
        if not broker.stop(cfg):
            print("kafka is not running")
    elif args.action == "fetch":
        print(broker.ensure_jars(cfg))
    else:
        st = broker.status(cfg)
        for k, v in st.items():
            print(f"{k:10} {v}")
        return 0 if st["ready"] else 3
    return 0


def cmd_topics(args) -> int:
    from streamagent.ops.topics import create_topics

    create_topics(_settings())
    return 0


def cmd_worker(args) -> int:
    from streamagent.stream.worker import run_worker

    s = _settings()
    if args.role:
        s = s.model_copy(update={"worker_role": args.role})
    return run_worker(s)


def cmd_learner(args) -> int:
    from streamagent.stream.learner import run_learner

    return run_learner(_settings())


def cmd_produce(args) -> int:
    from streamagent.ops.kafka import kafka_client
    from streamagent.ops.produce import read_jsonl, send_events
    from streamagent.sim.synthetic import synthetic_events

    s = _settings()
    events = (read_jsonl(Path(args.file)) if args.file else
              synthetic_events(args.n, users=args.users, seed=args.seed))
    n = send_events(kafka_client(s), args.topic or s.topic_user_events, events, log=print)
    print(f"sent {n} events to {args.topic or s.topic_user_events}")
    return 0


def cmd_erase(args) -> int:
    from streamagent.ops.kafka import kafka_client
    from streamagent.ops.produce import send_erasures

    s = _settings()
    topic = args.topic or s.topic_user_events
    n = send_erasures(kafka_client(s), topic, args.user_id)
    print(f"sent {n} erasure request{'s' if n != 1 else ''} to {topic}")
    return 0


def cmd_tail(args) -> int:
    from streamagent.ops.kafka import kafka_client
    from streamagent.ops.tail import tail

    s = _settings()
    tail(kafka_client(s), args.topic or s.topic_decision_log, limit=args.n,
         timeout=args.timeout, follow=args.follow)
    return 0


def cmd_config(args) -> int:
    from streamagent.config import settings_markdown

    if args.markdown:
        print(settings_markdown(), end="")
    else:
        from streamagent.ops.kafka import is_secret_key

        for k, v in _settings().model_dump().items():
            if k == "kafka_config":  # the passthrough may hold secrets too (SecretStr fields
                # print as **********)
                v = ",".join(f"{key}={'**********' if is_secret_key(key) else val}"
                             for key, val in v.items())
            print(f"STREAMAGENT_{k.upper()}={v}")
    return 0


def _main_of(module: str):
    """A command that runs ``module.main(args)``, imported only when the command runs (the
    benchmarks and offline tools pull in heavy libraries the other commands do not need)."""
    def run(args) -> int:
        import importlib

        return importlib.import_module(module).main(args)
    return run


def _module_command(sub, name: str, module: str, help_: str) -> None:
    """A subcommand whose options come from ``module.add_arguments`` and which runs
    ``module.main`` (see :func:`_main_of`)."""
    import importlib

    cmd = sub.add_parser(name, help=help_)
    importlib.import_module(module).add_arguments(cmd)
    cmd.set_defaults(fn=_main_of(module))


def cmd_simulate(args) -> int:
    from streamagent.sim.kafka_shop import simulate

    simulate(_settings(), args.scenario, args.users, args.days, args.seed, args.timeout,
             log=lambda m: print(m, flush=True))
    return 0


def cmd_model(args) -> int:
    from streamagent.stream import registry

    if args.action == "export":
        return cmd_model_export(args)
    s = _settings()
    if args.action == "import":
        if not args.file:
            raise SystemExit("streamagent model import needs --file MODEL_FILE")
        snap = registry.import_model(s, args.file, args.promote)
        print(f"imported {args.file} as model v{snap.version} on {s.topic_model_candidates}"
              + (f"; it is now the deciders' model (promotion {snap.promotion})"
                 if args.promote else f"; `streamagent model promote {snap.version}` makes it live"))
        return 0
    if args.action == "list":
        rows = registry.table(s)
        if not rows:
            print(f"no model versions on {s.topic_model_candidates} yet")
        fmt = lambda v: "-" if v is None else f"{v:+.4f}" if isinstance(v, float) else str(v)  # noqa: E731
        print(f"{'version':>8} {'steps':>8} {'gate':>10} {'live value':>11} {'candidate':>10} "
              f"{'diff 95% low':>13} {'held out':>9}")
        for r in rows:
            print(f"{r['version']:>8} {r['train_steps']:>8} {r['gate']:>10} "
                  f"{fmt(r['live_value']):>11} {fmt(r['candidate_value']):>10} "
                  f"{fmt(r['diff_low']):>13} {fmt(r['held_out']):>9}"
                  + ("   <- live" if r["live"] else ""))
        return 0
    if args.action == "promote":
        if args.version is None:
            raise SystemExit("streamagent model promote needs a VERSION (see `model list`)")
        snap = registry.promote(s, args.version)
    else:
        snap = registry.rollback(s, args.version)
    print(f"model v{snap.version} is now the deciders' model (promotion {snap.promotion}, "
          f"{snap.meta['promoted_by']}, replacing v{snap.meta['replaces']})")
    return 0


def cmd_model_export(args) -> int:
    from streamagent.core.export import export_checkpoint

    if not args.out:
        raise SystemExit("streamagent model export needs --out FILE (and --checkpoint PATH, "
                         "unless it is the learner's own)")
    checkpoint = Path(args.checkpoint) if args.checkpoint else _settings().checkpoint_path
    snap = export_checkpoint(checkpoint, Path(args.out))
    print(f"wrote {args.out}: model v{snap.version}, {snap.train_steps} training steps, "
          f"{len(snap.feature_names)} features, actions {list(snap.actions)}; use it as "
          f"STREAMAGENT_MODEL_PATH")
    return 0


def cmd_demo(args) -> int:
    from streamagent.sim.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamagent", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = p.add_subparsers(dest="cmd", required=True)

    k = sub.add_parser("kafka", help="provision and run a local single-node Kafka (KRaft)")
    k.add_argument("action", choices=["start", "stop", "status", "fetch"])
    k.add_argument("--port", type=int, default=None, help="broker port (default STREAMAGENT_KAFKA_PORT)")
    k.add_argument("--data-dir", default=None, help="broker data dir (default $STREAMAGENT_DATA_DIR/kafka)")
    k.set_defaults(fn=cmd_kafka)

    t = sub.add_parser("topics", help="create the topics (partitions, retention, compaction)")
    t.add_argument("action", choices=["create"])
    t.set_defaults(fn=cmd_topics)

    w = sub.add_parser("worker", help="run the decide and reward-join agents (a Faust worker)")
    w.add_argument("--role", choices=["all", "decide", "join"],
                   help="all: both agents in this process; decide or join: one of them "
                        "(default: STREAMAGENT_WORKER_ROLE, all)")
    w.set_defaults(fn=cmd_worker)

    le = sub.add_parser("learner", help="run the Q-learner: transitions in, model versions out")
    le.set_defaults(fn=cmd_learner)

    pr = sub.add_parser("produce", help="send synthetic or file-based user events")
    pr.add_argument("--file", help="JSON-lines file of events (default: synthetic)")
    pr.add_argument("-n", type=int, default=1000, help="synthetic events to send")
    pr.add_argument("--users", type=int, default=200)
    pr.add_argument("--seed", type=int, default=1)
    pr.add_argument("--topic", default=None)
    pr.set_defaults(fn=cmd_produce)

    er = sub.add_parser("erase", help="request the erasure of users: a null record keyed by "
                        "each user id on user-events; the worker deletes their state and join "
                        "records (docs/OPERATIONS.md, erasure)")
    er.add_argument("user_id", nargs="+", help="the user id(s), as the events key them")
    er.add_argument("--topic", default=None, help="default STREAMAGENT_TOPIC_USER_EVENTS")
    er.set_defaults(fn=cmd_erase)

    tl = sub.add_parser("tail", help="print the newest messages of a topic (default decision-log)")
    tl.add_argument("--topic", default=None)
    tl.add_argument("-n", type=int, default=20, help="how many of the newest messages (all "
                    "partitions, by timestamp)")
    tl.add_argument("-f", "--follow", action="store_true",
                    help="then print new messages as they arrive, until Ctrl-C")
    tl.add_argument("--timeout", type=float, default=10.0,
                    help="seconds to wait for the broker and to read up to the end")
    tl.set_defaults(fn=cmd_tail)

    c = sub.add_parser("config", help="print the settings in force, or the reference table")
    c.add_argument("--markdown", action="store_true")
    c.set_defaults(fn=cmd_config)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    _module_command(bsub, "pipeline", "streamagent.bench.pipeline",
                    "events/s and latency of one worker vs baselines")
    _module_command(bsub, "learning", "streamagent.bench.learning",
                    "policies on the simulated shop vs the MDP optimum")
    _module_command(bsub, "pacing", "streamagent.bench.pacing",
                    "budget pacing (shadow price) vs the hard budget mask on the simulated shop")
    _module_command(bsub, "soak", "streamagent.bench.soak",
                    "millions of events with churning users through a worker and the learner: "
                    "memory and state size over time")
    _module_command(bsub, "offline", "streamagent.bench.offline",
                    "off-policy estimators on the Open Bandit Dataset vs the measured value "
                    "(and vs obp's estimators)")
    _module_command(sub, "explain", "streamagent.ops.explain",
                    "why a decision went the way it did: Q per action, rules, top features")
    _module_command(sub, "evaluate", "streamagent.offline.evaluate",
                    "estimate candidate policies' values on logged decisions (IPS, SNIPS, DM, "
                    "DR, PDWIS)")
    _module_command(sub, "train-offline", "streamagent.offline.train",
                    "learn a Q-network from logged decisions (a warm start for the deciders and "
                    "the learner), conservative where the logs are thin")

    mo = sub.add_parser("model", help="model versions: list them with the gate's verdicts, "
                        "promote one or roll back (by hand, on record); export a learner "
                        "checkpoint as a model file")
    mo.add_argument("action", choices=["list", "promote", "rollback", "export", "import"])
    mo.add_argument("version", nargs="?", type=int,
                    help="the version (rollback without one: the version the live one replaced)")
    mo.add_argument("--checkpoint", help="export: the learner checkpoint to read "
                    "(STREAMAGENT_LEARNER_CHECKPOINT, default $STREAMAGENT_DATA_DIR/learner/checkpoint.pt)")
    mo.add_argument("--out", help="export: the model file to write (for STREAMAGENT_MODEL_PATH)")
    mo.add_argument("--file", help="import: the model file to bring in as the next version")
    mo.add_argument("--promote", action="store_true",
                    help="import: make the imported version the deciders' model at once")
    mo.set_defaults(fn=cmd_model)

    sm = sub.add_parser("simulate", help="play the simulated shop against a running worker "
                        "(user-events and conversions out, coupon-actions in)")
    sm.add_argument("--days", type=int, default=30)
    sm.add_argument("--users", type=int, default=400)
    sm.add_argument("--scenario", default="fatigue", choices=["fatigue", "no-fatigue"])
    sm.add_argument("--seed", type=int, default=1)
    sm.add_argument("--timeout", type=float, default=180.0,
                    help="seconds to wait for a day's decisions before giving up")
    sm.set_defaults(fn=cmd_simulate)

    d = sub.add_parser("demo", help="the whole loop on a local broker, with live output")
    d.add_argument("--days", type=int, default=60, help="simulated days to play (event time)")
    d.add_argument("--users", type=int, default=400, help="simulated shop users")
    d.add_argument("--scenario", default="fatigue", choices=["fatigue", "no-fatigue"])
    d.add_argument("--seed", type=int, default=1)
    d.add_argument("--out", default="demo-report", help="where the report and PNG go")
    d.add_argument("--keep-running", action="store_true", help="leave the broker running at the end")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except StreamagentError as exc:
        print(f"streamagent: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
