"""SIGINT/SIGTERM (Ctrl-C, spot interruption, batch job stop) end the run at the next tensor, file or
part boundary: workers check `check()` there, temporaries are removed by the writers' abort paths,
finished stages and files stay for the rerun, and the process exits 130/143 with one line."""

import signal
import threading

from lmi_compile.errors import Interrupted
from lmi_compile.pipeline import testhooks

STOP = threading.Event()
_received: list[int] = []


def _handler(signum, frame):
    first = not STOP.is_set()
    STOP.set()
    _received.append(signum)
    if first:
        raise Interrupted(signum)  # in the main thread: leaves whatever wait it is in


def install() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler)
        signal.signal(signal.SIGTERM, _handler)


def received() -> int:
    """The first signal received (SIGTERM when a stop was asked for without one)."""
    return _received[0] if _received else signal.SIGTERM


def check() -> None:
    """Raise Interrupted in a worker once a stop was asked for."""
    testhooks.pause("boundary")
    if STOP.is_set():
        raise Interrupted(received())


def install_deferred() -> None:
    """Record SIGINT/SIGTERM without raising, for a main thread that waits in C calls a raising handler corrupts
    (Ray's ray.wait turns it into SystemError): the caller polls STOP and raises Interrupted(received())."""

    def mark(signum, frame):
        if not STOP.is_set():
            _received.append(signum)
        STOP.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, mark)
        signal.signal(signal.SIGTERM, mark)
