"""Push settings against s5cmd on one local SeaweedFS: which --concurrency / --part-size-mb a host wants.

Each round starts a fresh server (SeaweedFS frees no disk on delete), then pushes the same tree once per setting
and once with `s5cmd cp`, interleaved; prints the median wall time of each and its ratio to s5cmd's.

  python scripts/sweep_push.py --shards 4 --shard-mib 512 --settings 16x32 24x32 32x32 16x64 32x64 --rounds 3
"""

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench_push import make_tree, timed  # noqa: E402
from servers.seaweedfs import BUCKET, SeaweedFS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--shard-mib", type=int, default=128)
    ap.add_argument("--settings", nargs="+", default=["16x32"], help="CONCURRENCYxPART_MIB each")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sweep-push"))
    a = ap.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    tree = a.work / "tree"
    mb = make_tree(tree, a.shards, a.shard_mib) / 1e6
    s5 = shutil.which("s5cmd", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    runs: dict[str, list] = {}
    for r in range(a.rounds):
        server = SeaweedFS().start()
        env = {**os.environ, **server.env()}
        try:
            import boto3

            c = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                             aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
            try:
                c.create_bucket(Bucket=BUCKET)
            except Exception:
                pass
            order = list(a.settings) + ["s5cmd"]
            for name in (order if r % 2 == 0 else order[::-1]):
                uri = f"s3://{BUCKET}/r{r}-{name}/"
                if name == "s5cmd":
                    cmd = [s5, "--endpoint-url", server.endpoint, "cp", f"{tree}/", uri]
                else:
                    conc, part = name.split("x")
                    cmd = [sys.executable, "-m", "lmi_compile", "push", str(tree), uri, "--concurrency", conc,
                           "--part-size-mb", part]
                runs.setdefault(name, []).append(timed(cmd, env)[0])
        finally:
            server.stop()
            server.cleanup()
    base = statistics.median(runs["s5cmd"])
    print(f"push of {a.shards}x{a.shard_mib} MiB ({mb:.0f} MB), {os.cpu_count()} cores, median of {a.rounds}")
    for name, walls in runs.items():
        w = statistics.median(walls)
        print(f"  {name:>8}  {w:6.2f} s  {mb / w:6.0f} MB/s  vs s5cmd {base / w:5.2f}  runs {[round(x, 2) for x in walls]}")


if __name__ == "__main__":
    main()
