"""What the worker and learner processes do to their Python runtime (no Kafka or Faust here)."""
from __future__ import annotations

import logging
import sys
import threading
import time
import traceback


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


class LoopWatch:
    """How late the event loop runs what is due, and what it was doing when it stalled.

    A callback scheduled every ``interval_s`` measures its own lateness: the loop's lag (0
    when the loop is idle or quick; the length of the longest step in between when it is
    not), handed to ``observe``. A thread looks at the time of the callback's last run; once
    the loop has not run it for ``stall_s``, the thread takes the loop thread's stack *while
    it is stuck* and logs it (at most one stack per ``log_every_s``, with how many more
    stalls there were) and calls ``on_stall``. A stall's stack is the step that holds the
    loop, which a profile of the whole run averages away (docs/BENCHMARKS.md, the latency
    tail)."""

    def __init__(self, observe, on_stall, *, stall_s: float, interval_s: float = 0.02,
                 log_every_s: float = 10.0, log=None):
        self.observe, self.on_stall = observe, on_stall
        self.stall_s, self.interval_s, self.log_every_s = stall_s, interval_s, log_every_s
        self.log = log or logging.getLogger("streamagent.loop")
        self._beat = 0.0  # monotonic time of the callback's last run
        self._due = 0.0  # when the next run is due
        self._reported = -1.0  # the beat whose stall was reported
        self._last_log = float("-inf")
        self._unlogged = 0
        self._stop = None
        self._thread_id = None
        self._handle = None

    def start(self, loop) -> None:
        """Start on ``loop`` (from a callback or coroutine running in it)."""
        self._loop, self._thread_id = loop, threading.get_ident()
        self._beat = self._due = time.monotonic()
        self._handle = loop.call_soon(self._tick)
        self._stop = threading.Event()
        threading.Thread(target=self._watch, name="streamagent-loop-watch",
                         daemon=True).start()

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._handle is not None:
            self._handle.cancel()

    def _tick(self) -> None:
        now = time.monotonic()
        self.observe(max(0.0, now - self._due))
        self._beat, self._due = now, now + self.interval_s
        self._handle = self._loop.call_at(self._loop.time() + self.interval_s, self._tick)

    def _watch(self) -> None:
        while not self._stop.wait(min(self.stall_s / 4, 0.05)):
            beat = self._beat
            stuck = time.monotonic() - max(beat, self._due)
            if stuck >= self.stall_s and beat != self._reported:
                self._reported = beat
                self.on_stall()
                self._report(stuck)

    def _report(self, stuck: float) -> None:
        now = time.monotonic()
        if now - self._last_log < self.log_every_s:
            self._unlogged += 1
            return
        frame = sys._current_frames().get(self._thread_id)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(gone)\n"
        more = (f" ({self._unlogged} more stalls since the last one logged)"
                if self._unlogged else "")
        self._last_log, self._unlogged = now, 0
        self.log.warning("event loop stalled for %.0f ms so far%s; it is in:\n%s",
                         stuck * 1000, more, stack.rstrip())
