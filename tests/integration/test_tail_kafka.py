"""`streamagent tail` on a real broker: the newest N messages of a multi-partition topic, then,
with --follow, the ones that come after."""
from __future__ import annotations

import pytest
from confluent_kafka.admin import NewTopic

from streamagent.cli import main
from streamagent.ops.kafka import make_admin, make_producer, plaintext
from streamagent.ops.tail import tail_lines

pytestmark = pytest.mark.kafka

T0 = 1_767_225_600_000


def send(bootstrap: str, topic: str, numbers: range) -> None:
    """Message i on partition i % 3 with timestamp T0 + i: partitions interleave in time."""
    p = make_producer(plaintext(bootstrap))
    for i in numbers:
        p.produce(topic, value=f"m{i}".encode(), partition=i % 3, timestamp=T0 + i)
    assert p.flush(30) == 0


@pytest.fixture
def topic(kafka, run_id) -> str:
    name = f"tail-{run_id}"
    admin = make_admin(plaintext(kafka))
    for f in admin.create_topics([NewTopic(name, 3, 1)]).values():
        f.result(30)
    send(kafka, name, range(40))
    return name


def test_prints_the_newest_n_oldest_first(kafka, topic, capsys, monkeypatch):
    monkeypatch.setenv("STREAMAGENT_KAFKA_BOOTSTRAP", kafka)
    assert main(["tail", "--topic", topic, "-n", "5"]) == 0
    assert capsys.readouterr().out.split() == [f"m{i}" for i in range(35, 40)]
    assert list(tail_lines(plaintext(kafka), topic, 100)) == [f"m{i}" for i in range(40)]


def test_follow_goes_on_with_new_messages(kafka, topic):
    lines = tail_lines(plaintext(kafka), topic, 2, follow=True)
    try:
        assert [next(lines) for _ in range(2)] == ["m38", "m39"]
        send(kafka, topic, range(40, 43))
        got = sorted((next(lines) for _ in range(3)), key=lambda m: int(m[1:]))
        assert got == ["m40", "m41", "m42"]
    finally:
        lines.close()


def test_a_missing_topic_is_named(kafka, run_id, capsys, monkeypatch):
    monkeypatch.setenv("STREAMAGENT_KAFKA_BOOTSTRAP", kafka)
    assert main(["tail", "--topic", f"no-such-{run_id}", "--timeout", "5"]) == 2
    assert f"no topic 'no-such-{run_id}'" in capsys.readouterr().err
