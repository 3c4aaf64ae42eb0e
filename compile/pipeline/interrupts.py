"""SIGINT/SIGTERM (Ctrl-C, spot interruption, batch job stop) end the run at the next tensor, file or
part boundary: workers check `check()` there, temporaries are removed by the writers' abort paths,
finished stages and files stay for the rerun, and the process exits 130/143 with one line."""

import contextlib
import importlib
import signal
import threading

from lmi_compile.errors import Interrupted
from lmi_compile.pipeline import testhooks

STOP = threading.Event()
_received: list[int] = []


_held = False  # in held(): a signal is recorded, and raised once the block ends


def _handler(signum, frame):
    first = not STOP.is_set()
    STOP.set()
    _received.append(signum)
    if first and not _held:
        raise Interrupted(signum)  # in the main thread: leaves whatever wait it is in


@contextlib.contextmanager
def held():
    """SIGINT/SIGTERM that arrive in the block are raised (Interrupted) when it ends, not inside it: for imports
    of native extensions, where an exception raised in their initialisation aborts the process (torch:
    pybind11's 'terminate called after throwing', exit -6, temporaries left behind)."""
    global _held
    if threading.current_thread() is not threading.main_thread():  # handlers run in the main thread only
        yield
        return
    outer, seen = _held, len(_received)
    _held = True
    try:
        yield
    finally:
        _held = outer
    if not outer and len(_received) > seen:
        raise Interrupted(received())


def import_held(name: str):
    """import_module(name) with signals held (held())."""
    with held():
        return importlib.import_module(name)


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
