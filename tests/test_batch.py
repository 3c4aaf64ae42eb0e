"""`lmi-compile batch` (#19) on a real Ray cluster of two nodes on this machine, each with its own temp and work
folders (no shared disk), SeaweedFS for staging, stage hand-over and uploads, and the per-release compiler stand-ins.

The head node stands for an inf2 machine (`neuron_cores`), the second node for a g5 (one GPU, A10G). Nodes are
started and stopped by PID (servers/ray_cluster.py), never with `ray stop`. One cluster serves the module; the test
that replaces the GPU node runs last.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ISOLATED_ENV, STANDINS, STRIPPED_ENV, error_line, run_cli, trtllm_standin
from lmi_compile.pipeline.stages import read_record
from servers.ray_cluster import RayCluster

pytestmark = pytest.mark.s3

NEURON_STANDIN = f"{sys.executable} {STANDINS / 'neuron_compile_standin.py'}"
GPU = {"num_gpus": 1, "resources": {"accelerator_type:A10G": 1}}
# A lost node is noticed in about 5 s instead of Ray's default 15 s or more.
QUICK_HEALTH_CHECK = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5"}
FAST_RETRY = {"LMI_COMPILE_BATCH_BACKOFF_S": "0.2", **RayCluster.client_env()}


def node_env(s3_server) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in STRIPPED_ENV and not k.startswith(("LMI_COMPILE_", "RAY_"))}
    return {**env, **ISOLATED_ENV, **s3_server.env()}


@pytest.fixture(scope="module")
def cluster(s3_server):
    c = RayCluster(node_env(s3_server))
    try:
        # two CPUs on the inf2 node: a CPU stage and a compile can run there at once, as on a real inf2 machine.
        # Both start as a script's `ray start ... &` starts them, SIGINT ignored: ray.cancel must still stop a job
        # there (the Ctrl-C test)
        c.start_head("inf2", num_cpus=2, resources={"neuron_cores": 2}, env=QUICK_HEALTH_CHECK, sigint_ignored=True)
        c.add_node("g5", **GPU, sigint_ignored=True)
        yield c
    finally:
        c.shutdown()


def write_jobs(path: Path, model: Path, prefix: str, *, bad: bool = True, extra: dict | None = None) -> Path:
    jobs = [
        {"name": "trt-030", "backend": "trtllm", "model": str(model), "lmi_version": "0.30",
         "trtllm_build": str(trtllm_standin("0.30")), "upload": f"{prefix}trt-030/",
         "resources": {"accelerator_type": "A10G", "gpus": 1}},
        {"name": "trt-033", "backend": "trtllm", "model": str(model), "lmi_version": "0.33",
         "trtllm_build": str(trtllm_standin("0.33")), "upload": f"{prefix}trt-033/", "max_output_len": 512,
         "resources": {"accelerator_type": "A10G"}},
        {"name": "inf2", "backend": "neuron", "model": str(model), "tp": 2, "n_positions": 256,
         "compile_entry": NEURON_STANDIN, "upload": f"{prefix}inf2/", "resources": {"neuron_cores": 2}},
    ]
    if bad:
        jobs.append({"name": "too-long", "backend": "neuron", "model": str(model), "n_positions": 100000,
                     "compile_entry": NEURON_STANDIN, "upload": f"{prefix}too-long/"})
    for j in jobs:
        j.update(extra or {})
    path.write_text(json.dumps({"defaults": {"trust_remote_code": False}, "jobs": jobs}))  # JSON is YAML
    return path


def report(proc) -> dict[str, dict]:
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return {j["name"]: j for j in json.loads(proc.stdout)["jobs"]}


def manifest(s3_client, uri: str) -> dict | None:
    from lmi_compile.remote.s3 import parse_s3_uri

    u = parse_s3_uri(uri)
    try:
        return json.loads(s3_client.get_object(Bucket=u.bucket, Key=u.key("lmi-compile-manifest.json"))["Body"].read())
    except s3_client.exceptions.NoSuchKey:
        return None


def keys(s3_client, uri: str) -> list[str]:
    from lmi_compile.remote.s3 import list_objects, parse_s3_uri

    return sorted(list_objects(s3_client, parse_s3_uri(uri)))


def node_of(cluster, node_id: str):
    return next(n for n in cluster.nodes if n.node_id() == node_id)


def test_embedded_mode_runs_the_same_file_on_this_machine(model_factory, s3_env, s3_prefix, s3_client, tmp_path):
    """Runs before the module's cluster starts: the two would share this machine's two cores."""
    jobs = write_jobs(tmp_path / "jobs.yaml", model_factory(), s3_prefix)
    proc = run_cli("batch", jobs, "--json", env={**FAST_RETRY, "RAY_USAGE_STATS_ENABLED": "0"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    r = report(proc)
    assert {n: j["status"] for n, j in r.items()} == {"trt-030": "done", "trt-033": "done", "inf2": "done",
                                                       "too-long": "failed"}
    assert len({j["node"] for j in r.values()}) == 1  # one machine
    assert all(manifest(s3_client, f"{s3_prefix}{n}/") for n in ("trt-030", "trt-033", "inf2"))
    assert (Path.cwd() / "lmi-compile-work" / "batch" / "inf2" / "output" / "serving.properties").is_file()


def test_jobs_run_on_the_nodes_with_their_resources_and_a_rerun_skips_them(cluster, model_factory, s3_env,
                                                                           s3_prefix, s3_client, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.yaml", model_factory(), s3_prefix)
    args = ("batch", jobs, "--address", cluster.address, "--staging", f"{s3_prefix}staging/", "--json")
    proc = run_cli(*args, env=FAST_RETRY)
    assert proc.returncode == 1, proc.stderr[-3000:]  # one job failed
    r = report(proc)
    inf2, g5 = cluster.nodes
    handed_over_between_nodes = 0
    for name, node in (("trt-030", g5), ("trt-033", g5), ("inf2", inf2)):
        job = r[name]
        assert job["status"] == "done" and job["error"] is None, job
        assert job["node"] == node.node_id(), (name, job["node"])  # the build/compile ran where its resources are
        cpu_stage, stage = ("split", "compile") if name == "inf2" else ("convert", "build")
        assert list(job["stages"]) == ["fetch", cpu_stage, "handover-push", "handover-fetch", stage, "layout", "push"]
        assert {job["stage_nodes"][k] for k in (stage, "layout", "push")} == {node.node_id()}  # layout + push there
        assert job["output"] == f"{s3_prefix}{name}/"
        # the build started from the hand-over (published, verified), its stage recognised by its fingerprint
        [handover] = {k.split("/")[0] for k in keys(s3_client, f"{s3_prefix}staging/handover/") if k.startswith(name)}
        handover = f"{s3_prefix}staging/handover/{handover}/"
        work = node.work / name / "work"
        record = read_record(work / ("split" if name == "inf2" else "checkpoint"))
        assert record["stage"] == cpu_stage and record["fingerprint"] == manifest(s3_client, handover)["content_id"]
        cpu = node_of(cluster, job["stage_nodes"][cpu_stage])
        if cpu is not node:  # no shared disk: fetched from S3 there, and the weights never were
            handed_over_between_nodes += 1
            assert record["handed_over_from"] == handover, record
            assert not (work / "source").exists() and not (cpu.work / name / "work" / "engines").exists()
        m = manifest(s3_client, job["output"])
        assert m and m["job"]["name"] == name and m["job"]["node"] == node.node_id()
        assert "lmi-compile-upload-in-progress.json" not in keys(s3_client, job["output"])
    assert handed_over_between_nodes  # Ray keeps CPU-only work off the GPU node while another node has room
    bad = r["too-long"]
    assert bad["status"] == "failed" and "--n-positions 100000 exceeds max_position_embeddings" in bad["error"], bad
    assert manifest(s3_client, f"{s3_prefix}too-long/") is None
    assert any(k.startswith("models/") for k in keys(s3_client, f"{s3_prefix}staging/"))  # the local model, staged
    # engine-dir layout (0.33) and triton layout (0.30) as their releases load them
    assert "rank0.engine" in keys(s3_client, f"{s3_prefix}trt-033/")
    assert "tensorrt_llm/1/rank0.engine" in keys(s3_client, f"{s3_prefix}trt-030/")

    # A rerun skips what is published, and resumes the rest at its first unfinished stage: trt-030's output is
    # gone, but its hand-over is in --staging, so no CPU task runs and the build node finds every stage done.
    for k in keys(s3_client, f"{s3_prefix}trt-030/"):
        s3_client.delete_object(Bucket="models", Key=f"{s3_prefix}trt-030/{k}".removeprefix("s3://models/"))
    again = run_cli(*args, env=FAST_RETRY)
    assert again.returncode == 1, again.stderr[-3000:]
    r2 = report(again)
    for name in ("trt-033", "inf2"):
        assert r2[name]["status"] == "skipped" and r2[name]["node"] == r[name]["node"], r2[name]
    resumed = r2["trt-030"]
    assert resumed["status"] == "done" and list(resumed["stages"]) == ["handover-fetch", "build", "layout", "push"]
    log = (g5.work / "trt-030" / "lmi-compile-build.log").read_text()
    assert f"convert: {g5.work / 'trt-030' / 'work' / 'checkpoint'} is up to date, skipping" in log, log
    assert manifest(s3_client, f"{s3_prefix}trt-030/")
    assert r2["too-long"]["status"] == "failed"  # bad input is not retried, and fails the same way again


@pytest.mark.parametrize("node_sigint", [signal.SIG_IGN, signal.SIG_DFL, signal.default_int_handler],
                         ids=["ignored", "default", "python"])
def test_a_task_is_cancellable_whatever_sigint_the_node_left_and_a_cancel_during_the_start_is_held(node_sigint):
    """ray.cancel interrupts a running task through Python's SIGINT handler (as _thread.interrupt_main does): a
    task sets that handler where the node left SIGINT ignored or at its default (the module's cluster covers only
    the first), keeps Python's own where a node started normally, and restores what it found; while its command
    starts, a cancel is recorded, not raised inside Popen (the started command would be left running)."""
    import _thread

    from lmi_compile.batch.runner import _cancel_held, _cancellable

    before = signal.signal(signal.SIGINT, node_sigint)
    try:
        if node_sigint is not signal.default_int_handler:
            _thread.interrupt_main()  # not handled by Python: what such a node did to a cancel
        with pytest.raises(KeyboardInterrupt):
            with _cancellable():
                with _cancel_held() as held:
                    _thread.interrupt_main()
                    time.sleep(0.05)  # the interrupt is checked between bytecodes: it would have been raised here
                assert held == [signal.SIGINT]
                _thread.interrupt_main()
                time.sleep(5)  # interrupted at once
        assert signal.getsignal(signal.SIGINT) is node_sigint
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_cancels_the_running_tasks_and_leaves_nothing_half_published(
        signum, cluster, model_factory, s3_env, s3_prefix, s3_client, tmp_path):
    """The job is held (pipeline/testhooks.py) while its hand-over push has a multipart upload open; the batch is
    then signalled: the task is cancelled, its command stops at that boundary, the upload is aborted."""
    model = model_factory(vocab_size=17000, hidden_size=512, num_layers=1)
    jobs = write_jobs(tmp_path / "jobs.yaml", model, s3_prefix, bad=False)
    data = json.loads(jobs.read_text())
    data["jobs"] = [dict(data["jobs"][0], dtype="float32")]  # a 67 MiB rank file: a multipart upload (64 MiB parts)
    jobs.write_text(json.dumps(data))
    ready = tmp_path / "paused"
    hold = {"LMI_COMPILE_TEST_JOB_PAUSE_AT": "push-part", "LMI_COMPILE_TEST_JOB_PAUSE_READY": str(ready),
            "LMI_COMPILE_TEST_JOB_PAUSE_S": "120"}
    out, err = tmp_path / "out.json", tmp_path / "err.log"
    started = time.time()
    with open(out, "w") as o, open(err, "w") as e:
        driver = subprocess.Popen([sys.executable, "-m", "lmi_compile", "batch", str(jobs), "--address",
                                   cluster.address, "--staging", f"{s3_prefix}staging/", "--json"],
                                  env={**os.environ, **FAST_RETRY, **hold}, stdout=o, stderr=e)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert driver.poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
            time.sleep(0.1)
        from lmi_compile.remote.s3 import parse_s3_uri

        bucket, prefix = parse_s3_uri(s3_prefix).bucket, parse_s3_uri(s3_prefix).prefix
        assert s3_client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads")  # held mid-upload
        driver.send_signal(signum)
        code = driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    stderr = err.read_text()
    assert code == (130 if signum == signal.SIGINT else 143), stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert lines == [f"error: interrupted by {signum.name}; finished work is kept, rerun the same command to resume"]
    job = json.loads(out.read_text())["jobs"][0]
    assert job["status"] == "failed" and "interrupted" in job["error"], job
    # the task was cancelled: its command stopped at the held part, as on SIGTERM, and aborted its upload
    # (earlier tests of this module ran a job of this name too, and left its log on whichever node ran it)
    logs = [n.work / "trt-030" / "lmi-compile-cpu.log" for n in cluster.nodes if n.alive()]
    ours = [p for p in logs if p.exists() and p.stat().st_mtime >= started]
    assert len(ours) == 1, ours
    log = ours[0].read_text()
    assert "error: interrupted by SIGTERM" in log, (log, stderr[-3000:])
    assert not s3_client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads")
    handover = keys(s3_client, f"{s3_prefix}staging/handover/")
    assert not any(k.endswith("lmi-compile-manifest.json") for k in handover), handover  # reads incomplete
    assert keys(s3_client, f"{s3_prefix}trt-030/") == []


def test_a_lost_gpu_node_mid_build_is_retried_and_nothing_is_half_published(cluster, model_factory, s3_env,
                                                                             s3_prefix, s3_client, tmp_path):
    """Runs last in this module: it replaces the GPU node. The retry starts from the hand-over on a fresh node."""
    slow = cluster.nodes[1]
    upload = f"{s3_prefix}trt-030/"
    jobs = tmp_path / "jobs.yaml"
    write_jobs(jobs, model_factory(), s3_prefix, bad=False)
    data = json.loads(jobs.read_text())
    # the same trtllm-build stand-in, slowed down to 30 s per rank on the node about to be lost
    wrapper = tmp_path / "trtllm-build-slow"
    wrapper.write_text(f"#!/bin/sh\n[ \"$LMI_COMPILE_BATCH_WORK\" = {slow.work} ] && export TRTLLM_BUILD_STANDIN_DELAY=30\n"
                       f"TRTLLM_STANDIN_VERSION=0.12.0 exec {trtllm_standin('0.30')} \"$@\"\n")
    wrapper.chmod(0o755)
    data["jobs"] = [dict(data["jobs"][0], trtllm_build=str(wrapper))]
    jobs.write_text(json.dumps(data))
    out, err = tmp_path / "out.json", tmp_path / "err.log"
    # mid-build: the trtllm-build stand-in has started its (30 s) engine, so its command is in the build's wait
    building = slow.work / "trt-030" / "work" / "logs" / "trtllm-build.log"
    building.unlink(missing_ok=True)  # an earlier test's run of this job name on this node
    with open(out, "w") as o, open(err, "w") as e:
        driver = subprocess.Popen([sys.executable, "-m", "lmi_compile", "batch", str(jobs), "--address",
                                   cluster.address, "--staging", f"{s3_prefix}staging/", "--json"],
                                  env={**os.environ, **FAST_RETRY}, stdout=o, stderr=e)
    try:
        deadline = time.monotonic() + 120
        while "pretending to build rank 0" not in (building.read_text() if building.exists() else ""):
            assert driver.poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
            time.sleep(0.1)
        cluster.kill(slow)
        assert manifest(s3_client, upload) is None and keys(s3_client, upload) == []  # nothing published
        fresh = cluster.add_node("g5-fresh", **GPU)
        assert driver.wait(timeout=180) == 0, err.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    job = json.loads(out.read_text())["jobs"][0]
    assert job["status"] == "done" and job["node"] == fresh.node_id(), job
    assert job["stage_nodes"]["convert"] != fresh.node_id()  # the CPU stages did not run again
    assert read_record(fresh.work / "trt-030" / "work" / "checkpoint")["handed_over_from"].startswith(s3_prefix)
    assert "node lost" in err.read_text() and "retrying" in err.read_text()
    m = manifest(s3_client, upload)
    assert m and m["job"]["node"] == fresh.node_id()
    assert "lmi-compile-upload-in-progress.json" not in keys(s3_client, upload)


# Refused before any work (exit 2), naming the job and the key; none of these needs Ray to be reached.
@pytest.mark.parametrize("change,expected", [
    (lambda d: d["jobs"][0].update(tp_degree=2), "job 'trt-030': unknown key 'tp_degree'"),
    (lambda d: d["jobs"][0].update(name=".."), "job '..': `name` may hold"),  # its folders would be its parent's
    (lambda d: d["jobs"][1].update(name="trt-030"), "job 'trt-030': duplicate name"),
    (lambda d: d["jobs"][2].pop("upload"), "job 'inf2': `upload` is missing"),
    (lambda d: d["jobs"][0].update(tp="two"), "job 'trt-030': Invalid value for '--tp'"),
    (lambda d: d["jobs"][2].update(resources={"neuron_core": 2}), "job 'inf2': resources: unknown key 'neuron_core'"),
    (lambda d: d["jobs"][0].update(work_dir="/tmp/x"), "job 'trt-030': 'work_dir' cannot be set"),
    (lambda d: d["jobs"][0].update(handover_in="s3://models/x/"), "job 'trt-030': 'handover_in' cannot be set"),
    (lambda d: d["jobs"][1].update(upload=d["jobs"][0]["upload"]), "job 'trt-033': upload"),
    (lambda d: d.update(default={}), "unknown top-level key 'default'"),
    (lambda d: d["jobs"][2].update(n_positions=256, backend="trtllm"), "job 'inf2': unknown key 'n_positions'"),
])
def test_bad_jobs_files_are_refused_before_any_work(change, expected, model_factory, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.yaml", model_factory(), "s3://models/x/")
    data = json.loads(jobs.read_text())
    change(data)
    jobs.write_text(json.dumps(data))
    proc = run_cli("batch", jobs, "--address", "127.0.0.1:9", "--staging", "s3://models/staging/")
    assert proc.returncode == 2, proc.stderr
    assert expected in error_line(proc)


def test_a_local_model_on_a_cluster_needs_staging(model_factory, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.yaml", model_factory(), "s3://models/x/")
    proc = run_cli("batch", jobs, "--address", "127.0.0.1:9")
    assert proc.returncode == 2
    line = error_line(proc)
    assert "job 'trt-030'" in line and "no node of the cluster sees this machine's disk" in line and "--staging" in line


def test_a_job_that_cannot_fit_its_instance_is_reported_not_run(model_factory, s3_env, s3_prefix, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.yaml", model_factory(), s3_prefix, bad=False)
    data = json.loads(jobs.read_text())
    data["jobs"] = [dict(data["jobs"][0], max_batch_size=100000, max_seq_len=2048)]
    jobs.write_text(json.dumps(data))
    proc = run_cli("batch", jobs, "--json")
    assert proc.returncode == 1, proc.stderr[-2000:]
    job = report(proc)["trt-030"]
    assert job["status"] == "failed" and job["error"].startswith("not run: does not fit ml.g5.xlarge"), job
    assert not (Path.cwd() / "lmi-compile-work").exists()  # nothing was started


def test_the_example_aws_cluster_offers_what_batch_asks_of_ray(model_factory):
    """configs/ray-cluster-aws.yaml stays consistent with the requests of fit.py: every README job's build task has a
    worker type to land on, its CPU stages one without GPUs, and nothing lands on the head."""
    import yaml

    from lmi_compile.batch.fit import cpu_stage_request, ray_resources
    from lmi_compile.batch.jobs import Job
    from lmi_compile.model.config import ModelConfig

    cfg = yaml.safe_load((Path(__file__).parent.parent / "configs" / "ray-cluster-aws.yaml").read_text())
    types = {name: t["resources"] for name, t in cfg["available_node_types"].items()}
    head = cfg["head_node_type"]
    assert types[head]["CPU"] == 0 and any("--head --num-cpus=0" in c for c in cfg["head_start_ray_commands"])

    def landing(req: dict) -> set[str]:
        need = {"CPU": req.get("num_cpus", 1), "GPU": req.get("num_gpus", 0), **req.get("resources", {})}
        return {n for n, have in types.items() if all(have.get(k, 0) >= v for k, v in need.items() if v)}

    model = model_factory()
    config = ModelConfig.load(model / "config.json")
    for backend, options, resources, expected in (
            ("trtllm", {"tp": 4}, {"accelerator_type": "A10G", "gpus": 4}, {"g5-a10g"}),
            ("trtllm", {"tp": 8}, {"accelerator_type": "A100-40GB", "gpus": 8}, {"p4d-a100"}),
            ("neuron", {"tp": 8}, {"neuron_cores": 8}, {"inf2"})):
        job = Job(name="j", backend=backend, model=str(model), options=options, resources=resources)
        assert landing(ray_resources(job)) == expected, (backend, resources)
        cpu_nodes = landing(cpu_stage_request(job, config))
        assert head not in cpu_nodes and any("GPU" not in types[n] for n in cpu_nodes), cpu_nodes
