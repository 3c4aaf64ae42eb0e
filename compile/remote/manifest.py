"""The names and checksums lmi-compile's outputs carry, shared by the stages that write and read them.

A laid-out tree carries LAYOUT_MANIFEST (build facts); a published S3 prefix carries MANIFEST_KEY (every
object with its size and S3 checksum) and, while an upload is under way, MARKER_KEY.
"""

import base64
import hashlib
from pathlib import Path

LAYOUT_MANIFEST = "lmi-compile.json"  # build facts every layout carries beside serving.properties
MANIFEST_KEY = "lmi-compile-manifest.json"
MARKER_KEY = "lmi-compile-upload-in-progress.json"
MIB = 1024 * 1024


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def composite(part_digests: list[bytes], size: int, part_size: int) -> str:
    """The ChecksumSHA256 S3 reports for an object of `size` bytes uploaded in parts of `part_size`, from the
    raw SHA256 digest of each part in order: the plain digest for a single upload, else the digest of the
    digests with "-<parts>" appended."""
    if size <= part_size:
        return b64(part_digests[0])
    return f"{b64(hashlib.sha256(b''.join(part_digests)).digest())}-{len(part_digests)}"


def part_bounds(size: int, part_size: int) -> list[tuple[int, int]]:
    """(offset, length) of each part whose digest the checksum of a `size`-byte object is made from."""
    if size <= part_size:
        return [(0, size)]
    return [(off, min(part_size, size - off)) for off in range(0, size, part_size)]


def s3_checksum(path: Path, size: int, part_size: int) -> str:
    """The ChecksumSHA256 S3 reports for this file uploaded with this part size (composite if multipart)."""
    digests = []
    with open(path, "rb") as f:
        for _, n in part_bounds(size, part_size):
            h = hashlib.sha256()
            left = n
            while left and (chunk := f.read(min(8 * MIB, left))):
                h.update(chunk)
                left -= len(chunk)
            digests.append(h.digest())
    return composite(digests, size, part_size)
