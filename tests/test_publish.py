"""S3 publish against a real S3 server (SeaweedFS): verified, resumable, atomic, never orphaning parts."""

import hashlib
import json
import re
import signal
from pathlib import Path

import pytest
from conftest import PausedCli, error_line, run_cli

from lmi_compile.errors import LmiCompileError
from lmi_compile.remote.publish import MANIFEST_KEY, MARKER_KEY, push
from lmi_compile.remote.s3 import parse_s3_uri

MIB = 1024 * 1024


def make_tree(root: Path, big: int = 2, big_mib: int = 12, small: int = 3, seed: int = 0) -> Path:
    import random

    rnd = random.Random(seed)
    (root / "tensorrt_llm" / "1").mkdir(parents=True)
    for i in range(big):
        (root / "tensorrt_llm" / "1" / f"rank{i}.engine").write_bytes(rnd.randbytes(big_mib * MIB + 123))
    for i in range(small):
        (root / "tensorrt_llm" / f"file{i}.json").write_text(json.dumps({"i": i, "seed": seed}))
    (root / "serving.properties").write_text("option.rolling_batch=trtllm\n")
    return root


def remote_tree(client, uri: str) -> dict[str, str]:
    u = parse_s3_uri(uri)
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=u.bucket, Prefix=u.prefix):
        for o in page.get("Contents", []):
            body = client.get_object(Bucket=u.bucket, Key=o["Key"])["Body"].read()
            out[o["Key"][len(u.prefix):]] = hashlib.sha256(body).hexdigest()
    return out


def local_tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}


def open_uploads(client, uri: str) -> list:
    u = parse_s3_uri(uri)
    return [x for x in client.list_multipart_uploads(Bucket=u.bucket, Prefix=u.prefix).get("Uploads", [])]


def test_round_trip_byte_for_byte(s3_client, s3_prefix, tmp_path):
    tree = make_tree(tmp_path / "art")
    proc = run_cli("push", tree, s3_prefix, "--part-size-mb", "5")
    assert proc.returncode == 0, proc.stderr
    remote = remote_tree(s3_client, s3_prefix)
    manifest = json.loads(s3_client.get_object(Bucket="models", Key=parse_s3_uri(s3_prefix).key(MANIFEST_KEY))
                          ["Body"].read())
    assert {k: v for k, v in remote.items() if k != MANIFEST_KEY} == local_tree(tree)
    assert MARKER_KEY not in remote
    assert set(manifest["objects"]) == set(local_tree(tree))
    big = manifest["objects"]["tensorrt_llm/1/rank0.engine"]
    assert big["size"] == 12 * MIB + 123 and big["checksum_crc32"].endswith("-3")  # 3 parts of 5 MiB, composite
    from lmi_compile.remote.manifest import file_checksums

    local = file_checksums(tree / "tensorrt_llm/1/rank0.engine", big["size"], 5 * MIB, ("crc32",))
    assert big["checksum_crc32"] == local["crc32"]
    # the server checked every part against it, and stores (and reports) the same composite
    head = s3_client.head_object(Bucket="models", Key=parse_s3_uri(s3_prefix).key("tensorrt_llm/1/rank0.engine"),
                                 ChecksumMode="ENABLED")
    assert head["ChecksumCRC32"] == big["checksum_crc32"]
    # and back down through fetch's S3 path, checked against the manifest
    out = tmp_path / "down"
    from lmi_compile.remote.s3 import download_files, list_objects, make_client

    objs = list_objects(make_client(), parse_s3_uri(s3_prefix))
    download_files(make_client(), parse_s3_uri(s3_prefix), sorted(objs), out, objs, desc="down")
    assert {k: v for k, v in local_tree(out).items() if k != MANIFEST_KEY} == local_tree(tree)


def test_manifest_written_last_and_marker_first(s3_env, s3_prefix, tmp_path):
    from lmi_compile.remote.s3 import make_client

    client = make_client()
    events = []
    client.meta.events.register("provide-client-params.s3.*", lambda params, model, **kw: events.append(
        (model.name, params.get("Key", "").rsplit("/", 1)[-1])))
    push(make_tree(tmp_path / "art"), s3_prefix, part_size=5 * MIB, client=client)
    writes = [(op, key) for op, key in events if op in ("PutObject", "CompleteMultipartUpload", "DeleteObject")]
    assert writes[0] == ("PutObject", MARKER_KEY)
    assert writes[-2] == ("PutObject", MANIFEST_KEY) and writes[-1] == ("DeleteObject", MARKER_KEY)
    data_writes = writes[1:-2]
    assert len(data_writes) == 6 and all(key not in (MANIFEST_KEY, MARKER_KEY) for _, key in data_writes)
    heads = [i for i, (op, _) in enumerate(events) if op == "HeadObject"]
    assert heads and max(heads) < events.index(("PutObject", MANIFEST_KEY))  # verified before the manifest


def test_injected_failure_aborts_multipart_and_leaves_incomplete_marker(s3_env, s3_prefix, tmp_path):
    from lmi_compile.remote.s3 import make_client

    client = make_client()
    calls = {"n": 0}

    def fail_third_part(**kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ConnectionResetError("injected: connection dropped")

    # parts go out on URLs presigned per part (remote/getter.py sends them): the third part's request fails
    client.meta.events.register("before-parameter-build.s3.UploadPart", fail_third_part)
    tree = make_tree(tmp_path / "art")
    with pytest.raises(LmiCompileError) as e:
        push(tree, s3_prefix, part_size=5 * MIB, concurrency=2, client=client, delete_local=True)
    # one message: the object and the cause, what is and is not uploaded, the parts aborted, how to go on
    assert re.fullmatch(re.escape(s3_prefix) + r"tensorrt_llm/1/rank[01]\.engine: S3 request failed "
                        r"\(ConnectionResetError: injected: connection dropped\); push incomplete: [0-5] of 6 "
                        r"objects are uploaded; not uploaded: .*tensorrt_llm/1/rank[01]\.engine.*; aborted [12] "
                        r"unfinished multipart upload\(s\); rerun to resume", str(e.value)), str(e.value)
    assert open_uploads(make_client(), s3_prefix) == []  # no orphan parts billed to the user
    remote = remote_tree(make_client(), s3_prefix)
    assert MANIFEST_KEY not in remote and MARKER_KEY in remote
    assert tree.is_dir()  # --delete-local never fires without a verified upload
    proc = run_cli("fetch", s3_prefix, "--output", tmp_path / "f")
    assert proc.returncode == 2 and "incomplete upload" in error_line(proc)
    # the rerun resumes and completes
    push(tree, s3_prefix, part_size=5 * MIB)
    assert {k: v for k, v in remote_tree(make_client(), s3_prefix).items() if k != MANIFEST_KEY} == local_tree(tree)


def test_resume_after_kill_uploads_only_the_rest(s3_env, s3_client, s3_prefix, tmp_path):
    tree = make_tree(tmp_path / "art", big=4, big_mib=6)  # 2 parts of 5 MiB each, sent one at a time
    args = ("push", tree, s3_prefix, "--concurrency", "1", "--part-size-mb", "5")
    # held before part 5: the first part of the third engine, two engines complete; then SIGKILL
    PausedCli(*args, point="push-part#5", tmp_path=tmp_path).signal(signal.SIGKILL)
    u = parse_s3_uri(s3_prefix)
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=u.bucket, Prefix=u.prefix).get("Contents", [])]
    assert u.key(MANIFEST_KEY) not in keys and u.key(MARKER_KEY) in keys
    assert sum(k.endswith(".engine") for k in keys) == 2
    assert len(open_uploads(s3_client, s3_prefix)) == 1  # the third engine's multipart upload, left open
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert "push: 2 object(s) already uploaded with matching checksums, kept" in again.stderr
    assert "aborted 1 multipart upload(s) left by an interrupted run" in again.stderr
    assert {k: v for k, v in remote_tree(s3_client, s3_prefix).items() if k != MANIFEST_KEY} == local_tree(tree)
    assert open_uploads(s3_client, s3_prefix) == []


def _b64sha(data: bytes) -> str:
    import base64

    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def _b64crc(data: bytes) -> str:
    import base64
    import zlib

    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def test_resume_does_not_trust_size_alone(s3_env, s3_client, s3_prefix, tmp_path):
    from lmi_compile.remote.publish import content_id, local_files

    tree = make_tree(tmp_path / "art", big=1, big_mib=6)
    push(tree, s3_prefix, part_size=5 * MIB)
    u = parse_s3_uri(s3_prefix)
    # a run that never finished (marker, no manifest) left same-size objects holding other bytes:
    s3_client.delete_object(Bucket=u.bucket, Key=u.key(MANIFEST_KEY))
    cid = content_id(tree, local_files(tree))
    s3_client.put_object(Bucket=u.bucket, Key=u.key(MARKER_KEY), Body=json.dumps({"content_id": cid}).encode())
    rnd = __import__("random").Random(18)
    big, small, bare = "tensorrt_llm/1/rank0.engine", "tensorrt_llm/file0.json", "serving.properties"
    # - multipart, with valid CRC32 checksums of ITS bytes (composite, as push's own uploads are)
    other = rnd.randbytes((tree / big).stat().st_size)
    up = s3_client.create_multipart_upload(Bucket=u.bucket, Key=u.key(big), ChecksumAlgorithm="CRC32")
    parts = []
    for i, off in enumerate(range(0, len(other), 5 * MIB)):
        chunk = other[off:off + 5 * MIB]
        r = s3_client.upload_part(Bucket=u.bucket, Key=u.key(big), UploadId=up["UploadId"], PartNumber=i + 1,
                                  Body=chunk, ChecksumCRC32=_b64crc(chunk))
        parts.append({"PartNumber": i + 1, "ETag": r["ETag"], "ChecksumCRC32": _b64crc(chunk)})
    s3_client.complete_multipart_upload(Bucket=u.bucket, Key=u.key(big), UploadId=up["UploadId"],
                                        MultipartUpload={"Parts": parts})
    # - single part, with a valid SHA256 checksum of its bytes (as lmi-compile uploaded before 2026-11)
    other_small = (tree / small).read_bytes().replace(b"0", b"9")
    s3_client.put_object(Bucket=u.bucket, Key=u.key(small), Body=other_small, ChecksumSHA256=_b64sha(other_small))
    # - without any checksum
    s3_client.put_object(Bucket=u.bucket, Key=u.key(bare), Body=b"X" * (tree / bare).stat().st_size)
    heads = {rel: s3_client.head_object(Bucket=u.bucket, Key=u.key(rel), ChecksumMode="ENABLED")
             for rel in (big, small, bare)}
    assert heads[big]["ChecksumCRC32"].endswith("-2") and heads[small]["ChecksumSHA256"] == _b64sha(other_small)
    assert "ChecksumSHA256" not in heads[bare] and "ChecksumCRC32" not in heads[bare]
    assert all(heads[rel]["ContentLength"] == (tree / rel).stat().st_size for rel in heads)

    manifest = push(tree, s3_prefix, part_size=5 * MIB).manifest
    remote = remote_tree(s3_client, s3_prefix)
    for rel in (big, small, bare):
        assert remote[rel] == local_tree(tree)[rel], f"{rel}: kept on size alone"
    assert manifest["objects"][small]["checksum_crc32"] == _b64crc((tree / small).read_bytes())


def test_overwrite_refusal_and_replacement(s3_env, s3_client, s3_prefix, tmp_path):
    first = make_tree(tmp_path / "a", big=2, big_mib=1, seed=1)
    second = make_tree(tmp_path / "b", big=1, big_mib=1, seed=2)
    assert run_cli("push", first, s3_prefix).returncode == 0
    proc = run_cli("push", second, s3_prefix)
    assert proc.returncode == 2 and "--overwrite" in error_line(proc)
    assert {k: v for k, v in remote_tree(s3_client, s3_prefix).items() if k != MANIFEST_KEY} == local_tree(first)
    proc = run_cli("push", second, s3_prefix, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    # stale objects of the replaced upload (rank1.engine) are gone: the prefix is exactly the new tree
    assert {k: v for k, v in remote_tree(s3_client, s3_prefix).items() if k != MANIFEST_KEY} == local_tree(second)


def test_a_refused_push_leaves_no_transfer_process(s3_env, s3_prefix, tmp_path, monkeypatch):
    """The PUT workers start before the prefix is looked at (so they are ready when the first part is); a push
    refused before any upload (the prefix holds another upload) still ends every one of them."""
    import threading
    import time

    import psutil

    monkeypatch.setenv("LMI_COMPILE_TRANSFER_PROCESSES", "1")
    assert run_cli("push", make_tree(tmp_path / "a", big=1, big_mib=1, seed=1), s3_prefix).returncode == 0
    me = psutil.Process()

    def workers():
        return [c for c in me.children(recursive=True) if "getter.py" in " ".join(c.cmdline())]

    with pytest.raises(LmiCompileError, match="--overwrite"):
        push(make_tree(tmp_path / "b", big=1, big_mib=1, seed=2), s3_prefix, concurrency=4)
    # the spawning thread ends once it sees the workers closed: a worker it was starting then is ended by close()
    deadline = time.monotonic() + 30
    while any(t.name == "spawn-getters" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "spawn-getters" for t in threading.enumerate())
    assert workers() == []


def test_a_put_worker_holds_a_buffer_not_its_part(s3_env, s3_client, s3_prefix, tmp_path):
    """A PUT worker hashes its part through a 1 MiB buffer and sends it from the file: its memory does not grow
    with the part size (a part held whole was 32 MiB a worker by default, 2 GiB at 64 connections)."""
    import os
    import subprocess
    import sys

    tree = make_tree(tmp_path / "art", big=2, big_mib=64, small=0)
    script = ("import resource, sys; from pathlib import Path; from lmi_compile.remote.publish import push; "
              "push(Path(sys.argv[1]), sys.argv[2], concurrency=2, part_size=64 << 20); "
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    proc = subprocess.run([sys.executable, "-c", script, str(tree), s3_prefix], capture_output=True, text=True,
                          env={**os.environ, "LMI_COMPILE_TRANSFER_PROCESSES": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    worker_peak_mib = int(proc.stdout.split()[-1]) / 1024  # the largest worker's peak (its only children)
    assert 0 < worker_peak_mib < 32, worker_peak_mib  # one 64 MiB part held whole: over 70
    assert {k: v for k, v in remote_tree(s3_client, s3_prefix).items() if k != MANIFEST_KEY} == local_tree(tree)


def test_delete_local_after_verification(s3_env, s3_client, s3_prefix, tmp_path):
    tree = make_tree(tmp_path / "art", big=1, big_mib=1)
    want = local_tree(tree)
    proc = run_cli("push", tree, s3_prefix, "--delete-local")
    assert proc.returncode == 0, proc.stderr
    assert not tree.exists()
    assert {k: v for k, v in remote_tree(s3_client, s3_prefix).items() if k != MANIFEST_KEY} == want


def test_delete_local_only_after_every_key_is_verified(s3_env, s3_prefix, tmp_path, monkeypatch):
    from urllib.parse import unquote, urlparse

    from lmi_compile.remote.s3 import make_client

    tree = make_tree(tmp_path / "art", big=1, big_mib=1)
    files = set(local_tree(tree))
    prefix = "/" + parse_s3_uri(s3_prefix).bucket + "/" + parse_s3_uri(s3_prefix).prefix
    events = []
    client = make_client()
    client.meta.events.register("after-call.s3.HeadObject", lambda http_response, parsed, **_: events.append(
        ("verified", unquote(urlparse(http_response.url).path).removeprefix(prefix), parsed.get("ChecksumCRC32"))))
    real_unlink = Path.unlink
    with monkeypatch.context() as m:
        m.setattr(Path, "unlink", lambda p, *a, **k: (events.append(("unlink", p)), real_unlink(p, *a, **k)))
        push(tree, s3_prefix, client=client, delete_local=True)
    assert not tree.exists()
    deleted = [i for i, e in enumerate(events) if e[0] == "unlink" and tree in e[1].parents]
    assert {events[i][1].relative_to(tree).as_posix() for i in deleted} == files
    before = events[:deleted[0]]
    assert {rel for _, rel, checksum in before if checksum} == files, events  # every key HEAD-checked first

    # what push does not upload is the user's, and stays: hidden files (a .git, a .env); lmi-compile's own stage
    # record goes with the files it lists (else the folder would still claim to be laid out)
    tree3 = make_tree(tmp_path / "art3", big=1, big_mib=1, seed=7)
    (tree3 / ".git" / "objects").mkdir(parents=True)  # empty, and part of the repository
    (tree3 / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tree3 / ".env").write_text("SECRET=1\n")
    (tree3 / "notes").mkdir()  # an empty folder of the user's: push uploads files only
    (tree3 / ".lmi-compile-stage.json").write_text("{}")
    push(tree3, s3_prefix.rstrip("/") + "-3/", delete_local=True)
    left = sorted(p.relative_to(tree3).as_posix() for p in tree3.rglob("*"))
    assert left == [".env", ".git", ".git/HEAD", ".git/objects", "notes"], left

    # a HEAD that does not confirm the checksum stops the push before anything local is deleted
    tree2 = make_tree(tmp_path / "art2", big=1, big_mib=1, seed=5)
    bad = make_client()

    def tamper(parsed, **_):
        if "ChecksumCRC32" in parsed:
            parsed["ChecksumCRC32"] = "AAAA" + parsed["ChecksumCRC32"][4:]

    bad.meta.events.register("after-call.s3.HeadObject", tamper)
    with pytest.raises(LmiCompileError, match="checksum .* after upload, expected"):
        push(tree2, s3_prefix.rstrip("/") + "-2/", client=bad, delete_local=True)
    assert local_tree(tree2) and tree2.is_dir()


def test_bad_credentials_publish_nothing(s3_env, s3_client, s3_prefix, tmp_path):
    tree = make_tree(tmp_path / "art", big=1, big_mib=1)
    proc = run_cli("push", tree, s3_prefix, env={"AWS_SECRET_ACCESS_KEY": "wrong-secret-value"})
    assert proc.returncode == 2 and "credentials were rejected" in error_line(proc)
    assert "wrong-secret-value" not in proc.stderr
    u = parse_s3_uri(s3_prefix)
    assert s3_client.list_objects_v2(Bucket=u.bucket, Prefix=u.prefix).get("KeyCount", 0) == 0


def test_a_repush_repairs_objects_changed_on_the_server(s3_env, s3_client, s3_prefix, tmp_path):
    """An object overwritten on the server after the push (same size, no checksum) is what check reports and what
    a plain re-push uploads again; without the damage, a re-push changes nothing."""
    tree = make_tree(tmp_path / "art", big=1, big_mib=1)
    assert run_cli("push", tree, s3_prefix).returncode == 0
    u, rel = parse_s3_uri(s3_prefix), "tensorrt_llm/1/rank0.engine"
    s3_client.put_object(Bucket=u.bucket, Key=u.key(rel), Body=b"X" * (tree / rel).stat().st_size)
    proc = run_cli("check", s3_prefix)
    assert proc.returncode == 1 and rel in proc.stdout and "upload: INCOMPLETE" in proc.stdout
    proc = run_cli("push", tree, s3_prefix)
    assert proc.returncode == 0, proc.stderr
    assert "are not what its manifest says" in proc.stderr and rel in proc.stderr
    assert {k: v for k, v in remote_tree(s3_client, s3_prefix).items() if k != MANIFEST_KEY} == local_tree(tree)
    assert "upload: complete" in run_cli("check", s3_prefix).stdout
    proc = run_cli("push", tree, s3_prefix)
    assert proc.returncode == 0 and "nothing changed" in proc.stderr


def test_a_repush_of_an_edited_folder_needs_overwrite(s3_env, s3_client, s3_prefix, tmp_path):
    """The same bytes (a copy, a touched file) are the same upload; an edit of the same size is another one:
    refused naming the file, then uploaded with --overwrite. --delete-local applies to a push with nothing to do.
    The folder is a recorded stage output, whose record alone once made an edited copy read as unchanged."""
    import shutil

    from lmi_compile.pipeline import stages

    tree = stages.finish(make_tree(tmp_path / ".art.partial", big=1, big_mib=1), tmp_path / "art", "layout", "fp")
    assert run_cli("push", tree, s3_prefix).returncode == 0
    copy = shutil.copytree(tree, tmp_path / "copy")
    (copy / "serving.properties").touch()
    proc = run_cli("push", copy, s3_prefix)
    assert proc.returncode == 0 and "nothing changed" in proc.stderr, proc.stderr
    props = (copy / "serving.properties").read_text()
    (copy / "serving.properties").write_text(props.replace("trtllm", "TRTLLM"))  # same size
    proc = run_cli("push", copy, s3_prefix)
    assert proc.returncode == 2 and "serving.properties" in error_line(proc) and "--overwrite" in error_line(proc)
    assert {k: v for k, v in remote_tree(s3_client, s3_prefix).items() if k != MANIFEST_KEY} == local_tree(tree)
    proc = run_cli("push", copy, s3_prefix, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert {k: v for k, v in remote_tree(s3_client, s3_prefix).items() if k != MANIFEST_KEY} == local_tree(copy)
    proc = run_cli("push", copy, s3_prefix, "--delete-local")
    assert proc.returncode == 0 and "nothing changed" in proc.stderr and not copy.exists()


def test_trtllm_upload_end_to_end(s3_env, s3_client, s3_prefix, model_factory, tmp_path):
    standin = Path(__file__).parent / "standins" / "trtllm-build"
    proc = run_cli("trtllm", model_factory(), "--tp", "2", "--work-dir", tmp_path / "w", "--output", tmp_path / "out",
                   "--trtllm-build", standin, "--upload", s3_prefix)
    assert proc.returncode == 0, proc.stderr
    remote = remote_tree(s3_client, s3_prefix)
    assert {k: v for k, v in remote.items() if k != MANIFEST_KEY} == local_tree(tmp_path / "out")
    props = s3_client.get_object(Bucket="models", Key=parse_s3_uri(s3_prefix).key("serving.properties"))["Body"].read()
    assert f"option.model_id={s3_prefix}".encode() in props


def test_a_prefix_outside_ascii_reaches_lmi_as_written(s3_env, s3_client, s3_prefix, model_factory, tmp_path):
    """LMI reads serving.properties with java.util.Properties.load of its bytes, that is as ISO-8859-1: a UTF-8
    'è' in option.model_id would reach it as 'Ã¨', another prefix. It is written as Java escapes it."""
    from lmi_compile.lmi.check import check
    from lmi_compile.lmi.properties import parse

    standin = Path(__file__).parent / "standins" / "trtllm-build"
    prefix = f"{s3_prefix}modèle/"
    proc = run_cli("trtllm", model_factory(), "--work-dir", tmp_path / "w", "--output", tmp_path / "out",
                   "--trtllm-build", standin, "--upload", prefix)
    assert proc.returncode == 0, proc.stderr
    props = s3_client.get_object(Bucket="models", Key=parse_s3_uri(prefix).key("serving.properties"))["Body"].read()
    assert props.isascii() and f"option.model_id={s3_prefix}mod\\u00e8le/".encode() in props
    assert parse(props, "serving.properties")["option.model_id"] == prefix
    assert check(prefix).properties["option.model_id"] == prefix


def test_upload_preflight_fails_before_heavy_work(s3_env, model_factory, tmp_path):
    standin = Path(__file__).parent / "standins" / "trtllm-build"
    proc = run_cli("trtllm", model_factory(), "--work-dir", tmp_path / "w", "--output", tmp_path / "out",
                   "--trtllm-build", standin, "--upload", "s3://no-such-bucket-x/m/")
    assert proc.returncode == 2 and "bucket does not exist" in error_line(proc)
    assert not (tmp_path / "w" / "checkpoint").exists()


def test_an_occupied_upload_prefix_is_refused_before_the_convert(s3_env, s3_client, s3_prefix, model_factory,
                                                                 tmp_path):
    """--upload to a prefix holding another upload fails in the pre-flight, not after the build; a rerun of the
    job that published there passes it (and its push has nothing to do)."""
    standin = Path(__file__).parent / "standins" / "trtllm-build"
    assert run_cli("push", make_tree(tmp_path / "other"), s3_prefix).returncode == 0
    args = ["trtllm", model_factory(), "--work-dir", "w", "--output", "out", "--trtllm-build", standin]
    proc = run_cli(*args, "--upload", s3_prefix)
    assert proc.returncode == 2 and "another upload" in error_line(proc) and "--overwrite" in error_line(proc)
    assert not Path("w", "checkpoint").exists() and not Path("out").exists()
    free = s3_prefix.rstrip("/") + "-free/"
    assert run_cli(*args, "--upload", free).returncode == 0
    proc = run_cli(*args, "--upload", free)
    assert proc.returncode == 0 and "nothing changed" in proc.stderr, proc.stderr
    # a rerun with another option would replace out/, which the push then refuses: refused now, before the build
    engines = Path("w", "engines", ".lmi-compile-stage.json").read_text()
    layout = Path("out", ".lmi-compile-stage.json").read_text()
    proc = run_cli(*args, "--upload", free, "--max-batch-size", "3")
    line = error_line(proc)
    assert proc.returncode == 2 and "--max-batch-size" in line and "3 now" in line and "--overwrite" in line, line
    assert Path("w", "engines", ".lmi-compile-stage.json").read_text() == engines
    assert Path("out", ".lmi-compile-stage.json").read_text() == layout
    proc = run_cli(*args, "--upload", free, "--max-batch-size", "3", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    props = s3_client.get_object(Bucket="models", Key=parse_s3_uri(free).key("serving.properties"))["Body"].read()
    assert b"option.max_rolling_batch_size=3" in props
    # how it runs, not what it makes: the build's workers, a permission, and values equal to those the first run took
    # as defaults (the dtype as the convert found it in the checkpoint)
    took = json.loads(Path("out", ".lmi-compile-stage.json").read_text())["made_with"]
    assert took["--dtype"] in ("float16", "bfloat16", "float32"), took
    proc = run_cli(*args, "--upload", free, "--max-batch-size", "3", "--build-workers", "2", "--allow-longer",
                   "--max-input-len", "1024", "--dtype", took["--dtype"])
    assert proc.returncode == 0 and "nothing changed" in proc.stderr, proc.stderr



def test_neuron_upload_preflight_compares_options_as_the_layout_took_them(s3_env, s3_prefix, model_factory):
    """neuron fills --lmi-version, --amp and --n-positions from the release and the model: a rerun that names the
    values the first run took passes the --upload pre-flight (its push has nothing to do); another batch size is
    refused before the compile, naming it."""
    import sys

    standin = f"{sys.executable} {Path(__file__).parent / 'standins' / 'neuron_compile_standin.py'}"
    args = ["neuron", model_factory(), "--work-dir", "w", "--output", "out", "--compile-entry", standin,
            "--upload", s3_prefix]
    assert run_cli(*args).returncode == 0
    took = json.loads(Path("out", ".lmi-compile-stage.json").read_text())["made_with"]
    assert took["--lmi-version"] and took["--amp"] and took["--n-positions"], took
    proc = run_cli(*args, "--lmi-version", took["--lmi-version"], "--amp", took["--amp"], "--n-positions",
                   str(took["--n-positions"]))
    assert proc.returncode == 0 and "nothing changed" in proc.stderr, proc.stderr
    compiled = Path("w", "compiled", ".lmi-compile-stage.json").read_text()
    proc = run_cli(*args, "--batch-size", str(took["--batch-size"] + 1))
    line = error_line(proc)
    assert proc.returncode == 2 and "--batch-size" in line and "--overwrite" in line, line
    assert Path("w", "compiled", ".lmi-compile-stage.json").read_text() == compiled


@pytest.mark.parametrize("head, entry, differs", [
    ({"ChecksumCRC32": "c1"}, {"checksum_crc32": "c1"}, None),
    ({"ChecksumCRC32": "c2"}, {"checksum_crc32": "c1"}, "checksum c2, expected c1"),
    # pushed before 2026-11: S3 verified SHA256, the entry has it and a CRC32 of the same bytes
    ({"ChecksumSHA256": "s1"}, {"checksum_sha256": "s1", "checksum_crc32": "c1"}, None),
    ({"ChecksumSHA256": "s2"}, {"checksum_sha256": "s1", "checksum_crc32": "c1"}, "checksum s2, expected s1"),
    # such an object overwritten by an SDK that sends CRC32 by default
    ({"ChecksumCRC32": "c2"}, {"checksum_sha256": "s1", "checksum_crc32": "c1"}, "checksum c2, expected c1"),
    # a plain PUT over it: S3 stores no checksum the entry can be compared with
    ({}, {"checksum_crc32": "c1"}, "checksum None, expected c1"),
    ({"ChecksumCRC64NVME": "n", "ChecksumType": "FULL_OBJECT"}, {"checksum_sha256": "s1"},
     "checksum n (ChecksumCRC64NVME), expected s1"),
    ({"ChecksumSHA256": "s1"}, {"checksum_crc32": "c1"}, "checksum s1 (ChecksumSHA256), expected c1"),
])
def test_a_stored_checksum_is_compared_on_the_algorithm_both_carry(head, entry, differs):
    from lmi_compile.remote.manifest import stored_difference

    assert stored_difference(head, entry) == differs


@pytest.mark.parametrize("size, part, expected", [
    (10000 * 5 * MIB, 5 * MIB, 5 * MIB),  # exactly S3's 10,000 parts: kept
    (10000 * 5 * MIB + 1, 5 * MIB, 6 * MIB),  # a byte more: grown a MiB
    (10000 * 6 * MIB + 1, 5 * MIB, 7 * MIB),  # rounded up, never to 10,001 parts
])
def test_a_big_file_goes_up_in_at_most_10000_parts(size, part, expected):
    """S3 refuses part 10,001: a 60 GB engine pushed with --part-size-mb 5 gets bigger parts, whole MiB."""
    from lmi_compile.remote.publish import MAX_PARTS, part_size_for

    got = part_size_for(size, part)
    assert got == expected and -(-size // got) <= MAX_PARTS


def test_an_object_of_exactly_one_part_fetches_verified(s3_env, s3_prefix, tmp_path):
    """A file of exactly the part size is one PUT whose checksum is the plain one, not a composite: fetch checks it
    as such (a composite for it would refuse an intact file)."""
    import os

    from lmi_compile.remote.fetch import manifest_objects
    from lmi_compile.remote.s3 import download_files, list_objects, make_client

    tree = tmp_path / "art"
    tree.mkdir()
    (tree / "exact.bin").write_bytes(os.urandom(5 * MIB))
    (tree / "serving.properties").write_text("option.rolling_batch=trtllm\n")
    assert run_cli("push", tree, s3_prefix, "--part-size-mb", "5").returncode == 0
    client, u = make_client(), parse_s3_uri(s3_prefix)
    objs = {k: v for k, v in list_objects(client, u).items() if k != MANIFEST_KEY}
    download_files(client, u, sorted(objs), tmp_path / "d", objs, desc="d", expect=manifest_objects(client, u))
    assert (tmp_path / "d" / "exact.bin").read_bytes() == (tree / "exact.bin").read_bytes()


def test_another_folders_interrupted_upload_is_not_taken_over(s3_env, s3_client, s3_prefix, tmp_path):
    """A prefix holding another folder's interrupted upload (its marker names other content) is occupied: a push
    without --overwrite refuses it, as it refuses a finished one."""
    a, b = make_tree(tmp_path / "a", big_mib=6, seed=1), make_tree(tmp_path / "b", big_mib=6, seed=2)
    PausedCli("push", a, s3_prefix, "--concurrency", "1", "--part-size-mb", "5", point="push-part#3",
              tmp_path=tmp_path).signal(signal.SIGKILL)
    u = parse_s3_uri(s3_prefix)
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=u.bucket, Prefix=u.prefix).get("Contents", [])}
    assert u.key(MARKER_KEY) in keys and any(k.endswith(".engine") for k in keys)  # partly uploaded
    proc = run_cli("push", b, s3_prefix, "--part-size-mb", "5")
    assert proc.returncode == 2 and "--overwrite" in error_line(proc), proc.stderr
    # replaced with --overwrite: the killed run's open multipart upload (a's second engine) goes too, not left billed
    assert open_uploads(s3_client, s3_prefix)
    proc = run_cli("push", b, s3_prefix, "--part-size-mb", "5", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert open_uploads(s3_client, s3_prefix) == []
    assert {k: v for k, v in remote_tree(s3_client, s3_prefix).items() if k != MANIFEST_KEY} == local_tree(b)


def test_a_prefix_being_replaced_reads_incomplete_until_its_new_manifest(s3_env, s3_client, s3_prefix, tmp_path):
    """push --overwrite of a published prefix removes the old manifest before it changes anything: killed midway,
    the prefix reads as an incomplete upload (check, fetch, batch), never as the old one finished."""
    a = make_tree(tmp_path / "a", big_mib=6, seed=1)
    assert run_cli("push", a, s3_prefix, "--part-size-mb", "5").returncode == 0
    (a / "serving.properties").write_text("option.rolling_batch=trtllX\n")  # an edit of the same size
    PausedCli("push", a, s3_prefix, "--overwrite", "--concurrency", "1", "--part-size-mb", "5",
              point="push-file#1", tmp_path=tmp_path).signal(signal.SIGKILL)
    u = parse_s3_uri(s3_prefix)
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=u.bucket, Prefix=u.prefix).get("Contents", [])}
    assert u.key(MARKER_KEY) in keys and u.key(MANIFEST_KEY) not in keys
    proc = run_cli("check", s3_prefix)
    assert "upload: INCOMPLETE" in proc.stdout, proc.stdout
