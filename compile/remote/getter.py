"""A transfer worker process of the S3 fetch (ranged GETs, s3.download_files) and push (part PUTs,
publish.Publisher): the standard library and isal's CRC32 only, started as a script.

Why a process: one Python process moving several GB/s spends its time handing the GIL between threads for every
socket read, checksum and write; separate processes each read, hash and pwrite without waiting on one another
(on the 16-core host 8 of them fetched a model 1.6x faster than 16 threads of botocore, with half the CPU).
Why plain http.client: the URL comes presigned (SigV4, by botocore in the parent, which knows endpoints,
regions and credentials), so a GET is one request line; the body is read straight from the socket into one
reused buffer, hashed there (isal's crc32 and hashlib release the GIL) and written in place with pwrite.

A PUT is read twice, never held: the part is hashed chunk by chunk in the same reused buffer, then sent from the
file on a URL presigned with its checksum as a signed header, which S3 verifies (over plain http with sendfile,
straight from the page cache). A worker's memory is its buffer, whatever the part size (a part held whole was
32 MiB a worker, 2 GiB at 64 connections).

Protocol: one JSON task per line on stdin, one JSON reply per line on stdout, in order.
  info:  {"op": "info"} -> {"ok": true, "crc32": the module computing CRC32}
  get:   {"url", "path" (an existing temporary, written in place), "size" (the object's),
          "parts": [[offset, length], ...] (consecutive; one GET covers them), "algorithm": "crc32"|"sha256"|null}
         -> {"ok": true, "digests": [hex per part]}
  put:   {"op": "put", "path", "offset", "size", "algorithms": [...]} -> {"ok": true, "digests": {name: hex}};
         then {"url", "headers"} (signed for those digests) -> {"ok": true, "etag"}, or {"skip": true} -> nothing
  a failure: {"ok": false, "kind": "http"|"net"|"disk"|"gone", ...}
The worker ignores SIGINT (a terminal's Ctrl-C reaches the whole process group): the parent decides, and ends
workers by closing stdin or with SIGTERM before it removes the temporaries they write.
"""

import hashlib
import http.client
import json
import os
import signal
import sys
import urllib.parse

if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1]:  # -S hides site-packages: s3.Getters names where isal lies
    sys.path.append(sys.argv[1])
try:  # ISA-L's CRC32 (python-isal, a dependency): zlib's values at 85 GB/s a core here, zlib's own 5 GB/s
    from isal.isal_zlib import crc32
except ImportError:
    from zlib import crc32

# Read, hashed and written in these: small enough to stay in cache between the socket's copy in and the page
# cache's copy out. On 2 cores, 16 threads with 1 MiB each spent 3.9 s of CPU on a 2.8 GiB fetch (perf: more of
# it in the kernel's copy into the page cache, and spinning on the file's lock), 2.7 s with 256 KiB (wall 3.99 ->
# 3.35 s, medians of 10); on the 16-core host the two measured the same (2.02 s, 8.5 GiB).
CHUNK = 256 * 1024


def write_size(forced_kib: int | None = None, balloons: str = "/sys/bus/virtio/drivers/virtio_balloon") -> int:
    """The bytes of one pwrite: a whole chunk (256 KiB), or 32 KiB where the kernel hands freed memory back to its
    hypervisor (virtio-balloon free page reporting, feature bit 5). There a large write fills the page cache with
    large folios, taken from the free blocks the host reclaimed, and every page of them faults on the host: on
    the 2-core CI machine 2 GiB took 4.2 s of kernel time in 1 MiB writes and 0.7 s in 32 KiB ones (s5cmd writes
    32 KiB too). Where guest memory stays backed (the 16-core GPU host) 32 KiB writes cost more (8.5 GiB fetch
    2.66 s against 2.42 s in 1 MiB ones). `forced_kib`: LMI_COMPILE_WRITE_KIB, read by s3.Getters."""
    if forced_kib:
        return min(CHUNK, forced_kib * 1024)
    import glob

    for path in glob.glob(f"{balloons}/virtio*/features"):
        try:
            with open(path) as f:
                if f.read(6)[5:6] == "1":
                    return 32 * 1024
        except OSError:
            pass
    return CHUNK


class Crc32:
    """CRC32 with hashlib's update/digest (digest: 4 bytes, big-endian, as S3 encodes ChecksumCRC32)."""

    def __init__(self, data=b""):
        self.value = crc32(data)

    def update(self, data) -> None:
        self.value = crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


HASHES = {"crc32": Crc32, "sha256": hashlib.sha256}  # manifest field checksum_<name> -> hasher


class HttpError(Exception):
    def __init__(self, status: int, body: bytes):
        super().__init__(status)
        self.status, self.body = status, body


class DiskError(Exception):
    pass


class Getter:
    def __init__(self, write: int = CHUNK):
        self.write = write  # bytes per pwrite (write_size)
        self.conn = None
        self.conn_key = None
        self.fd = None
        self.fd_path = None
        self.buf = memoryview(bytearray(CHUNK))

    def connection(self, u: urllib.parse.SplitResult):
        key = (u.scheme, u.hostname, u.port)
        if self.conn is None or self.conn_key != key:
            self.drop()
            if u.scheme == "https":
                import ssl

                ctx = ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or None)
                self.conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=120, context=ctx)
            else:
                self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
            self.conn_key = key
        return self.conn

    def drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None

    def close(self) -> None:
        self.drop()
        self.close_file()

    def close_file(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self.fd = self.fd_path = None

    def file(self, path: str) -> int:
        if self.fd_path != path:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
            self.fd = os.open(path, os.O_WRONLY)  # never O_CREAT: a removed temporary stays removed
            self.fd_path = path
        return self.fd

    def get(self, task: dict) -> list[str]:
        parts = task["parts"]
        start, end = parts[0][0], parts[-1][0] + parts[-1][1]
        u = urllib.parse.urlsplit(task["url"])
        conn = self.connection(u)
        headers = {} if (start, end) == (0, task["size"]) else {"Range": f"bytes={start}-{end - 1}"}
        conn.request("GET", f"{u.path}?{u.query}" if u.query else u.path, headers=headers)
        resp = conn.getresponse()
        if resp.status not in (200, 206):
            body = resp.read()
            raise HttpError(resp.status, body[:2000])
        length = resp.getheader("Content-Length")
        if length is None or int(length) != end - start:
            resp.close()
            raise HttpError(-1, f"asked for bytes {start}-{end - 1}, the server sent {length} bytes".encode())
        fd = self.file(task["path"])
        make = HASHES.get(task.get("algorithm") or "")
        buf, digests = self.buf, []
        for off, n in parts:
            h = make() if make else None
            pos = off
            while pos < off + n:
                want = min(len(buf), off + n - pos)
                view, got = buf[:want], 0
                while got < want:
                    k = resp.readinto(view[got:])
                    if not k:
                        raise ConnectionError(f"stream ended after {pos - start + got} of {end - start} bytes")
                    got += k
                if h:
                    h.update(view)
                try:
                    while view:
                        k = os.pwrite(fd, view[:self.write], pos)
                        view, pos = view[k:], pos + k
                except OSError as e:
                    raise DiskError(e.strerror) from None
            digests.append(h.digest().hex() if h else "")
        if resp.read(1):  # the whole body is read: the connection stays usable
            raise ConnectionError("the server sent more bytes than it announced")
        return digests

    def read_part(self, task: dict) -> tuple[tuple, dict]:
        """The part's digests, hashed chunk by chunk in the reused buffer, and the file's (mtime, size) then."""
        path, pos, end = task["path"], task["offset"], task["offset"] + task["size"]
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise DiskError(f"{path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            hashes = {name: HASHES[name]() for name in task["algorithms"]}
            while pos < end:
                k = os.preadv(fd, [self.buf[:min(len(self.buf), end - pos)]], pos)
                if k <= 0:
                    raise DiskError(f"{path}: file shrank during upload; do not modify artifacts while pushing")
                for h in hashes.values():
                    h.update(self.buf[:k])
                pos += k
        finally:
            os.close(fd)
        return (st.st_mtime_ns, st.st_size), {name: h.digest().hex() for name, h in hashes.items()}

    def put(self, task: dict, stamp: tuple, msg: dict) -> str:
        """PUT the part on its presigned URL, its bytes read from the file again; its ETag. The file must be as it
        was hashed: the server refuses bytes that do not match the signed checksum, and this says why."""
        u = urllib.parse.urlsplit(msg["url"])
        conn = self.connection(u)
        path, offset, n = task["path"], task["offset"], task["size"]
        with open(path, "rb") as f:
            conn.putrequest("PUT", f"{u.path}?{u.query}" if u.query else u.path)
            for k, v in {"Content-Length": str(n), **msg.get("headers", {})}.items():
                conn.putheader(k, v)
            conn.endheaders()
            if not isinstance(conn, http.client.HTTPSConnection):
                sent = conn.sock.sendfile(f, offset, n)  # plain http: page cache to socket, no copy here
            else:  # TLS encrypts in user space: send from the reused buffer
                sent = 0
                while sent < n:
                    k = os.preadv(f.fileno(), [self.buf[:min(len(self.buf), n - sent)]], offset + sent)
                    if k <= 0:
                        break
                    conn.sock.sendall(self.buf[:k])
                    sent += k
            st = os.fstat(f.fileno())
        if sent != n or (st.st_mtime_ns, st.st_size) != stamp:
            self.drop()  # the request is incomplete or its bytes are not the hashed ones: never finish it
            raise DiskError(f"{path}: changed during upload; do not modify artifacts while pushing")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise HttpError(resp.status, body[:2000])
        return resp.getheader("ETag") or ""


def run(g: Getter, task: dict, then=None) -> dict:
    """One task's reply (never raises for a failed transfer). A put hands its digests to `then`, which returns
    the signed URL message (or None to skip), and replies with the ETag; what `then` raises is the caller's and
    propagates."""
    if task.get("op") == "info":
        return {"ok": True, "crc32": crc32.__module__}
    if task.get("op") != "put":
        return _guard(g, lambda: {"ok": True, "digests": g.get(task)})
    read = _guard(g, lambda: g.read_part(task))
    if isinstance(read, dict):
        return read
    stamp, digests = read
    msg = then({"ok": True, "digests": digests})
    if not msg or msg.get("skip"):
        return {"ok": True, "skipped": True}
    return _guard(g, lambda: {"ok": True, "etag": g.put(task, stamp, msg)})


def _guard(g: Getter, fn):
    try:
        return fn()
    except HttpError as e:
        g.drop()
        return {"ok": False, "kind": "http", "status": e.status, "body": e.body.decode("utf-8", "replace")}
    except DiskError as e:
        return {"ok": False, "kind": "disk", "error": str(e)}
    except FileNotFoundError:
        return {"ok": False, "kind": "gone", "error": "the temporary was removed"}
    except Exception as e:  # the connection: dropped, reset, timed out, malformed
        g.drop()
        return {"ok": False, "kind": "net", "error": f"{type(e).__name__}: {str(e)[:200]}"}


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # s3.Getters starts it as: getter.py ISAL_HOME NICE WRITE_SIZE
    if int(sys.argv[2]):  # a lower priority
        os.nice(int(sys.argv[2]))
    g = Getter(write=int(sys.argv[3]))

    def send(reply: dict) -> None:
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()

    def then(reply: dict) -> dict | None:
        send(reply)
        line = sys.stdin.readline()
        return json.loads(line) if line else None

    for line in sys.stdin:
        reply = run(g, json.loads(line), then)
        if not reply.get("skipped"):
            send(reply)


if __name__ == "__main__":
    main()
