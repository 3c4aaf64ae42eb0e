"""`lmi-compile` and `python -m lmi_compile`: this process's own settings, then the CLI (cli.main)."""

import gc
import os
import sys


def run() -> None:
    # A command's start-up (typer, botocore's S3 model) makes about a million objects that all live on, and the
    # default thresholds rescan them dozens of times: 25-40 ms of every command here. Collections stay on,
    # rarer; what a convert allocates in bulk (tensors, buffers) is freed by reference counts, not by them.
    gc.set_threshold(50_000, 10, 10)
    from lmi_compile.cli import main

    try:
        main()
    except SystemExit as e:
        if isinstance(e.code, int):
            _exit_now(e.code)  # returns where that is not safe
        raise


def _exit_now(code: int) -> None:
    """End the process without Python's finalization, which frees those million objects one by one after the
    work is done (70 ms of every S3 command here, with botocore's client; a tenth of a whole 8.5 GiB fetch's
    margin on the 16-core host). atexit handlers still run and the standard streams are flushed; our files are
    written in `with` blocks, so none waits for a finalizer. Kept: the normal exit under a profiler or tracer
    (cProfile prints after the run), and while a non-daemon thread lives (Python would join it first)."""
    import threading

    if sys.getprofile() or sys.gettrace():
        return
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # closed (None when started with the descriptor shut), or a broken pipe
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
