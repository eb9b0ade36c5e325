"""A real single-node Apache Kafka broker (KRaft, combined broker/controller) on loopback.

The jars come from Maven Central through the machine's Maven into a cache outside git
(``~/.cache/streamagent/kafka/<version>`` by default); storage is formatted with
``kafka.tools.StorageTool format --standalone`` and the node runs as ``kafka.Kafka``, the
same two steps Kafka's own ``bin/kafka-storage.sh`` and ``bin/kafka-server-start.sh`` take.
No Docker, no downloads beyond Maven Central.

With a :class:`BrokerSecurity` the client listener is secured (SASL_SSL with SCRAM users made
at format time, or SSL with client certificates required), on certificates made for the run
(streamagent.ops.tls); the controller listener stays PLAINTEXT on 127.0.0.1.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import secrets
from dataclasses import dataclass
from pathlib import Path

from streamagent.errors import BrokerError
from streamagent.ops.kafka import KafkaClientConfig
from streamagent.ops.local import port_busy

KAFKA_VERSION = "4.1.1"
SCALA_VERSION = "2.13"
LOG4J_VERSION = "2.24.3"
SLF4J_VERSION = "2.0.16"

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.streamagent</groupId><artifactId>kafka-runtime</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_{scala}</artifactId><version>{kafka}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>{log4j}</version></dependency>
    <!-- kafka_2.13 pulls slf4j-api 1.7, which the log4j2 binding for slf4j 2 cannot serve -->
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>{slf4j}</version></dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <File name="file" fileName="${sys:kafka.logs.dir}/server.log">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Logger name="kafka" level="INFO"/>
    <Logger name="org.apache.kafka" level="INFO"/>
    <Logger name="state.change.logger" level="WARN"/>
    <Root level="WARN"><AppenderRef ref="file"/></Root>
  </Loggers>
</Configuration>
"""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "streamagent" / "kafka"


@dataclass(frozen=True)
class BrokerSecurity:
    """A secured client listener for the local broker (tests; trying secured settings out).

    - ``SASL_SSL``: TLS, and SCRAM (``mechanism``) with ``users`` (name, password), created
      when the storage is formatted (so changing them needs a fresh ``data_dir``). Passwords
      must not contain ``,``, ``]`` or ``"`` (the format tool's syntax).
    - ``SSL``: TLS with a client certificate required (mTLS); ``users`` is not used.

    The broker's own connections use the same listener (an internal SCRAM user, or its
    certificate); the controller listener stays PLAINTEXT on 127.0.0.1, where clients can
    neither produce nor fetch. No ACLs: every authenticated client may do anything.
    """

    protocol: str = "SASL_SSL"
    mechanism: str = "SCRAM-SHA-512"
    users: tuple[tuple[str, str], ...] = (("streamagent", "streamagent-local-secret"),)

    def __post_init__(self) -> None:
        if self.protocol not in ("SASL_SSL", "SSL"):
            raise BrokerError(f"the local broker's secured listener is SASL_SSL or SSL, not "
                              f"{self.protocol!r}")
        if self.mechanism not in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
            raise BrokerError(f"the local broker supports SCRAM-SHA-256 or SCRAM-SHA-512, not "
                              f"{self.mechanism!r}")
        for name, password in self.users:
            if any(c in name + password for c in ',]"=[') or not name or not password:
                raise BrokerError(f"SCRAM user {name!r}: names and passwords must be non-empty "
                                  f"and free of , ] [ = and \"")


@dataclass(frozen=True)
class BrokerConfig:
    """Where and how the local broker runs. Defaults suit a laptop or a CI box."""

    data_dir: Path
    port: int = 9092
    controller_port: int | None = None
    version: str = KAFKA_VERSION
    cache_dir: Path | None = None
    heap: str = "1g"
    default_partitions: int = 4
    security: BrokerSecurity | None = None  # None: the client listener is PLAINTEXT

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    def client(self, user: str | None = None, password: str | None = None) -> KafkaClientConfig:
        """How a client reaches this broker: as ``user`` (the first of ``security.users`` by
        default; ``password`` overrides theirs, to try a wrong one), trusting its CA, with the
        client certificate under SSL. The certificates exist once the broker was started."""
        sec = self.security
        if sec is None:
            return KafkaClientConfig(self.bootstrap)
        ca = str(self.tls_dir / "ca.pem")
        if sec.protocol == "SSL":
            return KafkaClientConfig(self.bootstrap, "SSL", ssl_ca_location=ca,
                                     ssl_certificate_location=str(self.tls_dir / "client.pem"),
                                     ssl_key_location=str(self.tls_dir / "client.key"))
        users = dict(sec.users)
        name = user or sec.users[0][0]
        return KafkaClientConfig(self.bootstrap, "SASL_SSL", sasl_mechanism=sec.mechanism,
                                 sasl_username=name,
                                 sasl_password=password or users.get(name), ssl_ca_location=ca)

    @property
    def ctl_port(self) -> int:
        return self.controller_port or self.port + 1

    @property
    def libs_dir(self) -> Path:
        return (self.cache_dir or default_cache_dir()) / self.version / "libs"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "broker.pid"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "logs" / "server.log"


def _require(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise BrokerError(f"'{tool}' was not found on PATH. {hint}")
    return path


def ensure_jars(cfg: BrokerConfig, log=print) -> Path:
    """Fetch the pinned Kafka release's jars with Maven unless the cache already has them."""
    libs = cfg.libs_dir
    marker = libs / ".complete"
    if marker.exists():
        return libs
    mvn = _require("mvn", "Install Maven (Debian: apt-get install maven) or use an external "
                          "broker by setting STREAMAGENT_KAFKA_BOOTSTRAP.")
    _require("java", "Install Java 17+ (Debian: apt-get install openjdk-17-jre-headless).")
    log(f"fetching Apache Kafka {cfg.version} jars from Maven Central into {libs} ...")
    libs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pom = Path(tmp) / "pom.xml"
        pom.write_text(_POM.format(scala=SCALA_VERSION, kafka=cfg.version,
                                   log4j=LOG4J_VERSION, slf4j=SLF4J_VERSION))
        proc = subprocess.run(
            [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
             f"-DoutputDirectory={libs}", "-DincludeScope=runtime"],
            capture_output=True, text=True)
    if proc.returncode != 0:
        raise BrokerError("Maven could not fetch the Kafka jars:\n"
                          + (proc.stdout + proc.stderr)[-3000:])
    marker.write_text(cfg.version)
    return libs


def _classpath(libs: Path) -> str:
    jars = sorted(str(p) for p in libs.glob("*.jar"))
    if not jars:
        raise BrokerError(f"no jars in {libs}; delete {libs} and run again")
    return os.pathsep.join(jars)


_INTERNAL_USER = "streamagent-broker"  # the broker's own SCRAM user, for its own connections


def _internal_password(cfg: BrokerConfig) -> str:
    """The internal user's password, made once per data dir (the format step stores it)."""
    f = cfg.tls_dir / "internal-user.password"
    if not f.exists():
        cfg.tls_dir.mkdir(parents=True, exist_ok=True)
        f.write_text(secrets.token_hex(16))
        f.chmod(0o600)
    return f.read_text().strip()


def _listener_properties(cfg: BrokerConfig) -> list[str]:
    sec = cfg.security
    if sec is None:
        return [
            f"listeners=PLAINTEXT://127.0.0.1:{cfg.port},CONTROLLER://127.0.0.1:{cfg.ctl_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{cfg.port}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "inter.broker.listener.name=PLAINTEXT",
        ]
    from streamagent.ops.tls import make_local_certs

    certs = make_local_certs(cfg.tls_dir)
    name = sec.protocol  # the listener is named after its protocol
    props = [
        f"listeners={name}://127.0.0.1:{cfg.port},CONTROLLER://127.0.0.1:{cfg.ctl_port}",
        f"advertised.listeners={name}://127.0.0.1:{cfg.port}",
        "controller.listener.names=CONTROLLER",
        f"listener.security.protocol.map=CONTROLLER:PLAINTEXT,{name}:{name}",
        f"inter.broker.listener.name={name}",
        "ssl.keystore.type=PKCS12",
        f"ssl.keystore.location={certs.server_keystore}",
        f"ssl.keystore.password={certs.keystore_password}",
        f"ssl.key.password={certs.keystore_password}",
        "ssl.truststore.type=PEM",
        f"ssl.truststore.location={certs.ca}",
        "ssl.endpoint.identification.algorithm=https",
    ]
    if sec.protocol == "SSL":
        return props + ["ssl.client.auth=required"]
    mech = sec.mechanism
    return props + [
        f"sasl.enabled.mechanisms={mech}",
        f"sasl.mechanism.inter.broker.protocol={mech}",
        f"listener.name.{name.lower()}.{mech.lower()}.sasl.jaas.config="
        f"org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="{_INTERNAL_USER}" password="{_internal_password(cfg)}";',
    ]


def _scram_args(cfg: BrokerConfig) -> list[str]:
    """``format --add-scram`` arguments: the SCRAM users exist from the first start on."""
    sec = cfg.security
    if sec is None or sec.protocol != "SASL_SSL":
        return []
    users = [*sec.users, (_INTERNAL_USER, _internal_password(cfg))]
    return [a for name, pw in users
            for a in ("--add-scram", f"{sec.mechanism}=[name={name},password={pw}]")]


def _server_properties(cfg: BrokerConfig) -> str:
    return "\n".join([
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.bootstrap.servers=127.0.0.1:{cfg.ctl_port}",
        *_listener_properties(cfg),
        f"log.dirs={cfg.data_dir / 'kraft'}",
        f"num.partitions={cfg.default_partitions}",
        "offsets.topic.replication.factor=1",
        "offsets.topic.num.partitions=4",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1",
        # a single local node: rebalance at once instead of waiting 3 s for more members
        "group.initial.rebalance.delay.ms=0",
        "auto.create.topics.enable=true",
        "log.retention.hours=168",
        "",
    ])


def _java_cmd(cfg: BrokerConfig, main: str, *args: str) -> list[str]:
    java = _require("java", "Install Java 17+ (Debian: apt-get install openjdk-17-jre-headless).")
    logs = cfg.data_dir / "logs"
    return [java, "-Xms256m", f"-Xmx{cfg.heap}", "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={logs}",
            f"-Dlog4j2.configurationFile={cfg.data_dir / 'log4j2.xml'}",
            "-cp", _classpath(cfg.libs_dir), main, *args]


def _read_pid(cfg: BrokerConfig) -> int | None:
    try:
        pid = int(cfg.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def is_ready(kafka: KafkaClientConfig, timeout: float = 2.0) -> bool:
    """True when the broker answers a metadata request (not merely an open port)."""
    from streamagent.ops.kafka import make_admin

    host, _, port = kafka.bootstrap.split(",")[0].rpartition(":")
    try:  # a cheap TCP probe first: librdkafka logs every refused connection loudly
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except OSError:
        return False
    try:
        md = make_admin(kafka).list_topics(timeout=timeout)
    except Exception:
        return False
    return bool(md.brokers)


def status(cfg: BrokerConfig) -> dict:
    pid = _read_pid(cfg)
    return {"pid": pid, "running": pid is not None, "bootstrap": cfg.bootstrap,
            "ready": pid is not None and is_ready(cfg.client()), "version": cfg.version,
            "data_dir": str(cfg.data_dir), "log": str(cfg.log_file)}


def start(cfg: BrokerConfig, wait: float = 90.0, log=print) -> int:
    """Start the broker in the background and return its pid once it serves requests."""
    pid = _read_pid(cfg)
    if pid is not None:
        if is_ready(cfg.client(), timeout=5):
            log(f"kafka already running (pid {pid}) on {cfg.bootstrap}")
            return pid
        raise BrokerError(f"a broker process {pid} from {cfg.data_dir} is alive but not serving "
                          f"{cfg.bootstrap}; stop it with 'streamagent kafka stop'")
    for port in (cfg.port, cfg.ctl_port):
        if port_busy(port):
            raise BrokerError(
                f"port {port} on 127.0.0.1 is already taken by another process; choose another "
                f"with --port / STREAMAGENT_KAFKA_PORT, or point STREAMAGENT_KAFKA_BOOTSTRAP at "
                f"the broker that is already there")
    ensure_jars(cfg, log=log)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    (cfg.data_dir / "logs").mkdir(exist_ok=True)
    props = cfg.data_dir / "server.properties"
    props.write_text(_server_properties(cfg))
    props.chmod(0o600)  # keystore and internal user's passwords, with security
    (cfg.data_dir / "log4j2.xml").write_text(_LOG4J2)
    if not (cfg.data_dir / "kraft" / "meta.properties").exists():
        cluster_id = subprocess.run(
            _java_cmd(cfg, "kafka.tools.StorageTool", "random-uuid"),
            capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        fmt = subprocess.run(
            _java_cmd(cfg, "kafka.tools.StorageTool", "format", "--standalone",
                      "-t", cluster_id, "-c", str(props), *_scram_args(cfg)),
            capture_output=True, text=True)
        if fmt.returncode != 0:
            raise BrokerError("formatting KRaft storage failed:\n"
                              + _redact(cfg, fmt.stdout + fmt.stderr))
    out = open(cfg.data_dir / "logs" / "stdout.log", "ab")
    proc = subprocess.Popen(_java_cmd(cfg, "kafka.Kafka", str(props)), stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    cfg.pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerError(f"the broker exited with code {proc.returncode}; see "
                              f"{cfg.log_file} and {cfg.data_dir / 'logs' / 'stdout.log'}")
        if is_ready(cfg.client(), timeout=1.0):
            log(f"kafka {cfg.version} ready on {cfg.bootstrap} (pid {proc.pid})")
            return proc.pid
        time.sleep(0.5)
    stop(cfg)
    raise BrokerError(f"the broker did not become ready within {wait:.0f}s; see {cfg.log_file}")


def _redact(cfg: BrokerConfig, text: str) -> str:
    """``text`` without the SCRAM passwords (the format tool may echo its arguments)."""
    if cfg.security is not None:
        for _, pw in cfg.security.users:
            text = text.replace(pw, "**********")
    return text


def stop(cfg: BrokerConfig, timeout: float = 30.0, log=print) -> bool:
    """Stop the broker: SIGTERM (a controlled shutdown), then SIGKILL after ``timeout``."""
    pid = _read_pid(cfg)
    if pid is None:
        cfg.pid_file.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        _reap(pid)
        time.sleep(0.2)
    else:
        os.kill(pid, signal.SIGKILL)
        log(f"kafka (pid {pid}) did not stop in {timeout:.0f}s; killed")
    cfg.pid_file.unlink(missing_ok=True)
    log(f"kafka stopped (pid {pid})")
    return True


def kill(cfg: BrokerConfig, log=print) -> bool:
    """Kill the broker at once (SIGKILL: a crash, no controlled shutdown), for fault tests.
    Its data dir stays, and :func:`start` brings it back on it (Kafka recovers its logs)."""
    pid = _read_pid(cfg)
    if pid is None:
        return False
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _reap(pid)  # our child (started here): reaped, or it would stay as a zombie
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    cfg.pid_file.unlink(missing_ok=True)
    log(f"kafka killed (pid {pid})")
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


if __name__ == "__main__":  # pragma: no cover - handy for debugging the recipe
    c = BrokerConfig(data_dir=Path(sys.argv[1]) if len(sys.argv) > 1 else Path("var/kafka"))
    start(c)
