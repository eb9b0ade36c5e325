"""The watchdog on a worker's part of a rebalance, and the exit deadline after a crash
(streamagent/stream/faust_internals.py). No broker: a throwaway Faust app, never started."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import faust

from streamagent.config import Settings
from streamagent.stream.faust_internals import install_revoke_watchdog


def app_with(revoke):
    app = faust.App("revoke-watchdog-test", broker="kafka://127.0.0.1:1", store="memory://",
                    web_enabled=False)
    app._on_partitions_revoked = revoke  # stands in for Faust's own
    return app


def test_the_consumer_calls_the_watched_revocation():
    async def revoke(revoked):
        pass

    app = app_with(revoke)
    install_revoke_watchdog(app, 5.0, on_stuck=lambda detail: None)
    # Faust hands the callback to the consumer when it builds it: ours must be the one it holds
    assert getattr(app.consumer._on_partitions_revoked, "streamagent_watchdog", False)


def test_a_revocation_past_its_time_is_reported_with_where_it_waits():
    async def stuck_here(revoked):
        await asyncio.sleep(0.6)

    stuck: list[str] = []
    app = app_with(stuck_here)
    install_revoke_watchdog(app, 0.2, on_stuck=stuck.append)

    async def main():
        await app.consumer._on_partitions_revoked({("user-events", 0), ("user-events", 1)})

    asyncio.run(main())
    assert len(stuck) == 1, stuck
    assert "giving up 2 partitions" in stuck[0]
    assert "stuck_here" in stuck[0], stuck[0]  # the revocation's stack names where it waits


def test_a_revocation_in_time_is_not_reported():
    async def quick(revoked):
        await asyncio.sleep(0.01)

    stuck: list[str] = []
    app = app_with(quick)
    install_revoke_watchdog(app, 0.2, on_stuck=stuck.append)

    async def main():
        await app.consumer._on_partitions_revoked(set())
        await asyncio.sleep(0.4)  # past the timeout: the timer was cancelled

    asyncio.run(main())
    assert stuck == []


def test_exit_deadline_ends_a_process_whose_shutdown_hangs():
    code = ("import time\n"
            "from streamagent.stream.faust_internals import exit_after\n"
            "exit_after(0.3, 'a test')\n"
            "time.sleep(30)\n")
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=20)
    assert proc.returncode == 1, proc
    assert time.monotonic() - t < 15
    assert "after a test: exiting with status 1 now" in proc.stderr, proc.stderr


def test_shipped_timeouts():
    s = Settings()
    # longer than Faust's own "too long" report (0.95 x its 60 s session timeout), shorter than
    # the broker's rebalance timeout (Faust's max poll interval, 1000 s)
    assert 60 < s.revoke_timeout_s < 1000
    assert s.exit_deadline_s > 0


def test_a_worker_whose_stop_hangs_exits_by_its_deadline():
    code = ("import asyncio, faust\n"
            "from streamagent.stream.faust_internals import make_worker\n"
            "async def hang(self):\n"
            "    await asyncio.sleep(30)\n"
            "faust.Worker.stop = hang  # a shutdown that never ends\n"
            "app = faust.App('t', broker='kafka://127.0.0.1:1', store='memory://',\n"
            "                web_enabled=False)\n"
            "w = make_worker(app, 'WARNING', exit_deadline_s=0.5)\n"
            "w.loop.run_until_complete(w.stop())\n")
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1, proc
    assert time.monotonic() - t < 25
    assert "after the worker began to stop: exiting with status 1 now" in proc.stderr, proc.stderr
