#!/usr/bin/env python3
"""Where the time of `lmi-compile push` goes, against `s5cmd cp`, on one local SeaweedFS.

Each round pushes the same tree once with each (a fresh prefix each, interleaved, the order alternating). Our
command runs with its publish layer timed from inside (a wrapper script patches Publisher's methods before the CLI
starts): when Python was up, botocore's client made, the first PUT sent, the last PUT answered, the process ended,
all from the moment the command was started. Prints every run and the medians: how much of a push is start-up and
how fast the transfer itself goes against s5cmd's whole command.

  python scripts/push_timeline.py --shards 4 --shard-mib 512 --rounds 7
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench_common import compile_package  # noqa: E402
from bench_push import make_tree  # noqa: E402
from servers.seaweedfs import BUCKET, SeaweedFS  # noqa: E402

# Run as `python WRAP push ...`: the CLI as `lmi-compile` runs it, with marks written to $TL_OUT at exit.
WRAP = r'''
import atexit, json, os, sys, time
T0 = float(os.environ["TL_T0"])
marks = []
def mark(name):
    marks.append((name, time.time() - T0))
mark("python up")
import lmi_compile.remote.publish as P
def timed(name, fn):
    def run(*a, **k):
        mark(name + " start")
        try:
            return fn(*a, **k)
        finally:
            mark(name + " end")
    return run
P.Publisher.send = timed("put", P.Publisher.send)
P.make_client = timed("client", P.make_client)
atexit.register(lambda: (mark("exit"), open(os.environ["TL_OUT"], "w").write(json.dumps(marks))))
sys.argv = ["lmi-compile", *sys.argv[1:]]
from lmi_compile.__main__ import run
run()
'''
PHASES = (("python up", "python up"), ("client made", "client end"), ("first PUT sent", "put start"),
          ("last PUT done", "put end"), ("exit", "exit"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--shard-mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("push_args", nargs="*", help="extra arguments for `lmi-compile push` (after --)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lmi-push-timeline-"))
    server = None
    try:
        tree = work / "tree"
        make_tree(tree, a.shards, a.shard_mib)
        server = SeaweedFS().start()
        env = {**os.environ, **server.env(), "AWS_ENDPOINT_URL_S3": server.endpoint,
               "AWS_EC2_METADATA_DISABLED": "true"}
        compile_package(env)
        subprocess.run([sys.executable, "-c", f"import boto3; boto3.client('s3', endpoint_url={server.endpoint!r}, "
                        f"region_name='us-east-1').create_bucket(Bucket={BUCKET!r})"], env=env, capture_output=True)
        s5 = shutil.which("s5cmd", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
        wrap, out = work / "wrap.py", work / "marks.json"
        wrap.write_text(WRAP)
        walls: dict[str, list[float]] = {"lmi-compile push": [], "s5cmd cp": []}
        phases: dict[str, list[float]] = {name: [] for name, _ in PHASES}
        for r in range(a.rounds):
            for name in (list(walls) if r % 2 == 0 else list(walls)[::-1]):
                if name == "s5cmd cp" and not s5:
                    continue
                uri = f"s3://{BUCKET}/r{r}-{name.split()[0]}/"
                cmd = ([s5, "--endpoint-url", server.endpoint, "cp", f"{tree}/", uri] if name == "s5cmd cp" else
                       [sys.executable, str(wrap), "push", str(tree), uri, *a.push_args])
                os.sync()
                t0 = time.time()
                proc = subprocess.run(cmd, env={**env, "TL_T0": repr(t0), "TL_OUT": str(out)}, capture_output=True,
                                      text=True)
                wall = time.time() - t0
                if proc.returncode:
                    raise SystemExit(f"{name} failed: {proc.stderr[-1500:]}")
                walls[name].append(wall)
                line = f"round {r} {name:<17} {wall:6.2f} s"
                if name == "lmi-compile push":
                    last = {}
                    for mark, t in json.loads(out.read_text()):
                        last.setdefault(mark + "/first", t)
                        last[mark] = t
                    got = {label: last.get(key + "/first" if key == "put start" else key, float("nan"))
                           for label, key in PHASES}
                    for label, t in got.items():
                        phases[label].append(t)
                    line += "  " + ", ".join(f"{label} {t:.2f}" for label, t in got.items())
                print(line, flush=True)
        med = {k: statistics.median(v) for k, v in walls.items() if v}
        ph = {k: statistics.median(v) for k, v in phases.items()}
        transfer = statistics.median(e - s for s, e in zip(phases["first PUT sent"], phases["last PUT done"]))
        print(f"\n{a.shards}x{a.shard_mib} MiB, {os.cpu_count()} cores, medians of {a.rounds}:")
        print("  lmi-compile push: " + ", ".join(f"{k} at {v:.2f} s" for k, v in ph.items()) +
              f"; transfer (first PUT sent to last done) {transfer:.2f} s")
        if "s5cmd cp" in med:
            base = med["s5cmd cp"]
            print(f"  s5cmd cp {base:.2f} s; lmi-compile push {med['lmi-compile push']:.2f} s "
                  f"({base / med['lmi-compile push']:.2f}x); its transfer alone against s5cmd's whole command "
                  f"{base / transfer:.2f}x")
    finally:
        if server:
            server.stop()
            server.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
