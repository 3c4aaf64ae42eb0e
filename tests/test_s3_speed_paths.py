"""The fast S3 fetch path against a real server (SeaweedFS): ranged GETs streamed from the socket, hashed per
upload part as they arrive, and a file named only once its bytes match the manifest."""

import hashlib
import json
import os
import signal
import threading
from pathlib import Path

import pytest
from conftest import PausedCli, error_line, run_cli

from lmi_compile.remote.manifest import MANIFEST_KEY
from lmi_compile.remote.s3 import parse_s3_uri

# ~23 MB in two shards of ~11 MiB: with 5 MiB parts each shard is a 3-part multipart upload, and one GET
# (RANGE_BYTES) covers several parts, so part boundaries fall inside a streamed range.
MULTIPART = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=1, intermediate_size=1024, vocab_size=4000)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())
            if p.is_file() and not p.name.startswith(".")}


def publish(model: Path, prefix: str) -> tuple[Path, str]:
    """Push with lmi-compile (so the prefix carries a manifest) in 5 MiB parts."""
    proc = run_cli("push", model, prefix, "--part-size-mb", "5")
    assert proc.returncode == 0, proc.stderr
    return model, prefix


@pytest.fixture
def published(s3_env, s3_prefix, model_factory):
    return publish(model_factory(shards=2, **MULTIPART), s3_prefix)


def test_fetch_verifies_every_byte_against_the_manifest(published, s3_client, tmp_path):
    model, prefix = published
    out = tmp_path / "out"
    proc = run_cli("fetch", prefix, "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert digests(out) == digests(model)
    # Same size, other bytes: what a republish without its manifest, or corruption at rest, looks like.
    u = parse_s3_uri(prefix)
    shard = "model-00002-of-00002.safetensors"
    body = bytearray((model / shard).read_bytes())
    body[len(body) // 2] ^= 0xFF
    s3_client.put_object(Bucket=u.bucket, Key=u.key(shard), Body=bytes(body))
    bad = tmp_path / "bad"
    proc = run_cli("fetch", prefix, "--output", bad)
    assert proc.returncode == 1, proc.stderr
    line = error_line(proc)
    assert shard in line and "do not match the upload manifest's checksum" in line
    assert "crc32" in line  # the cheaper checksum, where the manifest carries it
    assert not bad.exists() and (tmp_path / ".bad.partial").is_dir()  # the staging folder stays, to resume
    assert not (tmp_path / ".bad.partial" / shard).exists()  # never named, even there
    assert not list(tmp_path.rglob(f".{shard}.tmp-*")), "a file that failed its checksum must not remain"
    # A manifest written before CRC32 was recorded (SHA256 only, what S3 verified then) is checked with SHA256,
    # here written as S3 computes it (not by lmi-compile's code): the digest of each part's digest, "-<parts>".
    import base64
    import hashlib

    def s3_sha256(data: bytes, part: int) -> str:
        if len(data) <= part:
            return base64.b64encode(hashlib.sha256(data).digest()).decode()
        digests = b"".join(hashlib.sha256(data[o:o + part]).digest() for o in range(0, len(data), part))
        return f"{base64.b64encode(hashlib.sha256(digests).digest()).decode()}-{-(-len(data) // part)}"

    manifest = json.loads(s3_client.get_object(Bucket=u.bucket, Key=u.key(MANIFEST_KEY))["Body"].read())
    assert all(set(e) == {"size", "part_size", "checksum_crc32"} for e in manifest["objects"].values())
    for rel, e in manifest["objects"].items():
        e["checksum_sha256"] = s3_sha256((model / rel).read_bytes(), e["part_size"])
        del e["checksum_crc32"]
    assert any("-" in e["checksum_sha256"] for e in manifest["objects"].values())  # a multipart one (no - in base64)
    s3_client.put_object(Bucket=u.bucket, Key=u.key(MANIFEST_KEY), Body=json.dumps(manifest).encode())
    proc = run_cli("fetch", prefix, "--output", tmp_path / "bad-old")
    assert proc.returncode == 1 and shard in error_line(proc) and "sha256" in error_line(proc), proc.stderr
    s3_client.put_object(Bucket=u.bucket, Key=u.key(shard), Body=(model / shard).read_bytes())  # intact again
    proc = run_cli("fetch", prefix, "--output", tmp_path / "good-old")
    assert proc.returncode == 0, proc.stderr
    assert digests(tmp_path / "good-old") == digests(model)


def test_a_changed_object_of_one_part_is_refused_too(published, s3_client, tmp_path):
    """A small object (config, tokenizer: a single PUT, a plain checksum, no part count) is checked as a multipart
    one is: same size, other bytes, refused."""
    model, prefix = published
    u = parse_s3_uri(prefix)
    body = (model / "config.json").read_bytes()
    i = body.index(b": ") + 1
    other = body[:i] + b"\t" + body[i + 1:]  # same size, still JSON
    assert len(other) == len(body) and other != body
    s3_client.put_object(Bucket=u.bucket, Key=u.key("config.json"), Body=other)
    proc = run_cli("fetch", prefix, "--output", tmp_path / "out")
    assert proc.returncode == 1, proc.stderr
    assert "config.json" in error_line(proc) and "checksum" in error_line(proc)
    # another size than the manifest's: refused from the listing, before a byte of the weights comes
    s3_client.put_object(Bucket=u.bucket, Key=u.key("config.json"), Body=body + b" ")
    proc = run_cli("fetch", prefix, "--output", tmp_path / "sized")
    assert proc.returncode == 1, proc.stderr
    assert f"{len(body) + 1} bytes in S3 but {len(body)} in the upload manifest" in error_line(proc)
    assert "push it again" in error_line(proc)
    assert not list(tmp_path.glob(".sized.partial/*.safetensors"))


def test_a_finished_fetch_is_recorded_without_fsync(published, tmp_path, synced_paths):
    """The fetch's files are not synced (that would hold it to the disk's speed), so neither is its record: on ext4
    that fsync waited for every block the writeback had allocated, 0.4-1.0 s after an 18 GB fetch. The record
    still appears by rename, whole or not at all, and a rerun trusts it."""
    from lmi_compile.cli import app

    model, prefix = published
    out = tmp_path / "out"
    app(["fetch", prefix, "--output", str(out)], standalone_mode=False)
    assert digests(out) == digests(model)
    assert json.loads((out / ".lmi-compile-stage.json").read_text())["stage"] == "fetch"
    assert not [p for p in synced_paths if p.startswith(str(tmp_path))], synced_paths
    proc = run_cli("fetch", prefix, "--output", out)
    assert proc.returncode == 0 and "already in" in proc.stderr, proc.stderr


def test_interrupted_fetch_resumes_and_rechecks_kept_files(published, tmp_path):
    model, prefix = published
    out = tmp_path / "out"
    # held before the 2nd ranged GET of the weights (6 small files come first, one GET each): not all is in
    run = PausedCli("fetch", prefix, "--output", out, point="fetch-range#8", tmp_path=tmp_path)
    rc, err = run.signal(signal.SIGINT)
    assert rc == 130, err
    assert "interrupted by SIGINT" in err and "Traceback" not in err
    staging = tmp_path / ".out.partial"
    assert not list(staging.rglob("*.tmp-*")) and not out.exists()
    # a kept file that no longer matches the manifest (same size) is fetched again, not trusted on its size
    kept = staging / "config.json"
    assert kept.is_file()
    kept.write_bytes(kept.read_bytes().replace(b"{", b" ", 1))
    # a bad transfer setting is one line naming it; what was downloaded stays for the rerun that fixes it
    files = sorted(p.name for p in staging.iterdir())
    for setting in ("LMI_COMPILE_WRITE_KIB", "LMI_COMPILE_S3_CONNECTIONS"):
        bad = run_cli("fetch", prefix, "--output", out, env={setting: "32k"})
        assert bad.returncode == 2 and f"{setting}='32k'" in error_line(bad), bad.stderr
        assert sorted(p.name for p in staging.iterdir()) == files
    again = run_cli("fetch", prefix, "--output", out)
    assert again.returncode == 0, again.stderr
    assert digests(out) == digests(model)


class CuttingProxy:
    """A TCP proxy in front of the S3 server that cuts the first `cuts` responses running past `after` bytes:
    a connection dropped mid-body, as a real network drops it; and answers the first `slowdowns` presigned
    requests of `method` for a key holding `key` itself, with S3's throttling reply (503 SlowDown)."""

    def __init__(self, upstream: str, cuts: int = 0, after: int = 0, slowdowns: int = 0, method: bytes = b"GET",
                 key: bytes = b".safetensors"):
        import socket
        import threading
        from urllib.parse import urlsplit

        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.cuts, self.after, self.cut = cuts, after, 0
        self.slowdowns, self.slowed = slowdowns, 0
        self.method, self.key = method, key
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading

        while True:
            try:
                down, _ = self.sock.accept()
            except OSError:
                return
            first = b""
            if self.slowed < self.slowdowns:
                first = down.recv(65536)
                line = first.split(b"\r\n", 1)[0]
                with self.lock:
                    slow = (line.startswith(self.method) and self.key in line and b"X-Amz-Signature" in line
                            and self.slowed < self.slowdowns)
                    self.slowed += slow
                if slow:
                    body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    down.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                    down.close()
                    continue
            up = socket.create_connection(self.upstream)
            up.sendall(first)
            threading.Thread(target=self._pipe, args=(down, up, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, down, True), daemon=True).start()

    def _pipe(self, src, dst, response: bool):
        sent = 0
        try:
            while data := src.recv(1 << 16):
                if response and sent + len(data) > self.after:
                    with self.lock:
                        cut = self.cut < self.cuts
                        self.cut += cut
                    if cut:
                        dst.sendall(data[:self.after - sent])
                        break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(2)
            except OSError:
                pass
            s.close()

    def close(self):
        self.sock.close()


def test_two_fetches_into_one_folder_take_turns(published, tmp_path):
    """Before: both downloaded into one staging folder and renamed over each other. Now the second waits, then finds
    the first's fetch up to date."""
    import subprocess
    import sys
    import time

    model, prefix = published
    out = tmp_path / "models" / "tiny"
    first = PausedCli("fetch", prefix, "--output", out, point="fetch-range#2", tmp_path=tmp_path,
                      env={"LMI_COMPILE_TEST_PAUSE_RELEASE": str(tmp_path / "release")})
    with open(tmp_path / "second.err", "w") as err:
        second = subprocess.Popen([sys.executable, "-m", "lmi_compile", "fetch", prefix, "--output", str(out)],
                                  stderr=err, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while "waiting for another lmi-compile run" not in (tmp_path / "second.err").read_text():
            assert second.poll() is None and time.monotonic() < deadline, (tmp_path / "second.err").read_text()
            time.sleep(0.05)
        (tmp_path / "release").touch()
        assert first.proc.wait(timeout=120) == 0, first.stderr()
        assert second.wait(timeout=120) == 0, (tmp_path / "second.err").read_text()
    finally:
        for proc in (first.proc, second):
            if proc.poll() is None:
                proc.kill()
    assert "already in" in (tmp_path / "second.err").read_text()  # the first's, found up to date
    assert digests(out) == digests(model)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]


@pytest.mark.parametrize("fault", ["cut", "throttled"])
def test_a_range_dropped_or_throttled_is_retried(fault, published, s3_env, tmp_path, monkeypatch):
    """A connection that ends mid-range (a real one, cut by a proxy), or S3's throttling answer (503 SlowDown):
    the range is fetched again through the fetch's worker processes and the file is still verified."""
    from lmi_compile.remote.fetch import manifest_objects
    from lmi_compile.remote.s3 import download_files, list_objects, make_client

    model, prefix = published
    proxy = CuttingProxy(s3_env.endpoint, cuts=2, after=1 << 20) if fault == "cut" else \
        CuttingProxy(s3_env.endpoint, slowdowns=1)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
    try:
        client, u = make_client(), parse_s3_uri(prefix)
        objects = list_objects(client, u)
        weights = sorted(k for k in objects if k.endswith(".safetensors"))
        download_files(client, u, weights, tmp_path / "d", objects, desc="d", expect=manifest_objects(client, u))
    finally:
        proxy.close()
    assert (proxy.cut, proxy.slowed) == ((2, 0) if fault == "cut" else (0, 1))
    assert digests(tmp_path / "d") == {k: v for k, v in digests(model).items() if k in weights}
    assert not list((tmp_path / "d").glob(".*.tmp-*"))


def test_a_throttled_put_is_sent_again_and_one_refused_every_time_is_named(s3_env, s3_prefix, tmp_path,
                                                                           monkeypatch):
    """S3 answers PUTs to a busy prefix with 503 SlowDown: push signs and sends the part again, waiting longer each
    time, and once every attempt was refused says which object and what to do, in one line."""
    import types

    import lmi_compile.remote.s3 as s3
    from lmi_compile.errors import LmiCompileError
    from lmi_compile.remote.publish import push

    tree = tmp_path / "art"
    tree.mkdir()
    (tree / "rank0.engine").write_bytes(os.urandom(4096))
    waits = []
    monkeypatch.setattr(s3, "time", types.SimpleNamespace(sleep=waits.append))  # the back-off, not slept here
    for slowdowns, prefix in ((1, s3_prefix + "once/"), (s3.RANGE_ATTEMPTS, s3_prefix + "always/")):
        proxy = CuttingProxy(s3_env.endpoint, slowdowns=slowdowns, method=b"PUT", key=b"rank0.engine")
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        try:
            if slowdowns == 1:
                assert push(tree, prefix).uploaded == 1
            else:
                with pytest.raises(LmiCompileError, match=r"rank0\.engine: the PUT of bytes 0-4095 failed 5 times "
                                                          r"\(HTTP 503\); check the network and rerun to resume"):
                    push(tree, prefix)
        finally:
            proxy.close()
        assert proxy.slowed == slowdowns
    assert waits == [0.2, 0.2, 0.4, 0.8, 1.6]


def test_ranged_gets_run_in_worker_processes(published, s3_env, tmp_path):
    """The shipped engine: big ranges go to worker processes (remote/getter.py) that exit once the download is
    done; a request error there comes back as one translated line."""
    import psutil

    from lmi_compile.errors import LmiCompileError
    from lmi_compile.remote.s3 import Getters, download_files, list_objects, make_client

    _, prefix = published
    client, u = make_client(), parse_s3_uri(prefix)
    objects = list_objects(client, u)
    weights = sorted(k for k in objects if k.endswith(".safetensors"))
    getters = Getters(client, processes=2, in_process=False)
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in getters.presign(u, weights[0])  # SigV4: every region accepts it
    try:
        download_files(client, u, weights, tmp_path / "d", objects, desc="d", getters=getters)
        procs = list(getters._all)
        assert procs and all("getter.py" in " ".join(psutil.Process(p.pid).cmdline()) for p in procs)
        # an object deleted after the listing: the worker's 404 becomes the fetch's error line
        gone = dict(objects, **{"missing.safetensors": 10 << 20})
        with pytest.raises(LmiCompileError, match=r"missing.safetensors: removed from S3 after the listing \(NoSuchKey"):
            download_files(client, u, ["missing.safetensors"], tmp_path / "e", gone, desc="e", getters=getters)
    finally:
        getters.close()
    assert all(p.poll() is not None for p in procs)
    assert not list((tmp_path / "e").glob(".*.tmp-*"))


def test_a_put_whose_bytes_do_not_match_its_signed_checksum_is_refused(s3_env, tmp_path):
    """Push's PUTs go through the same workers; the checksum is a signed header, and the server checks the bytes
    against it: a part announced with another part's SHA256 is refused (BadDigest), not stored; a file changed
    between its hashing and its sending is refused before the request completes, with the reason."""
    import base64
    import os
    import time

    from lmi_compile.remote.s3 import Getters, make_client

    client = make_client()
    data = tmp_path / "part.bin"
    data.write_bytes(os.urandom(5 << 20))
    getters = Getters(client, processes=1, in_process=False)
    task = {"op": "put", "path": str(data), "offset": 0, "size": 5 << 20, "algorithms": ["sha256", "crc32"]}

    def sign(reply, tamper):
        digest = bytearray(bytes.fromhex(reply["digests"]["sha256"]))
        digest[0] ^= tamper
        b64 = base64.b64encode(bytes(digest)).decode()
        url = client.generate_presigned_url("put_object", Params={"Bucket": "models", "Key": "put-check/p",
                                                                  "ChecksumSHA256": b64}, ExpiresIn=60)
        return {"url": url, "headers": {"x-amz-checksum-sha256": b64}}

    try:
        bad = getters.run(task, then=lambda r: sign(r, 1))
        assert not bad["ok"] and bad["status"] == 400 and "BadDigest" in bad["body"], bad
        good = getters.run(task, then=lambda r: sign(r, 0))
        assert good["ok"] and good["etag"], good
        assert len(getters._all) == 1  # a 5 MiB PUT runs in a worker process, not in this one
        stored = data.read_bytes()

        def change_then_sign(reply):  # the worker sends the bytes from the file after hashing them
            time.sleep(0.02)  # past the clock tick of the hash (coarse file timestamps)
            with open(data, "r+b") as f:
                f.write(b"changed")
            return sign(reply, 0)

        changed = getters.run(task, then=change_then_sign)
        assert not changed["ok"] and changed["kind"] == "disk", changed
        assert "changed during upload" in changed["error"] and str(data) in changed["error"], changed
    finally:
        getters.close()
    assert client.get_object(Bucket="models", Key="put-check/p")["Body"].read() == stored


def rank_tensors(folder: Path) -> dict:
    """Each rank file's tensors (the header's metadata carries a fingerprint of the source files' identity)."""
    from safetensors.torch import load_file

    return {p.name: load_file(p) for p in sorted(folder.glob("rank*.safetensors"))}


def same_tensors(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(
        a[f].keys() == b[f].keys() and all(torch.equal(a[f][k], b[f][k]) for k in a[f]) for f in a)


@pytest.fixture(scope="module")
def reference_ranks(model_factory, tmp_path_factory):
    """The rank files of a convert of the local model (the one `published` pushes)."""
    work = tmp_path_factory.mktemp("ref")
    proc = run_cli("trtllm", model_factory(shards=2, **MULTIPART), "--tp", "2", "--until", "convert", "--work-dir", work)
    assert proc.returncode == 0, proc.stderr
    return rank_tensors(work / "checkpoint")


def later_ranges_slowed(monkeypatch, seconds: float) -> None:
    """GETs of 5 MiB (a part each), every range after a file's first `seconds` late: the convert must wait for them."""
    import time

    import lmi_compile.remote.s3 as s3

    monkeypatch.setattr(s3, "RANGE_BYTES", 5 << 20)
    real_get = s3._get_parts

    def slow_get(getters, uri, t, first, count, bar):
        if first:
            time.sleep(seconds)
        return real_get(getters, uri, t, first, count, bar)

    monkeypatch.setattr(s3, "_get_parts", slow_get)


def test_trtllm_converts_while_the_model_downloads(published, reference_ranks, tmp_path, monkeypatch):
    """Ranges of 5 MiB, the later ones slowed down: convert tasks start on the headers and wait for their
    tensors' bytes; the rank files equal a convert of the local model, the later stages (stand-in build,
    layout) use the verified source folder, and a rerun finds every stage done."""

    import lmi_compile.remote.streaming as streaming
    from lmi_compile.cli import app

    _, prefix = published
    later_ranges_slowed(monkeypatch, 0.15)
    waited = []
    real_wait = streaming.ArrivingModel.wait_range

    arriving = []

    def counting_wait(self, rel, start, end):
        with self._cv:
            there = any(s <= start and end <= e for s, e in self._ranges.get(rel, []))
        arriving.append(self)
        real_wait(self, rel, start, end)
        waited.append((not there, self.done))

    monkeypatch.setattr(streaming.ArrivingModel, "wait_range", counting_wait)
    work, out = tmp_path / "w", tmp_path / "out"
    args = ["trtllm", prefix, "--tp", "2", "--work-dir", str(work), "--output", str(out), "--trtllm-build",
            str(Path(__file__).parent / "standins" / "trtllm-build")]
    app(args, standalone_mode=False)
    assert any(w for w, _ in waited), "no convert task had to wait: the convert did not overlap the download"
    # and a wait ended on its bytes landing, not on the whole fetch ending (ranges reported wrong: no overlap)
    assert any(w and not done for w, done in waited), waited
    a = arriving[0]  # every byte was reported as it landed: each file's ranges merge into the whole file
    assert a._ranges and all(r == [(0, a.sizes[rel])] for rel, r in a._ranges.items()), a._ranges
    assert same_tensors(rank_tensors(work / "checkpoint"), reference_ranks)
    assert not (work / ".source.arriving").exists() and (work / "source" / "config.json").is_file()
    assert (out / "tokenizer.json").read_bytes() == (work / "source" / "tokenizer.json").read_bytes()
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert "already in" in again.stderr and "convert: " in again.stderr and "is up to date, skipping" in again.stderr


def test_convert_fed_a_corrupt_download_is_never_recorded(published, s3_client, tmp_path):
    model, prefix = published
    u = parse_s3_uri(prefix)
    shard = "model-00001-of-00002.safetensors"
    body = bytearray((model / shard).read_bytes())
    body[-1000] ^= 0xFF  # tensor bytes, not the header: the convert reads it without noticing
    s3_client.put_object(Bucket=u.bucket, Key=u.key(shard), Body=bytes(body))
    work = tmp_path / "w"
    proc = run_cli("trtllm", prefix, "--tp", "2", "--until", "convert", "--work-dir", work)
    assert proc.returncode == 1, proc.stderr
    assert shard in error_line(proc) and "checksum" in error_line(proc)
    assert not (work / "checkpoint").exists() and not (work / "source").exists()
    assert not (work / ".source.arriving").exists() and not list(work.rglob("*.tmp-*"))


def test_sigterm_while_converting_from_s3_then_resume(published, reference_ranks, tmp_path):
    _, prefix = published
    work = tmp_path / "w"
    args = ("trtllm", prefix, "--tp", "2", "--until", "convert", "--work-dir", work)
    run = PausedCli(*args, point="fetch-range#8", tmp_path=tmp_path)  # 6 small files, then the weights
    rc, err = run.signal(signal.SIGTERM)
    assert rc == 143, err
    assert "Traceback" not in err
    assert not list(work.rglob("*.tmp-*")) and not (work / ".source.arriving").exists()
    assert not (work / "checkpoint").exists()
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert same_tensors(rank_tensors(work / "checkpoint"), reference_ranks)


def test_no_hard_links_means_convert_after_download(tmp_path, monkeypatch):
    """A filesystem that refuses hard links: the convert does not read the arriving files, it waits for the
    finished fetch instead (no error)."""
    import os

    from lmi_compile.remote.streaming import ArrivingModel

    def refuse(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)
    arriving = ArrivingModel(tmp_path / "view")
    (tmp_path / "f.tmp").write_bytes(b"x")
    arriving.opened("model.safetensors", tmp_path / "f.tmp")
    assert arriving.unlinkable and arriving.wait_weights() == []


def test_no_keep_source_leaves_one_copy_and_reruns(published, reference_ranks, tmp_path):
    """--no-keep-source: after the convert (fed while the model downloads) the fetched weights are gone, config and
    tokenizer stay; a rerun finds the convert done; a stage that needs the weights again (a neuron split in the
    same work dir) fetches them again, verified, and removes them after it."""
    model, prefix = published
    work = tmp_path / "w"
    args = ("trtllm", prefix, "--tp", "2", "--until", "convert", "--work-dir", work, "--no-keep-source")
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert same_tensors(rank_tensors(work / "checkpoint"), reference_ranks)
    kept = sorted(p.name for p in (work / "source").iterdir() if not p.name.startswith("."))
    assert kept == sorted(p.name for p in model.iterdir() if not p.name.endswith(".safetensors")), kept
    assert "tokenizer.json" in kept and "model.safetensors.index.json" in kept
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".") and p.is_dir()) == []  # no partial copy
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert "is up to date, skipping" in again.stderr
    assert not list((work / "source").glob("*.safetensors"))
    split = run_cli("neuron", prefix, "--tp", "2", "--until", "split", "--work-dir", work, "--no-keep-source")
    assert split.returncode == 0, split.stderr
    # the split reads the model as it lands too, and consumed the shards it fetched again
    assert "fetching them again" in split.stderr and "2 weight file(s) removed" in split.stderr
    assert any((work / "split").iterdir()) and not list((work / "source").glob("*.safetensors"))


def test_no_keep_source_rerun_that_goes_on_to_build_stops_the_download(published, tmp_path, monkeypatch):
    """--no-keep-source, converted already (a build failed, say): a rerun that goes on to build finds the convert up
    to date and stops the download it started, instead of bringing the whole model again to delete it. The build
    and layout still get the config and tokenizer."""
    import lmi_compile.remote.s3 as s3
    import lmi_compile.remote.streaming as streaming
    from lmi_compile.cli import app

    model, prefix = published
    work = tmp_path / "w"
    args = ["trtllm", prefix, "--tp", "2", "--work-dir", str(work), "--no-keep-source"]
    assert run_cli(*args, "--until", "convert").returncode == 0
    # one connection and 5 MiB ranges: after each shard's first range (its header, which the up-to-date check
    # reads) its later ranges come one at a time, each held until the download is dropped (at most 60 s)
    monkeypatch.setenv("LMI_COMPILE_S3_CONNECTIONS", "1")
    monkeypatch.setattr(s3, "RANGE_BYTES", 5 * 1024 * 1024)
    dropped, started_after = threading.Event(), []
    real_get, real_drop = s3._get_parts, streaming.StreamingFetch.drop_weights

    def held_back(getters, uri, t, first, count, bar):
        if first and t.rel.endswith(".safetensors"):
            if dropped.is_set():
                started_after.append((t.rel, first))
            else:
                dropped.wait(60)
        return real_get(getters, uri, t, first, count, bar)

    def drop_weights(self):
        dropped.set()
        return real_drop(self)

    monkeypatch.setattr(s3, "_get_parts", held_back)
    monkeypatch.setattr(streaming.StreamingFetch, "drop_weights", drop_weights)
    app([*args, "--trtllm-build", str(Path(__file__).parent / "standins" / "trtllm-build"), "--output",
         str(tmp_path / "out")], standalone_mode=False)
    # at most the range its worker had taken already starts once the convert is found up to date; before, all
    # four later ranges were fetched, to be deleted after
    assert dropped.is_set() and len(started_after) <= 1, started_after
    assert (tmp_path / "out" / "rank0.engine").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()
    assert not list((work / "source").glob("*.safetensors"))
    assert json.loads((work / "source" / ".lmi-compile-stage.json").read_text())["weights_removed"]
    assert not [p for p in work.iterdir() if p.name.startswith(".source")]  # no partial copy or view left


def slowed_gets(monkeypatch, slow: str, seconds: float, last_waits_for=None) -> None:
    """Ranges of 5 MiB; every range of the files whose names hold `slow` (after their header) arrives late. With
    `last_waits_for` (an Event), their last range waits for it too (at most 60 s), so such a file is never complete
    before it is set, however slowly a loaded machine runs the rest."""
    import time

    import lmi_compile.remote.s3 as s3

    monkeypatch.setattr(s3, "RANGE_BYTES", 5 * 1024 * 1024)
    real_get = s3._get_parts

    def slow_get(client, uri, t, first, count, bar):
        if first and slow in t.rel:
            time.sleep(seconds)
            if last_waits_for is not None and first + count == len(t.parts):
                last_waits_for.wait(60)
        return real_get(client, uri, t, first, count, bar)

    monkeypatch.setattr(s3, "_get_parts", slow_get)


@pytest.fixture
def published4(s3_env, s3_prefix, model_factory):
    return publish(model_factory(shards=4, **MULTIPART), s3_prefix)


def test_no_keep_source_removes_each_shard_after_its_last_read(published4, model_factory, tmp_path, monkeypatch):
    """--no-keep-source with a convert fed as the model lands: a shard goes as soon as it is verified and every
    task reading it is done, while later shards are still downloading (the source on disk never becomes a
    second copy of the model); the rank files equal a convert of the local model; the fetch is recorded as
    consumed (config and tokenizer kept), and a rerun finds the convert done."""
    import lmi_compile.remote.streaming as streaming
    from lmi_compile.cli import app

    model, prefix = published4
    # the last shard lands after a first shard is removed (or after 60 s, and the test fails): on a loaded machine a
    # fixed delay let every shard land before the convert had finished with one
    removed = threading.Event()
    slowed_gets(monkeypatch, "-00004-of-", 0.4, last_waits_for=removed)
    # four connections: the slowed ranges of the last shard wait behind the others, as a big model's later shards
    # wait behind its first ones (with 16, this tiny model's twelve ranges would all be in flight at once)
    monkeypatch.setenv("LMI_COMPILE_S3_CONNECTIONS", "4")
    removals = []
    real_remove = streaming.ArrivingModel._remove

    def recording_remove(self, rel):  # in the remover thread: what was verified when the file went
        with self._cv:
            removals.append((rel, set(self._verified)))
        try:
            return real_remove(self, rel)
        finally:
            removed.set()

    monkeypatch.setattr(streaming.ArrivingModel, "_remove", recording_remove)
    ref = tmp_path / "ref"
    assert run_cli("trtllm", model, "--tp", "2", "--until", "convert", "--work-dir", ref).returncode == 0
    work = tmp_path / "w"
    args = ["trtllm", prefix, "--tp", "2", "--until", "convert", "--work-dir", str(work), "--no-keep-source"]
    app(args, standalone_mode=False)
    shards = sorted(p.name for p in model.glob("*.safetensors"))
    assert sorted(rel for rel, _ in removals) == shards
    first, verified_then = removals[0]
    # gone before the last shard landed (which of the first three goes first is the convert's order)
    assert first != shards[-1] and shards[-1] not in verified_then, removals
    assert same_tensors(rank_tensors(work / "checkpoint"), rank_tensors(ref / "checkpoint"))
    kept = sorted(p.name for p in (work / "source").iterdir() if not p.name.startswith("."))
    assert kept == sorted(p.name for p in model.iterdir() if not p.name.endswith(".safetensors")), kept
    rec = json.loads((work / "source" / ".lmi-compile-stage.json").read_text())
    assert rec["stage"] == "fetch" and rec["fingerprint"] is None and rec["weights_removed"] == shards
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".") and p.is_dir()) == []
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert "is up to date, skipping" in again.stderr and not list(work.rglob("*.safetensors.tmp-*"))


def test_no_keep_source_downloads_only_so_far_ahead_of_the_convert(s3_env, s3_prefix, model_factory, tmp_path,
                                                                   monkeypatch):
    """A consumed model's download starts a shard only while the shards started and not yet removed stay within the
    lead (here 1 MiB, less than a shard: one at a time), or when a convert task waits on it: downloaded far ahead,
    shards pass the kernel's writeback mark and are written to disk only to be deleted. Before, every shard
    started at once. A held-back shard brings only its head (for its header), not its first range (a part, here 5
    MiB; 64 MiB by default)."""
    import lmi_compile.remote.s3 as s3
    import lmi_compile.remote.streaming as streaming
    from lmi_compile.cli import app

    # four shards of 3-4 parts (5 MiB), a GET per part: a file's ranges after its first wait for the lead
    model, prefix = publish(model_factory(shards=4, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2,
                                          intermediate_size=2048, vocab_size=8000, dtype="bfloat16"), s3_prefix)
    monkeypatch.setattr(s3, "RANGE_BYTES", 1)
    monkeypatch.setenv("LMI_COMPILE_STREAM_LEAD_MIB", "1")
    admissions = []
    real_admit = streaming.ArrivingModel.admit

    def recording_admit(self, rel, size, first):
        with self._cv:
            held = {r for r in self._admitted if r not in self.removed}
            wanted = rel in self._wanted
        ok = real_admit(self, rel, size, first)
        if ok and rel.endswith(".safetensors") and rel not in held:
            admissions.append((rel, held, wanted))
        return ok

    early = []  # bytes of a shard that landed before it was admitted: its head only (the header), 1 MiB
    real_arrived = streaming.ArrivingModel.arrived

    def recording_arrived(self, rel, start, end):
        with self._cv:
            if rel.endswith(".safetensors") and rel not in self._admitted:
                early.append((rel, start, end))
        return real_arrived(self, rel, start, end)

    monkeypatch.setattr(streaming.ArrivingModel, "admit", recording_admit)
    monkeypatch.setattr(streaming.ArrivingModel, "arrived", recording_arrived)
    work = tmp_path / "w"
    app(["trtllm", prefix, "--tp", "2", "--until", "convert", "--work-dir", str(work), "--no-keep-source"],
        standalone_mode=False)
    shards = sorted(p.name for p in model.glob("*.safetensors"))
    assert sorted(rel for rel, _, _ in admissions) == shards
    # shards 2-4 were held back until shard 1 was converted, which needs every header: their heads came first
    assert {rel for rel, _, _ in early} == set(shards[1:])
    assert all(start == 0 and end == streaming.HEAD_BYTES for _, start, end in early), early
    for rel, held, wanted in admissions:  # each started on an empty lead, or because the convert waited on it
        assert not held or wanted, admissions
    assert admissions[0][0] == shards[0]  # in order, save what the convert asked for
    ref = tmp_path / "ref"
    assert run_cli("trtllm", model, "--tp", "2", "--until", "convert", "--work-dir", ref).returncode == 0
    assert same_tensors(rank_tensors(work / "checkpoint"), rank_tensors(ref / "checkpoint"))


def test_the_lead_holds_back_safetensors_shards_only(tmp_path):
    """Pickled weights are deleted only at the end: held back they would only come one at a time, each when the
    convert waits on it. A shard waits for room; none is held once the first is removed."""
    from lmi_compile.remote.streaming import ArrivingModel

    a = ArrivingModel(tmp_path)
    a.lead = 100
    a.weights(["a.bin", "b.bin", "s1.safetensors", "s2.safetensors"])
    assert a.admit("a.bin", 10_000, first=False) and a.admit("b.bin", 10_000, first=True)
    assert a.admit("s1.safetensors", 1_000, first=True)  # nothing held
    assert not a.admit("s2.safetensors", 50, first=True)  # 1,050 bytes held would pass the lead
    with a._cv:
        a.reads = {}
        a._verified.add("s1.safetensors")
        a._release("s1.safetensors")  # converted and verified: removed
    assert a.admit("s2.safetensors", 50, first=True)
    a.removals_done(stop=True)


def test_room_alone_admits_only_the_first_shard_still_waiting(tmp_path):
    """Shards start in order: a later, smaller one that would fit must not jump ahead of the first still waiting
    (it would hold lead room until the convert reaches it)."""
    from lmi_compile.remote.streaming import ArrivingModel

    a = ArrivingModel(tmp_path)
    a.lead = 100
    a.weights(["s1.safetensors", "s2.safetensors", "s3.safetensors"])
    assert a.admit("s1.safetensors", 60, first=True)
    assert not a.admit("s2.safetensors", 60, first=True)
    assert not a.admit("s3.safetensors", 30, first=False)  # fits, but s2 waits before it


def test_a_consumed_shard_frees_its_blocks_while_a_reader_still_holds_it(tmp_path):
    """The convert's reader keeps each shard open to the end: the shard is truncated, not only unlinked, or its
    blocks stay taken and the disk holds the whole model at the peak."""
    from lmi_compile.remote.streaming import ArrivingModel

    view, staging = tmp_path / "view", tmp_path / "staging"
    staging.mkdir()
    view.mkdir()
    (staging / "a.safetensors").write_bytes(b"x" * 65536)
    os.link(staging / "a.safetensors", view / "a.safetensors")
    reader = os.open(view / "a.safetensors", os.O_RDONLY)
    try:
        a = ArrivingModel(view, staging)
        a.weights(["a.safetensors"])
        a.plan_reads(["a.safetensors"])
        a.verified("a.safetensors", staging / "a.safetensors")
        a.read_done("a.safetensors")
        a.removals_done(stop=True)
        assert not (staging / "a.safetensors").exists() and not (view / "a.safetensors").exists()
        assert os.fstat(reader).st_size == 0
    finally:
        os.close(reader)


def test_a_consumed_shard_goes_only_once_verified(tmp_path):
    """Read to its end is not enough: a shard is deleted once the fetch has also checked it (deleted before, the
    download would go on writing into a truncated temporary and name it)."""
    from lmi_compile.remote.streaming import ArrivingModel

    view, staging = tmp_path / "view", tmp_path / "staging"
    staging.mkdir()
    tmp = staging / ".a.safetensors.tmp-1"
    tmp.write_bytes(b"x" * 4096)
    a = ArrivingModel(view, staging)
    a.weights(["a.safetensors"])
    a.plan_reads(["a.safetensors"])
    a.opened("a.safetensors", tmp)
    a.arrived("a.safetensors", 0, 4096)
    a.read_done("a.safetensors")
    a.removals_done()
    assert a.removed == [] and tmp.stat().st_size == 4096
    tmp.rename(staging / "a.safetensors")
    a.verified("a.safetensors", staging / "a.safetensors")
    a.removals_done(stop=True)
    assert a.removed == ["a.safetensors"] and not (staging / "a.safetensors").exists()


def test_a_pickled_model_of_several_ranges_converts_while_it_downloads(s3_env, s3_prefix, model_factory, tmp_path,
                                                                        monkeypatch):
    """Pickles are read whole (torch's loader): the convert waits for a .bin file's every byte, not its first
    range. Rank files equal a local convert's."""

    from lmi_compile.cli import app

    model, prefix = publish(model_factory(fmt="bin", shards=2, **MULTIPART), s3_prefix)
    assert all(p.stat().st_size > 5 << 20 for p in model.glob("*.bin"))  # several ranges each
    later_ranges_slowed(monkeypatch, 0.3)
    ref = tmp_path / "ref"
    assert run_cli("trtllm", model, "--tp", "2", "--until", "convert", "--work-dir", ref).returncode == 0
    work = tmp_path / "w"
    app(["trtllm", prefix, "--tp", "2", "--until", "convert", "--work-dir", str(work)], standalone_mode=False)
    assert same_tensors(rank_tensors(work / "checkpoint"), rank_tensors(ref / "checkpoint"))


def test_neuron_splits_while_the_model_downloads(published4, model_factory, tmp_path, monkeypatch):
    """neuron s3://... --until split reads tensors as they land (a task waits for bytes still downloading); the
    split weights equal those of the local model's split, and the stage is recorded once the fetch is verified
    (a rerun skips both)."""
    import torch

    import lmi_compile.remote.streaming as streaming
    from lmi_compile.cli import app

    model, prefix = published4
    slowed_gets(monkeypatch, "-of-", 0.15)
    waited = []
    real_wait = streaming.ArrivingModel.wait_range

    def counting_wait(self, rel, start, end):
        with self._cv:
            waited.append(not any(s <= start and end <= e for s, e in self._ranges.get(rel, [])))
        return real_wait(self, rel, start, end)

    monkeypatch.setattr(streaming.ArrivingModel, "wait_range", counting_wait)
    ref = tmp_path / "ref"
    assert run_cli("neuron", model, "--tp", "2", "--until", "split", "--work-dir", ref).returncode == 0
    work = tmp_path / "w"
    args = ["neuron", prefix, "--tp", "2", "--until", "split", "--work-dir", str(work)]
    app(args, standalone_mode=False)
    assert any(waited), "no split task had to wait: the split did not overlap the download"
    ours, theirs = work / "split" / "pytorch_model.bin", ref / "split" / "pytorch_model.bin"
    assert (ours / "key_to_filename.json").read_text() == (theirs / "key_to_filename.json").read_text()
    names = sorted(p.name for p in theirs.iterdir())
    assert sorted(p.name for p in ours.iterdir()) == names and len(names) > 10
    for name in names:
        if name != "key_to_filename.json":
            assert torch.equal(torch.load(ours / name), torch.load(theirs / name)), name
    assert sorted(p.name for p in (work / "source").glob("*.safetensors")) == \
        sorted(p.name for p in model.glob("*.safetensors"))  # kept: no --no-keep-source
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert "already in" in again.stderr and "is up to date, skipping" in again.stderr


def test_split_fed_a_corrupt_download_is_never_kept(published4, s3_client, tmp_path, monkeypatch):
    """A split that read bytes failing the manifest's checksum (the last shard, whose last range is held until the
    split has written a file) is neither recorded nor kept for a rerun, which would otherwise keep every file
    already written."""
    from lmi_compile.cli import app
    from lmi_compile.errors import LmiCompileError

    model, prefix = published4
    u = parse_s3_uri(prefix)
    shard = "model-00004-of-00004.safetensors"
    body = bytearray((model / shard).read_bytes())
    body[-1000] ^= 0xFF
    s3_client.put_object(Bucket=u.bucket, Key=u.key(shard), Body=bytes(body))
    # the corrupt shard's last range lands only once the split has written a file (or after 60 s)
    import torch

    written, real_save = threading.Event(), torch.save

    def save(*args, **kwargs):
        real_save(*args, **kwargs)
        written.set()

    monkeypatch.setattr(torch, "save", save)
    slowed_gets(monkeypatch, "-00004-of-", 0.4, last_waits_for=written)
    work = tmp_path / "w"
    with pytest.raises(LmiCompileError, match="checksum") as e:
        app(["neuron", prefix, "--tp", "2", "--until", "split", "--work-dir", str(work)], standalone_mode=False)
    assert shard in str(e.value) and written.is_set()
    assert not (work / "split").exists() and not (work / ".split.partial").exists()
    assert not (work / ".source.arriving").exists()


@pytest.fixture(params=["http", "https"])
def scheme(request, s3_env, tmp_path, monkeypatch):
    """The loopback server as it is, and behind TLS as real S3 is reached, its certificate signed by a private CA
    that AWS_CA_BUNDLE names (servers/tls.py)."""
    if request.param == "http":
        yield request.param
        return
    from servers.tls import TlsProxy

    proxy = TlsProxy(s3_env.port, tmp_path / "tls")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(proxy.cert))
    try:
        yield request.param
    finally:
        proxy.stop()


@pytest.mark.parametrize("processes", ["0", "1"])
def test_push_and_fetch_in_either_engine(processes, scheme, s3_prefix, s3_client, model_factory, tmp_path,
                                         monkeypatch):
    """The transfer code runs in worker processes on many cores and in threads of the CLI's own process on few
    (LMI_COMPILE_TRANSFER_PROCESSES forces one): each engine pushes and fetches byte for byte, over http and over
    TLS (where a PUT is sent from the file a buffer at a time), and refuses an object whose bytes are not the
    manifest's."""
    monkeypatch.setenv("LMI_COMPILE_TRANSFER_PROCESSES", processes)
    model = model_factory(shards=2, **MULTIPART)
    proc = run_cli("push", model, s3_prefix, "--part-size-mb", "5")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("fetch", s3_prefix, "--output", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert digests(tmp_path / "out") == digests(model)
    u, shard = parse_s3_uri(s3_prefix), "model-00001-of-00002.safetensors"
    body = bytearray((model / shard).read_bytes())
    body[-1] ^= 0xFF
    s3_client.put_object(Bucket=u.bucket, Key=u.key(shard), Body=bytes(body))
    proc = run_cli("fetch", s3_prefix, "--output", tmp_path / "bad")
    assert proc.returncode == 1, proc.stderr
    assert shard in error_line(proc) and "checksum" in error_line(proc)
    assert not (tmp_path / "bad" / shard).exists()


def test_an_untrusted_endpoint_certificate_is_one_line(s3_env, tmp_path, monkeypatch):
    """An HTTPS endpoint whose CA the machine does not trust (no AWS_CA_BUNDLE): one line that names the fix."""
    from servers.tls import TlsProxy

    proxy = TlsProxy(s3_env.port, tmp_path / "tls")
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
        proc = run_cli("fetch", "s3://models/any/", "--output", tmp_path / "untrusted")
        assert proc.returncode == 2, proc.stderr
        assert "certificate is not trusted" in error_line(proc) and "AWS_CA_BUNDLE" in error_line(proc)
        assert not (tmp_path / "untrusted").exists()
    finally:
        proxy.stop()


def test_engine_choice_follows_the_cores(monkeypatch):
    import os

    from lmi_compile.remote import s3

    monkeypatch.delenv("LMI_COMPILE_TRANSFER_PROCESSES", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert not s3.use_processes() and s3.Getters(None).in_process
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert s3.use_processes() and not s3.Getters(None).in_process
    monkeypatch.setenv("LMI_COMPILE_TRANSFER_PROCESSES", "0")
    assert not s3.use_processes()


@pytest.mark.parametrize("setting,workers", [("3", 3), (None, 16)])
def test_fetch_keeps_its_connection_count_of_workers(setting, workers, published, tmp_path, monkeypatch):
    """S3 serves one connection at about 85 MB/s, so the fetch's rate there is its connection count: 16 by default
    (two per core, 16 to 64), LMI_COMPILE_S3_CONNECTIONS to set it. Seen from outside: the worker processes the
    paused CLI runs (LMI_COMPILE_TRANSFER_PROCESSES=1: processes, each one connection, on any machine)."""
    import time

    import psutil

    model, prefix = published
    monkeypatch.setenv("LMI_COMPILE_TRANSFER_PROCESSES", "1")
    if setting:
        monkeypatch.setenv("LMI_COMPILE_S3_CONNECTIONS", setting)
    else:
        monkeypatch.delenv("LMI_COMPILE_S3_CONNECTIONS", raising=False)
    run = PausedCli("fetch", prefix, "--output", tmp_path / "out", point="fetch-range#8", tmp_path=tmp_path)
    try:
        cli = psutil.Process(run.proc.pid)
        counts = []
        for _ in range(100):  # the workers start from a thread of the CLI: give them time to all be there
            counts.append(sum("getter.py" in " ".join(c.cmdline()) for c in cli.children()))
            if counts[-1] >= workers and len(counts) > 20:
                break
            time.sleep(0.05)
        assert max(counts) == workers, counts
    finally:
        run.proc.kill()
        run.proc.wait()


def test_a_bad_connection_count_is_one_clear_error(published, tmp_path, monkeypatch):
    _, prefix = published
    monkeypatch.setenv("LMI_COMPILE_S3_CONNECTIONS", "lots")
    proc = run_cli("fetch", prefix, "--output", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert error_line(proc) == ("error: LMI_COMPILE_S3_CONNECTIONS='lots': give a whole number from 1 to 256")
    assert not (tmp_path / "out").exists()


def test_transfer_workers_check_crc32_with_isal_and_it_equals_zlibs():
    """Workers start without site-packages (-I -S), so they are told where isal lies; without it they would
    silently verify at zlib's speed (5 GB/s a core against ISA-L's 85 here)."""
    import os
    import zlib

    from lmi_compile.remote import getter
    from lmi_compile.remote.s3 import Getters

    data = os.urandom(3 << 20)
    assert getter.crc32(data[1000:], getter.crc32(data[:1000])) == zlib.crc32(data)  # chained, as parts are
    getters = Getters(None, processes=1, in_process=False)
    try:
        assert getters._ask(getters._spawn(), {"op": "info"}) == {"ok": True, "crc32": "isal.isal_zlib"}
    finally:
        getters.close()


@pytest.mark.parametrize("features, forced, expected", [
    ("0110010100000000", None, 32 << 10),  # free page reporting negotiated (this CI machine's balloon)
    ("0110000100000000", None, 256 << 10),  # a balloon without it: a whole chunk
    (None, None, 256 << 10),  # no balloon (the 16-core GPU host)
    ("0110010100000000", 128, 128 << 10),
    (None, 4096, 256 << 10),  # never more than a chunk
])
def test_write_size_is_small_only_where_freed_memory_goes_back_to_the_hypervisor(tmp_path, features, forced,
                                                                                  expected):
    from lmi_compile.remote.getter import write_size

    if features:
        (tmp_path / "virtio3").mkdir()
        (tmp_path / "virtio3" / "features").write_text(features + "0" * 48 + "\n")
    assert write_size(forced, str(tmp_path)) == expected


def test_a_bad_write_size_setting_is_one_line_naming_it(monkeypatch):
    """LMI_COMPILE_WRITE_KIB is read where a transfer starts, in this process: a bad value is refused there (the
    worker that writes has no error path of its own, and ignored it)."""
    from lmi_compile.remote.s3 import BadInput, Getters

    monkeypatch.setenv("LMI_COMPILE_WRITE_KIB", "64")
    assert Getters(None).write == 64 << 10
    for bad in ("32k", "0", "-1"):
        monkeypatch.setenv("LMI_COMPILE_WRITE_KIB", bad)
        with pytest.raises(BadInput, match=f"LMI_COMPILE_WRITE_KIB='{bad}': give a whole number from 1 to "):
            Getters(None)


def test_the_s3_client_asks_botocore_for_its_one_service_not_the_list_of_all(s3_env, monkeypatch):
    """make_client answers botocore's "is this service known?" by looking the name up (its ~420 service folders
    were listed twice per client); every other service, STS for credentials included, is still known."""
    import os

    import botocore.session
    from botocore.exceptions import UnknownServiceError

    from lmi_compile.remote.s3 import look_up_services_by_name, make_client

    listed = []
    real = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p=".": listed.append(p) or real(p))
    assert make_client().list_buckets()["Buckets"] is not None
    assert len(listed) < 10, len(listed)
    monkeypatch.setattr(os, "listdir", real)
    session = botocore.session.get_session()
    look_up_services_by_name(session)
    known = session.get_component("data_loader").list_available_services("service-2")
    assert "sts" in known and "s3" in known and "no-such-service" not in known and len(list(known)) > 100
    assert session.create_client("sts", region_name="us-east-1").meta.service_model.service_name == "sts"
    with pytest.raises(UnknownServiceError):
        session.create_client("no-such-service", region_name="us-east-1")


def test_workers_of_a_fetch_read_as_it_lands_yield_the_cores_to_the_reader(published, tmp_path, monkeypatch):
    """A convert reading the model while it downloads is the command's critical path (torch's import first): the
    transfer workers run niced then (fetch.BESIDE_A_CONSUMER_NICE; on the 16-core host a streaming convert took
    12.15 s against 12.77 s without), and a plain fetch's do not."""
    import os

    from lmi_compile.remote import fetch, s3

    getters = s3.Getters(None, processes=1, in_process=False, nice=7)
    try:
        proc = getters._spawn()
        assert getters._ask(proc, {"op": "info"})["ok"]  # past its start
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 7)
    finally:
        getters.close()

    asked = []
    real = s3.Getters.__init__

    def record(self, *a, **k):
        asked.append(k.get("nice", 0))
        real(self, *a, **k)

    monkeypatch.setattr(s3.Getters, "__init__", record)

    class Listener:  # hears everything, holds nothing back
        def admit(self, *a, **k):
            return True

        def __getattr__(self, name):
            return lambda *a, **k: None

    _, prefix = published
    fetch._fetch_s3(prefix, tmp_path / "a", trust_remote_code=False, listener=Listener())
    fetch._fetch_s3(prefix, tmp_path / "b", trust_remote_code=False)
    assert asked == [fetch.BESIDE_A_CONSUMER_NICE, 0] and fetch.BESIDE_A_CONSUMER_NICE > 0
    monkeypatch.setenv("LMI_COMPILE_TRANSFER_NICE", "3")
    assert fetch.consumer_nice() == 3
    monkeypatch.setenv("LMI_COMPILE_TRANSFER_NICE", "high")
    with pytest.raises(fetch.BadInput, match="LMI_COMPILE_TRANSFER_NICE='high': give a whole number from 0 to 19"):
        fetch.consumer_nice()


def test_a_shard_that_cannot_be_removed_is_reported_before_the_fetch_counts_as_consumed(tmp_path, monkeypatch):
    """--no-keep-source deletes converted shards in a thread of its own; a deletion that fails there is raised by
    remove_rest (which the consumed fetch's record waits for), not lost with the thread, and a stop ends it."""
    from lmi_compile.remote.streaming import ArrivingModel

    view, staging = tmp_path / "view", tmp_path / "staging"
    for folder in (view, staging):
        folder.mkdir()
        for name in ("a.safetensors", "b.safetensors"):
            (folder / name).write_bytes(b"x" * 64)
    a = ArrivingModel(view, staging)
    a.weights(["a.safetensors", "b.safetensors"])
    a.plan_reads(["a.safetensors", "b.safetensors"])
    real_truncate = os.truncate

    def truncate(path, n):
        if Path(path).name == "b.safetensors":
            raise RuntimeError(f"{path}: cannot truncate")  # not only OSError: the remover must not die of it
        return real_truncate(path, n)

    monkeypatch.setattr(os, "truncate", truncate)
    a.verified("a.safetensors", staging / "a.safetensors")
    a.read_done("a.safetensors")
    a.removals_done()
    assert not (staging / "a.safetensors").exists() and not (view / "a.safetensors").exists()
    a.verified("b.safetensors", staging / "b.safetensors")
    a.read_done("b.safetensors")
    with pytest.raises(RuntimeError, match="cannot truncate"):
        a.remove_rest()
    a.removals_done(stop=True)
    assert a._remover is None and not [t for t in threading.enumerate() if t.name == "remove-shards"]
    # a removal after the stop (drop_weights removes after close) starts another remover, which the next stop ends
    (staging / "c.safetensors").write_bytes(b"x")
    with a._cv:
        a._doom("c.safetensors")
    a.removals_done(stop=True)
    assert not (staging / "c.safetensors").exists()
    assert not [t for t in threading.enumerate() if t.name == "remove-shards"]
