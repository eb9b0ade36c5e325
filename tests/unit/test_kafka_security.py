"""Every Kafka client gets the same TLS/SASL settings (STREAMAGENT_KAFKA_*): how settings map to
librdkafka and to Faust/aiokafka, what is refused, that secrets are never shown, and that no
module builds a client any other way."""
from __future__ import annotations

import ast
import ssl
from pathlib import Path

import pytest

from streamagent.errors import ConfigError
from streamagent.ops.kafka import (KafkaClientConfig, client_config, kafka_client, make_admin,
                                   make_consumer, make_producer, plaintext)
from streamagent.params import shipped

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "streamagent"
SECRET = "s3cret-Pa55"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    from streamagent.ops.tls import make_local_certs

    return make_local_certs(tmp_path_factory.mktemp("tls"))


def sasl_ssl(certs, **kw):
    return shipped(kafka_bootstrap="b1:9093,b2:9093", kafka_security_protocol="SASL_SSL",
                   kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="alice",
                   kafka_sasl_password=SECRET, kafka_ssl_ca_location=certs.ca, **kw)


# --- no client is built any other way -----------------------------------------------------

def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), str(path))


def _called_name(node: ast.Call) -> str | None:
    f = node.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def test_no_module_builds_a_kafka_client_outside_ops_kafka():
    clients = {"Producer", "Consumer", "AdminClient", "SerializingProducer",
               "DeserializingConsumer", "AIOKafkaProducer", "AIOKafkaConsumer",
               "AIOKafkaClient", "AIOKafkaAdminClient"}
    found = []
    for name, tree in _modules():
        if name == "streamagent/ops/kafka.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _called_name(node) in clients:
                found.append(f"{name}:{node.lineno} builds {_called_name(node)}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
                    "confluent_kafka", "aiokafka"):  # a renamed client class hides its calls
                found += [f"{name}:{node.lineno} imports {a.name} as {a.asname}"
                          for a in node.names if a.name in clients and a.asname]
    assert not found, ("Kafka clients must come from streamagent.ops.kafka (make_producer, "
                       "make_consumer, make_admin), which applies the security settings:\n"
                       + "\n".join(found))


def test_every_faust_app_gets_the_broker_credentials():
    apps, bad = 0, []
    for name, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _called_name(node) == "App":
                apps += 1
                kws = {k.arg for k in node.keywords}
                spread = [k.value for k in node.keywords if k.arg is None]
                ok = "broker_credentials" in kws or any(
                    isinstance(v, ast.Call) and _called_name(v) == "faust_broker"
                    for v in spread)
                if not ok or "broker" in kws:
                    bad.append(f"{name}:{node.lineno}")
    assert apps >= 2  # the worker's and the benchmark's
    assert not bad, ("faust.App must get broker and broker_credentials from "
                     "streamagent.stream.app.faust_broker(kafka_client(settings)): " + str(bad))


def test_the_client_factories_refuse_a_bare_bootstrap_string():
    for make in (make_producer, make_consumer, make_admin):
        with pytest.raises(TypeError, match="KafkaClientConfig"):
            make("127.0.0.1:9092")


# --- settings -> librdkafka -----------------------------------------------------------------

def test_plaintext_by_default():
    kc = kafka_client(shipped())
    assert kc == plaintext("127.0.0.1:9092")
    assert kc.librdkafka() == {"security.protocol": "PLAINTEXT",
                               "bootstrap.servers": "127.0.0.1:9092"}


def test_sasl_ssl_scram_reaches_librdkafka(certs):
    conf = kafka_client(sasl_ssl(certs)).librdkafka()
    assert conf == {"bootstrap.servers": "b1:9093,b2:9093", "security.protocol": "SASL_SSL",
                    "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "alice",
                    "sasl.password": SECRET, "ssl.ca.location": str(certs.ca)}


def test_mtls_reaches_librdkafka(certs):
    s = shipped(kafka_security_protocol="ssl", kafka_ssl_ca_location=certs.ca,
                kafka_ssl_certificate_location=certs.client_cert,
                kafka_ssl_key_location=certs.client_key)
    conf = kafka_client(s).librdkafka()
    assert conf["security.protocol"] == "SSL"
    assert conf["ssl.certificate.location"] == str(certs.client_cert)
    assert conf["ssl.key.location"] == str(certs.client_key)
    assert "sasl.username" not in conf


def test_the_password_can_come_from_a_file(certs, tmp_path):
    f = tmp_path / "password"
    f.write_text(SECRET + "\n")  # as `kubectl create secret --from-file` may leave it
    s = sasl_ssl(certs).model_copy(update={"kafka_sasl_password": None,
                                           "kafka_sasl_password_file": f})
    assert kafka_client(s).sasl_password == SECRET


def test_passthrough_tunes_defaults_but_not_security_or_what_a_call_needs(certs, monkeypatch):
    monkeypatch.setenv("STREAMAGENT_KAFKA_CONFIG",
                       "linger.ms=50, client.id=shop-7,group.id=theirs")
    s = sasl_ssl(certs)
    assert s.kafka_config == {"linger.ms": "50", "client.id": "shop-7", "group.id": "theirs"}
    conf = client_config(kafka_client(s), {"linger.ms": 5, "group.id": "x"}, **{"group.id": "mine"})
    assert conf["linger.ms"] == "50" and conf["client.id"] == "shop-7"
    assert conf["group.id"] == "mine"
    assert conf["sasl.password"] == SECRET and conf["bootstrap.servers"] == "b1:9093,b2:9093"
    monkeypatch.setenv("STREAMAGENT_KAFKA_CONFIG", '{"socket.keepalive.enable": "true"}')
    assert shipped().kafka_config == {"socket.keepalive.enable": "true"}


# --- what is refused --------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"kafka_security_protocol": "TLS"}, "KAFKA_SECURITY_PROTOCOL='TLS' is not one of"),
    ({"kafka_sasl_username": None}, "needs STREAMAGENT_KAFKA_SASL_USERNAME"),
    ({"kafka_sasl_password": None}, "needs a password"),
    ({"kafka_sasl_mechanism": None}, "needs STREAMAGENT_KAFKA_SASL_MECHANISM"),
    ({"kafka_sasl_mechanism": "GSSAPI"}, "KAFKA_SASL_MECHANISM='GSSAPI' is not supported"),
    ({"kafka_ssl_ca_location": Path("/nonexistent/ca.pem")},
     "CA_LOCATION=/nonexistent/ca.pem: no such file"),
    ({"kafka_ssl_certificate_location": Path(__file__)}, "needs both"),
    ({"kafka_ssl_key_password": "x"}, "KEY_PASSWORD is set without"),
    ({"kafka_security_protocol": "PLAINTEXT", "kafka_ssl_ca_location": None},
     "USERNAME/PASSWORD are set but"),
    ({"kafka_security_protocol": "SASL_PLAINTEXT"}, "CA_LOCATION set but"),
    ({"kafka_sasl_password_file": Path("/nonexistent/pw")}, "not both"),
    ({"kafka_config": {"sasl.password": "x"}}, "use STREAMAGENT_KAFKA_SASL_PASSWORD instead"),
    ({"kafka_config": {"security.protocol": "PLAINTEXT"}}, "KAFKA_SECURITY_PROTOCOL instead"),
])
def test_bad_combinations_are_clear_config_errors(certs, overrides, message):
    s = sasl_ssl(certs).model_copy(update=overrides)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        kafka_client(s)


def test_an_unreadable_or_empty_password_file_is_a_config_error(certs, tmp_path):
    s = sasl_ssl(certs).model_copy(update={"kafka_sasl_password": None})
    with pytest.raises(ConfigError, match="PASSWORD_FILE=.*missing"):
        kafka_client(s.model_copy(update={"kafka_sasl_password_file": tmp_path / "missing"}))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        kafka_client(s.model_copy(update={"kafka_sasl_password_file": tmp_path / "empty"}))


def test_the_worker_stops_on_a_bad_mix_before_it_starts(monkeypatch, capsys):
    from streamagent.cli import main

    monkeypatch.setenv("STREAMAGENT_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("STREAMAGENT_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    assert main(["worker"]) == 2
    assert "STREAMAGENT_KAFKA_SASL_USERNAME" in capsys.readouterr().err


# --- secrets are never shown ----------------------------------------------------------------

def test_secrets_are_not_in_repr_or_streamagent_config(certs, monkeypatch, capsys):
    from streamagent.cli import main

    kc = kafka_client(sasl_ssl(certs))
    assert SECRET not in repr(kc) and SECRET not in str(sasl_ssl(certs))
    monkeypatch.setenv("STREAMAGENT_KAFKA_SASL_PASSWORD", SECRET)
    monkeypatch.setenv("STREAMAGENT_KAFKA_SSL_KEY_PASSWORD", SECRET + "k")
    monkeypatch.setenv("STREAMAGENT_KAFKA_CONFIG",
                       f"sasl.oauthbearer.client.secret={SECRET}o,client.id=visible")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out
    assert "STREAMAGENT_KAFKA_SASL_PASSWORD=**********" in out
    assert "client.id=visible" in out


# --- settings -> Faust / aiokafka -------------------------------------------------------------

def _aiokafka_auth(app_kwargs: dict) -> dict:
    """What Faust hands every aiokafka client it builds, from faust.App's arguments."""
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    return credentials_to_aiokafka_auth(app_kwargs["broker_credentials"], None)


def test_sasl_ssl_scram_reaches_aiokafka(certs):
    from streamagent.stream.app import faust_broker

    kw = faust_broker(kafka_client(sasl_ssl(certs)))
    assert kw["broker"] == "kafka://b1:9093;kafka://b2:9093"
    auth = _aiokafka_auth(kw)
    assert auth["security_protocol"] == "SASL_SSL"
    assert auth["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (auth["sasl_plain_username"], auth["sasl_plain_password"]) == ("alice", SECRET)
    ctx = auth["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext) and ctx.check_hostname
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert any(c["subject"] == ((("commonName", "streamagent local test CA"),),)
               for c in ctx.get_ca_certs())


def test_mtls_and_plaintext_reach_aiokafka(certs, monkeypatch):
    from streamagent.stream.app import faust_broker

    monkeypatch.setenv("STREAMAGENT_KAFKA_CONFIG", "ssl.endpoint.identification.algorithm=none")
    s = shipped(kafka_security_protocol="SSL", kafka_ssl_ca_location=certs.ca,
                kafka_ssl_certificate_location=certs.client_cert,
                kafka_ssl_key_location=certs.client_key)
    auth = _aiokafka_auth(faust_broker(kafka_client(s)))
    assert auth["security_protocol"] == "SSL" and not auth["ssl_context"].check_hostname
    monkeypatch.delenv("STREAMAGENT_KAFKA_CONFIG")
    assert faust_broker(kafka_client(shipped()))["broker_credentials"] is None
    bad = s.model_copy(update={"kafka_ssl_certificate_location": certs.ca})  # not its key
    with pytest.raises(ConfigError, match="cannot load the client certificate"):
        faust_broker(kafka_client(bad))


def test_the_worker_app_gets_the_credentials(certs, tmp_path):
    from faust.auth import SASLCredentials

    from streamagent.stream.app import create_app

    w = create_app(sasl_ssl(certs, table_store="memory://", metrics_port=0, data_dir=tmp_path))
    creds = w.app.conf.broker_credentials
    assert isinstance(creds, SASLCredentials)
    assert creds.username == "alice" and creds.mechanism.value == "SCRAM-SHA-512"
    assert creds.protocol.value == "SASL_SSL"
    # HTTP endpoints stay on loopback unless told otherwise; Faust's own server too
    assert shipped().metrics_host == "127.0.0.1" and w.app.conf.web_bind == "127.0.0.1"


def test_a_child_process_gets_the_same_settings_whatever_its_environment(certs, monkeypatch):
    kc = kafka_client(sasl_ssl(certs))
    monkeypatch.setenv("STREAMAGENT_KAFKA_SSL_CERTIFICATE_LOCATION", "/elsewhere.pem")
    for k, v in kc.env().items():
        monkeypatch.setenv(k, v)
    assert kafka_client(shipped()) == kc
    assert kafka_client(shipped(**plaintext("h:1").settings())) == plaintext("h:1")


# --- the local secured broker's configuration ---------------------------------------------------

def test_a_secured_local_broker_listens_with_sasl_ssl_only(tmp_path):
    from streamagent.ops.broker import BrokerConfig, BrokerSecurity, _scram_args, _server_properties

    cfg = BrokerConfig(data_dir=tmp_path, port=19092,
                       security=BrokerSecurity(users=(("alice", "pw-a"),)))
    props = _server_properties(cfg)
    assert "listeners=SASL_SSL://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093" in props
    assert "PLAINTEXT://127.0.0.1:19092" not in props
    assert "sasl.enabled.mechanisms=SCRAM-SHA-512" in props
    assert "SCRAM-SHA-512=[name=alice,password=pw-a]" in _scram_args(cfg)
    client = cfg.client()
    assert (client.security_protocol, client.sasl_username, client.sasl_password) == (
        "SASL_SSL", "alice", "pw-a")
    assert cfg.client(password="wrong").sasl_password == "wrong"
    mtls = BrokerConfig(data_dir=tmp_path, port=19092, security=BrokerSecurity(protocol="SSL"))
    assert "ssl.client.auth=required" in _server_properties(mtls)
    assert mtls.client().ssl_certificate_location.endswith("client.pem")
