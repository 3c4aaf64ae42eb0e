"""The names and checksums lmi-compile's outputs carry, shared by the stages that write and read them.

A laid-out tree carries LAYOUT_MANIFEST (build facts); a published S3 prefix carries MANIFEST_KEY (every
object with its size and checksums) and, while an upload is under way, MARKER_KEY.

Each manifest entry has `size`, `part_size` and `checksum_crc32`: the ChecksumCRC32 S3 verified and reports for
the object (composite for multipart; UPLOAD_CHECKSUM). Entries written before 2026-11 have `checksum_sha256`,
what S3 verified then, and since issue 17 `checksum_crc32` too, computed by push from the very bytes it sent.
fetch checks CRC32 where an entry has it (ISA-L's CRC32, remote/getter.py, runs at 85 GB/s a core here, SHA256
at 1.8) and SHA256 otherwise, so manifests of every age verify. Older releases reading today's prefixes: their
fetch checks CRC32 too, but their HEAD comparisons (check, re-push) looked at SHA256 only, and on these objects
compare sizes alone. CRC32 is S3's and the SDKs' own integrity check: it catches corruption, not a forgery.
"""

import base64
import os
from pathlib import Path

from lmi_compile.remote.getter import HASHES

LAYOUT_MANIFEST = "lmi-compile.json"  # build facts every layout carries beside serving.properties
MANIFEST_KEY = "lmi-compile-manifest.json"
MARKER_KEY = "lmi-compile-upload-in-progress.json"
MIB = 1024 * 1024


# The checksum push has S3 verify on every PUT and store with the object (composite for a multipart upload): CRC32,
# as the AWS SDKs have sent by default since 2025. S3 (and the test server) hash each part again to check it, and
# SHA256 cost that server as much CPU as the upload's own bytes. Prefixes pushed before 2026-11 had S3 verify
# SHA256; their objects still report it, and a HEAD is compared on whichever algorithm both sides carry.
UPLOAD_CHECKSUM = "crc32"
S3_FIELDS = {"crc32": "ChecksumCRC32", "sha256": "ChecksumSHA256"}  # manifest checksum_<name> -> S3's field


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def stored_difference(head: dict, entry: dict) -> str | None:
    """How the checksum S3 stored with an object (a HEAD with checksums) differs from a manifest entry's, or
    None: compared on every algorithm both carry; an object S3 stored with none of them (a plain PUT over it)
    differs."""
    pairs = [(head[S3_FIELDS[a]], entry[f"checksum_{a}"]) for a in S3_FIELDS
             if head.get(S3_FIELDS[a]) and isinstance(entry.get(f"checksum_{a}"), str)]
    bad = next(((got, want) for got, want in pairs if got != want), None)
    if bad:
        return f"checksum {bad[0]}, expected {bad[1]}"
    if not pairs:
        want = next((entry[f"checksum_{a}"] for a in S3_FIELDS if isinstance(entry.get(f"checksum_{a}"), str)), None)
        other = next((f"{v} ({k})" for k, v in head.items() if k.startswith("Checksum") and k != "ChecksumType"),
                     None)
        return f"checksum {other}, expected {want}"
    return None


def verifying_checksum(entry: dict) -> tuple[str, str] | None:
    """(algorithm, expected checksum) fetch checks a manifest entry against: the cheapest the entry carries."""
    for name in ("crc32", "sha256"):
        if isinstance(entry.get(f"checksum_{name}"), str):
            return name, entry[f"checksum_{name}"]
    return None


def composite(part_digests: list[bytes], size: int, part_size: int, algorithm: str = "sha256") -> str:
    """The checksum S3 reports for an object of `size` bytes uploaded in parts of `part_size`, from each part's
    raw digest in order: the plain digest for a single upload, else the digest of the digests with "-<parts>"
    appended (S3's COMPOSITE checksum type)."""
    if size <= part_size:
        return b64(part_digests[0])
    return f"{b64(HASHES[algorithm](b''.join(part_digests)).digest())}-{len(part_digests)}"


def part_bounds(size: int, part_size: int) -> list[tuple[int, int]]:
    """(offset, length) of each part whose digest the checksum of a `size`-byte object is made from."""
    if size <= part_size:
        return [(0, size)]
    return [(off, min(part_size, size - off)) for off in range(0, size, part_size)]


def file_checksums(path: Path, size: int, part_size: int, algorithms=("sha256",)) -> dict[str, str]:
    """{algorithm: the checksum S3 reports for this file uploaded with this part size}, in one read."""
    digests: dict[str, list[bytes]] = {a: [] for a in algorithms}
    with open(path, "rb") as f:
        for _, n in part_bounds(size, part_size):
            hs = {a: HASHES[a]() for a in algorithms}
            left = n
            while left and (chunk := f.read(min(8 * MIB, left))):
                for h in hs.values():
                    h.update(chunk)
                left -= len(chunk)
            for a, h in hs.items():
                digests[a].append(h.digest())
    return {a: composite(d, size, part_size, a) for a, d in digests.items()}


def s3_checksum(path: Path, size: int, part_size: int, algorithm: str = "sha256") -> str:
    """The checksum S3 reports for this file uploaded with this part size (composite if multipart)."""
    return file_checksums(path, size, part_size, (algorithm,))[algorithm]


def read_manifest(client, uri) -> dict | None:
    """The upload manifest under `uri` (an S3Uri) when a push finished there; None when it is absent, unreadable
    or not a JSON object (callers that must explain why use remote/fetch.py manifest_objects)."""
    import json

    try:
        data = json.loads(client.get_object(Bucket=uri.bucket, Key=uri.key(MANIFEST_KEY))["Body"].read())
    except Exception:
        return None
    return data if isinstance(data, dict) else None


def unmatched_objects(client, uri, objects: dict) -> dict[str, str]:
    """{rel: how it differs} for the objects of a manifest (`{rel: entry}`) that S3 no longer holds as published:
    missing, of another size, or whose stored checksum (HEAD with checksums) is not the entry's; a plain PUT over
    a published object stores none, or another. HEADs only, in parallel, no object read; in the order of the names."""
    from concurrent.futures import ThreadPoolExecutor

    from botocore.exceptions import ClientError

    from lmi_compile.remote.s3 import translate

    def differs(item) -> str | None:
        rel, entry = item
        try:
            head = client.head_object(Bucket=uri.bucket, Key=uri.key(rel), ChecksumMode="ENABLED")
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return "missing"
            raise translate(e, f"{uri}{rel}") from None
        if head.get("ContentLength") != entry.get("size"):
            return f"size {head.get('ContentLength')}, expected {entry.get('size')}"
        return stored_difference(head, entry)

    items = sorted(objects.items())
    with ThreadPoolExecutor(max(1, min(32, len(items)))) as pool:
        return {rel: why for (rel, _), why in zip(items, pool.map(differs, items)) if why}


def first_local_difference(files, objects: dict) -> str | None:
    """The first of `files` (publish.LocalFile) whose bytes are not those a manifest's entries record (by the
    cheapest checksum an entry carries), or None: a re-push of a copied or touched folder is the same upload."""
    from concurrent.futures import ThreadPoolExecutor

    def differs(f) -> bool:
        entry = objects.get(f.rel) or {}
        want = verifying_checksum(entry)
        if want is None or entry.get("size") != f.size or not isinstance(entry.get("part_size"), int):
            return True
        algorithm, expected = want
        return file_checksums(f.path, f.size, entry["part_size"], (algorithm,))[algorithm] != expected

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1, len(files)))) as pool:  # hashing releases the GIL
        return next((f.rel for f, bad in zip(files, pool.map(differs, files)) if bad), None)

