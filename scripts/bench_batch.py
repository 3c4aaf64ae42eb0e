#!/usr/bin/env python3
"""Benchmark `lmi-compile batch` against the same jobs run as sequential CLI commands.

N small TensorRT-LLM jobs (a tiny Llama, the trtllm-build STAND-IN of each job's release):

Embedded Ray (local outputs):
  sequential   `lmi-compile trtllm ...` once per job, one after the other
  batch -p 1   `lmi-compile batch jobs.yaml --max-parallel 1`: the same order, so the difference is batch's
               overhead per job (Ray start and stop, task dispatch, the job subprocess)
  batch        `lmi-compile batch jobs.yaml`: as many jobs at once as this machine's CPUs allow
Two-node Ray cluster on this machine (tests/servers/ray_cluster.py: two g5-like nodes, 2 CPUs + 1 GPU each) and
SeaweedFS (every job uploads, as a cluster requires):
  sequential   `lmi-compile trtllm ... --upload s3://...` once per job
  batch        `lmi-compile batch jobs.yaml --address ... --staging s3://...`: stage placement (CPU stages, hand-over
               through S3, build + layout + push), two nodes at once
Each run starts from empty work folders and upload prefixes. Prints wall times, per-job overhead and ratios.
--build-seconds makes the stand-in sleep that long per engine, as a real (GPU-bound) build takes time without
using this machine's CPUs; 0 (default) measures pure overhead.

  python scripts/bench_batch.py --jobs 6 --dir /tmp/bench-batch
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

RELEASES = ("0.30", "0.31", "0.32", "0.33", "0.35", "0.29")


def standin(release: str) -> str:
    from lmi_compile.lmi.targets import resolve

    return str(ROOT / "tests" / "standins" / f"trtllm-build-{resolve('trtllm', release)['tool']['version']}")


def jobs(n: int, model: Path) -> list[dict]:
    return [{"name": f"job{i}", "backend": "trtllm", "model": str(model), "lmi_version": RELEASES[i % len(RELEASES)],
             "max_batch_size": 8 + i, "trtllm_build": standin(RELEASES[i % len(RELEASES)])} for i in range(n)]


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    with open(cwd / "bench.log", "a") as f:  # for a look at where the time went (batch --json: stages per job)
        f.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
    return took


def sequential(specs: list[dict], d: Path, env: dict, upload: str | None = None) -> float:
    d.mkdir()
    took = 0.0
    for j in specs:
        cmd = [sys.executable, "-m", "lmi_compile", "trtllm", j["model"], "--lmi-version", j["lmi_version"],
               "--max-batch-size", str(j["max_batch_size"]), "--trtllm-build", j["trtllm_build"], "--work-dir",
               str(d / j["name"] / "work"), "--output", str(d / j["name"] / "output")]
        took += timed(cmd + (["--upload", f"{upload}{j['name']}/"] if upload else []), d, env)
    return took


def batch(specs: list[dict], d: Path, env: dict, *extra: str) -> float:
    d.mkdir()
    (d / "jobs.yaml").write_text(json.dumps({"jobs": specs}))
    return timed([sys.executable, "-m", "lmi_compile", "batch", "jobs.yaml", "--json", *extra], d, env)


def cluster_runs(specs: list[dict], d: Path, env: dict) -> tuple[float, float]:
    """(sequential with uploads, batch on a two-node cluster with --staging), against SeaweedFS."""
    import boto3
    from botocore.config import Config

    from conftest import ISOLATED_ENV
    from servers.ray_cluster import RayCluster
    from servers.seaweedfs import BUCKET, SeaweedFS

    s3 = SeaweedFS().start()
    cluster = None
    try:
        boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.env()["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=s3.env()["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
                     config=Config(s3={"addressing_style": "path"})).create_bucket(Bucket=BUCKET)
        env = {**env, **ISOLATED_ENV, **s3.env(), **RayCluster.client_env()}
        seq = sequential(specs, d / "sequential-upload", env, upload=f"s3://{BUCKET}/sequential/")
        cluster = RayCluster(env)
        # a GPU node has CPUs besides its GPU: a job's CPU stages run there while another job builds
        gpu = {"num_cpus": 2, "num_gpus": 1, "resources": {"accelerator_type:A10G": 1}}
        cluster.start_head("g5-a", **gpu)
        cluster.add_node("g5-b", **gpu)
        uploaded = [dict(j, upload=f"s3://{BUCKET}/batch/{j['name']}/", resources={"accelerator_type": "A10G"})
                    for j in specs]
        two = batch(uploaded, d / "batch-cluster", env, "--address", cluster.address, "--staging",
                    f"s3://{BUCKET}/staging/")
        return seq, two
    finally:
        if cluster:
            cluster.shutdown()
        s3.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench-batch"))
    ap.add_argument("--build-seconds", type=float, default=0.0, help="stand-in build time per engine (sleeps)")
    ap.add_argument("--no-cluster", action="store_true", help="embedded runs only")
    ap.add_argument("--no-embedded", action="store_true", help="cluster runs only")
    args = ap.parse_args()
    from tiny_models import TinySpec, write_checkpoint

    d = args.dir.resolve()
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    model = write_checkpoint(d / "model", TinySpec())
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "LMI_COMPILE_LOG_INTERVAL": "3600",
           "TRTLLM_BUILD_STANDIN_DELAY": str(args.build_seconds)}
    specs = jobs(args.jobs, model)

    n = args.jobs
    print(f"{n} jobs (tiny Llama, trtllm-build stand-in, {args.build_seconds:g} s build per engine), "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    if not args.no_embedded:
        embedded(specs, d, env, n)
    if not args.no_cluster:
        seq_up, two = cluster_runs(specs, d, env)
        print("two-node Ray cluster on this machine (2 CPUs + 1 GPU each, sharing its cores), uploads and staging on "
              "SeaweedFS:")
        print(f"  sequential CLI   {seq_up:7.1f} s  ({seq_up / n:.2f} s per job)")
        print(f"  batch, 2 nodes   {two:7.1f} s  ({two / n:.2f} s per job)  ratio to sequential {two / seq_up:.2f}x")


def embedded(specs: list[dict], d: Path, env: dict, n: int) -> None:
    seq = sequential(specs, d / "sequential", env)
    results = {"batch -p 1": batch(specs, d / "batch-p1", env, "--max-parallel", "1"),
               "batch": batch(specs, d / "batch", env)}
    one = batch(specs[:1], d / "batch-one", env)  # what a batch costs once, whatever its size
    print("embedded Ray, local outputs:")
    print(f"  sequential CLI   {seq:7.1f} s  ({seq / n:.2f} s per job)")
    for label, t in results.items():
        print(f"  {label:15}  {t:7.1f} s  ({t / n:.2f} s per job)  ratio to sequential {t / seq:.2f}x")
    print(f"  batch overhead per job (batch -p 1 vs sequential): {(results['batch -p 1'] - seq) / n:+.2f} s, of which "
          f"once per batch (Ray start and stop, JOBS checks; a 1-job batch less one job): {one - seq / n:.2f} s, "
          f"per job beyond it: {(results['batch -p 1'] - one) / (n - 1) - seq / n:+.2f} s")


if __name__ == "__main__":
    main()
