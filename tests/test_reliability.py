"""Crash and kill safety, signals, disk space: a run stopped at any moment leaves nothing that looks
complete, and the rerun finishes with output byte-identical to an uninterrupted run."""

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PausedCli, error_line, run_cli

MIB = 1024 * 1024
MID_SIZE = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1536,
                vocab_size=8000)


def digests(root: Path) -> dict[str, str]:
    """Artifact bytes, without the stage record (it holds a timestamp)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lmi-compile-stage.json"}


def start_cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lmi_compile", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(pred, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return False


def convert_args(model, work):
    return ("trtllm", model, "--tp", "2", "--pp", "2", "--work-dir", work, "--until", "convert", "--workers", "2")


@pytest.fixture(scope="module")
def reference_convert(model_factory, tmp_path_factory):
    model = model_factory(shards=3, **MID_SIZE)
    work = tmp_path_factory.mktemp("ref")
    proc = run_cli(*convert_args(model, work))
    assert proc.returncode == 0, proc.stderr
    return model, digests(work / "checkpoint")


def test_sigkill_at_random_points_then_resume(reference_convert, tmp_path):
    model, want = reference_convert
    rnd = random.Random(1234)
    for attempt in range(3):
        work = tmp_path / f"w{attempt}"
        # held at a seeded random tensor boundary of the convert, then killed: rank files half written, however
        # fast or loaded the machine (a kill after a random delay could land after the convert had finished)
        run = PausedCli(*convert_args(model, work), point=f"boundary#{rnd.randint(3, 24)}", tmp_path=tmp_path)
        assert any((work / ".checkpoint.partial").iterdir())
        run.signal(signal.SIGKILL)
        final = work / "checkpoint"
        if final.exists():  # it finished before the kill: still must be complete and correct
            assert digests(final) == want
        else:  # what the kill left (half-written rank files) is in the staging folder only
            assert not [p for p in work.rglob("rank*.safetensors") if ".checkpoint.partial" not in p.parts]
        again = run_cli(*convert_args(model, work))
        assert again.returncode == 0, again.stderr
        assert digests(final) == want
        assert not list(work.rglob("*.tmp-*"))


def test_sigterm_stops_cleanly_and_resumes(reference_convert, tmp_path):
    model, want = reference_convert
    work = tmp_path / "w"
    # held at the 20th tensor boundary: rank files are half written, the stage cannot have finished
    run = PausedCli(*convert_args(model, work), point="boundary#20", tmp_path=tmp_path)
    staging = work / ".checkpoint.partial"
    assert any(p.name.startswith(".rank") for p in staging.iterdir())  # temporaries exist at the signal
    rc, err = run.signal(signal.SIGTERM)
    assert rc == 143, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert lines == ["error: interrupted by SIGTERM; finished work is kept, rerun the same command to resume"]
    assert "Traceback" not in err
    assert not list(work.rglob("*.tmp-*")), "temporaries must be cleaned on SIGTERM"
    assert not (work / "checkpoint").exists()
    again = run_cli(*convert_args(model, work))
    assert again.returncode == 0, again.stderr
    assert digests(work / "checkpoint") == want


def _tree(root: Path, n: int, mib: int) -> Path:
    rnd = random.Random(7)
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"rank{i}.engine").write_bytes(rnd.randbytes(mib * MIB))
    (root / "config.json").write_text('{"a": 1}')
    return root


def test_push_sigkill_at_random_points_then_resume(s3_env, s3_client, s3_prefix, tmp_path):
    from lmi_compile.remote.publish import MANIFEST_KEY
    from lmi_compile.remote.s3 import parse_s3_uri

    tree = _tree(tmp_path / "art", 10, 12)
    u = parse_s3_uri(s3_prefix)
    rnd = random.Random(99)
    for attempt in range(3):
        # held before a seeded random one of its first parts goes out (a rerun has fewer left), then killed: mid-push
        # however fast the machine
        run = PausedCli("push", tree, s3_prefix, "--concurrency", "2", "--part-size-mb", "5",
                        point=f"push-part#{rnd.randint(1, 4)}", tmp_path=tmp_path)
        run.signal(signal.SIGKILL)
    again = run_cli("push", tree, s3_prefix, "--part-size-mb", "5")
    assert again.returncode == 0, again.stderr
    remote = {}
    for o in s3_client.list_objects_v2(Bucket=u.bucket, Prefix=u.prefix)["Contents"]:
        rel = o["Key"][len(u.prefix):]
        if rel != MANIFEST_KEY:
            remote[rel] = hashlib.sha256(s3_client.get_object(Bucket=u.bucket, Key=o["Key"])["Body"].read()).hexdigest()
    assert remote == digests(tree)
    assert s3_client.list_multipart_uploads(Bucket=u.bucket, Prefix=u.prefix).get("Uploads", []) == []


def test_push_sigint_aborts_multipart_and_exits_130(s3_env, s3_client, s3_prefix, tmp_path):
    from lmi_compile.remote.publish import MANIFEST_KEY
    from lmi_compile.remote.s3 import parse_s3_uri

    tree = _tree(tmp_path / "art", 3, 12)
    u = parse_s3_uri(s3_prefix)
    # held before a part of a multipart upload: that upload is open and the push cannot have finished
    run = PausedCli("push", tree, s3_prefix, "--concurrency", "2", "--part-size-mb", "5", point="push-part#2",
                    tmp_path=tmp_path)
    assert s3_client.list_multipart_uploads(Bucket=u.bucket, Prefix=u.prefix).get("Uploads")
    rc, err = run.signal(signal.SIGINT)
    assert rc == 130, err
    assert "interrupted by SIGINT" in err and "Traceback" not in err
    assert s3_client.list_multipart_uploads(Bucket=u.bucket, Prefix=u.prefix).get("Uploads", []) == []
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=u.bucket, Prefix=u.prefix).get("Contents", [])]
    assert u.key(MANIFEST_KEY) not in keys


def test_push_survives_server_restart_or_fails_cleanly(tmp_path):
    """A dedicated server is stopped mid-upload and restarted: the push retries to success or fails with
    one line; either way nothing is half-published and a rerun completes."""
    import boto3
    from botocore.config import Config

    from servers.seaweedfs import SeaweedFS

    server = SeaweedFS().start()
    try:
        env = {**server.env()}
        client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                              config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 10}))
        client.create_bucket(Bucket="models")
        tree = _tree(tmp_path / "art", 8, 16)
        # held before its third part goes out (one at a time), while the server is stopped; released into the dead
        # server, which comes back a second later: the part fails and is retried, however fast the machine
        release = tmp_path / "release"
        run = PausedCli("push", tree, "s3://models/fault/", "--concurrency", "1", "--part-size-mb", "5",
                        point="push-part#3", tmp_path=tmp_path,
                        env={**env, "LMI_COMPILE_TEST_PAUSE_RELEASE": str(release)})
        server.stop()
        release.touch()
        time.sleep(1.0)
        server.restart()
        run.proc.wait(timeout=240)
        proc, err = run.proc, run.stderr()
        objs = {o["Key"] for o in client.list_objects_v2(Bucket="models", Prefix="fault/").get("Contents", [])}
        if proc.returncode != 0:
            assert proc.returncode == 1 and len([ln for ln in err.splitlines() if ln.startswith("error: ")]) == 1
            assert "rerun to resume" in err
            assert "fault/lmi-compile-manifest.json" not in objs  # nothing half-published looks complete
        again = subprocess.run([sys.executable, "-m", "lmi_compile", "push", str(tree), "s3://models/fault/",
                                "--part-size-mb", "5"], env={**os.environ, **env}, capture_output=True, text=True)
        assert again.returncode == 0, again.stderr
        for p in tree.iterdir():
            body = client.get_object(Bucket="models", Key=f"fault/{p.name}")["Body"].read()
            assert hashlib.sha256(body).hexdigest() == hashlib.sha256(p.read_bytes()).hexdigest()
    finally:
        server.cleanup()


@pytest.fixture
def small_fs(tmp_path):
    """A real, nearly full filesystem: a 4 MiB tmpfs (needs root, as CI has)."""
    if os.geteuid() != 0:
        pytest.skip("disk-full handling NOT TESTED in this run: it needs a 4 MiB tmpfs and mounting one needs root "
                    "(CI runs as root; see README, Set up and test)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"disk-full handling NOT TESTED in this run: mounting a 4 MiB tmpfs was refused "
                    f"({proc.stderr.strip()[:120] or proc.returncode}); run as root with mount allowed, as CI does")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_preflight_refuses_with_numbers(model_factory, small_fs):
    proc = run_cli("trtllm", model_factory(), "--work-dir", small_fs / "w", "--until", "convert")
    assert proc.returncode == 1
    line = error_line(proc)
    assert "convert stage needs about" in line and "GiB free" in line and "--work-dir" in line
    assert not (small_fs / "w" / "checkpoint").exists()


def test_an_s3_fetch_too_big_for_the_disk_is_refused_before_its_weights(s3_client, s3_prefix, model_factory,
                                                                         small_fs):
    from conftest import upload_folder

    upload_folder(s3_client, model_factory(), s3_prefix)
    proc = run_cli("fetch", s3_prefix, "--output", small_fs / "m")
    assert proc.returncode == 1
    line = error_line(proc)
    assert "fetch stage needs about" in line and "GiB free" in line and "--output" in line
    assert not list(small_fs.rglob("*.safetensors")) and not list(small_fs.rglob(".*.tmp-*"))


def test_enospc_mid_write_leaves_no_file(small_fs):
    import torch

    from lmi_compile.converters.safetensors_writer import SafetensorsWriter

    target = small_fs / "rank0.safetensors"
    with pytest.raises(OSError) as e:
        with SafetensorsWriter(target, [("a", "float32", (2 * MIB,))]) as w:  # 8 MiB into a 4 MiB filesystem
            w.write("a", torch.zeros(2 * MIB))
    assert e.value.errno == 28  # ENOSPC
    assert list(small_fs.iterdir()) == []  # neither the file nor its temporary remains


def test_enospc_mid_split_leaves_no_tensor_file_under_its_final_name(model_factory, small_fs):
    """The Neuron split writes each tensor file under a temporary name and renames it when whole: when the disk
    fills in the middle of one, every file under a final name loads, so a rerun (which keeps those) keeps no torn one."""
    import torch

    from lmi_compile.converters.neuron_split import SPLIT_DIR, write_split
    from lmi_compile.model.architectures import resolve
    from lmi_compile.model.validate import validate_model_dir

    from lmi_compile.errors import LmiCompileError

    m = validate_model_dir(model_factory(hidden_size=128, vocab_size=8000))  # a 4 MB embedding first, then the rest
    with pytest.raises(LmiCompileError) as e:  # one line naming the file and the fix, not torch's "unexpected pos"
        write_split(resolve(m.config), m.checkpoint, small_fs, amp=None, workers=1)
    assert str(small_fs / SPLIT_DIR) in str(e.value) and "No space left on device" in str(e.value)
    assert "free disk space" in str(e.value)
    assert not [p for p in (small_fs / SPLIT_DIR).iterdir() if p.name.startswith(".")]  # no temporary left behind
    kept = [p for p in (small_fs / SPLIT_DIR).iterdir() if not p.name.startswith(".")]
    assert kept, "the disk filled before any file was whole: the test no longer splits across the limit"
    for p in kept:
        torch.load(p, weights_only=True)


def test_kill_between_stage_record_and_rename(model_factory, tmp_path):
    """SIGKILL after the stage record is written, before the folder is renamed: the staging folder already
    holds the complete record (so the record can never be missing from a renamed folder), nothing sits
    under the final name, and the rerun completes from the finished files (it started over before)."""
    import json

    model, work = model_factory(), tmp_path / "w"
    args = ("trtllm", model, "--tp", "2", "--work-dir", work, "--until", "convert")
    run = PausedCli(*args, point="stage-rename", tmp_path=tmp_path)
    staging = work / ".checkpoint.partial"
    record = json.loads((staging / ".lmi-compile-stage.json").read_text())
    assert record["stage"] == "convert" and record["tp"] == 2 and len(record["fingerprint"]) == 32
    assert {"config.json", "rank0.safetensors", "rank1.safetensors"} <= {p.name for p in staging.iterdir()}
    assert not (work / "checkpoint").exists()
    written = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in staging.glob("rank*.safetensors")}
    run.signal(signal.SIGKILL)
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    final = json.loads((work / "checkpoint" / ".lmi-compile-stage.json").read_text())
    assert final["fingerprint"] == record["fingerprint"]
    assert not staging.exists()
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in (work / "checkpoint").glob("rank*.safetensors")} == written


def test_a_signal_during_import_torch_waits_for_its_end():
    """Ctrl-C or SIGTERM in a convert's first seconds lands in `import torch` (4 s with a CUDA build): raised there,
    inside torch's initialisation, it aborted the process (pybind11's 'terminate called', exit -6, temporaries
    left). Imports of native modules hold signals (interrupts.held): the import completes, then the run ends
    as it does anywhere else."""
    script = """
import os, signal, sys, threading, time
from lmi_compile.errors import Interrupted
from lmi_compile.pipeline import interrupts
interrupts.install()
seen = {}
def send_mid_import():
    while "torch" not in sys.modules:
        time.sleep(0.001)
    seen["mid"] = not hasattr(sys.modules["torch"], "nn")
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=send_mid_import, daemon=True).start()
try:
    interrupts.import_held("torch")
except Interrupted as e:
    torch = sys.modules["torch"]
    print(seen["mid"], hasattr(torch, "nn") and hasattr(torch, "Tensor"))
    sys.exit(e.exit_code)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "True"]  # sent mid-import; torch whole after it


@pytest.mark.parametrize("live_thread", [False, True])
def test_the_quick_exit_keeps_what_a_normal_exit_does(tmp_path, live_thread):
    """Commands end without Python's finalization (__main__._exit_now): the exit code, everything written to the
    standard streams (a pipe, block-buffered), atexit handlers, and a non-daemon thread's work are all kept."""
    script = f"""
import atexit, pathlib, sys, threading
from lmi_compile.__main__ import _exit_now
out = pathlib.Path({str(tmp_path)!r})
atexit.register(lambda: (out / "atexit").write_text("ran"))
released = threading.Event()  # the thread lives until the quick exit has been tried, however slow the machine
if {live_thread}:
    threading.Thread(target=lambda: (released.wait(60), (out / "thread").write_text("done"))).start()
sys.stdout.write("x" * 100000)
sys.stderr.write("last words")
_exit_now(3)
released.set()
print("after", end="")  # reached only where the quick exit was not safe, and Python's own exit follows
sys.exit(3)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert proc.stdout == "x" * 100000 + ("after" if live_thread else "")
    assert proc.stderr == "last words"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").exists() == live_thread


@pytest.mark.parametrize("args, code", [(["targets"], 0), (["check", "no-such-folder"], 2)])
def test_a_command_with_its_output_shut_keeps_its_exit_code(tmp_path, args, code):
    """Started with stdout closed (`>&-` in a shell), Python has no sys.stdout: the quick exit must not turn
    that into a traceback and exit 1."""
    proc = subprocess.run([sys.executable, "-m", "lmi_compile", *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, cwd=tmp_path, timeout=120,
                          preexec_fn=lambda: os.close(1))
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
