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


def revoke_under_watch(revoke, revoked, timeout: float, linger: float = 0.0) -> list[str]:
    """Run a revocation through the watched callback the consumer holds; what the watchdog
    reported (``linger``: wait on after it ended, past the timeout)."""
    stuck: list[str] = []
    app = app_with(revoke)
    install_revoke_watchdog(app, timeout, on_stuck=stuck.append)

    async def main():
        await app.consumer._on_partitions_revoked(revoked)
        await asyncio.sleep(linger)

    asyncio.run(main())
    return stuck


def test_a_revocation_past_its_time_is_reported_with_where_it_waits():
    async def stuck_here(revoked):
        await asyncio.sleep(0.6)

    stuck = revoke_under_watch(stuck_here, {("user-events", 0), ("user-events", 1)}, 0.2)
    assert len(stuck) == 1, stuck
    assert "giving up 2 partitions" in stuck[0]
    assert "stuck_here" in stuck[0], stuck[0]  # the revocation's stack names where it waits


def test_a_revocation_in_time_is_not_reported():
    async def quick(revoked):
        await asyncio.sleep(0.01)

    # lingers past the timeout: the timer was cancelled when the revocation ended
    assert revoke_under_watch(quick, set(), 0.2, linger=0.4) == []


def ends_by_its_deadline(code: str, why: str) -> None:
    """``code``, run in a process of its own, hangs; the exit deadline it arms must end it with
    status 1, well before the hang would, saying why."""
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1, proc
    assert time.monotonic() - t < 25  # the hang lasts 30 s
    assert f"after {why}: exiting with status 1 now" in proc.stderr, proc.stderr


def test_exit_deadline_ends_a_process_whose_shutdown_hangs():
    ends_by_its_deadline("import time\n"
                         "from streamagent.stream.faust_internals import exit_after\n"
                         "exit_after(0.3, 'a test')\n"
                         "time.sleep(30)\n", "a test")


def test_a_crashed_worker_whose_stop_hangs_exits_by_its_deadline():
    # the crash: no broker to start against; mode's Worker then stops, and the stop hangs
    ends_by_its_deadline("import asyncio, faust\n"
                         "from streamagent.stream.faust_internals import make_worker\n"
                         "async def hang(self):\n"
                         "    await asyncio.sleep(30)\n"
                         "faust.Worker.stop = hang  # a shutdown that never ends\n"
                         "app = faust.App('t', broker='kafka://127.0.0.1:1', store='memory://',\n"
                         "                web_enabled=False)\n"
                         "make_worker(app, 'WARNING', exit_deadline_s=0.5)"
                         ".execute_from_commandline()\n", "the worker began to stop")


def test_shipped_timeouts():
    s = Settings()
    # longer than Faust's own "too long" report (0.95 x its 60 s session timeout), shorter than
    # the broker's rebalance timeout (Faust's max poll interval, 1000 s)
    assert 60 < s.revoke_timeout_s < 1000
    assert s.exit_deadline_s > 0
