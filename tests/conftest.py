"""Fixtures: tiny checkpoints written on the fly, a real S3 server (SeaweedFS) and a local Hub server."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import TinySpec, write_checkpoint  # noqa: E402
from servers.hub import HubServer  # noqa: E402
from servers.seaweedfs import BUCKET, SeaweedFS  # noqa: E402

# No test may reach a real AWS endpoint, instance metadata or the real Hub.
ISOLATED_ENV = {
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_OFFLINE": "0",
    "HF_ENDPOINT": "http://127.0.0.1:9",  # discard port: a test that forgets the Hub fixture fails fast
    "PYTHONUNBUFFERED": "1",
}
STRIPPED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


@pytest.fixture(autouse=True)
def _isolate(monkeypatch, tmp_path):
    for k in STRIPPED_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in ISOLATED_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    # Users run the CLI from their own folder, not the repository: so does every test, and a default
    # ./lmi-compile-work lands in a fresh folder instead of the checkout.
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """make(family=..., fmt=..., shards=..., **TinySpec fields) -> a cached, read-only-by-convention folder."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("models")

    def make(family: str = "llama", fmt: str = "safetensors", shards: int = 1, **spec) -> Path:
        key = (family, fmt, shards, tuple(sorted((k, repr(v)) for k, v in spec.items())))
        if key not in cache:
            out = root / f"m{len(cache)}-{family}-{fmt}-{shards}"
            cache[key] = write_checkpoint(out, TinySpec(family=family, **spec), fmt=fmt, shards=shards)
        return cache[key]

    return make


@pytest.fixture
def model_copy(model_factory, tmp_path):
    """A private, writable copy of a tiny model, for tests that break it on purpose."""
    import shutil

    def make(**kw) -> Path:
        dst = tmp_path / "model"
        shutil.copytree(model_factory(**kw), dst)
        return dst

    return make


@pytest.fixture(scope="session")
def s3_server():
    import boto3
    from botocore.config import Config

    server = SeaweedFS().start()
    client = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=server.env()["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=server.env()["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
                          config=Config(s3={"addressing_style": "path"}))
    try:
        client.create_bucket(Bucket=BUCKET)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    yield server
    server.cleanup()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Credentials and endpoint for the SeaweedFS server, in this process's environment."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server


@pytest.fixture
def s3_client(s3_env):
    from lmi_compile.remote.s3 import make_client

    return make_client()


@pytest.fixture
def synced_paths(monkeypatch):
    """The paths this process calls os.fsync on while the test runs (Linux: named through /proc)."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("names a descriptor's file through /proc (Linux)")
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return synced


@pytest.fixture
def s3_prefix(request):
    """A fresh prefix in the test bucket for each test."""
    import re

    import hashlib

    # the name cut short, and a digest of the whole test id: parametrized tests' names differ only at their end
    safe = re.sub(r"[^a-zA-Z0-9_-]", "-", request.node.name)[:50]
    return f"s3://{BUCKET}/{safe}-{hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]}-{os.getpid()}/"


def upload_folder(client, folder: Path, uri: str) -> None:
    from lmi_compile.remote.s3 import parse_s3_uri

    from boto3.s3.transfer import S3Transfer  # as `aws s3 cp` would upload it (multipart above 8 MB), no manifest

    u, transfer = parse_s3_uri(uri), S3Transfer(client)
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            transfer.upload_file(str(p), u.bucket, u.key(str(p.relative_to(folder))))


@pytest.fixture(scope="session")
def hub_server():
    server = HubServer().start()
    yield server
    server.stop()


@pytest.fixture
def hub_env(hub_server, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub_server.endpoint)
    return hub_server


STANDINS = Path(__file__).parent / "standins"


def trtllm_standin(release: str | None = None) -> Path:
    """The trtllm-build STAND-IN of the TensorRT-LLM that LMI `release` ships (default: the default target's)."""
    from lmi_compile.lmi.targets import resolve

    return STANDINS / f"trtllm-build-{resolve('trtllm', release)['tool']['version']}"


def run_cli(*args, env: dict | None = None, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the installed CLI as a user would: a new process, the current (isolated) environment."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "lmi_compile", *map(str, args)], env=full_env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error:` line a failed run prints (asserting there is exactly one)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, f"expected one error line, got: {proc.stderr[-2000:]}"
    return lines[0]


class PausedCli:
    """The CLI started with the TEST-ONLY pause hook (compile/pipeline/testhooks.py) and held at `point`:
    a signal or kill sent now lands at a moment the work cannot have finished."""

    def __init__(self, *args, point: str, tmp_path: Path, env: dict | None = None, pause_s: int = 30,
                 timeout: float = 120):
        import time

        self.ready = tmp_path / f"paused-{point.replace('#', '-')}"
        self.ready.unlink(missing_ok=True)
        self.err_path = tmp_path / f"stderr-{point.replace('#', '-')}"
        full_env = {**os.environ, **(env or {}), "LMI_COMPILE_TEST_PAUSE_AT": point,
                    "LMI_COMPILE_TEST_PAUSE_READY": str(self.ready), "LMI_COMPILE_TEST_PAUSE_S": str(pause_s)}
        with open(self.err_path, "w") as err:  # a file, not a pipe: a full pipe would block the process elsewhere
            self.proc = subprocess.Popen([sys.executable, "-m", "lmi_compile", *map(str, args)], env=full_env,
                                         stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode} without reaching {point}: {self.stderr()[-2000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"did not reach {point} within {timeout}s")
            time.sleep(0.01)

    def stderr(self) -> str:
        return self.err_path.read_text()

    def signal(self, signum: int, within: float = 120) -> tuple[int, str]:
        """Send `signum`; the process must end within `within` seconds (it stays paused if it ignores it)."""
        self.proc.send_signal(signum)
        try:
            rc = self.proc.wait(timeout=within)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"still running {within}s after signal {signum}: the signal was not acted on")
        return rc, self.stderr()
