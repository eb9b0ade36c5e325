"""Small helpers for running things on this machine: free ports, stopping child processes."""
from __future__ import annotations

import signal
import socket
import subprocess
from contextlib import contextmanager


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_busy(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def free_port_pair() -> int:
    """A free port whose successor is free too (the local broker's controller uses port+1)."""
    while True:
        p = free_port()
        if p < 65535 and not port_busy(p + 1):
            return p


def terminate(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM (a clean shutdown), then SIGKILL if it has not exited within ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _interrupted(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def interrupt_on_termination():
    """Inside: SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does, so that a command
    which started child processes (a broker, workers) stops them on its way out (a plain
    SIGTERM ends Python without running ``finally`` blocks, and leaves the children running).
    The previous handlers come back on exit."""
    old = {sig: signal.signal(sig, _interrupted) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
