"""What the worker and learner processes do to their Python runtime (no Kafka or Faust here)."""
from __future__ import annotations


def freeze_gc() -> None:
    """Take every object alive now out of Python's cyclic garbage collector's way.

    The worker holds a few hundred thousand long-lived objects after start-up (torch, Faust,
    the Kafka clients, the model). Each full collection walked all of them: measured in a
    paced decide worker, a collection every 1-2 s that stopped the event loop for 135-159 ms
    and freed nothing, the largest part of the latency tail at low load and 20% of the drain
    rate (docs/BENCHMARKS.md). ``gc.freeze`` moves them to a generation the collector never
    walks; they are still freed by reference counting, and only a cycle among them (none is
    expected of start-up objects) would be kept. Done once the app is built and again after
    each partition assignment (a rebalance pauses the worker anyway), so what the start of
    the worker builds is frozen too."""
    import gc

    gc.collect()
    gc.freeze()
