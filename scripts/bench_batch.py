#!/usr/bin/env python3
"""Benchmark `lmi-compile batch` (embedded Ray) against the same jobs run as sequential CLI commands.

N small TensorRT-LLM jobs (a tiny Llama, the trtllm-build STAND-IN of each job's release, local outputs):
  sequential   `lmi-compile trtllm ...` once per job, one after the other
  batch -p 1   `lmi-compile batch jobs.yaml --max-parallel 1`: the same order, so the difference is batch's
               overhead (Ray start and stop, task dispatch, the job subprocess)
  batch        `lmi-compile batch jobs.yaml`: as many jobs at once as this machine's CPUs allow
Each run starts from empty work folders. Prints wall times, per-job overhead and ratios.

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
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench-batch"))
    args = ap.parse_args()
    from tiny_models import TinySpec, write_checkpoint

    d = args.dir.resolve()
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    model = write_checkpoint(d / "model", TinySpec())
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "LMI_COMPILE_LOG_INTERVAL": "3600"}
    specs = jobs(args.jobs, model)
    cli = [sys.executable, "-m", "lmi_compile"]

    seq_dir = d / "sequential"
    seq_dir.mkdir()
    seq = 0.0
    for j in specs:
        seq += timed([*cli, "trtllm", j["model"], "--lmi-version", j["lmi_version"], "--max-batch-size",
                      str(j["max_batch_size"]), "--trtllm-build", j["trtllm_build"], "--work-dir",
                      str(seq_dir / j["name"] / "work"), "--output", str(seq_dir / j["name"] / "output")], seq_dir, env)

    results = {}
    for label, extra in (("batch -p 1", ["--max-parallel", "1"]), ("batch", [])):
        run_dir = d / label.replace(" ", "")
        run_dir.mkdir()
        (run_dir / "jobs.yaml").write_text(json.dumps({"jobs": specs}))
        results[label] = timed([*cli, "batch", "jobs.yaml", "--json", *extra], run_dir, env)

    cpus = os.cpu_count()
    print(f"{args.jobs} jobs (tiny Llama, trtllm-build stand-in), {cpus} CPUs, embedded Ray")
    print(f"  sequential CLI   {seq:7.1f} s  ({seq / args.jobs:.2f} s per job)")
    for label, t in results.items():
        print(f"  {label:15}  {t:7.1f} s  ({t / args.jobs:.2f} s per job)  ratio to sequential {t / seq:.2f}x")
    print(f"  batch overhead per job (batch -p 1 vs sequential): {(results['batch -p 1'] - seq) / args.jobs:+.2f} s")


if __name__ == "__main__":
    main()
