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
# Every store write becomes one changelog record, and the worker's producer refuses records over
# 1,000,000 bytes (Faust's producer_max_request_size). One input can close thousands of
# attribution windows at once (a watermark move past a crowd of decisions), so its outputs are
# kept in parts of at most this size: the first under the input's key, the rest under
# ``<key>:1``, ``<key>:2``, ... (read and deleted in order until one is missing).
PART_BYTES = 256 << 10


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

    @staticmethod
    def _part_key(key: str, part: int) -> str:
        return key if part == 0 else f"{key}:{part}"

    def replayed_outputs(self, topic: str, partition: int, offset: int) -> list:
        key, out, part = self._out_key(topic, partition, offset), [], 0
        while (raw := self.store.get(self._part_key(key, part))) is not None:
            out.extend(orjson.loads(raw))
            part += 1
        return out

    def record(self, topic: str, partition: int, offset: int, outputs: list) -> None:
        """Call after processing an input and before sending its outputs."""
        key = self._out_key(topic, partition, offset)
        for part, raw in enumerate(_parts(outputs)):
            self.store[self._part_key(key, part)] = raw
        old, part = self._out_key(topic, partition, offset - KEEP_OFFSETS), 0
        while self._part_key(old, part) in self.store:
            del self.store[self._part_key(old, part)]
            part += 1
        self.store[self._last_key(topic, partition)] = str(offset).encode()


def _parts(outputs: list):
    """JSON arrays of the outputs, each at most PART_BYTES (or one output, if that is bigger)."""
    items, size = [], 2
    for o in outputs:
        raw = orjson.dumps(o)
        if items and size + len(raw) + 1 > PART_BYTES:
            yield b"[" + b",".join(items) + b"]"
            items, size = [], 2
        items.append(raw)
        size += len(raw) + 1
    if items:
        yield b"[" + b",".join(items) + b"]"
