"""Stage events for a runner outside the process (`lmi-compile batch`): which stage a pipeline entered, when.

Without LMI_COMPILE_STAGE_LOG a call costs one environment lookup and does nothing. With it, each stage a
backend enters appends one JSON line {"stage", "at"} to that file; the runner reads it for live progress and
per-stage timings. LMI_COMPILE_JOB (JSON, set by the runner) is recorded in the published manifest under
"job", so a rerun can tell that a prefix already holds this job's output.
"""

import json
import os
import time

STAGE_LOG_ENV = "LMI_COMPILE_STAGE_LOG"
JOB_ENV = "LMI_COMPILE_JOB"


def stage(name: str) -> None:
    """The pipeline enters stage `name` (a skipped stage is entered too, and takes no time)."""
    path = os.environ.get(STAGE_LOG_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"stage": name, "at": time.time()}) + "\n")


def job_facts() -> dict | None:
    """The batch job this run belongs to, as the runner described it (None outside `lmi-compile batch`)."""
    raw = os.environ.get(JOB_ENV)
    if not raw:
        return None
    try:
        facts = json.loads(raw)
    except ValueError:
        return None
    return facts if isinstance(facts, dict) else None
