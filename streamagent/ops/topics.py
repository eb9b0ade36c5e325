"""Create the topics streamagent uses, with partitions, retention and compaction set."""
from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka.admin import NewTopic

from streamagent.config import Settings
from streamagent.errors import BrokerError
from streamagent.ops.kafka import KafkaClientConfig, kafka_client, make_admin
from streamagent.units import DAY_MS, HOUR_MS


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict


def topic_specs(s: Settings) -> list[TopicSpec]:
    p = s.partitions
    keep = lambda days: {"retention.ms": str(days * DAY_MS)}  # noqa: E731
    specs = [
        TopicSpec(s.topic_user_events, p, keep(7)),
        TopicSpec(s.topic_conversions, p, keep(30)),
        # decisions are the audit trail and what off-policy evaluation reads: keep longer
        TopicSpec(s.topic_coupon_actions, p, keep(30)),
        TopicSpec(s.topic_decision_log, p, keep(90)),
        TopicSpec(s.topic_rewards, p, keep(90)),
        TopicSpec(s.topic_transitions, p, keep(30)),
        # the latest snapshot is what matters: compacted, and one partition so every decider
        # reads all versions in order
        TopicSpec(s.topic_model_updates, 1, {"cleanup.policy": "compact",
                                             "max.message.bytes": str(16 * 1024 * 1024),
                                             "segment.ms": str(HOUR_MS)}),
        # every version, keyed by version: the registry behind `streamagent model`
        TopicSpec(s.topic_model_candidates, 1, {"cleanup.policy": "compact",
                                                "max.message.bytes": str(16 * 1024 * 1024),
                                                "segment.ms": str(HOUR_MS)}),
    ]
    for src in (s.topic_user_events, s.topic_conversions, s.topic_decision_log,
                s.topic_transitions):
        specs.append(TopicSpec(s.dlq(src), p, keep(30)))
    return specs


def create_topics(s: Settings, specs: list[TopicSpec] | None = None, log=print) -> list[str]:
    """Create missing topics; existing ones are left alone. Returns the names created."""
    specs = specs if specs is not None else topic_specs(s)
    a = make_admin(kafka_client(s))
    try:
        existing = set(a.list_topics(timeout=10).topics)
    except Exception as exc:
        raise BrokerError(f"cannot reach Kafka at {s.kafka_bootstrap}: {exc}. Check "
                          f"STREAMAGENT_KAFKA_BOOTSTRAP and the security settings "
                          f"(STREAMAGENT_KAFKA_SECURITY_PROTOCOL, _SASL_*, _SSL_*)") from None
    new = [NewTopic(t.name, num_partitions=t.partitions, replication_factor=s.replication_factor,
                    config=t.config)
           for t in specs if t.name not in existing]
    created = []
    for name, fut in (a.create_topics(new, operation_timeout=30).items() if new else []):
        try:
            fut.result()
            created.append(name)
            log(f"created topic {name}")
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise BrokerError(f"could not create topic {name}: {exc}") from None
    return created


def partition_count(kafka: KafkaClientConfig, topic: str, default: int) -> int:
    try:
        md = make_admin(kafka).list_topics(topic, timeout=10)
        t = md.topics.get(topic)
        if t is not None and t.error is None and t.partitions:
            return len(t.partitions)
    except Exception:
        pass
    return default
