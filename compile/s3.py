"""S3 access shared by fetch and push: URIs, one tuned client, one-line errors, parallel transfers.

Credentials come from the standard AWS chain and are never logged. `AWS_ENDPOINT_URL_S3` /
`AWS_ENDPOINT_URL` are honoured by botocore itself, as in every AWS SDK.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput, LmiCompileError

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


def list_objects(client, uri: S3Uri) -> dict[str, int]:
    """{relative key: size} of every object under the prefix (all pages)."""
    out: dict[str, int] = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=uri.prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(uri.prefix):]
                if rel and not rel.endswith("/"):
                    out[rel] = obj["Size"]
    except Exception as e:  # botocore raises many unrelated types
        raise translate(e, str(uri)) from None
    return out


def default_concurrency() -> int:
    return max(8, min(32, 4 * (os.cpu_count() or 2)))


def transfer_config(concurrency: int | None = None, part_size: int = 32 * 1024 * 1024):
    from s3transfer.manager import TransferConfig

    return TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size,
                          max_request_concurrency=concurrency or default_concurrency(),
                          max_submission_concurrency=8, max_io_queue_size=1000)


def download_files(client, uri: S3Uri, rels: list[str], dest: Path, sizes: dict[str, int], *, desc: str) -> None:
    """Download `rels` under `uri` into `dest` in parallel, one byte-progress bar, files land atomically.

    Files already present with the listed size are kept (an interrupted fetch resumes).
    """
    from s3transfer.manager import TransferManager
    from s3transfer.subscribers import BaseSubscriber

    from .paths import safe_relpath
    from .progress import bytes_bar

    todo = []
    for rel in rels:
        target = dest / safe_relpath(rel, what=f"{uri}{rel}")
        if target.is_file() and target.stat().st_size == sizes[rel]:
            continue
        todo.append((rel, target))
    bar = bytes_bar(sum(sizes[r] for r, _ in todo), desc)

    class _Progress(BaseSubscriber):
        def on_progress(self, future, bytes_transferred, **kwargs):
            bar.update(bytes_transferred)

    conc = default_concurrency()
    try:
        with TransferManager(client, transfer_config(conc)) as tm:
            futures = []
            for rel, target in todo:
                target.parent.mkdir(parents=True, exist_ok=True)
                futures.append((rel, tm.download(uri.bucket, uri.key(rel), str(target), subscribers=[_Progress()])))
            for rel, fut in futures:
                try:
                    fut.result()
                except Exception as e:
                    raise translate(e, f"{uri}{rel}") from None
    finally:
        bar.close()
