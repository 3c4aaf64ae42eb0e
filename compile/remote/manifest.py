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


def s3_checksum(path: Path, size: int, part_size: int) -> str:
    """The ChecksumSHA256 S3 reports for this file uploaded with this part size (composite if multipart)."""
    if size <= part_size:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(8 * MIB):
                h.update(chunk)
        return b64(h.digest())
    digests = []
    with open(path, "rb") as f:
        for _ in range(-(-size // part_size)):
            h = hashlib.sha256()
            left = part_size
            while left and (chunk := f.read(min(8 * MIB, left))):
                h.update(chunk)
                left -= len(chunk)
            digests.append(h.digest())
    return f"{b64(hashlib.sha256(b''.join(digests)).digest())}-{len(digests)}"
