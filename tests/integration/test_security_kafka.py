"""The whole loop on a SASL_SSL broker (SCRAM-SHA-512 over TLS, hostname checked): topics,
worker (Faust/aiokafka), learner and tools (confluent-kafka) all authenticate with the same
STREAMAGENT_KAFKA_* settings (the password read from a file, as a mounted Kubernetes Secret),
and clients without them get nothing."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time

import orjson
import pytest

from streamagent.ops.broker import BrokerConfig, BrokerSecurity, start, stop
from streamagent.ops.kafka import make_producer
from streamagent.ops.local import free_port_pair
from streamagent.units import HOUR_MS
from tests.conftest import topic_env
from tests.integration.helpers import WorkerProcess, produce

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

T0 = 1_767_225_600_000
USERS = [f"sec-{i}" for i in range(24)]
PASSWORD = secrets.token_hex(12)
LOOP = dict(
    STREAMAGENT_ATTRIBUTION_WINDOW_HOURS="2", STREAMAGENT_ALLOWED_LATENESS_MINUTES="1",
    STREAMAGENT_TRANSITION_HORIZON_DAYS="1", STREAMAGENT_LEARNING_STARTS="16",
    STREAMAGENT_BATCH_SIZE="16", STREAMAGENT_SNAPSHOT_EVERY_UPDATES="10",
    STREAMAGENT_SNAPSHOT_INTERVAL_S="1", STREAMAGENT_CAP_MIN_GAP_HOURS="0",
    STREAMAGENT_CAP_MAX_COUPONS="100", STREAMAGENT_BUDGET_PER_PERIOD="1000000",
)


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory):
    cfg = BrokerConfig(data_dir=tmp_path_factory.mktemp("kafka-sasl-ssl"), port=free_port_pair(),
                       heap="512m", security=BrokerSecurity(
                           protocol="SASL_SSL", mechanism="SCRAM-SHA-512",
                           users=(("streamagent", PASSWORD),)))
    start(cfg, wait=120)
    try:
        yield cfg
    finally:
        stop(cfg)


def cli(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamagent.cli", *args],
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def tail(env: dict, topic: str, n: int = 10_000) -> list[dict]:
    r = cli(env, "tail", "--topic", topic, "-n", str(n), "--timeout", "20")
    assert r.returncode == 0, r.stderr[-2000:]
    return [orjson.loads(line) for line in r.stdout.splitlines() if line.strip()]


def test_the_loop_runs_on_sasl_ssl_and_strangers_get_nothing(secure_broker, tmp_path):
    cfg = secure_broker
    secure = cfg.client()
    pw_file = tmp_path / "kafka-password"  # as a Kubernetes Secret mounts it
    pw_file.write_text(PASSWORD + "\n")
    env = {**topic_env("sec", cfg.bootstrap, tmp_path, **LOOP), **secure.env(),
           "STREAMAGENT_KAFKA_SASL_PASSWORD": "",
           "STREAMAGENT_KAFKA_SASL_PASSWORD_FILE": str(pw_file)}
    assert env["STREAMAGENT_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    events_topic = env["STREAMAGENT_TOPIC_USER_EVENTS"]
    log_topic = env["STREAMAGENT_TOPIC_DECISION_LOG"]

    made = cli(env, "topics", "create")
    assert made.returncode == 0, made.stderr[-2000:]
    assert f"created topic {log_topic}" in made.stdout

    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    learner = WorkerProcess(env, tmp_path / "learner.log", command="learner",
                            ready_marker=b"learner: model v").start()
    try:
        learned, rounds, decisions = False, 0, []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not learned:
            ts = T0 + rounds * 3 * HOUR_MS
            f = tmp_path / f"events-{rounds}.jsonl"
            f.write_bytes(b"\n".join(orjson.dumps({"event_id": f"{u}-r{rounds}", "user_id": u,
                                                   "type": "session_start", "ts": ts})
                                     for u in USERS))
            sent = cli(env, "produce", "--file", str(f))
            assert sent.returncode == 0, sent.stderr[-2000:]
            want = len(USERS) * (rounds + 1)
            for _ in range(30):
                decisions = tail(env, log_topic)
                if len(decisions) >= want:
                    break
                time.sleep(1.0)
            assert len(decisions) >= want, f"{len(decisions)} of {want}\n{worker.tail()}"
            # even users buy 30 minutes after each decision: rewards, transitions, learning
            produce(secure, env["STREAMAGENT_TOPIC_CONVERSIONS"], [
                (d["user_id"].encode(), orjson.dumps({
                    "order_id": f"o-{d['decision_id']}", "user_id": d["user_id"],
                    "ts": d["ts"] + HOUR_MS // 2, "amount": 80.0,
                    "decision_id": d["decision_id"]}))
                for d in decisions if d["trigger_event_id"].endswith(f"-r{rounds}")
                and int(d["user_id"].split("-")[1]) % 2 == 0])
            learned = any(d["policy_version"] >= 1 for d in decisions)
            rounds += 1
        assert {d["trigger_event_id"] for d in decisions} >= {f"{u}-r0" for u in USERS}
        # a version the learner published reached the worker, both over SASL_SSL
        assert learned, f"no decision used a learned model\n{learner.tail()}\n{worker.tail()}"
        listed = cli(env, "model", "list")
        assert listed.returncode == 0 and "<- live" in listed.stdout, listed.stdout + listed.stderr

        # strangers: no credentials, a wrong password, and a wrong password writing
        plain = {**env, **{k: "" for k in secure.env() if k.startswith("STREAMAGENT_KAFKA_S")},
                 "STREAMAGENT_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT"}
        wrong_pw = tmp_path / "wrong-password"
        wrong_pw.write_text("not-" + PASSWORD)
        wrong = {**env, "STREAMAGENT_KAFKA_SASL_PASSWORD_FILE": str(wrong_pw)}
        for name, stranger in (("plaintext", plain), ("wrong password", wrong)):
            t0 = time.monotonic()
            r = cli(stranger, "tail", "--topic", log_topic, "-n", "100", "--timeout", "5",
                    timeout=60)
            assert r.returncode == 2 and r.stdout == "", (name, r.stdout[:500])
            assert "cannot read" in r.stderr, (name, r.stderr[-1000:])
            assert time.monotonic() - t0 < 30, name
        assert "Authentication failed" in r.stderr  # the wrong password's, from librdkafka
        # a worker with the wrong password stops at start, saying why
        r = cli({**wrong, "STREAMAGENT_DATA_DIR": str(tmp_path / "w2")}, "worker", timeout=90)
        assert r.returncode == 2 and "cannot reach Kafka" in r.stderr, r.stderr[-2000:]
        intruder = make_producer(cfg.client(password="not-" + PASSWORD),
                                 **{"message.timeout.ms": 4000})
        errors = []
        intruder.produce(events_topic, key=b"intruder", value=orjson.dumps({
            "event_id": "intruder-1", "user_id": "intruder", "type": "session_start",
            "ts": T0 + rounds * 3 * HOUR_MS}), on_delivery=lambda err, _m: errors.append(err))
        assert intruder.flush(15) == 0 and len(errors) == 1 and errors[0] is not None
        time.sleep(3)
        assert not [d for d in tail(env, log_topic) if d["user_id"] == "intruder"]
        assert worker.proc.poll() is None and learner.proc.poll() is None
    finally:
        learner.stop()
        worker.stop()
    for log in (tmp_path / "worker.log", tmp_path / "learner.log"):
        assert PASSWORD not in log.read_text(errors="replace"), f"the password is in {log}"


def test_mtls_both_client_families_get_in_and_no_certificate_gets_nothing(tmp_path):
    """An SSL listener that requires client certificates: the tools (confluent-kafka) and an
    aiokafka producer configured as Faust configures the worker's get through; a client
    without a certificate does not."""
    import asyncio

    from aiokafka import AIOKafkaProducer
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    from streamagent.stream.app import faust_broker

    cfg = BrokerConfig(data_dir=tmp_path / "kafka", port=free_port_pair(), heap="512m",
                       security=BrokerSecurity(protocol="SSL"))
    start(cfg, wait=120)
    try:
        mtls = cfg.client()
        env = {**topic_env("mtls", cfg.bootstrap, tmp_path), **mtls.env()}
        topic = env["STREAMAGENT_TOPIC_DECISION_LOG"]
        assert cli(env, "topics", "create").returncode == 0
        f = tmp_path / "e.jsonl"
        f.write_bytes(orjson.dumps({"event_id": "m1", "user_id": "u1", "type": "page_view",
                                    "ts": T0}))
        r = cli(env, "produce", "--file", str(f), "--topic", topic)
        assert r.returncode == 0, r.stderr[-2000:]

        async def faust_like_send() -> None:
            auth = credentials_to_aiokafka_auth(faust_broker(mtls)["broker_credentials"])
            p = AIOKafkaProducer(bootstrap_servers=cfg.bootstrap, **auth)
            await p.start()
            try:
                await p.send_and_wait(topic, b'{"via": "aiokafka"}', key=b"u2")
            finally:
                await p.stop()

        asyncio.run(faust_like_send())
        got = tail(env, topic)
        assert sorted(d.get("event_id") or d.get("via") for d in got) == ["aiokafka", "m1"]
        no_cert = {**env, "STREAMAGENT_KAFKA_SSL_CERTIFICATE_LOCATION": "",
                   "STREAMAGENT_KAFKA_SSL_KEY_LOCATION": ""}
        r = cli(no_cert, "tail", "--topic", topic, "--timeout", "5", timeout=60)
        assert r.returncode == 2 and r.stdout == "" and "cannot read" in r.stderr, r.stderr
    finally:
        stop(cfg)
