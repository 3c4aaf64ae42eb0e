"""`lmi-compile batch`: many compile jobs on Ray, embedded on this machine or on a cluster.

Ray schedules; this module only decides what to ask of it. On a cluster with --staging a job runs as two Ray
tasks (runner.py): its CPU stages (fetch, convert/split) on any node with a CPU and the memory `plan` sizes for
them, which hand over to --staging on S3 (handover.py); then its build/compile, layout and push on a node with
the job's resources (GPUs of its accelerator type, NeuronCores), which starts from that hand-over. Embedded (one
machine, the work dir serves) or on a cluster without --staging, a job is one task that runs every stage on its
build node. Before anything is scheduled: JOBS.yaml is checked against the backend commands, a job whose upload
prefix already holds this job's manifest is skipped, a job whose hand-over is already published starts at its
build, a job that cannot fit its instance is reported, and local model folders are published to --staging (on a
cluster no node sees this disk). One job's failure never stops the others; a lost node or an S3 5xx is retried
with backoff, bad input is not.
"""

import json
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmi_compile.batch.jobs import Job
from lmi_compile.errors import EXIT_BAD_INPUT, BadInput, Interrupted, LmiCompileError
from lmi_compile.pipeline.interrupts import STOP, install_deferred, received

log = logging.getLogger("lmi_compile")

ATTEMPTS = int(os.environ.get("LMI_COMPILE_BATCH_ATTEMPTS", "3"))
BACKOFF_S = float(os.environ.get("LMI_COMPILE_BATCH_BACKOFF_S", "5"))
# How long a job may wait for a node with its resources to exist (an autoscaler may be starting one).
SCHEDULE_TIMEOUT_S = float(os.environ.get("LMI_COMPILE_BATCH_SCHEDULE_TIMEOUT_S", "900"))
TICK_S = 0.5
# Exit-1 failures worth another attempt: the server or the network, not the input or the compiler.
TRANSIENT = re.compile(r"\b5\d\d\b|InternalError|ServiceUnavailable|SlowDown|RequestTimeout|Throttl|"
                       r"cannot reach|timed out|Connection(Error| reset| aborted| refused)|EndpointConnection")


@dataclass
class JobState:
    job: Job
    status: str = "pending"  # pending, running, retrying, done, skipped, failed
    stage: str = ""
    phase: str = "all"  # the task to run next: cpu (then build), build (from the hand-over), or all
    handover: str | None = None  # STAGING/handover/NAME-FINGERPRINT/ (cluster with --staging)
    cpu_request: dict = field(default_factory=dict)
    node: str | None = None  # where the build or compile ran
    stage_nodes: dict = field(default_factory=dict)  # {stage: node id}
    stages: dict = field(default_factory=dict)
    output: str | None = None
    error: str | None = None
    attempts: int = 0
    started: float | None = None
    ended: float | None = None
    not_before: float = 0.0
    dispatched: float = 0.0  # when its current task went out
    waiting_since: float | None = None
    ref: object = None

    @property
    def finished(self) -> bool:
        return self.status in ("done", "skipped", "failed")

    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.ended or time.time()) - self.started

    def report(self) -> dict:
        return {"name": self.job.name, "status": self.status, "node": self.node, "stages": self.stages,
                "output": self.output, "error": self.error, "stage_nodes": self.stage_nodes}


def run_batch(jobs_file: Path, commands: dict, *, address: str | None, staging: str | None,
              max_parallel: int | None, json_out: bool) -> int:
    from lmi_compile.batch import jobs as jobs_mod

    cluster = address is not None
    jobs = jobs_mod.load(jobs_file, commands, cluster=cluster)
    _check_sources(jobs, jobs_file, cluster=cluster, staging=staging)
    ray = _import_ray()
    states = [JobState(j) for j in jobs]
    for s in states:
        s.job.source = _staged_uri(s.job, staging) if cluster else s.job.model
    if cluster and not staging:
        log.warning("no --staging: each job runs all its stages on its build node (give --staging s3://bucket/prefix/ "
                    "to run fetch and convert/split on CPU nodes)")
    for s in states:  # before any work: done already, or cannot fit
        _skip_or_plan(s, staging if cluster else None)
    if cluster:
        _stage_local_models([s for s in states if not s.finished])
    report = sys.stdout
    if not all(s.finished for s in states):  # else nothing to schedule: Ray is not started
        # Ray prints cluster events with print(), some late (a node's death, at exit): stdout is the report's alone,
        # so everything else that prints from now on goes to stderr
        sys.stdout = sys.stderr
        try:
            _start_ray(ray, address)
            # ray.init replaced the SIGTERM handler with a bare exit; a signal now marks the stop, the loop cancels
            install_deferred()
            _schedule(ray, states, embedded=not cluster, max_parallel=max_parallel)
        except Interrupted:
            _final_report(states, json_out, report)
            raise
        finally:
            if not cluster:
                ray.shutdown()
    _final_report(states, json_out, report)
    return 1 if any(s.status == "failed" for s in states) else 0


def _import_ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports from a compile job
    try:
        import ray
    except ImportError:
        raise BadInput("lmi-compile batch needs Ray: pip install 'lmi-compile[batch]'") from None
    logging.getLogger("ray").setLevel(logging.WARNING)
    return ray


def _check_sources(jobs: list[Job], jobs_file: Path, *, cluster: bool, staging: str | None) -> None:
    """On a cluster no node sees this machine's disk: a local model must go through --staging."""
    from lmi_compile.remote.fetch import parse_source
    from lmi_compile.remote.s3 import parse_s3_uri

    if staging:
        uri = parse_s3_uri(staging)
        if not uri.prefix:
            raise BadInput(f"--staging {staging}: give a prefix (s3://bucket/lmi-compile-staging/), not a whole bucket")
    for job in jobs:
        revision = job.options.get("revision")
        source = parse_source(job.model, revision)
        if source.kind != "local":
            continue
        folder = Path(job.model).expanduser().resolve()
        if not folder.is_dir():
            raise BadInput(f"{jobs_file}: job {job.name!r}: model {job.model} is not a folder; give a local model "
                           f"folder, a Hub repo id or an s3:// prefix")
        job.model = str(folder)  # nodes and later steps never depend on the current folder
        if cluster and not staging:
            raise BadInput(f"{jobs_file}: job {job.name!r}: model {folder} is a local folder and no node of the "
                           f"cluster sees this machine's disk; give --staging s3://bucket/prefix/ to publish it "
                           f"there first, or use a Hub or S3 model")


def _skip_or_plan(s: JobState, staging: str | None) -> None:
    """Done already (skipped), cannot fit (failed, not run), or which task comes first: with --staging on a cluster
    the CPU stages, unless their hand-over for this job fingerprint is already published (then the build)."""
    from lmi_compile.batch import handover
    from lmi_compile.batch.fit import check_fit, cpu_stage_request
    from lmi_compile.remote.peek import read_remote_config

    if s.job.upload:
        recorded = _published_job(s.job.upload)
        if recorded and recorded.get("fingerprint") == s.job.fingerprint():
            s.status, s.node, s.output = "skipped", recorded.get("node"), s.job.upload
            log.info("job %s: %s already holds this job's verified output; skipped", s.job.name, s.job.upload)
            return
    o = s.job.options
    try:
        config = read_remote_config(s.job.model, o.get("revision"), o.get("token"))[0]
        why = check_fit(s.job, config)
        if staging and not why:
            s.cpu_request = cpu_stage_request(s.job, config)
    except LmiCompileError as e:
        why = str(e)
    if why:
        s.status, s.error = "failed", f"not run: {why}"
        log.error("job %s: %s", s.job.name, s.error)
        return
    if staging:
        s.handover = f"{staging.rstrip('/')}/handover/{s.job.name}-{s.job.fingerprint()[:16]}/"
        s.phase = "cpu"
        if handover.published(s.handover):
            s.phase = "build"
            log.info("job %s: %s holds its %s stage; resuming at the build", s.job.name, s.handover,
                     handover.STAGE_OF[s.job.backend])


def _published_job(upload: str) -> dict | None:
    """The `job` record of the manifest at `upload`, when a verified upload is there."""
    from lmi_compile.remote.manifest import read_manifest
    from lmi_compile.remote.s3 import make_client, parse_s3_uri

    # no manifest (or no access): the job runs, and its own pre-flight says what is wrong
    manifest = read_manifest(make_client(), parse_s3_uri(upload))
    return manifest.get("job") if manifest else None


def _staged_uri(job: Job, staging: str | None) -> str:
    """Where a local model folder is published for the nodes: STAGING/models/NAME-ID/, ID from its files (names,
    sizes, mtimes), so a rerun finds it there and a changed folder gets a new prefix."""
    import hashlib

    from lmi_compile.remote.fetch import parse_source
    from lmi_compile.remote.publish import local_files

    if parse_source(job.model, job.options.get("revision")).kind != "local":
        return job.model
    files = local_files(Path(job.model))
    ident = hashlib.sha256(json.dumps([(f.rel, f.size, f.path.stat().st_mtime_ns) for f in files]).encode())
    return f"{staging.rstrip('/')}/models/{Path(job.model).name}-{ident.hexdigest()[:16]}/"


def _stage_local_models(states: list[JobState]) -> None:
    """Publish each local model folder once to its staging prefix (verified push; a rerun finds it complete)."""
    from lmi_compile.remote.publish import push

    done: set[str] = set()
    for s in states:
        if s.job.source == s.job.model or s.job.source in done:
            continue
        log.info("staging: publishing %s to %s (no node sees this disk)", s.job.model, s.job.source)
        push(Path(s.job.model), s.job.source)
        done.add(s.job.source)


def _start_ray(ray, address: str | None) -> None:
    kw = {"log_to_driver": False, "configure_logging": False}
    if address is None:
        ray.init(include_dashboard=False, **kw)
    else:
        ray.init(address=address, **kw)


def _schedule(ray, states: list[JobState], *, embedded: bool, max_parallel: int | None) -> None:
    from lmi_compile.batch.fit import ray_resources
    from lmi_compile.batch.runner import Board, run_job

    task = ray.remote(max_retries=0)(run_job)
    work_root = str(Path("lmi-compile-work/batch").resolve()) if embedded else None
    # Live stages: on one machine from the jobs' stage logs, on a cluster through an actor (no shared disk).
    board = None if embedded else ray.remote(num_cpus=0)(Board).remote()
    view = Progress(states)
    try:
        while not all(s.finished for s in states):
            if STOP.is_set():
                raise Interrupted(received())
            now = time.time()
            running = [s for s in states if s.ref is not None]
            # CPU stages run ahead of the builds by at most as many jobs as can build at once: converting every job
            # first would leave the GPUs idle until the CPUs are through (builds first within a tick, too)
            ahead = sum(s.phase == "cpu" and s.ref is not None or s.phase == "build" and s.ref is None and
                        not s.finished for s in states)
            slots = _build_slots(ray) if any(s.phase == "cpu" and s.ref is None for s in states) else 0
            for s in sorted(states, key=lambda s: s.phase == "cpu"):
                if s.status not in ("pending", "retrying") or now < s.not_before:
                    continue
                if max_parallel and len(running) >= max_parallel:
                    break
                if s.phase == "cpu" and ahead >= slots:
                    continue
                req = s.cpu_request if s.phase == "cpu" else ray_resources(s.job)
                if embedded:
                    req = _local_request(ray, s, req)
                missing = _unplaceable(ray, req)
                if missing:
                    s.waiting_since = s.waiting_since or now
                    if embedded or now - s.waiting_since > SCHEDULE_TIMEOUT_S:
                        _fail(s, f"no node offers {missing}" + ("" if embedded else f" (waited "
                              f"{SCHEDULE_TIMEOUT_S:.0f}s; start a node with it or fix the job's resources)"))
                    continue
                s.waiting_since = None
                s.ref = task.options(**req).remote(_spec(s, work_root), board)
                s.attempts += 1
                s.status, s.stage, s.dispatched = "running", "queued", now
                ahead += s.phase == "cpu"
                s.started = s.started or now
                running.append(s)
            refs = [s.ref for s in states if s.ref is not None]
            if refs:
                ray.wait(refs, num_returns=1, timeout=TICK_S)  # back the moment any task ends: its next phase goes out
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                for s in states:
                    if s.ref is not None and s.ref in ready:
                        _finished(ray, s)
                _live_stages(ray, board, states, work_root)
            else:
                time.sleep(TICK_S)
            view.update()
    except (Interrupted, KeyboardInterrupt) as e:
        _cancel(ray, states)
        view.update()
        view.close()
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted(signal.SIGINT) from None
        raise
    view.close()


def _spec(s: JobState, work_root: str | None) -> dict:
    """What the task runs: the job's command line, and the phase's own options (runner.py)."""
    from lmi_compile.batch.handover import STAGE_OF

    phase_argv = {"cpu": ["--until", STAGE_OF[s.job.backend], "--handover-out", s.handover],
                  "build": ["--handover-in", s.handover], "all": []}[s.phase]
    # TEST-ONLY (pipeline/testhooks.py): LMI_COMPILE_TEST_JOB_<X> of the driver becomes LMI_COMPILE_TEST_<X> of
    # the job's command, so a test holds a job at a known point without holding the driver there too.
    hooks = {"LMI_COMPILE_TEST_" + k[len("LMI_COMPILE_TEST_JOB_"):]: v for k, v in os.environ.items()
             if k.startswith("LMI_COMPILE_TEST_JOB_")}
    return {"name": s.job.name, "backend": s.job.backend, "source": s.job.source, "argv": s.job.argv,
            "options": s.job.options, "fingerprint": s.job.fingerprint(), "work_root": work_root,
            "phase": s.phase, "phase_argv": phase_argv, "handover": s.handover, "env": hooks,
            "overwrite_upload": s.phase != "cpu" and s.attempts > 0 and _incomplete(s.job.upload)}


def _local_request(ray, s: JobState, req: dict) -> dict:
    """One machine: ask only for what it has (placement is moot; a GPU it lacks is the build tool's concern)."""
    have = ray.cluster_resources()
    out = {**req, "resources": {k: v for k, v in req["resources"].items() if k in have}}
    if req.get("num_gpus") and not have.get("GPU"):
        out["num_gpus"] = 0
    dropped = [k for k in req["resources"] if k not in have] + (["GPU"] if out.get("num_gpus") != req.get("num_gpus")
                                                               else [])
    if dropped and s.attempts == 0:
        log.warning("job %s: this machine offers no %s; running here without it", s.job.name, ", ".join(dropped))
    return out


def _build_slots(ray) -> int:
    """How many builds or compiles the alive nodes can run at once: their GPUs, and a NeuronCore pair each."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    return max(1, sum(int(n.get("GPU", 0)) + int(n.get("neuron_cores", 0)) // 2 for n in nodes))


def _unplaceable(ray, req: dict) -> str | None:
    """What no alive node offers (in total) of the request, or None."""
    need = {"CPU": req.get("num_cpus", 1), "GPU": req.get("num_gpus", 0), "memory": req.get("memory", 0),
            **req.get("resources", {})}
    need = {k: v for k, v in need.items() if v}
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(all(n.get(k, 0) >= v for k, v in need.items()) for n in nodes):
        return None
    return ", ".join(f"{k}={v:g}" for k, v in need.items() if k != "CPU" or not nodes)


def _incomplete(upload: str | None) -> bool:
    """The prefix holds an upload in progress (marker, no manifest): what a lost attempt of this job left."""
    if not upload:
        return False
    from lmi_compile.remote.manifest import MANIFEST_KEY, MARKER_KEY
    from lmi_compile.remote.s3 import list_objects, make_client, parse_s3_uri

    try:
        keys = list_objects(make_client(), parse_s3_uri(upload))
    except LmiCompileError:
        return False
    return MARKER_KEY in keys and MANIFEST_KEY not in keys


def _finished(ray, s: JobState) -> None:
    ref, s.ref = s.ref, None
    try:
        r = ray.get(ref)
    except Exception as e:
        name = type(e).__name__
        lost = name in ("NodeDiedError", "WorkerCrashedError", "TaskUnschedulableError", "ObjectLostError",
                        "OwnerDiedError", "RaySystemError", "LocalRayletDiedError", "ActorDiedError")
        message = str(e).splitlines()[0][:300] if str(e) else name
        if name == "TaskCancelledError":
            _fail(s, "cancelled")
        elif lost:
            _retry_or_fail(s, f"node lost ({name}: {message})")
        else:
            _fail(s, f"{name}: {message}")
        return
    if r["phase"] != "cpu":
        s.node, s.output = r["node"], r["output"]
    for stage, secs in r["stages"].items():
        s.stages[stage] = round(s.stages.get(stage, 0.0) + secs, 3)
        s.stage_nodes[stage] = r["node"]
    code, error = r["exit_code"], r["error"]
    if code == 0 and r["phase"] == "cpu":  # handed over: the build comes next, on a node with the job's resources
        s.phase, s.status, s.stage, s.attempts = "build", "pending", "", 0
        log.info("job %s: %s handed over on node %s", s.job.name, " + ".join(r["stages"]), r["node"][:8])
    elif code == 0:
        s.status, s.stage, s.error, s.ended = "done", "", None, time.time()
        log.info("job %s: done on node %s in %.1fs", s.job.name, s.node[:8], s.elapsed())
    elif code == EXIT_BAD_INPUT:
        _fail(s, error)  # bad input fails the same way every time
    elif code in (130, 143, -signal.SIGTERM, -signal.SIGKILL):
        _retry_or_fail(s, f"stopped on its node (exit {code}): {error}")  # a node going down (spot reclaim)
    elif error and TRANSIENT.search(error):
        _retry_or_fail(s, error)
    else:
        _fail(s, error or f"exit code {code}")


def _retry_or_fail(s: JobState, why: str) -> None:
    if s.attempts >= ATTEMPTS:
        _fail(s, f"{why} (after {s.attempts} attempts)")
        return
    delay = BACKOFF_S * 2 ** (s.attempts - 1)
    log.warning("job %s: attempt %d failed (%s); retrying in %.0fs", s.job.name, s.attempts, why, delay)
    s.status, s.stage, s.not_before = "retrying", "", time.time() + delay


def _fail(s: JobState, why: str | None) -> None:
    s.status, s.error, s.ended = "failed", " ".join((why or "failed").split())[:500], time.time()
    log.error("job %s: failed: %s", s.job.name, s.error)


def _live_stages(ray, board, states: list[JobState], work_root: str | None) -> None:
    from lmi_compile.batch.runner import last_stage

    if board is None:
        current = {s.job.name: last_stage(Path(work_root) / s.job.name, s.phase) for s in states if s.ref is not None}
        # a stage log left by an earlier run holds older events (one machine: one clock)
        current = {s.job.name: current[s.job.name] for s in states
                   if current.get(s.job.name) and current[s.job.name][1] >= s.dispatched}
    else:
        try:
            current = ray.get(board.read.remote(), timeout=5)
        except Exception:
            return
    for s in states:
        if s.status == "running" and s.job.name in current and current[s.job.name][2] == s.phase:
            s.stage = current[s.job.name][0]


def _cancel(ray, states: list[JobState]) -> None:
    """Ctrl-C / SIGTERM: cancel running tasks (each stops its run cleanly: temporaries removed, open multipart
    uploads aborted, no manifest written), wait for them, and report."""
    running = [s for s in states if s.ref is not None]
    log.warning("interrupted: cancelling %d running job(s); each stops at its next boundary", len(running))
    for s in running:
        ray.cancel(s.ref, force=False)
    refs = [s.ref for s in running]
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=90)
    for s in states:
        s.ref = None
        if not s.finished:
            _fail(s, "interrupted; rerun the same command to resume")


class Progress:
    """One line per job (stage, status, elapsed): a table redrawn in place on a TTY, log lines elsewhere."""

    def __init__(self, states: list[JobState]):
        self.states = states
        self.tty = sys.stderr.isatty()
        self.drawn = 0
        self.last: dict[str, tuple] = {}

    def update(self) -> None:
        if self.tty:
            lines = table(self.states, live=True)
            out = (f"\x1b[{self.drawn}F" if self.drawn else "") + "".join(f"\x1b[2K{ln}\n" for ln in lines)
            sys.stderr.write(out)
            sys.stderr.flush()
            self.drawn = len(lines)
            return
        for s in self.states:
            now = (s.status, s.stage)
            if self.last.get(s.job.name) != now:
                self.last[s.job.name] = now
                if s.status in ("running", "retrying"):
                    log.info("job %s: %s %s (%.0fs)", s.job.name, s.status, s.stage, s.elapsed())

    def close(self) -> None:
        self.drawn = 0


def table(states: list[JobState], *, live: bool = False) -> list[str]:
    rows = [("job", "backend", "status", "stage" if live else "stages (s)", "elapsed", "node",
             "" if live else "output / error")]
    for s in states:
        stages = s.stage if live else ", ".join(f"{k} {v:.1f}" for k, v in s.stages.items())
        tail = "" if live else (s.error if s.status == "failed" else s.output) or ""
        rows.append((s.job.name, s.job.backend, s.status, stages, f"{s.elapsed():.0f}s", (s.node or "-")[:8], tail))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + ("  " + r[-1] if r[-1] else "") for r in rows]


def _final_report(states: list[JobState], json_out: bool, out) -> None:
    if json_out:
        out.write(json.dumps({"jobs": [s.report() for s in states]}, indent=2) + "\n")
    else:
        for line in table(states):
            out.write(line.rstrip() + "\n")
        counts = {k: sum(s.status == k for s in states) for k in ("done", "skipped", "failed")}
        out.write(", ".join(f"{v} {k}" for k, v in counts.items()) + "\n")
    out.flush()
