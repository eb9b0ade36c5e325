"""Scale-out and recovery on the real broker (issue 14, item 1).

Deciders: four partitions, a steady stream of 40 users' events in rounds, with conversions.
Worker A runs alone; worker B joins mid-stream (a rebalance); A is SIGKILLed mid-stream and
comes back with an EMPTY data dir (its tables restored from the changelogs). Afterwards:

- every trigger has exactly one decision id, and a decision re-sent after the kill is identical;
- every decision whose attribution window closed has exactly one (distinct) reward;
- every decision, and every user's final state (the user-state changelog's latest record), is
  exactly what one uninterrupted decider makes of the same input: the reference is the
  worker's own engine (``DecisionEngine.step_batch``) run in this process over user-events as
  the broker holds them (same partitions and offsets), with the same settings, app id and
  fixed model file. (Same app id: the decision ids and the exploration draws hash it, so a
  second worker run under another app id would draw other actions.)

Learner: killed with SIGKILL between two checkpoints and restarted, it publishes higher
versions only, and learns every transition exactly once (the checkpoint's ``seen`` and input
offsets equal the transitions produced).
"""
from __future__ import annotations

import json
import re
import signal
import time
import urllib.error
import urllib.request
from collections import defaultdict

import numpy as np
import orjson
import pytest

from streamagent.core.contracts import Transition, encode
from streamagent.core.features import N_FEATURES
from streamagent.core.state import UserState
from streamagent.ops.kafka import plaintext
from streamagent.ops.local import free_port
from streamagent.ops.tail import read_all
from streamagent.units import HOUR_MS
from tests.conftest import topic_env
from tests.integration.helpers import TopicReader, WorkerProcess, event, produce, read_json

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

T0 = 1_767_225_600_000
PARTITIONS = 4


def readyz(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())
    except OSError:
        return None


def owned(port: int) -> set[int] | None:
    """The partitions a ready worker holds (None while it is not ready)."""
    doc = readyz(port)
    if not doc or not doc["ready"]:
        return None
    m = re.search(r"\[([\d, ]*)\]", doc["checks"]["partitions"]["detail"])
    return {int(p) for p in m.group(1).split(",") if p.strip()} if m else set()


def wait_split(ports: list[int], timeout: float = 240.0) -> list[set[int]]:
    """Until every worker is ready and together they hold each partition once, each some."""
    deadline = time.monotonic() + timeout
    got: list = []
    while time.monotonic() < deadline:
        got = [owned(p) for p in ports]
        if (all(g for g in got) and sum(len(g) for g in got) == PARTITIONS
                and set().union(*got) == set(range(PARTITIONS))):
            return got
        time.sleep(1.0)
    raise AssertionError(f"the rebalance did not settle in {timeout}s: {got}")


def model_file(env: dict, path, monkeypatch):
    """A fixed model (the seed's initial network) and the Settings the workers run with."""
    from streamagent.config import Settings
    from streamagent.core.catalog import load_catalog
    from streamagent.core.engine import initial_model

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = Settings()
    initial_model(load_catalog(s.catalog_path), tuple(s.hidden_sizes), s.seed,
                  s.q_heads).snapshot.save(path)
    monkeypatch.setenv("STREAMAGENT_MODEL_PATH", str(path))
    return Settings()


def reference(s, kafka: str, n_events: int) -> tuple[dict, dict]:
    """One uninterrupted decider over user-events as stored: (decision id -> decision-log
    document, user key -> final UserState)."""
    from streamagent.core.catalog import load_catalog
    from streamagent.core.engine import DecisionEngine, Model
    from streamagent.core.qnet import ModelSnapshot
    from streamagent.params import engine_params

    engine = DecisionEngine(load_catalog(s.catalog_path), engine_params(s, PARTITIONS),
                            Model(ModelSnapshot.load(s.model_path)))
    msgs = read_all(plaintext(kafka), s.topic_user_events, idle=2.0, max_wait=60)
    assert len(msgs) == n_events
    items = sorted(((m.value(), m.key(), m.partition(), m.offset()) for m in msgs),
                   key=lambda it: (it[2], it[3]))
    states: dict = {}
    results = engine.step_batch(items, states, {}, {}, now_ms=int(time.time() * 1000))
    decisions = {}
    for r in results:
        assert not isinstance(r, Exception), r
        if r.decision is not None:
            decisions[r.decision.decision_id] = orjson.loads(encode(r.decision.to_doc()))
    return decisions, states


@pytest.mark.timeout(1200)  # two session timeouts of a dead member, on a busy machine
def test_scale_out_kill_and_empty_disk_restore_decide_as_one_worker(kafka, tmp_path, run_id,
                                                                      monkeypatch):
    started = time.monotonic()
    ports = {"a": free_port(), "b": free_port()}
    env = topic_env("so" + run_id, kafka, tmp_path / "a", STREAMAGENT_PARTITIONS=str(PARTITIONS),
                    STREAMAGENT_ATTRIBUTION_WINDOW_HOURS="2",
                    STREAMAGENT_ALLOWED_LATENESS_MINUTES="1", STREAMAGENT_CAP_MIN_GAP_HOURS="0",
                    STREAMAGENT_CAP_MAX_COUPONS="1000", STREAMAGENT_BUDGET_PER_PERIOD="1000000",
                    STREAMAGENT_COMMIT_INTERVAL_S="5", STREAMAGENT_METRICS_PORT=str(ports["a"]))
    s = model_file(env, tmp_path / "model.snapshot", monkeypatch)
    env["STREAMAGENT_MODEL_PATH"] = str(s.model_path)
    env_b = {**env, "STREAMAGENT_DATA_DIR": str(tmp_path / "b"),
             "STREAMAGENT_METRICS_PORT": str(ports["b"])}
    env_a2 = {**env, "STREAMAGENT_DATA_DIR": str(tmp_path / "a-empty")}  # nothing on disk
    users = [f"so-{i}" for i in range(40)]
    rounds, join_round, kill_round = 8, 2, 5
    n_triggers = len(users) * (rounds + 1)
    n_events = 2 * n_triggers
    uev, conv = env["STREAMAGENT_TOPIC_USER_EVENTS"], env["STREAMAGENT_TOPIC_CONVERSIONS"]

    a = WorkerProcess(env, tmp_path / "a.log").start()
    b = a2 = None
    reader = TopicReader(kafka, env["STREAMAGENT_TOPIC_DECISION_LOG"])
    fault_at: dict[str, float] = {}
    try:
        for r in range(rounds + 1):
            ts = T0 + r * 3 * HOUR_MS if r < rounds else T0 + 100 * HOUR_MS  # the last closes all
            if r == join_round:  # B joins; this round's events arrive during the rebalance
                b = WorkerProcess(env_b, tmp_path / "b.log").start()
                fault_at["join"] = time.monotonic() - started
            items = []
            for u in users:
                items.append(event(f"{u}-{r}", u, "session_start", ts))
                items.append(event(f"{u}-{r}-v", u, "page_view", ts + 1000,
                                   category=("books", "toys", "garden")[r % 3]))
            produce(kafka, uev, items)
            got: list = []
            if r == kill_round:  # kill A while the round is being decided
                got = reader.read(8)
                a.proc.send_signal(signal.SIGKILL)
                a.proc.wait()
                fault_at["kill"] = time.monotonic() - started
                a = None
                a2 = WorkerProcess(env_a2, tmp_path / "a2.log").start()
            # B takes over A's partitions once the broker gives up on A (session timeout), then
            # A2 joins: read past the re-sent decisions until the round's triggers are all in
            # (earlier rounds' decisions re-sent after a rebalance or the kill come here too)
            def this_round() -> set[str]:
                return {t for d in got if (t := d["trigger_event_id"]).endswith(f"-{r}")}

            deadline = time.monotonic() + 300
            while len(this_round()) < len(users) and time.monotonic() < deadline:
                got += reader.read(len(users), timeout=10)
            logs = "\n".join(w.tail(30) for w in (a, b, a2) if w)
            assert len(this_round()) == len(users), logs
            if r == join_round + 1 or r == kill_round + 1:
                split = wait_split([ports["a"], ports["b"]])  # A (or A2) and B share the work
                fault_at[f"split{r}"] = time.monotonic() - started
            if r == rounds:  # no orders any more: heartbeats move the conversions' event time on
                produce(kafka, conv, [
                    (u.encode(), orjson.dumps({"order_id": f"hb-{u}", "user_id": u, "ts": ts,
                                              "amount": 0.0, "heartbeat": True})) for u in users])
            else:  # a third of the users buy half an hour after every session
                produce(kafka, conv, [
                    (u.encode(), orjson.dumps({"order_id": f"o-{u}-{r}", "user_id": u,
                                              "ts": ts + HOUR_MS // 2, "amount": 50.0}))
                    for u in users if int(u.split("-")[1]) % 3 == 0])
        log = read_json(kafka, env["STREAMAGENT_TOPIC_DECISION_LOG"], n_triggers, max_wait=120)
        rewards = read_json(kafka, env["STREAMAGENT_TOPIC_REWARDS"], len(users) * rounds,
                            max_wait=180)
        changelog = read_all(plaintext(kafka), f"{env['STREAMAGENT_APP_ID']}-user-state-changelog",
                             idle=3.0, max_wait=60)
        assert owned(ports["a"]), "the restored worker holds no partition"
    finally:
        reader.close()
        for w in (b, a2):
            if w is not None:
                w.stop()
        if a is not None:
            a.kill()
    runtime = time.monotonic() - started

    # every trigger: one decision id; a re-sent decision: the same content
    by_trigger: dict[str, set] = defaultdict(set)
    docs: dict[str, dict] = {}
    for d in log:
        d.pop("_key")
        by_trigger[d["trigger_event_id"]].add(d["decision_id"])
        assert docs.setdefault(d["decision_id"], d) == d, "a decision re-sent with other content"
    assert len(by_trigger) == n_triggers, "decisions lost"
    assert all(len(ids) == 1 for ids in by_trigger.values()), "a trigger decided twice"

    # every closed window: exactly one distinct reward, naming its decision
    distinct: dict[str, dict] = {}
    for rw in rewards:
        rw.pop("_key")
        assert distinct.setdefault(rw["decision_id"], rw) == rw, "two rewards for one decision"
    closed = {i for i, d in docs.items() if not d["trigger_event_id"].endswith(f"-{rounds}")}
    missing = sorted(docs[i]["trigger_event_id"] for i in closed - set(distinct))
    assert not missing, f"{len(missing)} decisions without reward, e.g. {missing[:10]}"
    assert set(distinct) == closed, "a reward for a decision whose window is still open"
    for rw in distinct.values():
        assert rw["orders"] == (1 if int(rw["user_id"].split("-")[1]) % 3 == 0 else 0), rw

    # the same decisions and final states as one uninterrupted decider
    ref_docs, ref_states = reference(s, kafka, n_events)
    assert set(ref_docs) == set(docs)
    differ = [i for i in docs if docs[i] != ref_docs[i]]
    assert not differ, (f"{len(differ)} decisions differ from one worker's, e.g.\n"
                        f"{docs[differ[0]]}\n{ref_docs[differ[0]]}")
    last: dict[bytes, bytes | None] = {}
    for m in changelog:
        last[m.key()] = m.value()
    assert set(last) == {u.encode() for u in users}
    for k, raw in last.items():
        assert raw is not None and UserState.from_bytes(raw) == ref_states[k], k

    n_conv = rounds * sum(int(u.split("-")[1]) % 3 == 0 for u in users) + len(users)
    print(f"\nscale-out: {n_events} user events + {n_conv} conversions/heartbeats in; "
          f"{len(docs)} decisions, {len(log) - len(docs)} re-sent duplicates; "
          f"{len(distinct)} rewards ({len(rewards) - len(distinct)} re-sent); final split "
          f"{split}; B joined at {fault_at['join']:.0f} s, A killed at {fault_at['kill']:.0f} s, "
          f"settled again at {fault_at[f'split{kill_round + 1}']:.0f} s; {runtime:.0f} s in all")


# ------------------------------------------------------------------ learner


# a learner that trains and publishes at once on a few hundred transitions; one transition,
# one replay item (n-step 1): the checkpoint's `seen` counts what was learned
QUICK_LEARNER = dict(STREAMAGENT_N_STEP="1", STREAMAGENT_GATE="false",
                     STREAMAGENT_TRAIN_EVERY="1", STREAMAGENT_LEARNING_STARTS="32",
                     STREAMAGENT_BATCH_SIZE="16", STREAMAGENT_SNAPSHOT_EVERY_UPDATES="20",
                     STREAMAGENT_SNAPSHOT_INTERVAL_S="2")


def transitions(n: int, start: int, n_actions: int, rng) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(start, start + n):
        user = f"lu-{i % 50}"
        t = Transition(decision_id=f"d-{i}", user_id=user, ts=T0 + i * 1000,
                       features=tuple(float(x) for x in rng.random(N_FEATURES)),
                       action_index=int(rng.integers(n_actions)), reward=float(rng.normal()),
                       propensity=0.5, policy_version=0,
                       next_features=tuple(float(x) for x in rng.random(N_FEATURES)),
                       next_allowed=(True,) * n_actions, next_ts=T0 + i * 1000 + HOUR_MS,
                       dt_ms=HOUR_MS, done=False, allowed=(True,) * n_actions)
        out.append((user.encode(), encode(t.to_doc())))
    return out


def metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
    except OSError:
        return None
    m = re.search(rf"^{name} (\S+)$", body, re.M)
    return float(m.group(1)) if m else None


def versions(kafka: str, topic: str) -> list[int]:
    return [int(m.key()) for m in read_all(plaintext(kafka), topic, idle=2.0, max_wait=30)]


@pytest.mark.timeout(900)
def test_learner_sigkill_and_restart_learns_each_transition_once(kafka, tmp_path, run_id):
    import torch

    from streamagent.config import Settings
    from streamagent.core.catalog import load_catalog

    started = time.monotonic()
    port = free_port()
    env = topic_env("sl" + run_id, kafka, tmp_path, STREAMAGENT_PARTITIONS=str(PARTITIONS),
                    STREAMAGENT_LEARNER_METRICS_PORT=str(port),
                    **QUICK_LEARNER)
    n_actions = load_catalog(Settings().catalog_path).n_actions
    rng = np.random.default_rng(14)
    topic, cands = env["STREAMAGENT_TOPIC_TRANSITIONS"], env["STREAMAGENT_TOPIC_MODEL_CANDIDATES"]
    chunks = [400, 400, 400]
    learner = WorkerProcess(env, tmp_path / "learner.log", command="learner",
                            ready_marker=b"learner: model v").start(ready_timeout=180)
    try:
        produce(kafka, topic, transitions(chunks[0], 0, n_actions, rng))
        deadline = time.monotonic() + 180
        while (metric(port, "streamagent_learning_transitions_total") or 0) < chunks[0]:
            assert time.monotonic() < deadline, learner.tail()
            time.sleep(1.0)
        deadline = time.monotonic() + 60
        while not versions(kafka, cands) and time.monotonic() < deadline:
            time.sleep(1.0)
        produce(kafka, topic, transitions(chunks[1], chunks[0], n_actions, rng))
        # kill it in the middle of the second chunk: past its last checkpoint, before the next
        deadline = time.monotonic() + 120
        while (metric(port, "streamagent_learning_transitions_total") or 0) < chunks[0] + 100:
            assert time.monotonic() < deadline, learner.tail()
            time.sleep(0.2)
        learned_before_kill = metric(port, "streamagent_learning_transitions_total")
        learner.proc.send_signal(signal.SIGKILL)
        learner.proc.wait()
        before = versions(kafka, cands)
        resumed_from = torch.load(env_checkpoint(env), map_location="cpu",
                                  weights_only=True)["seen"]

        learner = WorkerProcess(env, tmp_path / "learner.log", command="learner",
                                ready_marker=b"learner: model v").start(ready_timeout=180)
        produce(kafka, topic, transitions(chunks[2], chunks[0] + chunks[1], n_actions, rng))
        total = sum(chunks)
        deadline = time.monotonic() + 240
        while (metric(port, "streamagent_learning_transitions_total") or 0) < total - resumed_from:
            assert time.monotonic() < deadline, learner.tail()
            time.sleep(1.0)
        assert learner.stop() == 0, learner.tail()  # a last checkpoint and version
    finally:
        learner.kill()
    after = versions(kafka, cands)
    doc = torch.load(env_checkpoint(env), map_location="cpu", weights_only=True)

    assert before and after[:len(before)] == before
    assert after == sorted(set(after)), f"a version number published twice or out of order: {after}"
    assert after[-1] > before[-1], "no new version after the restart"
    assert doc["version"] == after[-1]
    assert sum(doc["extra"]["offsets"].values()) == total, "input offsets off the input's end"
    assert doc["seen"] == total, f"{doc['seen']} transitions learned of {total} produced"
    print(f"\nlearner: {total} transitions in; killed after {learned_before_kill:.0f} learned "
          f"(checkpoint had {resumed_from}); versions {before[0]}..{before[-1]} before, "
          f"up to {after[-1]} after; learned {doc['seen']} (0 twice, 0 lost); "
          f"{time.monotonic() - started:.0f} s")


def env_checkpoint(env: dict):
    from pathlib import Path

    return Path(env["STREAMAGENT_DATA_DIR"]) / "learner" / "checkpoint.pt"
