"""The Compose stack for real: images built, two deciders, the learner, the simulated shop and
Prometheus up on their own network, and the whole loop checked from outside.

Run it with `make test-containers` (it is excluded from the default pytest run). What it needs
and how it gets it (a Docker engine, Compose v2, a Debian base image, the Kafka jars, a
wheelhouse) is in tests/containers/stack.py; what it stands in for and what it does not cover
(Grafana) is in deploy/compose.test.yml and deploy/README.md. A cold run (nothing cached)
takes 9-11 minutes on 2 cores, a warm one (images built) about 1.5.

Environment: STREAMAGENT_CONTAINERS_KEEP=1 leaves the stack (and a dockerd it started)
running at the end; STREAMAGENT_TEST_PROJECT (streamagent-test), STREAMAGENT_TEST_BASE_IMAGE
(streamagent-test/debian:bookworm), STREAMAGENT_DEBIAN_MIRROR, STREAMAGENT_WHEELHOUSE
(~/.cache/streamagent/wheels), STREAMAGENT_TEST_WHEELS_PORT (38741; fixed, because the URL is
part of the build cache key), STREAMAGENT_CA_BUNDLE (the host's pip CA bundle).
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from streamagent.ops.local import free_port
from tests.containers.stack import (CACHE, ROOT, Stack, WheelServer, bridge_gateway,
                                    ensure_base_image, ensure_compose, ensure_docker,
                                    ensure_wheelhouse, host_ca_bundle, kafka_libs, log, run)

pytestmark = [pytest.mark.containers, pytest.mark.slow, pytest.mark.timeout(5400)]

PROJECT = os.environ.get("STREAMAGENT_TEST_PROJECT", "streamagent-test")
BASE = os.environ.get("STREAMAGENT_TEST_BASE_IMAGE", "streamagent-test/debian:bookworm")
MIRROR = os.environ.get("STREAMAGENT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
WHEELHOUSE = Path(os.environ.get("STREAMAGENT_WHEELHOUSE") or CACHE / "wheels")
WHEELS_PORT = int(os.environ.get("STREAMAGENT_TEST_WHEELS_PORT", "38741"))
KEEP = os.environ.get("STREAMAGENT_CONTAINERS_KEEP") == "1"
DECIDERS = 2
FLOW_TIMEOUT = 600  # s from `up` until everything below has been seen


def rule_count() -> int:
    n = 0
    for f in sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml")):
        for g in yaml.safe_load(f.read_text())["groups"]:
            n += len(g["rules"])
    return n


def prom(base: str, path: str) -> dict:
    with urllib.request.urlopen(base + path, timeout=10) as resp:
        doc = json.loads(resp.read())
    assert doc["status"] == "success", doc
    return doc["data"]


def prom_query(base: str, expr: str) -> dict[str, float]:
    """{instance: value} of an instant vector."""
    data = prom(base, "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    return {r["metric"].get("instance", ""): float(r["value"][1]) for r in data["result"]}


def wait_for(what: str, check, timeout: float, every: float = 5.0):
    """Poll ``check()`` until it returns a truthy non-string result; a string (or a falsy
    value, or an exception) says what is still missing, logged every 30 s. An AssertionError
    fails at once."""
    deadline = time.monotonic() + timeout
    last_log, last = 0.0, "not checked yet"
    while True:
        try:
            result = check()
            if result and not isinstance(result, str):
                log(f"ok: {what}")
                return result
            last = result or "not yet"
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported below
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s; last: {last}")
        if time.monotonic() - last_log > 30:
            log(f"waiting: {what} ({last})")
            last_log = time.monotonic()
        time.sleep(every)


def partition_counts(bootstrap: str, topic: str) -> dict[int, int]:
    from confluent_kafka import TopicPartition

    from streamagent.ops.kafka import make_consumer, plaintext

    c = make_consumer(plaintext(bootstrap))
    try:
        md = c.list_topics(topic, timeout=10).topics[topic]
        if md.error is not None:
            raise RuntimeError(str(md.error))
        out = {}
        for p in md.partitions:
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            out[p] = high - low
        return out
    finally:
        c.close()


def model_versions(bootstrap: str) -> list[int]:
    from streamagent.core.qnet import ModelSnapshot
    from streamagent.ops.kafka import plaintext
    from streamagent.ops.tail import read_all

    return [ModelSnapshot.from_bytes(m.value()).version
            for m in read_all(plaintext(bootstrap), "model-updates", idle=2.0, max_wait=30)]


def image_id(ref: str) -> str | None:
    out = run(["docker", "image", "inspect", "--format", "{{.Id}}", ref], check=False)
    return out.stdout.decode().strip() if out.returncode == 0 else None


def test_compose_stack_end_to_end():
    times: dict[str, float] = {}
    t = time.monotonic()

    def lap(name: str) -> None:
        nonlocal t
        times[name] = time.monotonic() - t
        t = time.monotonic()

    log("step 1/7: Docker engine")
    docker = ensure_docker()
    stack = wheels = None
    ok = False
    try:
        log("step 2/7: Docker Compose v2")
        compose = ensure_compose()
        lap("engine + compose")

        log("step 3/7: base image, Kafka jars, wheelhouse")
        ensure_base_image(BASE, MIRROR)
        libs = kafka_libs()
        ca = host_ca_bundle()
        if ca is None:
            ca = CACHE / "empty-ca-bundle.pem"  # the secret must exist; empty = not used
            ca.write_text("")
        kafka_port, prom_port = free_port(), free_port()
        env = {**os.environ,
               "STREAMAGENT_BASE_IMAGE": BASE,
               "STREAMAGENT_IMAGE": "streamagent-test/streamagent:local",
               "STREAMAGENT_KAFKA_LIBS": str(libs),
               "STREAMAGENT_CA_BUNDLE": str(ca),
               "KAFKA_HOST_PORT": str(kafka_port),
               "PROMETHEUS_PORT": str(prom_port),
               "MONITORING_ADDR": "127.0.0.1",
               # Grafana is not started (compose.test.yml), but the file needs a password
               "GRAFANA_ADMIN_PASSWORD": secrets.token_hex(16),
               "STREAMAGENT_WHEELS_URL": "", "STREAMAGENT_WHEELS_ONLY": ""}
        for k in ("KAFKA_IMAGE", "PROMETHEUS_IMAGE", "GRAFANA_IMAGE", "STREAMAGENT_PARTITIONS",
                  "COMPOSE_FILE", "COMPOSE_PROFILES", "COMPOSE_PROJECT_NAME"):
            env.pop(k, None)  # the test's own choices, not the caller's
        gw = bridge_gateway()
        if ensure_wheelhouse(WHEELHOUSE) and gw:
            wheels = WheelServer(WHEELHOUSE, gw, WHEELS_PORT).start()
            env.update(STREAMAGENT_WHEELS_URL=wheels.url, STREAMAGENT_WHEELS_ONLY="1")
            log(f"wheelhouse served to the build at {wheels.url}")
        else:
            log("wheelhouse not used: the image build downloads its dependencies from PyPI")
        lap("base image + jars + wheelhouse")

        stack = Stack(compose, PROJECT, env)
        stack("down", "--volumes", "--remove-orphans", timeout=300)  # an interrupted run's leftovers

        log("step 4/7: build the streamagent image (deploy/Dockerfile) and the Kafka and "
            "Prometheus stand-ins")
        build_log = CACHE / "containers-build.log"
        images = ("streamagent-test/streamagent:local", "streamagent-test/kafka:4.1.1",
                  "streamagent-test/prometheus:debian")
        before = {ref: image_id(ref) for ref in images}
        with open(build_log, "wb") as f:
            proc = subprocess.run(
                stack.cmd("build", "--progress", "plain", "topics", "kafka", "prometheus"),
                stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=3600)
        if proc.returncode != 0:
            raise AssertionError(f"image build failed; the end of {build_log}:\n"
                                 + build_log.read_text(errors="replace")[-5000:])
        if wheels:
            wheels.stop()
            wheels = None
        for ref in images:
            size = run(["docker", "image", "inspect", "--format", "{{.Size}}", ref]).stdout
            rebuilt = before[ref] != image_id(ref)
            log(f"image {ref}: {int(size) / 1e9:.2f} GB" + (" (rebuilt)" if rebuilt else ""))
            if rebuilt and before[ref]:  # the previous build, now untagged: do not pile them up
                run(["docker", "image", "rm", before[ref]], check=False)
        lap("build")

        log(f"step 5/7: up: kafka, topics, {DECIDERS} deciders, learner, prometheus, the demo "
            f"shop (project {PROJECT}; kafka on 127.0.0.1:{kafka_port}, prometheus on "
            f"127.0.0.1:{prom_port})")
        stack("up", "--detach", "--no-build", "--scale", f"decider={DECIDERS}", timeout=900)
        lap("up (until the deciders are healthy)")

        log("step 6/7: health, scraping and rules")
        deciders = [c["Name"] for c in stack.containers("decider")]
        assert len(deciders) == DECIDERS, deciders
        learner = [c["Name"] for c in stack.containers("learner")]
        for name in deciders + learner:
            wait_for(f"{name} healthy (its /readyz healthcheck)",
                     lambda n=name: stack.health(n) == "healthy" or stack.health(n), 300)
        for service, index, port in [*(("decider", i, 9400) for i in range(1, DECIDERS + 1)),
                                     ("learner", 1, 9401)]:
            status, body = stack.http_get(service, index, f"http://127.0.0.1:{port}/healthz")
            assert status == 200 and body.strip() == "ok", (service, index, status, body)
            status, body = stack.http_get(service, index, f"http://127.0.0.1:{port}/readyz")
            doc = json.loads(body)
            assert status == 200 and doc["ready"] is True and doc["checks"], (service, index, body)
            log(f"{service} #{index} /readyz: ready, checks "
                + ", ".join(f"{k}: {v.get('detail', '')}" for k, v in doc["checks"].items()))

        base = f"http://127.0.0.1:{prom_port}"

        def targets():
            active = prom(base, "/api/v1/targets")["activeTargets"]
            ours = [t for t in active if t["labels"]["job"].startswith("streamagent-")]
            by_job = {}
            for tg in ours:
                by_job.setdefault(tg["labels"]["job"], []).append(tg["health"])
            if (sorted(by_job.get("streamagent-decider", [])) != ["up"] * DECIDERS
                    or by_job.get("streamagent-learner") != ["up"]
                    or any(tg["health"] != "up" for tg in active)):
                return f"targets {[(tg['labels']['job'], tg['scrapeUrl'], tg['health'], tg.get('lastError')) for tg in active]}"
            return ours

        ours = wait_for(f"Prometheus scrapes {DECIDERS} deciders and the learner, all up",
                        targets, 180)
        assert len(ours) == DECIDERS + 1

        want_rules = rule_count()

        def rules():
            groups = prom(base, "/api/v1/rules")["groups"]
            got = [r for g in groups for r in g["rules"]]
            bad = [(r["name"], r.get("lastError")) for r in got if r.get("health") == "err"]
            assert not bad, f"rules failing to evaluate: {bad}"
            return (len(got) == want_rules and all(r.get("health") == "ok" for r in got)
                    or f"{len(got)} of {want_rules} rules loaded, "
                       f"{sum(r.get('health') == 'ok' for r in got)} evaluated")

        wait_for(f"Prometheus loaded and evaluated all {want_rules} rules of "
                 f"deploy/prometheus/rules", rules, 120)
        lap("health + scraping + rules")

        log("step 7/7: the loop: decisions from both replicas, rewards, model versions")
        bootstrap = f"localhost:{kafka_port}"

        def shop_running() -> None:
            shop = stack.containers("shop")
            if shop and shop[0]["State"] == "running":
                return
            # CI shows only the end of the output: the evidence goes into the message, the
            # shop's own last words last
            ready = []
            for i in range(1, DECIDERS + 1):
                status, body = stack.http_get("decider", i, "http://127.0.0.1:9400/readyz")
                ready.append(f"decider #{i} /readyz {status}: {body.strip()[:600]}")
            raise AssertionError(
                f"the demo shop stopped: {[(c.get('State'), c.get('ExitCode')) for c in shop]}"
                f"\n--- deciders' /readyz\n" + "\n".join(ready)
                + "\n--- deciders' and learner's last log lines\n"
                + stack.logs(12, "decider", "learner")[-6000:]
                + "\n--- the deciders' notable log lines (restarts, errors, rebalances)\n"
                + stack.digest("decider")
                + "\n--- the shop's last log lines\n" + stack.logs(4, "shop")[-1000:])

        def decisions():
            shop_running()
            per = prom_query(base, "sum by (instance) "
                             '(streamagent_decision_decisions_total{job="streamagent-decider"})')
            if len(per) < DECIDERS or min(per.values()) <= 0:
                return f"decisions per replica {per}"
            parts = partition_counts(bootstrap, "decision-log")
            if not parts or min(parts.values()) <= 0:
                return f"decision-log records per partition {parts}"
            return per, parts

        per, parts = wait_for(f"decisions on decision-log from each of the {DECIDERS} replicas",
                              decisions, FLOW_TIMEOUT)
        log(f"decisions per replica {per}; decision-log records per partition {parts}")

        def rewards():
            shop_running()
            parts = partition_counts(bootstrap, "rewards")
            return sum(parts.values()) > 0 and parts or f"rewards per partition {parts}"

        rw = wait_for("rewards on the rewards topic", rewards, FLOW_TIMEOUT)
        log(f"rewards per partition {rw}")

        def models():
            shop_running()
            versions = model_versions(bootstrap)
            if not versions or max(versions) < 1:
                return f"model-updates versions {versions}"
            live = prom_query(base, 'streamagent_decision_model_version{job="streamagent-decider"}')
            if len(live) < DECIDERS or min(live.values()) < 1:
                return f"deciders' live model versions {live}"
            return versions, live

        versions, live = wait_for("a model version >= 1 on model-updates, live in every decider",
                                  models, FLOW_TIMEOUT)
        log(f"model-updates versions {versions}; live in the deciders {live}")
        shop_running()
        lap("the loop")
        ok = True
    except BaseException:
        if stack is not None:
            log("FAILED; the end of every container's log:\n" + stack.logs())
        raise
    finally:
        if wheels:
            wheels.stop()
        if stack is not None and not KEEP:
            log("down --volumes")
            stack("down", "--volumes", "--remove-orphans", check=False, timeout=300)
            lap("down")
        if KEEP:
            log(f"left running (STREAMAGENT_CONTAINERS_KEEP=1): {' '.join(stack.cmd('ps'))}"
                if stack else "left running")
        else:
            docker.stop()
        total = sum(times.values())
        log(("passed" if ok else "failed") + f" in {total / 60:.1f} min: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
