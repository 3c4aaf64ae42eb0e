"""TEST-ONLY hook: hold the process at a named point so a test can signal or kill it exactly there.

Never set these variables outside the test suite. Without LMI_COMPILE_TEST_PAUSE_AT a call costs one
environment lookup and does nothing.

- LMI_COMPILE_TEST_PAUSE_AT=<point>[#<n>]: pause the n-th time (default: the first) `point` is reached.
- LMI_COMPILE_TEST_PAUSE_READY=<file>: created when the process is paused there; the test waits for it.
- LMI_COMPILE_TEST_PAUSE_S=<seconds>: the longest pause (default 60); then the run goes on as usual.
- LMI_COMPILE_TEST_PAUSE_RELEASE=<file>: the pause also ends once this file exists (the test did its part).

While paused the process still honours SIGINT/SIGTERM as at any boundary: the pause ends with
Interrupted once a stop was asked for. A test can therefore deliver a signal at a moment the work
cannot have finished, instead of racing it.

Points: "boundary" (every tensor, file or part boundary: interrupts.check), "push-file" (a push starts
one file), "push-part" (a part of a multipart upload is about to be sent), "fetch-range" (a ranged GET of
an S3 fetch is about to be sent), "stage-rename" (a stage's record is written, and synced where the stage
is durable, its folder not yet renamed into place).
"""

import os
import threading
import time

_seen: dict[str, int] = {}
_lock = threading.Lock()


def pause(point: str) -> None:
    want = os.environ.get("LMI_COMPILE_TEST_PAUSE_AT")
    if not want:
        return
    name, _, nth = want.partition("#")
    if name != point:
        return
    with _lock:
        _seen[point] = _seen.get(point, 0) + 1
        if _seen[point] != int(nth or 1):
            return
    from lmi_compile.errors import Interrupted
    from lmi_compile.pipeline.interrupts import STOP, received

    open(os.environ["LMI_COMPILE_TEST_PAUSE_READY"], "w").close()
    deadline = time.monotonic() + float(os.environ.get("LMI_COMPILE_TEST_PAUSE_S", "60"))
    release = os.environ.get("LMI_COMPILE_TEST_PAUSE_RELEASE")
    while time.monotonic() < deadline and not (release and os.path.exists(release)):
        if STOP.is_set():  # in a worker thread; in the main thread the handler raises out of sleep()
            raise Interrupted(received())
        time.sleep(0.01)
