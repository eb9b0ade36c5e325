"""The one place that builds confluent-kafka clients, and the one way to send with backpressure.

Every producer, consumer and admin client in streamagent comes from here and is built from a
:class:`KafkaClientConfig`: where the brokers are *and* how to reach them (TLS, SASL), from
the STREAMAGENT_KAFKA_* settings (:func:`kafka_client`). There is no way to build a client
from a bare bootstrap string, so no client can forget the security settings. Faust's own
clients (aiokafka) get the same settings through :meth:`KafkaClientConfig.ssl_context` and
``streamagent.stream.app.faust_broker``; tests/unit/test_kafka_security.py checks that no
module builds a client any other way.
"""
from __future__ import annotations

import logging
import ssl
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from streamagent.errors import ConfigError

if TYPE_CHECKING:
    from streamagent.config import Settings

_rdkafka_log = logging.getLogger("streamagent.rdkafka")
_rdkafka_log.setLevel(logging.ERROR)  # "coordinator load in progress" at start-up is noise

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
# librdkafka keys that have a setting of their own: the setting reaches Faust's clients too,
# a passthrough key would reach only the confluent-kafka ones
_OWN_SETTING = {
    "bootstrap.servers": "KAFKA_BOOTSTRAP", "security.protocol": "KAFKA_SECURITY_PROTOCOL",
    "sasl.mechanism": "KAFKA_SASL_MECHANISM", "sasl.mechanisms": "KAFKA_SASL_MECHANISM",
    "sasl.username": "KAFKA_SASL_USERNAME", "sasl.password": "KAFKA_SASL_PASSWORD",
    "ssl.ca.location": "KAFKA_SSL_CA_LOCATION",
    "ssl.certificate.location": "KAFKA_SSL_CERTIFICATE_LOCATION",
    "ssl.key.location": "KAFKA_SSL_KEY_LOCATION", "ssl.key.password": "KAFKA_SSL_KEY_PASSWORD",
}
_SECRET_WORDS = ("password", "secret", "jaas", "token", "ssl.key.pem", "keystore")


def is_secret_key(key: str) -> bool:
    """Whether a librdkafka setting's value should never be shown (passwords, keys, tokens)."""
    k = key.lower()
    return any(w in k for w in _SECRET_WORDS) and not k.endswith(".location")


@dataclass(frozen=True)
class KafkaClientConfig:
    """Where the brokers are and how every client authenticates to them.

    Built from settings by :func:`kafka_client`; validated when built (a :class:`ConfigError`
    names the STREAMAGENT_* variable to fix). ``extra`` is the librdkafka passthrough
    (STREAMAGENT_KAFKA_CONFIG). Secrets are kept out of ``repr``.
    """

    bootstrap: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_ca_location: str | None = None
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    ssl_key_password: str | None = field(default=None, repr=False)
    extra: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        proto = (self.security_protocol or "PLAINTEXT").strip().upper()
        object.__setattr__(self, "security_protocol", proto)
        if self.sasl_mechanism:
            object.__setattr__(self, "sasl_mechanism", self.sasl_mechanism.strip().upper())
        for name in ("ssl_ca_location", "ssl_certificate_location", "ssl_key_location"):
            v = getattr(self, name)
            object.__setattr__(self, name, str(v) if v else None)
        self._validate()

    # --- validation --------------------------------------------------------------------
    def _validate(self) -> None:
        p = self.security_protocol
        if not self.bootstrap or not self.bootstrap.strip():
            raise ConfigError("STREAMAGENT_KAFKA_BOOTSTRAP is empty: name the brokers, "
                              "host:port[,host:port]")
        if p not in SECURITY_PROTOCOLS:
            raise ConfigError(f"STREAMAGENT_KAFKA_SECURITY_PROTOCOL={p!r} is not one of "
                              f"{', '.join(SECURITY_PROTOCOLS)}")
        if self.sasl:
            if not self.sasl_mechanism:
                raise ConfigError(f"STREAMAGENT_KAFKA_SECURITY_PROTOCOL={p} needs "
                                  f"STREAMAGENT_KAFKA_SASL_MECHANISM: one of "
                                  f"{', '.join(SASL_MECHANISMS)}")
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise ConfigError(f"STREAMAGENT_KAFKA_SASL_MECHANISM={self.sasl_mechanism!r} "
                                  f"is not supported: use one of {', '.join(SASL_MECHANISMS)} "
                                  f"(the same for the worker's aiokafka clients and the "
                                  f"confluent-kafka ones)")
            if not self.sasl_username:
                raise ConfigError(f"STREAMAGENT_KAFKA_SECURITY_PROTOCOL={p} needs "
                                  f"STREAMAGENT_KAFKA_SASL_USERNAME")
            if not self.sasl_password:
                raise ConfigError(f"STREAMAGENT_KAFKA_SECURITY_PROTOCOL={p} needs a password: "
                                  f"STREAMAGENT_KAFKA_SASL_PASSWORD or "
                                  f"STREAMAGENT_KAFKA_SASL_PASSWORD_FILE")
        elif self.sasl_username or self.sasl_password:
            raise ConfigError(f"STREAMAGENT_KAFKA_SASL_USERNAME/PASSWORD are set but "
                              f"STREAMAGENT_KAFKA_SECURITY_PROTOCOL={p} does not use SASL: "
                              f"set it to SASL_SSL (or SASL_PLAINTEXT)")
        files = {"STREAMAGENT_KAFKA_SSL_CA_LOCATION": self.ssl_ca_location,
                 "STREAMAGENT_KAFKA_SSL_CERTIFICATE_LOCATION": self.ssl_certificate_location,
                 "STREAMAGENT_KAFKA_SSL_KEY_LOCATION": self.ssl_key_location}
        given = {k: v for k, v in files.items() if v}
        if given and not self.tls:
            raise ConfigError(f"{', '.join(given)} set but STREAMAGENT_KAFKA_SECURITY_PROTOCOL="
                              f"{p} does not use TLS: set it to SSL or SASL_SSL")
        for name, path in given.items():
            if not Path(path).is_file():
                raise ConfigError(f"{name}={path}: no such file")
        if bool(self.ssl_certificate_location) != bool(self.ssl_key_location):
            raise ConfigError("mTLS needs both STREAMAGENT_KAFKA_SSL_CERTIFICATE_LOCATION and "
                              "STREAMAGENT_KAFKA_SSL_KEY_LOCATION")
        if self.ssl_key_password and not self.ssl_key_location:
            raise ConfigError("STREAMAGENT_KAFKA_SSL_KEY_PASSWORD is set without "
                              "STREAMAGENT_KAFKA_SSL_KEY_LOCATION")
        for key, _ in self.extra:
            if key in _OWN_SETTING:
                raise ConfigError(f"STREAMAGENT_KAFKA_CONFIG sets {key}: use "
                                  f"STREAMAGENT_{_OWN_SETTING[key]} instead, so that the "
                                  f"worker's Faust clients get it too")

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def with_bootstrap(self, bootstrap: str) -> "KafkaClientConfig":
        """The same security, other brokers (a benchmark's ``--bootstrap``)."""
        return replace(self, bootstrap=bootstrap)

    # --- what the clients get ----------------------------------------------------------
    def librdkafka(self) -> dict:
        """Settings -> librdkafka: bootstrap, security and the passthrough (STREAMAGENT_KAFKA_*
        as the confluent-kafka clients take them; :func:`client_config` adds per-client ones)."""
        return {**dict(self.extra), **self._security(), "bootstrap.servers": self.bootstrap}

    def _security(self) -> dict:
        conf: dict = {"security.protocol": self.security_protocol}
        if self.sasl:
            conf.update({"sasl.mechanism": self.sasl_mechanism,
                         "sasl.username": self.sasl_username,
                         "sasl.password": self.sasl_password})
        for key, value in (("ssl.ca.location", self.ssl_ca_location),
                           ("ssl.certificate.location", self.ssl_certificate_location),
                           ("ssl.key.location", self.ssl_key_location),
                           ("ssl.key.password", self.ssl_key_password)):
            if value:
                conf[key] = value
        return conf

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of Faust's aiokafka clients (None without TLS): the CA, the client
        certificate for mTLS, and hostname checking unless the passthrough turns it off
        (ssl.endpoint.identification.algorithm=none), as librdkafka does."""
        if not self.tls:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ssl_ca_location)
        if self.ssl_certificate_location:
            try:
                ctx.load_cert_chain(self.ssl_certificate_location, self.ssl_key_location,
                                    password=self.ssl_key_password)
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(f"cannot load the client certificate "
                                  f"STREAMAGENT_KAFKA_SSL_CERTIFICATE_LOCATION="
                                  f"{self.ssl_certificate_location} with its key "
                                  f"(STREAMAGENT_KAFKA_SSL_KEY_LOCATION, _KEY_PASSWORD): {exc}"
                                  ) from None
        if dict(self.extra).get("ssl.endpoint.identification.algorithm", "https") == "none":
            ctx.check_hostname = False
        return ctx

    def settings(self) -> dict[str, str]:
        """Settings(**this) gives a process this configuration, whatever its environment says."""
        return {k.removeprefix("STREAMAGENT_").lower(): v for k, v in self.env().items()}

    def env(self) -> dict[str, str]:
        """STREAMAGENT_KAFKA_* variables that give a child process this configuration (unset
        ones as empty strings, so that the parent's own do not leak in)."""
        return {
            "STREAMAGENT_KAFKA_BOOTSTRAP": self.bootstrap,
            "STREAMAGENT_KAFKA_SECURITY_PROTOCOL": self.security_protocol,
            "STREAMAGENT_KAFKA_SASL_MECHANISM": self.sasl_mechanism or "",
            "STREAMAGENT_KAFKA_SASL_USERNAME": self.sasl_username or "",
            "STREAMAGENT_KAFKA_SASL_PASSWORD": self.sasl_password or "",
            "STREAMAGENT_KAFKA_SASL_PASSWORD_FILE": "",
            "STREAMAGENT_KAFKA_SSL_CA_LOCATION": self.ssl_ca_location or "",
            "STREAMAGENT_KAFKA_SSL_CERTIFICATE_LOCATION": self.ssl_certificate_location or "",
            "STREAMAGENT_KAFKA_SSL_KEY_LOCATION": self.ssl_key_location or "",
            "STREAMAGENT_KAFKA_SSL_KEY_PASSWORD": self.ssl_key_password or "",
            "STREAMAGENT_KAFKA_CONFIG": ",".join(f"{k}={v}" for k, v in self.extra),
        }


def plaintext(bootstrap: str) -> KafkaClientConfig:
    """A broker on a trusted network with no TLS or SASL (the local test/demo broker)."""
    return KafkaClientConfig(bootstrap)


def _secret(v) -> str | None:
    """A SecretStr's value (a plain str is taken as it is)."""
    return v.get_secret_value() if hasattr(v, "get_secret_value") else v


def kafka_client(s: "Settings", bootstrap: str | None = None) -> KafkaClientConfig:
    """Settings -> the brokers and security every client uses (``bootstrap`` overrides
    STREAMAGENT_KAFKA_BOOTSTRAP). Reads the password file; raises ConfigError on a bad mix."""
    password = _secret(s.kafka_sasl_password)
    if s.kafka_sasl_password_file is not None:
        if password:
            raise ConfigError("set STREAMAGENT_KAFKA_SASL_PASSWORD or "
                              "STREAMAGENT_KAFKA_SASL_PASSWORD_FILE, not both")
        try:
            password = Path(s.kafka_sasl_password_file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"STREAMAGENT_KAFKA_SASL_PASSWORD_FILE="
                              f"{s.kafka_sasl_password_file}: {exc.strerror}") from None
        if not password:
            raise ConfigError(f"STREAMAGENT_KAFKA_SASL_PASSWORD_FILE="
                              f"{s.kafka_sasl_password_file} is empty")
    return KafkaClientConfig(
        bootstrap=bootstrap or s.kafka_bootstrap,
        security_protocol=s.kafka_security_protocol,
        sasl_mechanism=s.kafka_sasl_mechanism,
        sasl_username=s.kafka_sasl_username,
        sasl_password=password,
        ssl_ca_location=s.kafka_ssl_ca_location,
        ssl_certificate_location=s.kafka_ssl_certificate_location,
        ssl_key_location=s.kafka_ssl_key_location,
        ssl_key_password=_secret(s.kafka_ssl_key_password),
        extra=tuple(sorted(s.kafka_config.items())),
    )


def _require(kafka) -> KafkaClientConfig:
    if not isinstance(kafka, KafkaClientConfig):
        raise TypeError(f"Kafka clients are built from a KafkaClientConfig "
                        f"(streamagent.ops.kafka.kafka_client(settings)), not a "
                        f"{type(kafka).__name__}: a bare bootstrap string would drop the "
                        f"TLS/SASL settings")
    return kafka


def client_config(kafka: KafkaClientConfig, defaults: dict | None = None, **extra) -> dict:
    """librdkafka settings for any client: the client's ``defaults``, then the passthrough
    (STREAMAGENT_KAFKA_CONFIG, which may tune them), then the caller's ``extra`` (what the
    call needs: a group id, EOF events...), then bootstrap and security, which nothing
    overrides."""
    kafka = _require(kafka)
    return {**(defaults or {}), **dict(kafka.extra), **extra, **kafka._security(),
            "bootstrap.servers": kafka.bootstrap}


def make_producer(kafka: KafkaClientConfig, **extra) -> Producer:
    """A producer for keyed events; ``extra`` librdkafka settings win over these."""
    conf = {"linger.ms": 5, "enable.idempotence": True,
            # the Java client's partitioner (murmur2), which Faust/aiokafka use too: a user's
            # conversions must land on the partition number of the user's decisions
            "partitioner": "murmur2_random",
            "compression.type": "lz4", "queue.buffering.max.messages": 500000}
    return Producer(client_config(kafka, conf, logger=_rdkafka_log, **extra))


def make_consumer(kafka: KafkaClientConfig, group: str | None = None, **extra) -> Consumer:
    """A consumer that starts at the earliest offset and commits only when told to.

    With no ``group`` it gets a fresh group of its own: it reads the whole topic and takes no
    partitions from anyone else.
    """
    conf = {"auto.offset.reset": "earliest", "enable.auto.commit": False}
    return Consumer(client_config(kafka, conf, **{
        "group.id": group or f"streamagent-tail-{uuid.uuid4()}", **extra}))


def make_admin(kafka: KafkaClientConfig, **extra) -> AdminClient:
    return AdminClient(client_config(kafka, **extra))


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


def end_offsets(kafka: KafkaClientConfig, topic: str) -> int:
    """The sum of the topic's partitions' end offsets: how many records it has ever held."""
    from confluent_kafka import TopicPartition

    c = make_consumer(kafka)
    try:
        md = c.list_topics(topic, timeout=10)
        return sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                   for p in md.topics[topic].partitions)
    finally:
        c.close()


def seed_group_offsets(kafka: KafkaClientConfig, source_group: str, group: str,
                       topics: list[str]) -> dict[tuple[str, int], int]:
    """Give ``group`` the offsets ``source_group`` committed on ``topics``, unless ``group``
    has committed any there already; returns what was copied ((topic, partition) -> offset).

    A worker role that moves to a consumer group of its own (WORKER_ROLE=join) continues where
    the group that read its topics before stopped: nothing read twice, nothing skipped. The
    commit is a plain offset commit outside any group generation, which the broker accepts
    while ``group`` has no members (the worker calls this before it joins)."""
    from confluent_kafka import TopicPartition

    src, dst = make_consumer(kafka, group=source_group), make_consumer(kafka, group=group)
    try:
        tps = []
        for t in topics:
            meta = src.list_topics(t, timeout=10).topics[t]
            if meta.error is not None:
                raise RuntimeError(f"topic {t}: {meta.error}")
            tps += [TopicPartition(t, p) for p in sorted(meta.partitions)]
        if any(tp.offset >= 0 for tp in dst.committed(tps, timeout=10)):
            return {}
        have = [tp for tp in src.committed(tps, timeout=10) if tp.offset >= 0]
        if have:
            try:
                dst.commit(offsets=have, asynchronous=False)
            except KafkaException:
                # refused while the group has members: another worker of the role started
                # first and copied them (then they are there), else the failure is real
                if any(tp.offset >= 0 for tp in dst.committed(tps, timeout=10)):
                    return {}
                raise
        return {(tp.topic, tp.partition): tp.offset for tp in have}
    finally:
        src.close()
        dst.close()
