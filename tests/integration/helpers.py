"""Run real worker processes and talk to the real broker from tests."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson

from streamagent.ops.kafka import KafkaClientConfig, make_consumer, make_producer, plaintext
from streamagent.ops.local import terminate
from streamagent.ops.tail import read_all


class WorkerProcess:
    """`streamagent worker` in a subprocess with its own environment and log file."""

    def __init__(self, env: dict, log_path: Path, command: str = "worker",
                 ready_marker: bytes = b"Worker]: Ready"):
        self.command, self.ready_marker = command, ready_marker
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def launch(self) -> "WorkerProcess":
        """Start it without waiting for it to be ready."""
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "streamagent.cli", self.command],
                                     env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        return self

    def start(self, ready_timeout: float = 90.0) -> "WorkerProcess":
        start_at = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.launch()
        if self.wait_for(self.ready_marker, ready_timeout, start_at):
            return self
        self.kill()
        raise RuntimeError(f"worker not ready in {ready_timeout}s:\n{self.tail()}")

    def wait_for(self, marker: bytes, timeout: float, start_at: int = 0) -> bool:
        """Whether ``marker`` appears in the log (from byte ``start_at``) within ``timeout``
        seconds; a process that exits meanwhile raises."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited {self.proc.returncode}:\n{self.tail()}")
            with open(self.log_path, "rb") as f:
                f.seek(start_at)
                if marker in f.read():
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.25)

    def stop(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        try:
            return terminate(self.proc, timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def client(kafka: str | KafkaClientConfig) -> KafkaClientConfig:
    """The test broker's clients: a bootstrap string (the plain session broker, `kafka`
    fixture) or a secured broker's :class:`KafkaClientConfig`."""
    return kafka if isinstance(kafka, KafkaClientConfig) else plaintext(kafka)


def produce(bootstrap: str | KafkaClientConfig, topic: str,
            items: list[tuple[bytes | None, bytes]]) -> None:
    p = make_producer(client(bootstrap))
    for key, value in items:
        p.produce(topic, key=key, value=value)
    assert p.flush(30) == 0


def event(eid: str, user: str, typ: str, ts: int, **kw) -> tuple[bytes, bytes]:
    return user.encode(), orjson.dumps({"event_id": eid, "user_id": user, "type": typ, "ts": ts, **kw})


def read_json(bootstrap: str | KafkaClientConfig, topic: str, expect: int, max_wait: float = 60.0) -> list[dict]:
    """Read ``topic`` until at least ``expect`` messages came (then 2 s more for extras)."""
    out: list = []
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        out = read_all(client(bootstrap), topic, idle=2.0, max_wait=max_wait)
        if len(out) >= expect:
            break
        time.sleep(1.0)
    return [orjson.loads(m.value()) | {"_key": m.key()} for m in out]


class TopicReader:
    """A persistent reader of one topic (from the beginning), for tests that go in rounds."""

    def __init__(self, bootstrap: str | KafkaClientConfig, topic: str):
        self.c = make_consumer(client(bootstrap))
        self.c.subscribe([topic])

    def read(self, count: int, timeout: float = 60.0) -> list[dict]:
        """The next ``count`` messages (fewer if ``timeout`` passes first)."""
        out: list[dict] = []
        deadline = time.monotonic() + timeout
        while len(out) < count and time.monotonic() < deadline:
            for m in self.c.consume(count - len(out), timeout=0.5):
                if not m.error():
                    out.append(orjson.loads(m.value()))
        return out

    def close(self) -> None:
        self.c.close()
