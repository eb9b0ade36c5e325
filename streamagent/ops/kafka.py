"""The one place that builds confluent-kafka clients, and the one way to send with backpressure.

Every producer, consumer and admin client in streamagent comes from here, so settings every
client must share (the keying partitioner, and later TLS/SASL) are set once. Faust's own
clients (aiokafka) are configured in streamagent.stream.app.
"""
from __future__ import annotations

import logging
import uuid

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

_rdkafka_log = logging.getLogger("streamagent.rdkafka")
_rdkafka_log.setLevel(logging.ERROR)  # "coordinator load in progress" at start-up is noise


def client_config(bootstrap: str, security: dict | None = None, **extra) -> dict:
    """librdkafka settings for any client: the bootstrap servers, ``security``, then ``extra``.

    ``security`` is where TLS/SASL settings (security.protocol, ssl.*, sasl.*) are merged in:
    from STREAMAGENT_* security settings, added by a later change.
    """
    conf = {"bootstrap.servers": bootstrap, **(security or {})}
    conf.update(extra)
    return conf


def make_producer(bootstrap: str, **extra) -> Producer:
    """A producer for keyed events; ``extra`` librdkafka settings win over these."""
    conf = {"linger.ms": 5, "enable.idempotence": True,
            # the Java client's partitioner (murmur2), which Faust/aiokafka use too: a user's
            # conversions must land on the partition number of the user's decisions
            "partitioner": "murmur2_random",
            "compression.type": "lz4", "queue.buffering.max.messages": 500000,
            "logger": _rdkafka_log}
    return Producer(client_config(bootstrap, **(conf | extra)))


def make_consumer(bootstrap: str, group: str | None = None, **extra) -> Consumer:
    """A consumer that starts at the earliest offset and commits only when told to.

    With no ``group`` it gets a fresh group of its own: it reads the whole topic and takes no
    partitions from anyone else.
    """
    conf = {"group.id": group or f"streamagent-tail-{uuid.uuid4()}",
            "auto.offset.reset": "earliest", "enable.auto.commit": False}
    return Consumer(client_config(bootstrap, **(conf | extra)))


def make_admin(bootstrap: str) -> AdminClient:
    return AdminClient(client_config(bootstrap))


def send(producer: Producer, topic: str, key: bytes | None, value: bytes,
         on_delivery=None) -> None:
    """Produce one message, waiting while the local queue is full; then serve delivery reports."""
    while True:
        try:
            producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
            break
        except BufferError:  # the local queue is full: let it drain
            producer.poll(0.05)
    producer.poll(0)
