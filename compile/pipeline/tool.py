"""Running a compiler-boundary executable (trtllm-build, TensorRT-LLM's convert_checkpoint.py): its output to a
log file, progress from the files it writes, and stopped with us on Ctrl-C / SIGTERM."""

import shlex
import subprocess
import sys
import time
from pathlib import Path

from lmi_compile.pipeline.progress import Progress


def python_module(module: str) -> list[str]:
    """`python -m module` without the current folder on sys.path: -m puts it first, so a json.py of the user's (a
    cloned repository, a model's code) in the folder a command runs from would run as the user (3.10 has no -P)."""
    return [sys.executable, "-c", f"import runpy, sys; del sys.path[0]; runpy.run_module({module!r}, "
                                  f"run_name='__main__', alter_sys=True)"]


def run_watched(cmd: list[str], *, cwd: Path, log_path: Path, total: int, desc: str, unit: str, pattern: str,
                poll_s: float = 0.5) -> tuple[int, str]:
    """Run `cmd` in `cwd` (absolute paths only), its stdout and stderr in `log_path`; a bar counts the files
    matching `pattern` in `cwd`. On an interrupt (any exception while it runs) the process is terminated, then
    killed after 30 s, and the exception propagates. Returns (exit code, the log's last non-empty line)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    bar = Progress(total=total, desc=desc, unit=unit)
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=cwd)
        try:
            while proc.poll() is None:
                time.sleep(poll_s)
                bar.update(len(list(cwd.glob(pattern))) - bar.n)
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        finally:
            bar.update(len(list(cwd.glob(pattern))) - bar.n)
            bar.close()
    tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["(no output)"]
    return proc.returncode, tail[0][:300]


def quoted(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
