"""The broker stops and starts again under a running worker and learner (issue 14).

The test runs its OWN single-node broker (own ports and data dir): the session broker is
shared by every other test. A steady stream of user events and orders goes in while the
broker is stopped (a controlled shutdown, data kept) for about 15 s and started again on the
same data dir and ports. The worker (decide + join) and the learner are left alone: they must
carry on by themselves.

Afterwards:

- every trigger event has exactly one decision id on decision-log, and a decision re-sent (a
  replay) is identical to the first copy; every decision whose attribution window closed has
  exactly one distinct reward;
- the worker and the learner are the processes started at the beginning, still running;
- the learner published a new model version after the broker came back;
- no send failed: the outage is far shorter than the producers' delivery timeouts (Faust's
  ``producer_request_timeout``, 20 min), so records wait in the producers and go out once the
  broker is back; ``streamagent_stream_processing_errors_total{stage="send"|"changelog"}`` stays
  at 0.

A second test makes the sends fail (the worker's producer times out after 3 s while the broker
is down): the worker must count the failures, commit no offset past them and stop; started
again (what an orchestrator does), it replays from the last commit and no decision is lost.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import defaultdict

import orjson
import pytest

from streamagent.ops.broker import BrokerConfig, kill, start, stop
from streamagent.ops.kafka import make_producer, plaintext
from streamagent.ops.local import free_port, free_port_pair
from streamagent.bench.soak import scrape as metrics
from streamagent.ops.tail import read_all
from streamagent.units import HOUR_MS
from tests.conftest import topic_env
from tests.integration.helpers import TopicReader, WorkerProcess

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

T0 = 1_767_225_600_000
LOOP = dict(
    STREAMAGENT_ATTRIBUTION_WINDOW_HOURS="2", STREAMAGENT_ALLOWED_LATENESS_MINUTES="1",
    STREAMAGENT_TRANSITION_HORIZON_DAYS="1", STREAMAGENT_LEARNING_STARTS="16",
    STREAMAGENT_BATCH_SIZE="16", STREAMAGENT_SNAPSHOT_EVERY_UPDATES="10",
    STREAMAGENT_SNAPSHOT_INTERVAL_S="1", STREAMAGENT_GATE="false",
    STREAMAGENT_CAP_MIN_GAP_HOURS="0", STREAMAGENT_CAP_MAX_COUPONS="1000",
    STREAMAGENT_BUDGET_PER_PERIOD="1000000", STREAMAGENT_COMMIT_INTERVAL_S="2",
)


@pytest.fixture
def own_broker(tmp_path):
    cfg = BrokerConfig(data_dir=tmp_path / "kafka", port=free_port_pair(), heap="512m",
                       default_partitions=2)
    start(cfg, wait=120)
    try:
        yield cfg
    finally:
        stop(cfg)


def errors(port: int, stage: str) -> float:
    return metrics(port).get(f'streamagent_stream_processing_errors_total{{stage="{stage}"}}', 0.0)


class Shop(threading.Thread):
    """Produces rounds of events at a steady pace, whatever the broker does.

    Round r: every user starts a session (a trigger) and views a page, at event time
    T0 + 3 h * r; a third of the users buy half an hour later (sent with the next round, so
    that the decisions are usually out before their orders). The producer is librdkafka's:
    while the broker is down it keeps the records and retries (its delivery timeout is 5 min),
    so nothing the shop sends is lost; delivery failures are counted anyway.
    """

    def __init__(self, bootstrap: str, env: dict, users: list[str], period_s: float = 0.5):
        super().__init__(daemon=True, name="shop")
        self.p = make_producer(plaintext(bootstrap))
        self.uev, self.conv = env["STREAMAGENT_TOPIC_USER_EVENTS"], env["STREAMAGENT_TOPIC_CONVERSIONS"]
        self.users, self.period = users, period_s
        self.rounds = 0  # rounds handed to the producer
        self.failed: list[str] = []
        self.halt = threading.Event()

    def _sent(self, err, msg) -> None:
        if err is not None:
            self.failed.append(str(err))

    def send_round(self, r: int) -> None:
        ts = T0 + r * 3 * HOUR_MS
        for u in self.users:
            for typ, dt, extra in (("session_start", 0, {}),
                                   ("page_view", 1000, {"category": "books"})):
                doc = {"event_id": f"{u}-{r}" + ("-v" if dt else ""), "user_id": u,
                       "type": typ, "ts": ts + dt, **extra}
                self.p.produce(self.uev, key=u.encode(), value=orjson.dumps(doc),
                               on_delivery=self._sent)
        for u in self.users:  # the orders of the round before: its decisions are out by now
            if int(u.split("-")[1]) % 3 == 0 and r > 0:
                doc = {"order_id": f"o-{u}-{r - 1}", "user_id": u,
                       "ts": ts - 3 * HOUR_MS + HOUR_MS // 2, "amount": 50.0}
                self.p.produce(self.conv, key=u.encode(), value=orjson.dumps(doc),
                               on_delivery=self._sent)
        self.p.poll(0)

    def run(self) -> None:
        while not self.halt.is_set():
            self.send_round(self.rounds)
            self.rounds += 1
            self.halt.wait(self.period)

    def finish(self, timeout: float = 120.0) -> int:
        """Stop the rounds, close every attribution window (heartbeats far ahead), deliver
        everything; returns the number of rounds."""
        self.halt.set()
        self.join()
        ts = T0 + (self.rounds + 30) * 3 * HOUR_MS
        for u in self.users:
            self.p.produce(self.conv, key=u.encode(), on_delivery=self._sent,
                           value=orjson.dumps({"order_id": f"hb-{u}", "user_id": u, "ts": ts,
                                               "amount": 0.0, "heartbeat": True}))
        left = self.p.flush(timeout)
        assert left == 0, f"{left} records not delivered"
        return self.rounds


def versions(bootstrap: str, topic: str) -> list[int]:
    return [int(m.key()) for m in read_all(plaintext(bootstrap), topic, idle=2.0, max_wait=30)]


def check_decisions(log: list[dict], rewards: list[dict], users: list[str], rounds: int) -> int:
    """Every trigger decided once (re-sent copies identical), every decision whose window
    closed (all but the last round's: the decisions' own event time keeps those open) one
    distinct reward; returns how many decisions were re-sent."""
    by_trigger: dict[str, set] = defaultdict(set)
    docs: dict[str, dict] = {}
    for d in log:
        by_trigger[d["trigger_event_id"]].add(d["decision_id"])
        assert docs.setdefault(d["decision_id"], d) == d, "a decision re-sent with other content"
    want = {f"{u}-{r}" for u in users for r in range(rounds)}
    missing = sorted(want - set(by_trigger))
    assert not missing, f"{len(missing)} triggers without a decision, e.g. {missing[:10]}"
    assert set(by_trigger) == want
    assert all(len(ids) == 1 for ids in by_trigger.values()), "a trigger decided twice"
    distinct: dict[str, dict] = {}
    for rw in rewards:
        assert distinct.setdefault(rw["decision_id"], rw) == rw, "two rewards for one decision"
    closed = {i for i, d in docs.items() if not d["trigger_event_id"].endswith(f"-{rounds - 1}")}
    lost = sorted(docs[i]["trigger_event_id"] for i in closed - set(distinct))
    assert not lost, f"{len(lost)} decisions without a reward, e.g. {lost[:10]}"
    assert set(distinct) == closed, "a reward for a decision whose window is still open"
    for rw in distinct.values():
        # a non-buyer's decision never gets an order; a buyer's gets its order unless the order
        # reached the join before the decision did (then it counts as unmatched: around the
        # outage both can wait in the shop's producer and arrive together)
        assert rw["orders"] <= (int(rw["user_id"].split("-")[1]) % 3 == 0), rw
    return len(log) - len(docs)


class Collector:
    """Reads a topic from the beginning as it fills (a TopicReader), keeping everything."""

    def __init__(self, bootstrap: str, topic: str):
        self.reader = TopicReader(bootstrap, topic)
        self.docs: list[dict] = []

    def until(self, done, timeout: float, idle: float = 60.0) -> list[dict]:
        """Read until ``done(docs)``, for at most ``timeout`` s, or ``idle`` s without a new
        record (a busy machine slows the worker down; a stalled one brings nothing)."""
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while not done(self.docs) and time.monotonic() < min(deadline, last + idle):
            got = self.reader.read(10_000, timeout=1.0)
            if got:
                self.docs += got
                last = time.monotonic()
        return self.docs

    def close(self) -> None:
        self.reader.close()


def wait_for(cond, timeout: float, what: str, *procs: WorkerProcess) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for p in procs:
            assert p.proc.poll() is None, f"{p.command} exited {p.proc.returncode}:\n{p.tail()}"
        assert time.monotonic() < deadline, f"{what} not within {timeout:.0f} s:\n" + "\n".join(
            p.tail(40) for p in procs)
        time.sleep(0.5)


@pytest.mark.timeout(600)
def test_worker_and_learner_carry_on_through_a_broker_restart(own_broker, tmp_path, run_id):
    started = time.monotonic()
    at: dict[str, float] = {}

    def mark(name: str) -> None:
        at[name] = time.monotonic() - started

    cfg = own_broker
    ports = {"worker": free_port(), "learner": free_port()}
    env = topic_env("br" + run_id, cfg.bootstrap, tmp_path / "data", **LOOP,
                    STREAMAGENT_METRICS_PORT=ports["worker"],
                    STREAMAGENT_LEARNER_METRICS_PORT=ports["learner"])
    users = [f"br-{i}" for i in range(30)]
    cands = env["STREAMAGENT_TOPIC_MODEL_CANDIDATES"]

    def learned_version() -> float:
        return metrics(ports["learner"]).get("streamagent_learning_model_version", 0.0)

    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    learner = WorkerProcess(env, tmp_path / "learner.log", command="learner",
                            ready_marker=b"learner: model v").start(ready_timeout=180)
    procs = (worker, learner)
    pids = {p.command: p.proc.pid for p in procs}
    shop = Shop(cfg.bootstrap, env, users)
    decisions = Collector(cfg.bootstrap, env["STREAMAGENT_TOPIC_DECISION_LOG"])
    rewards = Collector(cfg.bootstrap, env["STREAMAGENT_TOPIC_REWARDS"])
    try:
        mark("ready")
        shop.start()
        # the loop runs: decisions, rewards, transitions, and model versions published
        wait_for(lambda: learned_version() >= 2, 120, "a learned model version", *procs)
        version_at_stop, rounds_at_stop = learned_version(), shop.rounds
        mark("stop")
        stop(cfg)  # a controlled shutdown; the data dir stays
        mark("stopped")
        time.sleep(15)  # the shop keeps producing into its producer's queue
        for p in procs:
            assert p.proc.poll() is None, f"{p.command} died while the broker was down:\n{p.tail()}"
        start(cfg, wait=120)
        mark("started")
        # a new model version, learned and published after the broker came back
        wait_for(lambda: learned_version() > version_at_stop + 1, 120,
                 "a model version after the restart", *procs)
        mark("new version")
        time.sleep(3)  # a few more rounds with the broker back
        rounds = shop.finish()
        mark("shop done")
        n_closed = len(users) * (rounds - 1)
        log = decisions.until(lambda docs: len({d["trigger_event_id"] for d in docs})
                              >= len(users) * rounds, 300)
        rw = rewards.until(lambda docs: len({d["decision_id"] for d in docs}) >= n_closed, 300)
        time.sleep(2)
        log, rw = decisions.until(lambda _: True, 0), rewards.until(lambda _: True, 0)
        log += decisions.reader.read(10_000, timeout=2.0)
        rw += rewards.reader.read(10_000, timeout=2.0)
        mark("drained")
        after = versions(cfg.bootstrap, cands)
        worker_errors = {s: errors(ports["worker"], s) for s in ("send", "changelog", "decide",
                                                                  "join", "dlq")}
        learner_errors = {s: errors(ports["learner"], s) for s in ("learn",)}
        alive = {p.command: p.proc.poll() is None for p in procs}
    finally:
        shop.halt.set()
        decisions.close()
        rewards.close()
        for p in procs:
            p.stop()

    assert alive == {"worker": True, "learner": True}, "a process died"
    assert pids == {p.command: p.proc.pid for p in procs}  # the very processes started first
    assert shop.failed == [], f"the shop's own producer lost records: {shop.failed[:5]}"
    assert rounds_at_stop + 20 < rounds, "too few rounds after the broker came back"
    resent = check_decisions(log, rw, users, rounds)
    assert after == sorted(set(after)), f"a version published twice or out of order: {after}"
    assert after[-1] > version_at_stop + 1, (after, version_at_stop)
    assert learner_errors == {"learn": 0.0}, learner_errors
    # the outage was far shorter than the producers' delivery timeouts: nothing failed
    assert worker_errors == {s: 0.0 for s in worker_errors}, worker_errors
    print(f"\nbroker restart: {rounds} rounds of {len(users)} users ({rounds_at_stop} before "
          f"the stop), broker down {at['started'] - at['stop']:.0f} s; {len(log)} decisions "
          f"({resent} re-sent), {len(rw)} rewards; model v{version_at_stop:.0f} at the stop, "
          f"v{after[-1]} at the end; worker errors {worker_errors}; phases "
          + ", ".join(f"{k} {v:.0f} s" for k, v in at.items()))


def cli(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamagent.cli", *args],
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.timeout(900)
def test_failed_sends_stop_the_commit_and_the_worker(own_broker, tmp_path, run_id):
    """The worker's producer gives a record up after 3 s (Faust's PRODUCER_REQUEST_TIMEOUT;
    20 min by default) and the broker is killed while the worker works through a backlog:
    records it already handed to its producer, and those it hands over meanwhile, fail.

    The worker must count the failures, commit no offset of an input whose outputs were
    lost, and stop (exit status not 0), so that it is restarted. Restarted (by the test, as
    an orchestrator would), it reprocesses from its last commit: every trigger ends with its
    decision, none with two different ones.

    It also caught a Faust race (stream/faust_internals.py ``install_recovery_keeps_buffers``): the
    restarted worker, recovering its tables, let records fetched during the seek to the
    committed offsets reach the stream and then cleared them, so a stretch of a partition
    was never decided (9 to 872 triggers in one run of two) and the commit stuck before it.
    Both workers must now report no skipped offset."""
    started = time.monotonic()
    cfg = own_broker
    port = free_port()
    env = topic_env("bf" + run_id, cfg.bootstrap, tmp_path / "data", **{**LOOP,
                    "STREAMAGENT_METRICS_PORT": port, "STREAMAGENT_COMMIT_INTERVAL_S": "1",
                    # Faust's own settings, read from the environment
                    "PRODUCER_REQUEST_TIMEOUT": "3", "BROKER_SESSION_TIMEOUT": "10"})
    made = cli(env, "topics", "create")
    assert made.returncode == 0, made.stderr[-2000:]
    users = [f"bf-{i}" for i in range(2000)]
    rounds = 15
    p = make_producer(plaintext(cfg.bootstrap))
    for r in range(rounds):
        for i, u in enumerate(users):  # 10 s of event time apart: windows close one by one
            p.produce(env["STREAMAGENT_TOPIC_USER_EVENTS"], key=u.encode(), value=orjson.dumps(
                {"event_id": f"{u}-{r}", "user_id": u, "type": "session_start",
                 "ts": T0 + (r * len(users) + i) * 10_000}))
            p.poll(0)
    assert p.flush(60) == 0
    n_triggers = len(users) * rounds

    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    seen: dict[str, float] = {}

    def look() -> dict[str, float]:
        got = metrics(port)
        if got:
            seen.update(got)
        return got

    try:
        wait_for(lambda: look().get('streamagent_ingest_events_total{type="session_start"}', 0)
                 >= 3000, 120, "the worker at work", worker)
        applied = seen['streamagent_ingest_events_total{type="session_start"}']
        kill(cfg)  # the broker, at once (SIGKILL)
        killed_at = time.monotonic()
        while time.monotonic() - killed_at < 12 and worker.proc.poll() is None:
            look()
            time.sleep(0.5)
        start(cfg, wait=120)
        deadline = time.monotonic() + 60
        while worker.proc.poll() is None and time.monotonic() < deadline:
            look()
            time.sleep(0.5)
        code = worker.proc.poll()  # None: still running (checked below, after the loss)
        stopped_s = time.monotonic() - killed_at
        first_log = worker.log_path.read_text(errors="replace")
        worker.stop()
        worker = WorkerProcess(env, tmp_path / "worker.log").start()  # the orchestrator
        decisions = Collector(cfg.bootstrap, env["STREAMAGENT_TOPIC_DECISION_LOG"])
        try:
            log = decisions.until(lambda docs: len({d["trigger_event_id"] for d in docs})
                                  >= n_triggers, 600)
            log += decisions.reader.read(10_000, timeout=3.0)
        finally:
            decisions.close()
        after = metrics(port)  # the restarted worker: what it found replayed
    finally:
        worker.stop()
    replays = {k: after.get(f"streamagent_ingest_{k}_total", 0.0)
               for k in ("replayed_events", "replay_decision_missing")}
    skipped = {f"{who} {k}": v for who, got in (("first", seen), ("restarted", after))
               for k, v in got.items()
               if k.startswith("streamagent_ingest_offsets_skipped_total")}

    failed = {s: seen.get(f'streamagent_stream_processing_errors_total{{stage="{s}"}}', 0.0)
              for s in ("send", "changelog")}
    assert failed["send"] + failed["changelog"] > 0, (failed, first_log[-3000:])
    by_trigger: dict[str, set] = defaultdict(set)
    docs: dict[str, dict] = {}
    for d in log:
        by_trigger[d["trigger_event_id"]].add(d["decision_id"])
        assert docs.setdefault(d["decision_id"], d) == d, "a decision re-sent with other content"
    want = {f"{u}-{r}" for u in users for r in range(rounds)}
    missing = sorted(want - set(by_trigger))
    assert not missing, (f"{len(missing)} of {n_triggers} triggers never got a decision, e.g. "
                         f"{missing[:5]}; failures counted {failed}, exit status {code}, "
                         f"restarted worker: {replays}, skipped offsets {skipped}\n"
                         f"{first_log[-3000:]}")
    assert skipped and not any(skipped.values()), skipped
    assert all(len(ids) == 1 for ids in by_trigger.values()), "a trigger decided twice"
    assert code is not None, f"the worker carried on after failed sends:\n{first_log[-3000:]}"
    assert code != 0, f"the worker stopped with status 0 after failed sends:\n{first_log[-3000:]}"
    print(f"\nfailed sends: {n_triggers} triggers; the broker killed at {applied:.0f} "
          f"applied; failures counted {failed}; the worker stopped {stopped_s:.0f} s after the "
          f"kill with status {code}; restarted, {len(log)} decisions ({len(log) - len(docs)} "
          f"re-sent; replays {replays}), none lost; {time.monotonic() - started:.0f} s")
