"""The worker's event-loop watch (stream/runtime.py LoopWatch): lag measured, a stall's stack
logged while it lasts."""
from __future__ import annotations

import asyncio
import logging
import time

from streamagent.stream.runtime import LoopWatch


def hold_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # a blocking step, as a slow handler or a synchronous flush would be


def run_watched(body, stall_s=0.1, log_every_s=10.0):
    lags, stalls = [], []
    log = logging.getLogger("test.loopwatch")
    watch = LoopWatch(lags.append, lambda: stalls.append(1), stall_s=stall_s,
                      log_every_s=log_every_s, log=log)

    async def main():
        watch.start(asyncio.get_running_loop())
        await asyncio.sleep(0.1)
        await body()
        await asyncio.sleep(0.1)
        watch.stop()
    asyncio.run(main())
    return lags, stalls


def test_a_blocked_loop_is_measured_counted_and_its_stack_logged(caplog):
    async def body():
        hold_the_loop(0.4)
    with caplog.at_level(logging.WARNING, logger="test.loopwatch"):
        lags, stalls = run_watched(body)
    assert stalls == [1]  # one stall, reported once however long it lasts
    assert max(lags) >= 0.35
    (rec,) = [r for r in caplog.records if "stalled" in r.getMessage()]
    assert "hold_the_loop" in rec.getMessage()  # taken while the loop was stuck in it


def test_an_idle_loop_has_no_stall_and_little_lag():
    async def body():
        await asyncio.sleep(0.5)
    lags, stalls = run_watched(body)
    assert stalls == []
    assert len(lags) >= 10 and sorted(lags)[len(lags) // 2] < 0.05


def test_stalls_within_the_log_interval_are_counted_not_logged(caplog):
    async def body():
        for _ in range(3):
            hold_the_loop(0.25)
            await asyncio.sleep(0.05)
    with caplog.at_level(logging.WARNING, logger="test.loopwatch"):
        _, stalls = run_watched(body)
    assert len(stalls) == 3
    assert len([r for r in caplog.records if "stalled" in r.getMessage()]) == 1
