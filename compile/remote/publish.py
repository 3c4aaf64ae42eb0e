"""The push stage: publish a local artifact tree to an S3 prefix, verified, resumable and atomic.

- Every object goes up with a CRC32 checksum the server verifies (per part for multipart uploads; manifest.py
  UPLOAD_CHECKSUM); afterwards every key is confirmed with HEAD (size and S3's checksum, composite for multipart).
- A marker object is written first and the manifest (every key, size, checksum, build facts) last, then
  the marker is removed: a prefix with the marker and no manifest is an incomplete upload.
- A rerun skips objects whose size AND checksum already match, and uploads the rest.
- A prefix holding anything else is refused unless --overwrite; multipart uploads started by a failed
  run are aborted; local files are deleted only with --delete-local, after verification.
"""

import contextlib
import json
import logging
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from lmi_compile import __version__
from lmi_compile.pipeline import observe, stages, testhooks
from lmi_compile.errors import BadInput, Interrupted, LmiCompileError
from lmi_compile.pipeline.interrupts import check
from lmi_compile.paths import resolve_inside
from lmi_compile.pipeline.progress import bytes_bar
from lmi_compile.remote.manifest import (HASHES, LAYOUT_MANIFEST, MANIFEST_KEY, MARKER_KEY, MIB, S3_FIELDS,
                                         UPLOAD_CHECKSUM, b64, composite, file_checksums, first_local_difference,
                                         unmatched_objects)
from lmi_compile.remote.s3 import (RANGE_ATTEMPTS, Getters, S3Uri, connections, failed, list_objects, make_client,
                                   parse_s3_uri, translate)

log = logging.getLogger("lmi_compile")

# 64 MiB parts: the server's cost per request is what limits a push on many cores (16-core host, SeaweedFS, 4x512
# MiB, sweep_push.py medians of 5, two rounds: 32 connections 0.77x s5cmd with 32 MiB parts, 0.96x with 64; 16
# connections 0.93x / 1.05x); S3 takes parts up to 5 GiB, and a worker sends a part from the file, whatever its size
DEFAULT_PART = 64 * MIB
MAX_PARTS = 10000


@dataclass(frozen=True)
class LocalFile:
    rel: str
    path: Path
    size: int


def local_files(root: Path) -> list[LocalFile]:
    """Every regular file under root (hidden bookkeeping files excluded), none escaping root."""
    root = Path(root)
    if not root.is_dir():
        raise BadInput(f"{root}: not a folder; push takes the folder to publish")
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        if p.is_dir():
            continue
        real = resolve_inside(root, rel, what=str(p))
        if not real.is_file():
            raise BadInput(f"{p}: not a regular file; push uploads files only")
        out.append(LocalFile(rel, real, real.stat().st_size))
    if not out:
        raise BadInput(f"{root}: nothing to publish (empty folder)")
    return out


def part_size_for(size: int, configured: int = DEFAULT_PART) -> int:
    """Parts of `configured` bytes, grown (in MiB steps) to stay within S3's 10,000 parts."""
    need = -(-size // MAX_PARTS)
    return max(configured, -(-need // MIB) * MIB)



class Publisher:
    def __init__(self, client, uri: S3Uri, *, concurrency: int, part_size: int, workers: Getters):
        self.client, self.uri = client, uri
        self.concurrency, self.part_size = concurrency, part_size
        self.parts = ThreadPoolExecutor(concurrency, thread_name_prefix="part")
        self.workers = workers  # every PUT goes through them (remote/getter.py); started and ended by push()
        self.workers.client = client
        self.open_uploads: dict[str, str] = {}  # key -> UploadId, until completed
        self._lock = threading.Lock()
        self.bar = None

    def _call(self, op: str, **kw):
        try:
            return getattr(self.client, op)(Bucket=self.uri.bucket, **kw)
        except Exception as e:
            raise translate(e, f"{self.uri}{kw.get('Key', '')[len(self.uri.prefix):]}") from None

    def head(self, rel: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.uri.bucket, Key=self.uri.key(rel), ChecksumMode="ENABLED")
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise translate(e, f"{self.uri}{rel}") from None

    def get_json(self, rel: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.uri.bucket, Key=self.uri.key(rel))["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise translate(e, f"{self.uri}{rel}") from None
        try:
            return json.loads(body)
        except ValueError:
            return None

    def put_json(self, rel: str, data: dict) -> None:
        body = (json.dumps(data, indent=2) + "\n").encode()
        self._call("put_object", Key=self.uri.key(rel), Body=body, ContentType="application/json",
                   **{S3_FIELDS[UPLOAD_CHECKSUM]: b64(HASHES[UPLOAD_CHECKSUM](body).digest())})

    def send(self, op: str, key: str, f: LocalFile, offset: int, size: int, **params) -> tuple[str, bytes]:
        """PUT bytes [offset, offset + size) of `f` (put_object or upload_part `op`) through a transfer worker: it
        hashes them, the URL is presigned here with their checksum (UPLOAD_CHECKSUM) as a signed header (S3
        verifies it), and it sends them from the file, refusing a file changed in between. Returns (ETag, raw
        digest); retried like a GET."""
        alg = UPLOAD_CHECKSUM
        task = {"op": "put", "path": str(f.path), "offset": offset, "size": size, "algorithms": [alg]}
        raw = {}

        def sign(reply: dict) -> dict:
            raw[alg] = bytes.fromhex(reply["digests"][alg])
            digest = b64(raw[alg])
            url = self.workers.sign(op, {"Bucket": self.uri.bucket, "Key": key, **params, S3_FIELDS[alg]: digest},
                                    f"{self.uri}{f.rel}")
            return {"url": url, "headers": {f"x-amz-checksum-{alg}": digest}}

        for attempt in range(RANGE_ATTEMPTS):
            check()
            reply = self.workers.run(task, then=sign)
            if reply["ok"]:
                return reply["etag"], raw[alg]
            if self.workers.redirected(reply):
                continue
            failed(reply, f"{self.uri}{f.rel}", f"the PUT of bytes {offset}-{offset + size - 1}", attempt,
                   "rerun to resume")
        raise AssertionError("unreachable")  # failed() raises on the last attempt

    def upload(self, f: LocalFile, part_size: int) -> dict[str, str]:
        """Upload one file in parts of `part_size`; return its manifest checksum: what S3 verified and now
        reports (UPLOAD_CHECKSUM, composite for multipart)."""
        check()
        testhooks.pause("push-file")
        alg = UPLOAD_CHECKSUM
        if f.size <= part_size:
            _, raw = self.send("put_object", self.uri.key(f.rel), f, 0, f.size)
            self.bar.update(f.size)
            return {f"checksum_{alg}": b64(raw)}
        key = self.uri.key(f.rel)
        upload_id = self._call("create_multipart_upload", Key=key, ChecksumAlgorithm=alg.upper())["UploadId"]
        with self._lock:
            self.open_uploads[key] = upload_id
        n = -(-f.size // part_size)

        def part(i: int):
            check()
            testhooks.pause("push-part")
            off = i * part_size
            size = min(part_size, f.size - off)
            etag, raw = self.send("upload_part", key, f, off, size, UploadId=upload_id, PartNumber=i + 1)
            self.bar.update(size)
            return {"PartNumber": i + 1, "ETag": etag, S3_FIELDS[alg]: b64(raw)}, raw

        futures = [self.parts.submit(part, i) for i in range(n)]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for fut in futures:
            if fut.done() and fut.exception():
                for other in futures:
                    other.cancel()
                raise fut.exception()
        results = [fut.result() for fut in futures]
        self._call("complete_multipart_upload", Key=key, UploadId=upload_id,
                   MultipartUpload={"Parts": [p for p, _ in results]})
        with self._lock:
            self.open_uploads.pop(key, None)
        return {f"checksum_{alg}": composite([raw for _, raw in results], f.size, part_size, alg)}

    def abort_open_uploads(self) -> list[str]:
        aborted = []
        with self._lock:
            pending = dict(self.open_uploads)
            self.open_uploads.clear()
        for key, upload_id in pending.items():
            try:
                self.client.abort_multipart_upload(Bucket=self.uri.bucket, Key=key, UploadId=upload_id)
                aborted.append(key)
            except Exception as e:  # best effort: report, the lifecycle rule is the user's last resort
                log.warning("push: could not abort multipart upload of %s (%s)", key, type(e).__name__)
        return aborted


def preflight(uri_text: str, output: Path | None = None, *, overwrite: bool = False,
              made_with: dict | None = None) -> S3Uri:
    """Before hours of compile: the URI parses, credentials work, the bucket exists, and the prefix is empty, or
    replaced with --overwrite, or holds the upload (finished or interrupted) of `output` as it is now, made with
    the options `made_with` names (Job.made_with): a rerun of the job that published it. Otherwise the push at
    the end would refuse it after the compile: a rerun with other options replaces `output` with another
    artifact, which the prefix does not hold."""
    uri = parse_s3_uri(uri_text)
    if not uri.prefix:
        raise BadInput(f"{uri}: give a prefix (s3://bucket/models/NAME/), not a whole bucket")
    client = make_client()
    existing = list_objects(client, uri)
    foreign = sorted(k for k in existing if k not in (MANIFEST_KEY, MARKER_KEY))
    if not foreign or overwrite:
        return uri
    ids = set()
    for key in (MANIFEST_KEY, MARKER_KEY):
        if key in existing:
            try:
                ids.add(json.loads(client.get_object(Bucket=uri.bucket, Key=uri.key(key))["Body"].read())["content_id"])
            except Exception:  # unreadable: not this output's upload
                pass
    if output is not None and Path(output).is_dir() and any(Path(output).iterdir()):
        if content_id(output, local_files(output)) in ids:
            then = (stages.read_record(output) or {}).get("made_with")
            # the options given (an option left out takes the value the backend finds for the model, as before)
            changed = [k for k in sorted(made_with) if then.get(k) != made_with[k]] \
                if isinstance(then, dict) and made_with is not None else []
            if not changed:
                return uri
            raise BadInput(f"{uri}: holds the upload of {output}, made with other options than this run's "
                           f"({'; '.join(f'{k} {then.get(k)} then, {made_with.get(k)} now' for k in changed)}); this "
                           f"run would replace {output} and its push would be refused: pass --overwrite to replace "
                           f"the upload, or upload to another prefix")
    raise _occupied(uri, foreign)


def _occupied(uri: S3Uri, foreign: list[str]) -> BadInput:
    return BadInput(f"{uri}: prefix already holds {len(foreign)} object(s) of another upload (e.g. {foreign[0]}); "
                    f"choose an empty prefix or pass --overwrite to replace them")


def content_id(root: Path, files: list[LocalFile]) -> str:
    """Identity of what is being published: the fingerprint of our stage record while the folder holds exactly
    the files that stage wrote, else names, sizes and mtimes (so an edit changes it, whatever the record says)."""
    rec = stages.read_record(root)
    if rec and rec.get("fingerprint") and stages.not_written_here(root, rec) is None:
        return rec["fingerprint"]
    return stages.fingerprint(files=[(f.rel, f.size, f.path.stat().st_mtime_ns) for f in files])


@dataclass(frozen=True)
class Pushed:
    """What a push did: objects in the published tree, how many went up this time, and the manifest there."""

    objects: int
    uploaded: int
    manifest: dict


def push(root: Path, uri_text: str, *, overwrite: bool = False, delete_local: bool = False,
         concurrency: int | None = None, part_size: int | None = None, client=None) -> Pushed:
    """Publish `root` to `uri_text`, verified."""
    root = Path(root)
    uri = parse_s3_uri(uri_text)
    if not uri.prefix:
        raise BadInput(f"{uri}: give a prefix (s3://bucket/models/NAME/), not a whole bucket")
    files = local_files(root)
    cid = content_id(root, files)
    # at least 8, not 16: on 2 cores shared with a server 16 in flight took 8.7 s where 4 or 8 took 6.5-6.9 s
    # (4x256 MiB, medians of 7); on S3 8 still double the 4 few cores had
    concurrency = concurrency or connections(least=8)
    # the PUT workers start first (standard library only): ready by the time botocore has loaded here; whatever
    # ends the push (a refusal before any upload included) ends them
    workers = Getters(None, processes=concurrency).start()
    try:
        client = client or make_client(max_pool=max(64, 2 * concurrency))
        pub = Publisher(client, uri, concurrency=concurrency, part_size=part_size or DEFAULT_PART, workers=workers)
        return _publish(pub, root, files, cid, overwrite=overwrite, delete_local=delete_local)
    finally:
        workers.close()


def _publish(pub: Publisher, root: Path, files: list[LocalFile], cid: str, *, overwrite: bool,
             delete_local: bool) -> Pushed:
    client, uri = pub.client, pub.uri
    existing = list_objects(client, uri)
    manifest = pub.get_json(MANIFEST_KEY) if MANIFEST_KEY in existing else None
    marker = pub.get_json(MARKER_KEY) if MARKER_KEY in existing else None
    ours = {f.rel for f in files}
    foreign = {k for k in existing if k not in (MANIFEST_KEY, MARKER_KEY)}
    resuming = bool(marker) and marker.get("content_id") == cid
    published = (manifest or {}).get("objects")
    if isinstance(published, dict) and set(published) == ours == foreign and all(
            existing[f.rel] == f.size for f in files):
        # The prefix holds a finished upload of these names and sizes: the same bytes (this folder unchanged
        # since, or a copy of it, told by hashing it) are a no-op once S3 is seen to still hold what the manifest
        # says; other bytes are another upload.
        same = manifest.get("content_id") == cid
        if not same and not overwrite:
            differs = first_local_difference(files, published)
            if differs is not None:
                raise BadInput(f"{uri}: holds an earlier upload of these files, and {differs} differs from it; "
                               f"pass --overwrite to replace the changed objects, or push to another prefix")
            same = True
        if same:
            damaged = unmatched_objects(client, uri, published)
            if not damaged:
                log.info("push: %s already holds these %d objects, verified against its manifest; nothing changed",
                         uri, len(files))
                _delete_local(root, files, delete_local)
                return Pushed(objects=len(files), uploaded=0, manifest=manifest)
            rel, why = next(iter(damaged.items()))
            log.warning("push: %d object(s) at %s are not what its manifest says (e.g. %s: %s); uploading them "
                        "again", len(damaged), uri, rel, why)
            resuming = True  # the upload is this one: repaired in place
    if foreign and not resuming and not overwrite:
        raise _occupied(uri, sorted(foreign))
    if manifest:
        pub._call("delete_object", Key=uri.key(MANIFEST_KEY))  # the prefix reads incomplete while it changes
    if resuming or overwrite:
        # A run killed with SIGKILL could not abort its multipart uploads; they are ours, so end them now.
        stale = pub._call("list_multipart_uploads", Prefix=uri.prefix).get("Uploads", [])
        for up in stale:
            pub._call("abort_multipart_upload", Key=up["Key"], UploadId=up["UploadId"])
        if stale:
            log.info("push: aborted %d multipart upload(s) left by an interrupted run", len(stale))
    pub.put_json(MARKER_KEY, {"content_id": cid, "tool_version": __version__,
                              "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    entries: dict[str, dict] = {}
    todo = []
    for f in files:
        ps = part_size_for(f.size, pub.part_size)
        if existing.get(f.rel) == f.size:
            # uploaded by the interrupted run (or, with SHA256, by an lmi-compile of before 2026-11): kept when the
            # checksum S3 stored matches this file's
            head = pub.head(f.rel) or {}
            alg = next((a for a in (UPLOAD_CHECKSUM, *S3_FIELDS) if head.get(S3_FIELDS[a])), None)
            if alg:
                local = file_checksums(f.path, f.size, ps, tuple(dict.fromkeys((alg, "crc32"))))
                if head[S3_FIELDS[alg]] == local[alg]:
                    entries[f.rel] = {"size": f.size, **{f"checksum_{a}": v for a, v in local.items()},
                                      "part_size": ps}
                    continue
        todo.append((f, ps))
    skipped = len(files) - len(todo)
    if skipped:
        log.info("push: %d object(s) already uploaded with matching checksums, kept", skipped)
    pub.bar = bytes_bar(sum(f.size for f, _ in todo), f"push to {uri}")
    done_rels: list[str] = []
    try:
        with ThreadPoolExecutor(pub.concurrency, thread_name_prefix="file") as files_pool:
            todo.sort(key=lambda t: -t[0].size)  # big files first: their parts keep the pool busy

            def one(item):
                f, ps = item
                entries[f.rel] = {"size": f.size, **pub.upload(f, ps), "part_size": ps}
                done_rels.append(f.rel)

            futures = [files_pool.submit(one, item) for item in todo]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            errors = [fut for fut in futures if fut.done() and fut.exception()]
            if errors:
                for fut in futures:
                    fut.cancel()
                raise errors[0].exception()
        verify(pub, files, entries)
        if overwrite:
            for stale in sorted(foreign - ours):
                pub._call("delete_object", Key=uri.key(stale))
        manifest = {"tool": "lmi-compile", "tool_version": __version__, "content_id": cid,
                    "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "objects": {rel: entries[rel] for rel in sorted(entries)}, "build": _build_facts(root)}
        if job := observe.job_facts():  # set by `lmi-compile batch`: a rerun skips a prefix holding this job
            manifest["job"] = job
        pub.put_json(MANIFEST_KEY, manifest)
        pub._call("delete_object", Key=uri.key(MARKER_KEY))
    except BaseException as e:
        pub.parts.shutdown(wait=True, cancel_futures=True)
        aborted = pub.abort_open_uploads()
        missing = sorted(ours - set(entries))
        summary = (f"{len(entries)} of {len(files)} objects are uploaded; not uploaded: "
                   f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if aborted:
            summary += f"; aborted {len(aborted)} unfinished multipart upload(s)"
        if isinstance(e, Interrupted):
            raise
        if isinstance(e, LmiCompileError):
            raise type(e)(f"{e}; push incomplete: {summary}; rerun to resume", exit_code=e.exit_code) from None
        if isinstance(e, Exception):
            raise LmiCompileError(f"push to {uri} failed ({type(e).__name__}: {str(e)[:200]}); {summary}; "
                                  f"rerun to resume") from None
        raise
    finally:
        pub.bar.close()
        pub.parts.shutdown(wait=False)  # (the workers are ended by push())
    log.info("push: %d object(s), %.1f MiB at %s, verified; manifest written last", len(files),
             sum(f.size for f in files) / MIB, uri)
    _delete_local(root, files, delete_local)
    return Pushed(objects=len(files), uploaded=len(todo), manifest=manifest)


def _delete_local(root: Path, files: list[LocalFile], delete_local: bool) -> None:
    """--delete-local, once the upload is verified: the files it uploaded go, with lmi-compile's own records
    (a layout's stage record would otherwise claim the folder is still laid out) and the folders left empty.
    What push skipped (hidden files: a `.git`, a `.env`) is the user's and stays, and is named."""
    if not delete_local:
        return
    gone = [root / f.rel for f in files]
    gone += [p for p in root.rglob(".lmi-compile*") if p.is_file() and not p.is_symlink()]
    for path in gone:
        path.unlink(missing_ok=True)  # a link inside root goes, not the file it names
    # the folders those files left empty, deepest first, root last: never a folder of the user's (an empty one in
    # .git is part of the repository)
    folders = {parent for path in gone for parent in path.parents if parent == root or root in parent.parents}
    for folder in sorted(folders, key=lambda f: -len(f.parts)):
        with contextlib.suppress(OSError):  # only empty folders go
            folder.rmdir()
    kept = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir() or p.is_symlink()) \
        if root.exists() else []
    if kept:
        log.warning("push: deleted the %d uploaded file(s) of %s (--delete-local); kept what push does not upload: "
                    "%s", len(files), root, ", ".join(kept[:5]) + (", ..." if len(kept) > 5 else ""))
    else:
        log.info("push: deleted local %s after verification (--delete-local)", root)


def verify(pub: Publisher, files: list[LocalFile], entries: dict) -> None:
    """HEAD every key: its size and S3's checksum must be what was sent."""
    bad = unmatched_objects(pub.client, pub.uri, {f.rel: entries[f.rel] for f in files})
    if bad:
        rel, why = next(iter(bad.items()))
        got, _, expected = why.partition(", ")  # "checksum X after upload, expected Y"
        raise LmiCompileError(f"{pub.uri}{rel}: {got} after upload{', ' + expected if expected else ''}")


def _build_facts(root: Path) -> dict:
    p = root / LAYOUT_MANIFEST
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except ValueError:
        return {}
