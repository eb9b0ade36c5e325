"""Topic creation on a real broker takes the replication factor from the settings."""
from __future__ import annotations

import pytest

from streamagent.errors import BrokerError
from streamagent.ops.topics import TopicSpec, create_topics
from streamagent.params import shipped

pytestmark = pytest.mark.kafka


def test_topics_are_created_with_the_configured_replication_factor(kafka, run_id):
    from confluent_kafka.admin import AdminClient

    spec = [TopicSpec(f"rf-{run_id}", 2, {})]
    assert create_topics(shipped(kafka_bootstrap=kafka), spec, log=lambda m: None) == [spec[0].name]
    md = AdminClient({"bootstrap.servers": kafka}).list_topics(spec[0].name, timeout=10)
    assert all(len(p.replicas) == 1 for p in md.topics[spec[0].name].partitions.values())
    # the single local broker cannot hold 3 replicas: the setting reaches the broker, which says so
    with pytest.raises(BrokerError, match="(?i)replication"):
        create_topics(shipped(kafka_bootstrap=kafka, replication_factor=3),
                      [TopicSpec(f"rf3-{run_id}", 2, {})], log=lambda m: None)
