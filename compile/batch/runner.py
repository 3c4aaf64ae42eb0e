"""What runs on a node: one phase of a job, as the backend command in a subprocess, its stages reported as they go.

Phases: "cpu" (fetch and convert/split, then the hand-over to --staging), "build" (from the hand-over: build or
compile, layout, push) or "all" (every stage here: embedded mode, or a cluster without --staging). The subprocess
is the same `lmi-compile trtllm|neuron` a user runs, so a batch job has exactly its checks, stage skipping, clean
interruption (SIGTERM stops at the next boundary and aborts open multipart uploads) and one-line errors. Its work
folder is on this node's own disk (LMI_COMPILE_BATCH_WORK, default ~/.cache/lmi-compile/batch): a rerun that lands
on the same node resumes at the first unfinished stage.
"""

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from lmi_compile.pipeline.tool import python_module

WORK_ENV = "LMI_COMPILE_BATCH_WORK"
POLL_S = 0.25
STOP_GRACE_S = 60


def work_root(given: str | None) -> Path:
    if given:
        return Path(given)
    return Path(os.environ.get(WORK_ENV) or Path.home() / ".cache" / "lmi-compile" / "batch")


class Board:
    """A Ray actor (no CPU) the running jobs tell their stage to, and the driver reads for live progress."""

    def __init__(self):
        self.stages: dict[str, tuple[str, float, str]] = {}

    def update(self, name: str, stage: str, at: float, phase: str = "all") -> None:
        self.stages[name] = (stage, at, phase)

    def read(self) -> dict:
        return dict(self.stages)


def run_job(spec: dict, board=None) -> dict:
    """Run one job here (inside a Ray task). Returns node, exit code, stage seconds, error line and output."""
    with _cancellable():
        return _run_job(spec, board)


def _run_job(spec: dict, board) -> dict:
    import ray

    from lmi_compile.pipeline.observe import JOB_ENV, STAGE_LOG_ENV

    node = ray.get_runtime_context().get_node_id()
    phase = spec.get("phase", "all")
    root = work_root(spec.get("work_root")) / spec["name"]
    root.mkdir(parents=True, exist_ok=True)
    stage_log, cli_log = root / f"stages-{phase}.jsonl", root / f"lmi-compile-{phase}.log"
    stage_log.write_text("")
    argv = [*python_module("lmi_compile"), spec["backend"], spec["source"], *spec["argv"],
            *spec.get("phase_argv", []), "--work-dir", str(root / "work")]
    output = spec["options"].get("output")
    if phase == "cpu":
        output = spec.get("handover")
    elif not output:
        output = str(root / "output")
        argv += ["--output", output]
    if spec.get("overwrite_upload") and "--overwrite" not in argv:
        argv.append("--overwrite")  # a retry replaces the incomplete upload its lost attempt left
    env = {**os.environ, **spec.get("env", {}), STAGE_LOG_ENV: str(stage_log), "PYTHONUNBUFFERED": "1",
           JOB_ENV: json.dumps({"name": spec["name"], "fingerprint": spec["fingerprint"], "node": node})}
    started = time.time()
    seen = 0
    with open(cli_log, "w") as log, _cancel_held() as held:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
    try:
        if held:  # cancelled while the command started: it is stopped like a running one
            raise KeyboardInterrupt
        while proc.poll() is None:
            seen = _report(stage_log, seen, spec["name"], board, phase)
            try:
                proc.wait(timeout=POLL_S)  # returns the moment the command ends
            except subprocess.TimeoutExpired:
                pass
    except BaseException:  # ray.cancel (KeyboardInterrupt) or the worker going down: stop the run cleanly
        _stop(proc)
        raise
    _report(stage_log, seen, spec["name"], board, phase)
    ended = time.time()
    return {"node": node, "phase": phase, "exit_code": proc.returncode, "stages": stage_seconds(stage_log, ended),
            "error": _error_line(cli_log) if proc.returncode else None,
            "output": output if phase == "cpu" else spec["options"].get("upload") or output, "log": str(cli_log),
            "seconds": ended - started}


def _cancellable():
    """Python's own SIGINT handler while the task runs: ray.cancel stops a running task by raising
    KeyboardInterrupt through it (PyErr_SetInterrupt), which does nothing where SIGINT is ignored. A node inherits
    that from whatever started it: a script's `ray start ... --block &` (a shell without job control ignores SIGINT
    for background commands) left Ctrl-C of a batch waiting 90 s for jobs that never stopped. A handler of Python's
    or of C code's is left as it is."""
    return _sigint(signal.default_int_handler, replaces=lambda before: before in (signal.SIG_IGN, signal.SIG_DFL))


@contextlib.contextmanager
def _cancel_held():
    """While the command starts, a cancel is recorded (the list), not raised: raised inside Popen, after the fork,
    it would leave the started command running with nothing to stop it."""
    held: list[int] = []
    with _sigint(lambda signum, frame: held.append(signum), replaces=lambda before: before is not None):
        yield held


@contextlib.contextmanager
def _sigint(handler, replaces):
    """`handler` for SIGINT inside the block, where the main thread runs it and `replaces(the handler there)`;
    the earlier one after."""
    before = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not replaces(before):
        yield
        return
    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _die_with_parent() -> None:
    """The run gets SIGTERM (and stops cleanly) if the Ray worker that started it dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # the CLI stops at the next boundary and aborts open uploads
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _events(stage_log: Path) -> list[dict]:
    out = []
    try:
        lines = stage_log.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return out


def _report(stage_log: Path, seen: int, name: str, board, phase: str) -> int:
    events = _events(stage_log)
    if board is not None and len(events) > seen:
        board.update.remote(name, events[-1]["stage"], events[-1]["at"], phase)
    return len(events)


def last_stage(root: Path, phase: str) -> tuple[str, float, str] | None:
    """The stage a job's phase is in, from its stage log (what the Board holds, where the driver sees the disk)."""
    events = _events(root / f"stages-{phase}.jsonl")
    return (events[-1]["stage"], events[-1]["at"], phase) if events else None


def stage_seconds(stage_log: Path, ended: float) -> dict[str, float]:
    """Seconds per stage: from entering it to entering the next (the last ends with the run)."""
    events = _events(stage_log)
    out: dict[str, float] = {}
    for e, nxt in zip(events, events[1:] + [{"at": ended}]):
        out[e["stage"]] = round(out.get(e["stage"], 0.0) + max(0.0, nxt["at"] - e["at"]), 3)
    return out


def _error_line(cli_log: Path) -> str | None:
    try:
        lines = cli_log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    errors = [ln for ln in lines if ln.startswith("error: ")]
    if errors:
        return errors[-1].removeprefix("error: ")
    tail = [ln for ln in lines if ln.strip()]
    return tail[-1][:300] if tail else None
