"""S3 access shared by fetch and push: URIs, one tuned client, one-line errors, parallel transfers.

Credentials come from the standard AWS chain and are never logged. `AWS_ENDPOINT_URL_S3` /
`AWS_ENDPOINT_URL` are honoured by botocore itself, as in every AWS SDK.
"""

import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lmi_compile.errors import BadInput, Interrupted, LmiCompileError
from lmi_compile.pipeline import testhooks
from lmi_compile.pipeline.interrupts import STOP, check, received
from lmi_compile.remote.manifest import HASHES, composite, part_bounds, s3_checksum, verifying_checksum

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


def make_client(max_pool: int = 64):
    """One S3 client with adaptive retries (throttling, 5xx, dropped connections) and a big pool."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    s3cfg = {"addressing_style": "path"} if endpoint else {}
    if endpoint and endpoint.startswith("http://"):
        # Over plain http botocore hashes every body for SigV4; checksums still protect the data.
        s3cfg["payload_signing_enabled"] = False
    cfg = Config(retries={"mode": "adaptive", "max_attempts": 8}, max_pool_connections=max_pool,
                 s3=s3cfg, connect_timeout=10, read_timeout=120,
                 request_checksum_calculation="when_required", response_checksum_validation="when_required")
    return boto3.session.Session().client("s3", config=cfg)


def translate(e: Exception, where: str) -> LmiCompileError:
    """Map boto errors to one-line messages; never includes credentials."""
    from botocore.exceptions import (ClientError, EndpointConnectionError, NoCredentialsError,
                                     PartialCredentialsError)

    if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
        return BadInput(f"{where}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                        f"AWS_PROFILE, or run with an instance/task role")
    if isinstance(e, EndpointConnectionError):
        return LmiCompileError(f"{where}: cannot reach the S3 endpoint ({e.kwargs.get('endpoint_url', '?')}); "
                               f"check network access and AWS_ENDPOINT_URL")
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return BadInput(f"{where}: bucket does not exist; check the bucket name and region")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            return BadInput(f"{where}: AWS credentials were rejected ({code}); check the access key, "
                            f"secret and session token")
        if code in ("AccessDenied", "403") or status == 403:
            return BadInput(f"{where}: access denied; the credentials lack s3:GetObject/ListBucket/PutObject "
                            f"on this prefix")
        return LmiCompileError(f"{where}: S3 request failed ({code or status}: "
                               f"{e.response.get('Error', {}).get('Message', '')})")
    return LmiCompileError(f"{where}: S3 request failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")


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


def default_concurrency() -> int:
    return max(8, min(32, 4 * (os.cpu_count() or 2)))


RANGE_BYTES = 64 * 1024 * 1024  # one GET (a whole number of manifest parts): few requests, as botocore's cost is per request
CHUNK_BYTES = 1024 * 1024  # read, hashed and written in these: small enough to stay in cache (1 MiB: 12% less CPU than 4)
RANGE_ATTEMPTS = 4  # botocore retries the request; this also covers a stream that drops mid-body
_buffers = threading.local()


def _chunk_buffer() -> memoryview:
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = memoryview(bytearray(CHUNK_BYTES))
    return buf


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
        self.fd: int | None = None
        self.left = 0

    def ranges(self) -> list[tuple[int, int]]:
        """(first part, part count) of each GET: whole parts, about RANGE_BYTES each."""
        per = max(1, RANGE_BYTES // self.part_size)
        return [(i, min(per, len(self.parts) - i)) for i in range(0, len(self.parts), per)]

    def checksum(self) -> str:
        return composite(self.digests, self.size, self.part_size, self.algorithm)


def download_files(client, uri: S3Uri, rels: list[str], dest: Path, sizes: dict[str, int], *, desc: str,
                   concurrency: int | None = None, expect: dict[str, dict] | None = None,
                   mtimes: dict[str, int] | None = None, listener=None) -> None:
    """Download `rels` under `uri` into `dest` with parallel ranged GETs, each streamed in CHUNK_BYTES pieces
    straight from the socket into a reused buffer, hashed there (per upload part, in the worker, so hashing
    runs in parallel and never re-reads the file) and written in place with pwrite.

    `expect` maps a key to its manifest entry (size, part_size, checksum_crc32 and/or checksum_sha256): such a
    file appears under its name only once every byte matches the checksum the upload recorded (CRC32 where the
    entry has it); others are checked for size.
    Files already present are kept (an interrupted fetch resumes), after the same check from disk. A finished
    file takes its object's LastModified from `mtimes` as its mtime, so a refetch of the same objects keeps
    the fingerprints of the stages built from them.

    Each file's first range (a safetensors header) is fetched before any other range. `listener`, when given,
    hears `kept(rel, path)` for a file already present, `opened(rel, temporary)` before a file's first GET and
    `arrived(rel, start, end)` once those bytes are written (unverified until the file is finished): what a
    convert that runs while the model downloads reads from."""
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
            else:
                if listener:
                    listener.kept(rel, t.target)
                continue
        targets.append(t)
    bar = bytes_bar(sum(t.size for t in targets), desc)
    lock = threading.Lock()

    def fetch_range(t: _Target, first: int, count: int) -> None:
        check()
        testhooks.pause("fetch-range")
        for attempt in range(RANGE_ATTEMPTS):
            try:
                _get_parts(client, uri, t, first, count, bar)
                break
            except LmiCompileError:
                raise  # already says what and where; retrying does not help
            except Exception as e:
                if attempt == RANGE_ATTEMPTS - 1:
                    raise translate(e, f"{uri}{t.rel}") from None
                time.sleep(0.2 * 2 ** attempt)
        if listener:
            start, (last_off, last_n) = t.parts[first][0], t.parts[first + count - 1]
            listener.arrived(t.rel, start, last_off + last_n)
        with lock:
            t.left -= 1
            done = t.left == 0
        if done:
            _finish(uri, t)

    try:
        tasks = []
        for t in targets:
            t.target.parent.mkdir(parents=True, exist_ok=True)
            t.fd = os.open(t.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(t.fd, t.size)
            if listener:
                listener.opened(t.rel, t.tmp)
            ranges = t.ranges()
            t.left = len(ranges)
            tasks += [(t, first, count) for first, count in ranges]
        # every file's first range (its header) first; then big files first, their ranges keep every worker busy
        tasks.sort(key=lambda task: (task[1] != 0, -task[0].size, task[1]))
        with ThreadPoolExecutor(concurrency or download_concurrency(), thread_name_prefix="get") as pool:
            futures = [pool.submit(fetch_range, *task) for task in tasks]
            wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:
                if f.done() and f.exception():
                    for other in futures:
                        other.cancel()
                    raise f.exception()
    finally:
        bar.close()
        for t in targets:  # anything unfinished: close and drop its temporary
            if t.fd is not None:
                try:
                    os.close(t.fd)
                except OSError:
                    pass
                t.tmp.unlink(missing_ok=True)


def download_concurrency() -> int:
    """GETs in flight: each streams at memory speed once its bytes arrive, so a few per core suffice."""
    return max(4, min(32, 2 * (os.cpu_count() or 2)))


def _get_parts(client, uri: S3Uri, t: _Target, first: int, count: int, bar) -> None:
    """GET parts first..first+count-1 of `t` as one range: hash each part, pwrite every chunk."""
    start = t.parts[first][0]
    end = t.parts[first + count - 1][0] + t.parts[first + count - 1][1]
    kw = {"Range": f"bytes={start}-{end - 1}"} if (start, end) != (0, t.size) else {}
    resp = client.get_object(Bucket=uri.bucket, Key=uri.key(t.rel), **kw)
    body = resp["Body"]
    if resp.get("ContentLength") != end - start:
        body.close()
        raise LmiCompileError(f"{uri}{t.rel}: asked for bytes {start}-{end - 1}, the server sent "
                              f"{resp.get('ContentLength')} bytes; the object changed during the download, rerun")
    readinto = _raw_readinto(body)
    buf = _chunk_buffer()
    digests, sent = [], 0
    try:
        for i in range(first, first + count):
            off, n = t.parts[i]
            h = HASHES[t.algorithm]() if t.expect else None
            pos = off
            while pos < off + n:
                want = min(len(buf), off + n - pos)
                view = buf[:want]
                got = 0
                while got < want:
                    k = readinto(view[got:])
                    if not k:
                        raise ConnectionError(f"stream ended after {pos - start + got} of {end - start} bytes")
                    got += k
                if STOP.is_set():
                    raise Interrupted(received())
                if h:
                    h.update(view)
                _pwrite_all(t, view, pos)
                pos += want
            bar.update(n)
            sent += n
            digests.append(h.digest() if h else b"")
    except BaseException:
        bar.update(-sent)  # the retry counts these bytes again
        body.close()
        raise
    _release(body)
    t.digests[first:first + count] = digests


def _pwrite_all(t: _Target, view: memoryview, pos: int) -> None:
    try:
        while view:
            k = os.pwrite(t.fd, view, pos)
            view, pos = view[k:], pos + k
    except OSError as e:  # the local disk, not the transfer: no retry
        raise LmiCompileError(f"{t.target}: cannot write ({e.strerror}); free disk space or choose another "
                              f"--output / --work-dir") from None


def _raw_readinto(body):
    """readinto of the HTTP response under botocore's StreamingBody: straight from the socket into our buffer
    (urllib3's readinto reads into a new bytes object and copies it). Falls back to the public API."""
    fp = getattr(getattr(body, "_raw_stream", None), "_fp", None)
    if fp is not None and hasattr(fp, "readinto") and not getattr(body._raw_stream, "_decoder", None):
        return fp.readinto
    return body.readinto


def _release(body) -> None:
    raw = getattr(body, "_raw_stream", None)
    if raw is not None and hasattr(raw, "release_conn"):
        raw.release_conn()  # fully read: the connection goes back to the pool
    else:
        body.close()


def _finish(uri: S3Uri, t: _Target) -> None:
    """All ranges are in: check the checksum, then give the file its name."""
    os.close(t.fd)
    t.fd = None
    if t.expect and t.checksum() != t.want:
        t.tmp.unlink(missing_ok=True)
        raise LmiCompileError(f"{uri}{t.rel}: downloaded bytes do not match the upload manifest's checksum "
                              f"({t.algorithm} {t.checksum()} != {t.want}); the object changed after it "
                              f"was published or was corrupted in transit: push it again or rerun the fetch")
    if t.mtime is not None:
        os.utime(t.tmp, ns=(t.mtime, t.mtime))
    os.replace(t.tmp, t.target)
