import socket

import pytest

from streamagent.config import Settings, settings_markdown
from streamagent.core.catalog import load_catalog
from streamagent.errors import BrokerError, CatalogError
from pathlib import Path


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("STREAMAGENT_TRIGGER_TYPES", "session_start, search")
    monkeypatch.setenv("STREAMAGENT_HIDDEN_SIZES", "[32, 16]")
    monkeypatch.setenv("STREAMAGENT_BUDGET_PER_PERIOD", "123.5")
    s = Settings()
    assert s.trigger_types == ("session_start", "search")
    assert s.hidden_sizes == (32, 16)
    assert s.budget_per_period == 123.5


def test_bad_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("STREAMAGENT_EPSILON_START", "1.5")
    with pytest.raises(Exception, match="epsilon_start"):
        Settings()


def test_configuration_doc_is_current():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "CONFIGURATION.md").read_text()
    assert doc == settings_markdown(), "run `make docs` to regenerate docs/CONFIGURATION.md"


def test_every_setting_is_one_row_of_three_cells():
    import re

    rows = [r for r in settings_markdown().splitlines() if r.startswith("| `STREAMAGENT_")]
    assert len(rows) == len(Settings.model_fields)
    for row in rows:  # an unescaped | in a description would split its cell
        assert len(re.findall(r"(?<!\\)\|", row)) == 4, row[:80]


def test_default_catalog_loads():
    cat = load_catalog()
    assert cat.actions[0] == "none" and cat.n_actions == len(cat.coupons) + 1
    assert all(c.cost > 0 for c in cat.coupons)


@pytest.mark.parametrize("body,match", [
    ("coupons: []", "non-empty"),
    ("coupons: [{id: a, kind: bogus, value: 1}]", "kind"),
    ("coupons: [{id: none, kind: amount_off, value: 1}]", "reserved"),
    ("coupons: [{id: a, kind: percent_off, value: 150}]", "out-of-range"),
    ("coupons: [{id: a, kind: amount_off, value: 1}, {id: a, kind: amount_off, value: 2}]", "duplicate"),
    ("coupons: [", "YAML"),
])
def test_bad_catalogs_say_what_is_wrong(tmp_path, body, match):
    p = tmp_path / "c.yaml"
    p.write_text(body)
    with pytest.raises(CatalogError, match=match):
        load_catalog(p)


def test_coupon_discounts():
    cat = load_catalog()
    by = {c.id: c for c in cat.coupons}
    assert by["pct10"].discount_on(50.0) == 5.0
    assert by["amt15_min100"].discount_on(99.0) == 0.0
    assert by["amt15_min100"].discount_on(100.0) == 15.0


def test_broker_start_says_when_the_port_is_taken(tmp_path):
    from streamagent.ops.broker import BrokerConfig, start

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(BrokerError, match=f"port {port}"):
            start(BrokerConfig(data_dir=tmp_path, port=port))


def test_broker_start_says_when_java_is_missing(tmp_path, monkeypatch):
    from streamagent.ops.broker import BrokerConfig, ensure_jars

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerError, match="'mvn' was not found"):
        ensure_jars(BrokerConfig(data_dir=tmp_path, cache_dir=tmp_path / "cache"))


def test_the_replication_factor_reaches_the_faust_app(tmp_path):
    """Changelog topics (created by Faust) get the configured replication factor too."""
    from streamagent.params import shipped
    from streamagent.stream.app import create_app

    w = create_app(shipped(table_store="memory://", metrics_port=0, data_dir=tmp_path,
                           replication_factor=3))
    assert w.app.conf.topic_replication_factor == 3
    assert shipped().replication_factor == 1


def test_rocksdb_memory_comes_from_the_settings():
    from streamagent.params import shipped
    from streamagent.stream.app import ROCKSDB_OPTIONS, table_options

    assert table_options("rocksdb://", shipped()) == ROCKSDB_OPTIONS  # the shipped defaults
    assert table_options("memory://", shipped()) is None
    opts = table_options("rocksdb://", shipped(rocksdb_write_buffer_mb=8, rocksdb_write_buffers=3,
                                               rocksdb_block_cache_mb=64))
    assert opts == {"write_buffer_size": 8 << 20, "max_write_buffer_number": 3,
                    "block_cache_size": 64 << 20}
