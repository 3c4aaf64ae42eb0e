"""S3 access shared by fetch and push: URIs, one tuned client, one-line errors, parallel transfers.

Credentials come from the standard AWS chain and are never logged. `AWS_ENDPOINT_URL_S3` /
`AWS_ENDPOINT_URL` are honoured by botocore itself, as in every AWS SDK.
"""

import functools
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lmi_compile.errors import BadInput, BadSetting, Interrupted, LmiCompileError
from lmi_compile.pipeline import testhooks
from lmi_compile.pipeline.interrupts import STOP, check, received
from lmi_compile.remote.manifest import composite, part_bounds, s3_checksum, verifying_checksum

BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    prefix: str  # "" or ends with "/"

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def key(self, rel: str) -> str:
        return self.prefix + rel


def parse_s3_uri(uri: str) -> S3Uri:
    """Parse s3://bucket[/prefix]; the prefix is treated as a folder."""
    if not uri.startswith("s3://"):
        raise BadInput(f"{uri}: not an S3 URI; use s3://bucket/prefix/")
    rest = uri[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not BUCKET_RE.match(bucket or "") or ".." in bucket:
        raise BadInput(f"{uri}: {bucket!r} is not a valid S3 bucket name; use s3://bucket/prefix/")
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise BadInput(f"{uri}: '.' and '..' are not allowed in an S3 prefix")
    prefix = "/".join(parts)
    return S3Uri(bucket, prefix + "/" if prefix else "")


def make_client(max_pool: int = 64, region: str | None = None):
    """One S3 client with adaptive retries (throttling, 5xx, dropped connections) and a big pool. botocore's own
    session, not boto3's: nothing here uses boto3's additions, and importing them was 0.09 s of every command."""
    import botocore.session
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    s3cfg = {"addressing_style": "path"} if endpoint else {}
    if endpoint and endpoint.startswith("http://"):
        # Over plain http botocore hashes every body for SigV4; checksums still protect the data.
        s3cfg["payload_signing_enabled"] = False
    # SigV4 for presigned URLs too (botocore presigns S3 with SigV2 by default; regions since 2014 accept only V4)
    cfg = Config(retries={"mode": "adaptive", "max_attempts": 8}, max_pool_connections=max_pool, signature_version="s3v4",
                 s3=s3cfg, connect_timeout=10, read_timeout=120,
                 request_checksum_calculation="when_required", response_checksum_validation="when_required")
    session = botocore.session.get_session()
    look_up_services_by_name(session)
    return session.create_client("s3", config=cfg, region_name=region)


def look_up_services_by_name(session) -> None:
    loader = session.get_component("data_loader")
    full_list = loader.list_available_services
    loader.list_available_services = lambda type_name: _KnownServices(loader, type_name, full_list)


class _KnownServices:
    """botocore's "is this service known?" answered by looking up the one name asked (its folder of API versions):
    botocore lists every service folder it ships, about 420 of them, twice per client, which was 20 ms of every S3
    command here. Any other use (iteration, a client for STS that credentials may need) sees the full list."""

    def __init__(self, loader, type_name: str, full_list):
        self.loader, self.type_name, self.full_list = loader, type_name, full_list

    def __contains__(self, name) -> bool:
        from botocore.exceptions import DataNotFoundError

        try:
            return bool(self.loader.list_api_versions(name, self.type_name))
        except DataNotFoundError:
            return False

    def __iter__(self):
        return iter(self.full_list(self.type_name))

    def __len__(self) -> int:
        return len(self.full_list(self.type_name))


def translate(e: Exception, where: str) -> LmiCompileError:
    """Map boto errors to one-line messages; never includes credentials."""
    from botocore.exceptions import (ClientError, EndpointConnectionError, NoCredentialsError,
                                     PartialCredentialsError, SSLError)

    # The settings of the environment (credentials, CA bundle) are BadSetting: fixed, a rerun resumes what an
    # interrupted fetch downloaded instead of starting again
    if isinstance(e, SSLError):  # before EndpointConnectionError: the endpoint answered, its certificate failed
        return BadSetting(f"{where}: the S3 endpoint's TLS certificate is not trusted ({_tls_reason(e)}); set "
                          f"AWS_CA_BUNDLE to the CA bundle that signed it")
    if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
        return BadSetting(f"{where}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                          f"AWS_PROFILE, or run with an instance/task role")
    if isinstance(e, EndpointConnectionError):
        return LmiCompileError(f"{where}: cannot reach the S3 endpoint ({e.kwargs.get('endpoint_url', '?')}); "
                               f"check network access and AWS_ENDPOINT_URL")
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return BadInput(f"{where}: bucket does not exist; check the bucket name and region")
        if code in ("NoSuchKey", "404") or status == 404:
            return BadInput(f"{where}: no such object; check the S3 prefix (the model's folder, e.g. "
                            f"s3://bucket/models/llama/)")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            return BadSetting(f"{where}: AWS credentials were rejected ({code}); check the access key, "
                              f"secret and session token")
        if code in ("AccessDenied", "403") or status == 403:
            return BadSetting(f"{where}: access denied; the credentials lack s3:GetObject/ListBucket/PutObject "
                              f"on this prefix")
        return LmiCompileError(f"{where}: S3 request failed ({code or status}: "
                               f"{e.response.get('Error', {}).get('Message', '')})")
    return LmiCompileError(f"{where}: S3 request failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")


def _tls_reason(e: Exception) -> str:
    found = re.search(r"\[SSL: [A-Z_]+\][^(\]'\"]*", str(e))
    return found.group(0).strip() if found else type(e).__name__


def list_objects(client, uri: S3Uri, mtimes: dict[str, int] | None = None) -> dict[str, int]:
    """{relative key: size} of every object under the prefix (all pages); `mtimes` gets each LastModified (ns)."""
    out: dict[str, int] = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=uri.prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(uri.prefix):]
                if rel and not rel.endswith("/"):
                    out[rel] = obj["Size"]
                    if mtimes is not None and obj.get("LastModified"):
                        mtimes[rel] = int(obj["LastModified"].timestamp()) * 1_000_000_000
    except Exception as e:  # botocore raises many unrelated types
        raise translate(e, str(uri)) from None
    return out


RANGE_BYTES = 64 * 1024 * 1024  # one GET (a whole number of manifest parts): few requests, each streamed whole
IN_PROCESS_BYTES = 4 * 1024 * 1024  # smaller GETs (config, tokenizer) run in this process: no worker to wait for
RANGE_ATTEMPTS = 5  # per range: dropped connections, 5xx and throttling (the worker's GET has no retries of its own)


class _Target:
    """One file being downloaded: its temporary, the ranges still to come, and its parts' digests."""

    def __init__(self, rel: str, target: Path, size: int, expect: dict | None, mtime: int | None = None):
        self.rel, self.target, self.size, self.mtime = rel, target, size, mtime
        self.expect = expect  # the manifest entry, or None (size-checked only)
        self.algorithm, self.want = verifying_checksum(expect) if expect else (None, None)
        self.part_size = expect["part_size"] if expect else RANGE_BYTES
        self.parts = part_bounds(size, self.part_size)
        self.digests: list[bytes | None] = [None] * len(self.parts)
        self.tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        self.created = False
        self.left = 0

    def ranges(self) -> list[tuple[int, int]]:
        """(first part, part count) of each GET: whole parts, about RANGE_BYTES each."""
        per = max(1, RANGE_BYTES // self.part_size)
        return [(i, min(per, len(self.parts) - i)) for i in range(0, len(self.parts), per)]

    def checksum(self) -> str:
        return composite(self.digests, self.size, self.part_size, self.algorithm)


# Worker processes pay off where cores are many (16-core host: fetch 0.93-1.02x s5cmd, 0.63x with threads); on a
# few cores the S3 server or the network stack shares them and the processes' start-up costs more than the GIL
# does (2 cores, 0.53 GB fetch, medians of 7: threads 1.37 s, processes 1.52 s, the code before them 1.42 s), so
# there the same transfer code runs in threads of this process. LMI_COMPILE_TRANSFER_PROCESSES=0/1 forces either.
PROCESSES_FROM_CORES = 5


def use_processes() -> bool:
    forced = os.environ.get("LMI_COMPILE_TRANSFER_PROCESSES", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return (os.cpu_count() or 2) >= PROCESSES_FROM_CORES


class Getters:
    """The transfer engine of fetch and push: worker processes (remote/getter.py) doing ranged GETs and part PUTs
    on URLs this process presigns with its botocore client, or on a host of few cores the same code in our own
    threads (use_processes). A thread of ours drives one worker at a time; close() ends them all."""

    def __init__(self, client, processes: int | None = None, in_process: bool | None = None, nice: int = 0):
        self.client = client
        self.nice = nice  # added to the worker processes' niceness
        self.processes = processes or connections()
        self.in_process = not use_processes() if in_process is None else in_process
        self._free: list = []
        self._all: list = []
        self._local = threading.local()  # in-process: each thread keeps its Getter (and its connection)
        self._local_getters: list = []
        self._lock = threading.Lock()
        self.closed = False
        from lmi_compile.remote.getter import write_size

        self.write = write_size(env_number("LMI_COMPILE_WRITE_KIB", 1, 1 << 20))

    def presign(self, uri: S3Uri, rel: str) -> str:
        return self.sign("get_object", {"Bucket": uri.bucket, "Key": uri.key(rel)}, f"{uri}{rel}")

    def sign(self, op: str, params: dict, where: str) -> str:
        """A SigV4 URL for one request of `op`, valid for an hour (signed again for every retry)."""
        try:
            return self.client.generate_presigned_url(op, Params=params, ExpiresIn=3600)
        except Exception as e:
            raise translate(e, where) from None

    def redirected(self, reply: dict) -> bool:
        """A URL signed for the wrong region (no AWS_REGION set for a bucket elsewhere): S3 names the bucket's
        region in its error; sign for that region from now on. (botocore's own calls follow such redirects.)"""
        region = re.search(r"<Region>([a-z0-9-]+)</Region>", reply.get("body") or "")
        if reply.get("kind") != "http" or reply.get("status") not in (301, 400) or not region:
            return False
        if region.group(1) == self.client.meta.region_name:
            return False
        self.client = make_client(region=region.group(1))
        return True

    def start(self) -> "Getters":
        """Start every worker now, from a thread of ours (a spawn is a millisecond or two of this process, times
        dozens), so their start-up overlaps botocore's, the listing and the small files."""
        def spawn_all():
            while True:
                with self._lock:  # close() takes it too: a worker spawned here is always one close() ends
                    if self.closed or len(self._all) >= self.processes:
                        return
                    try:
                        self._free.append(self._spawn())
                    except OSError:  # out of processes or memory: run() spawns on need and reports it there
                        return

        if not self.in_process:
            threading.Thread(target=spawn_all, name="spawn-getters", daemon=True).start()
        return self

    def _spawn(self):
        import subprocess
        import sys

        # -I -S: nothing of the user's site or PYTHON* variables; the folder isal lies in goes after the standard
        # library on the worker's path, and isal is all it imports from there
        proc = subprocess.Popen([sys.executable, "-I", "-S", str(Path(__file__).with_name("getter.py")), _isal_home(),
                                 str(self.nice), str(self.write)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._all.append(proc)
        return proc

    def run(self, task: dict, then=None) -> dict:
        """Hand one task to a free worker (started on first need) and wait for its reply; a small one runs here,
        with the same code. A put's digests go to `then`, whose answer (the signed URL) goes back to the worker."""
        if self.in_process or _task_bytes(task) < IN_PROCESS_BYTES:
            return self._run_here(task, then)
        with self._lock:
            if self.closed:
                raise Interrupted(received())
            proc = self._free.pop() if self._free else self._spawn()
        try:
            reply = self._ask(proc, task)
            if reply and reply.get("ok") and task.get("op") == "put":
                try:
                    msg = then(reply)
                except BaseException:
                    try:  # the worker waits for an answer: it gets one, and stays usable
                        self._tell(proc, {"skip": True})
                        with self._lock:
                            self._free.append(proc)
                    except OSError:
                        pass
                    raise
                reply = self._ask(proc, msg)
        except (BrokenPipeError, ValueError, OSError):
            reply = None
        if reply is None:  # the worker died (killed by close(), or crashed): never reuse it
            if STOP.is_set() or self.closed:
                raise Interrupted(received())
            return {"ok": False, "kind": "net", "error": f"transfer process ended (exit {proc.poll()})"}
        with self._lock:
            self._free.append(proc)
        return reply

    def _run_here(self, task: dict, then) -> dict:
        from lmi_compile.remote import getter

        if self.closed:
            raise Interrupted(received())
        g = getattr(self._local, "getter", None)
        if g is None:
            g = self._local.getter = getter.Getter(write=self.write)
            with self._lock:
                self._local_getters.append(g)
        try:
            return getter.run(g, task, then)
        finally:
            g.close_file()  # its connection stays for the thread's next task; no descriptor outlives a task

    @staticmethod
    def _tell(proc, msg: dict) -> None:
        proc.stdin.write(json.dumps(msg) + "\n")
        proc.stdin.flush()

    def _ask(self, proc, msg: dict) -> dict | None:
        self._tell(proc, msg)
        line = proc.stdout.readline()
        return json.loads(line) if line else None

    def close(self) -> None:
        """End every worker and wait for it, so none writes a temporary after this returns."""
        with self._lock:
            self.closed = True
            procs, self._all, self._free = self._all, [], []
            local, self._local_getters = self._local_getters, []
        for g in local:  # a thread in a transfer sees its connection fail; its file is closed by that thread
            g.drop()
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except Exception:
                p.kill()
                p.wait()
            for f in (p.stdin, p.stdout):
                try:
                    f.close()
                except OSError:
                    pass


@functools.cache
def _isal_home() -> str:
    """The folder holding the isal package (its CRC32: remote/getter.py), for workers that start without
    site-packages; "" where it is not installed (they use zlib's)."""
    import importlib.util

    spec = importlib.util.find_spec("isal")
    return str(Path(spec.origin).parent.parent) if spec and spec.origin else ""


def _task_bytes(task: dict) -> int:
    if task.get("op") == "put":
        return task["size"]
    if not task.get("parts"):  # info
        return 0
    return task["parts"][-1][0] + task["parts"][-1][1] - task["parts"][0][0]


def connections(least: int = 16) -> int:
    """Requests in flight for a fetch or a push (push --concurrency overrides), each on its own connection in its
    own worker (a process, or a thread on a few cores): LMI_COMPILE_S3_CONNECTIONS when set, else two per core,
    `least` to 64. S3 serves one connection at about 85 MB/s, so the count sets the rate there: 16 reach a 4-core
    instance's 10-15 Gbit/s, 64 about 5 GB/s. With every connection capped at 10 MB/s on loopback (bench_push.py
    --conn-mbps), 16 instead of 4 halved a 2-core fetch; uncapped, 16 against 4 cost 3% there, and 32 or 48 against
    16 nothing measurable on the 16-core host."""
    forced = env_number("LMI_COMPILE_S3_CONNECTIONS", 1, 256)
    return forced if forced is not None else max(least, min(64, 2 * (os.cpu_count() or 2)))


def env_number(name: str, low: int, high: int) -> int | None:
    """The whole number an environment setting gives (None when unset); anything else is one line naming it."""
    forced = os.environ.get(name, "").strip()
    if not forced:
        return None
    try:
        n = int(forced)
    except ValueError:
        n = low - 1
    if not low <= n <= high:
        raise BadSetting(f"{name}={forced!r}: give a whole number from {low} to {high}")
    return n


def download_files(client, uri: S3Uri, rels: list[str], dest: Path, sizes: dict[str, int], *, desc: str,
                   concurrency: int | None = None, expect: dict[str, dict] | None = None,
                   mtimes: dict[str, int] | None = None, listener=None, getters: Getters | None = None) -> None:
    """Download `rels` under `uri` into `dest` with parallel ranged GETs, done by worker processes
    (remote/getter.py) on URLs presigned here: each streams its range from the socket into a reused buffer,
    hashes it there (per upload part, so hashing runs in parallel and never re-reads the file) and writes it in
    place with pwrite.

    `expect` maps a key to its manifest entry (size, part_size, checksum_crc32 and/or checksum_sha256): such a
    file appears under its name only once every byte matches the checksum the upload recorded (CRC32 where the
    entry has it); others are checked for size.
    Files already present are kept (an interrupted fetch resumes), after the same check from disk (without a
    manifest entry: their size, and their mtime against the object's LastModified when `mtimes` has it). A finished
    file takes its object's LastModified from `mtimes` as its mtime, so a refetch of the same objects keeps
    the fingerprints of the stages built from them.

    Each file's first range (a safetensors header) is fetched before any other range (or, for a file a listener
    with `admit` holds back, its head: _submit_as_admitted). `listener`, when given,
    hears `kept(rel, path)` for a file already present, `opened(rel, temporary)` before a file's first GET and
    `arrived(rel, start, end)` once those bytes are written (unverified until the file is finished) and
    `verified(rel, path)` once the file is checked and named: what a convert that runs while the model
    downloads reads from. `getters` (the workers) may be shared by calls;
    without it this call starts and ends its own."""
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    from lmi_compile.paths import safe_relpath
    from lmi_compile.pipeline.progress import bytes_bar

    expect = expect or {}
    targets = []
    for rel in rels:
        t = _Target(rel, dest / safe_relpath(rel, what=f"{uri}{rel}"), sizes[rel], expect.get(rel),
                    (mtimes or {}).get(rel))
        if t.expect and t.expect.get("size") != t.size:
            raise LmiCompileError(f"{uri}{rel}: {t.size} bytes in S3 but {t.expect.get('size')} in the upload "
                                  f"manifest; the prefix changed after it was published, push it again")
        if t.target.is_file() and t.target.stat().st_size == t.size:
            if t.expect:  # kept from an interrupted run: the prefix may have been republished since
                if s3_checksum(t.target, t.size, t.part_size, t.algorithm) == t.want:
                    if listener:
                        listener.kept(rel, t.target)
                    continue
                t.target.unlink()
            elif t.mtime is None or t.target.stat().st_mtime_ns == t.mtime:
                # no checksum to check it by: kept when it is the object listed now (its LastModified, which a
                # fetched file carries as its mtime), not another of its size (a republished or other model)
                if listener:
                    listener.kept(rel, t.target)
                continue
        targets.append(t)
    if not targets:
        return
    bar = bytes_bar(sum(t.size for t in targets), desc)
    lock = threading.Lock()
    own = getters is None
    getters = getters or Getters(client, processes=min(connections(), len(targets) * 4)).start()

    def fetch_range(t: _Target, first: int, count: int) -> None:
        check()
        testhooks.pause("fetch-range")
        _get_parts(getters, uri, t, first, count, bar)
        if listener:
            start, (last_off, last_n) = t.parts[first][0], t.parts[first + count - 1]
            listener.arrived(t.rel, start, last_off + last_n)
        with lock:
            t.left -= 1
            done = t.left == 0
        if done:
            _finish(uri, t)
            if listener:
                listener.verified(t.rel, t.target)

    def fetch_head(t: _Target, n: int) -> None:
        """A held-back shard's first `n` bytes, unhashed: its header (its first range brings them again, hashed)."""
        check()
        end = min(t.size, n)
        try:
            _get(getters, uri, t, [(0, end)], None)
        except Interrupted:
            if STOP.is_set() or t.tmp.exists():
                raise
            return  # a late head (a stalled GET retried): the file was admitted and finished meanwhile
        listener.arrived(t.rel, 0, end)

    try:
        tasks = []
        for t in targets:
            t.target.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(t.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                t.created = True
                try:
                    os.ftruncate(fd, t.size)
                finally:
                    os.close(fd)
            except OSError as e:
                raise LmiCompileError(f"{t.target}: cannot write ({e.strerror}); free disk space or choose another "
                                      f"--output / --work-dir") from None
            if listener:
                listener.opened(t.rel, t.tmp)
            ranges = t.ranges()
            t.left = len(ranges)
            tasks += [(t, first, count) for first, count in ranges]
        # Every file's first range (its header) first; then the files in their listed order (shards hold the
        # layers in order) a few at a time, their ranges interleaved: the workers write into several files at once
        # (a filesystem serialises buffered writes to one file on its inode lock), while a convert reading the
        # model as it lands finds its next tensors arriving, and can delete each shard it is done with
        # (--no-keep-source) long before the last one lands.
        window = max(2, min(4, getters.processes // 4))  # at most 4 files: --no-keep-source frees them in order
        order = {id(t): i for i, t in enumerate(targets)}
        tasks.sort(key=lambda task: (task[1] != 0, order[id(task[0])] // window, task[1], order[id(task[0])]))
        with ThreadPoolExecutor(concurrency or getters.processes, thread_name_prefix="get") as pool:
            futures: list = []
            try:
                if getattr(listener, "admit", None) is None:
                    futures += [pool.submit(fetch_range, *task) for task in tasks]
                else:
                    _submit_as_admitted(pool, fetch_range, fetch_head, tasks, listener, futures)
                wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException:  # interrupted: end the workers so the threads waiting on them return
                getters.close()
                raise
            for f in futures:
                if f.done() and f.exception():
                    for other in futures:
                        other.cancel()
                    getters.close()
                    raise f.exception()
    finally:
        bar.close()
        if own:
            getters.close()  # (a failure closed shared workers already: none writes a temporary removed below)
        for t in targets:  # anything unfinished: drop its temporary
            t.tmp.unlink(missing_ok=True)


def _submit_as_admitted(pool, fetch_range, fetch_head, tasks: list, listener, futures: list) -> None:
    """Submit `tasks` (in their order) as `listener.admit(rel, size, first)` lets each file start; `first`: the file
    is the first, in order, still waiting (only it may start on room alone). A file held back gets only its head
    now (`listener.head_bytes`, unhashed: a safetensors header, which the consumer reads from every shard before
    it starts), its ranges once admitted. A consumer that deletes shards as it converts them keeps the download
    only so far ahead of it this way: a whole first range (64 MiB) of each of a 405B model's 191 shards would be
    12 GB held. Ranges of admitted files go ahead of later files that wait. Returns when all are submitted, or
    early when one has failed (the caller raises it)."""
    pending, admitted, headed = list(tasks), set(), set()
    while pending:
        check()
        later, refused, first = [], set(), True
        for task in pending:
            t = task[0]
            if id(t) not in admitted:
                if id(t) in refused or not listener.admit(t.rel, t.size, first=first):
                    refused.add(id(t))
                    first = False
                    later.append(task)
                    if id(t) not in headed:
                        headed.add(id(t))
                        futures.append(pool.submit(fetch_head, t, listener.head_bytes))
                    continue
                admitted.add(id(t))
            futures.append(pool.submit(fetch_range, *task))
        if any(f.done() and f.exception() for f in futures):
            return
        pending = later
        if pending:
            listener.wait_for_room(0.2)


def _get_parts(getters: Getters, uri: S3Uri, t: _Target, first: int, count: int, bar) -> None:
    """GET parts first..first+count-1 of `t` as one range through a worker: it hashes each part and pwrites
    every chunk; retried (on a fresh URL) when the connection drops or the server is busy."""
    start = t.parts[first][0]
    end = t.parts[first + count - 1][0] + t.parts[first + count - 1][1]
    digests = _get(getters, uri, t, t.parts[first:first + count], t.algorithm if t.expect else None)
    t.digests[first:first + count] = [bytes.fromhex(d) for d in digests]
    bar.update(end - start)


def _get(getters: Getters, uri: S3Uri, t: _Target, parts: list, algorithm: str | None) -> list[str]:
    """GET the consecutive `parts` of `t` as one range into its temporary; each part's digest (hex, "" unhashed)."""
    start, end = parts[0][0], parts[-1][0] + parts[-1][1]
    task = {"path": str(t.tmp), "size": t.size, "parts": parts, "algorithm": algorithm}
    for attempt in range(RANGE_ATTEMPTS):
        if STOP.is_set():
            raise Interrupted(received())
        task["url"] = getters.presign(uri, t.rel)
        reply = getters.run(task)
        if reply["ok"]:
            break
        if reply["kind"] == "disk":  # the local disk, not the transfer: no retry
            raise LmiCompileError(f"{t.target}: cannot write ({reply['error']}); free disk space or choose another "
                                  f"--output / --work-dir")
        if getters.redirected(reply):
            continue
        if reply["kind"] == "http" and reply["status"] == -1:
            raise LmiCompileError(f"{uri}{t.rel}: {reply['body']}; the object changed during the download, rerun")
        failed(reply, f"{uri}{t.rel}", f"bytes {start}-{end - 1}", attempt, "rerun (finished files are kept)")
    return reply["digests"]


def failed(reply: dict, where: str, what: str, attempt: int, fix: str) -> None:
    """A worker's failed reply: raise the one-line error if it will not get better, else wait before the retry."""
    kind = reply["kind"]
    if kind == "gone":
        raise Interrupted(received())
    if kind == "disk":
        raise LmiCompileError(f"{where}: {reply['error']}")
    if kind == "http" and not _retryable(reply["status"], reply["body"]):
        raise _http_error(reply["status"], reply["body"], where)
    if attempt == RANGE_ATTEMPTS - 1:
        why = reply.get("error") or f"HTTP {reply.get('status')}"
        raise LmiCompileError(f"{where}: {what} failed {RANGE_ATTEMPTS} times ({why}); check the network and {fix}")
    time.sleep(0.2 * 2 ** attempt)


def _retryable(status: int, body: str) -> bool:
    """5xx, throttling, and a presigned URL that expired in a queue (it is signed again on retry)."""
    return status >= 500 or status in (408, 429) or (status == 403 and "expired" in body.lower())


def _http_error(status: int, body: str, where: str) -> LmiCompileError:
    """An S3 error response as botocore would raise it, through the same one-line translation."""
    from botocore.exceptions import ClientError

    code = re.search(r"<Code>([^<]*)</Code>", body)
    msg = re.search(r"<Message>([^<]*)</Message>", body)
    if status == 404:  # listed, then gone: the prefix changed under the transfer; what arrived is kept for a rerun
        return LmiCompileError(f"{where}: removed from S3 after the listing ({code.group(1) if code else 404}); "
                               f"rerun to fetch the prefix as it is now")
    err = {"Code": code.group(1) if code else str(status), "Message": msg.group(1) if msg else ""}
    return translate(ClientError({"Error": err, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"), where)


def _finish(uri: S3Uri, t: _Target) -> None:
    """All ranges are in: check the checksum, then give the file its name."""
    if t.expect and t.checksum() != t.want:
        t.tmp.unlink(missing_ok=True)
        raise LmiCompileError(f"{uri}{t.rel}: downloaded bytes do not match the upload manifest's checksum "
                              f"({t.algorithm} {t.checksum()} != {t.want}); the object changed after it "
                              f"was published or was corrupted in transit: push it again or rerun the fetch")
    if t.mtime is not None:
        os.utime(t.tmp, ns=(t.mtime, t.mtime))
    os.replace(t.tmp, t.target)
