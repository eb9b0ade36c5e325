"""Replay safety for outputs that a stateful step produces.

After a hard crash a worker's state store can be ahead of its committed input offsets (state
writes reach RocksDB and the changelog at once; offsets are committed every few seconds). The
inputs since the last commit are then delivered again, but the state already reflects them, so
processing them again would produce nothing, and outputs whose sending was lost in the crash
would be gone. The outbox keeps, per input (topic, partition, offset), the outputs that input
produced, and remembers the last input offset processed, so that a replayed input re-sends
exactly its outputs instead of being processed again. Consumers dedupe by record id.
"""
from __future__ import annotations

from typing import MutableMapping

import orjson

KEEP_OFFSETS = 50_000  # > inputs per commit interval on one partition, with room to spare


class Outbox:
    def __init__(self, store: MutableMapping[str, bytes], prefix: str = "ob"):
        self.store, self.prefix = store, prefix

    def _last_key(self, topic: str, partition: int) -> str:
        return f"{self.prefix}:last:{topic}:{partition}"

    def _out_key(self, topic: str, partition: int, offset: int) -> str:
        return f"{self.prefix}:out:{topic}:{partition}:{offset}"

    def is_replay(self, topic: str, partition: int, offset: int) -> bool:
        raw = self.store.get(self._last_key(topic, partition))
        return raw is not None and offset <= int(raw)

    def replayed_outputs(self, topic: str, partition: int, offset: int) -> list:
        raw = self.store.get(self._out_key(topic, partition, offset))
        return orjson.loads(raw) if raw else []

    def record(self, topic: str, partition: int, offset: int, outputs: list) -> None:
        """Call after processing an input and before sending its outputs."""
        if outputs:
            self.store[self._out_key(topic, partition, offset)] = orjson.dumps(outputs)
        old = self._out_key(topic, partition, offset - KEEP_OFFSETS)
        if old in self.store:
            del self.store[old]
        self.store[self._last_key(topic, partition)] = str(offset).encode()
