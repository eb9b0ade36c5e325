"""Shared fixtures. The `kafka` fixture runs a real local broker for the whole session.

Set STREAMAGENT_TEST_BOOTSTRAP to use a broker you already run instead.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def kafka(tmp_path_factory) -> str:
    external = os.environ.get("STREAMAGENT_TEST_BOOTSTRAP")
    if external:
        yield external
        return
    from streamagent.ops.broker import BrokerConfig, start, stop
    from streamagent.ops.local import free_port_pair

    # a free port (and the one above it, for the controller) unless one is given
    port = int(os.environ.get("STREAMAGENT_TEST_KAFKA_PORT") or 0) or free_port_pair()
    cfg = BrokerConfig(data_dir=tmp_path_factory.mktemp("kafka"), port=port, heap="768m")
    start(cfg, wait=120)
    try:
        yield cfg.bootstrap
    finally:
        stop(cfg)


@pytest.fixture
def run_id() -> str:
    return uuid.uuid4().hex[:8]


def topic_env(prefix: str, bootstrap: str, data_dir: Path, **extra) -> dict:
    """Environment for a worker whose topics, group and stores belong to one test only."""
    env = {
        "STREAMAGENT_KAFKA_BOOTSTRAP": bootstrap,
        "STREAMAGENT_APP_ID": f"sa-{prefix}",
        "STREAMAGENT_DATA_DIR": str(data_dir),
        "STREAMAGENT_TOPIC_USER_EVENTS": f"{prefix}-user-events",
        "STREAMAGENT_TOPIC_CONVERSIONS": f"{prefix}-conversions",
        "STREAMAGENT_TOPIC_COUPON_ACTIONS": f"{prefix}-coupon-actions",
        "STREAMAGENT_TOPIC_DECISION_LOG": f"{prefix}-decision-log",
        "STREAMAGENT_TOPIC_REWARDS": f"{prefix}-rewards",
        "STREAMAGENT_TOPIC_TRANSITIONS": f"{prefix}-transitions",
        "STREAMAGENT_TOPIC_MODEL_UPDATES": f"{prefix}-model-updates",
        "STREAMAGENT_TOPIC_MODEL_CANDIDATES": f"{prefix}-model-candidates",
        "STREAMAGENT_LEARNER_METRICS_PORT": "0",
        "STREAMAGENT_PARTITIONS": "2",
        "STREAMAGENT_METRICS_PORT": "0",
        "STREAMAGENT_LOG_LEVEL": "info",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env
