"""A real multi-node Ray cluster on this machine, for `lmi-compile batch` tests.

Each node is its own `ray start --block` process (head first), started in its own session and stopped by its
PID: never `ray stop`, which ends every Ray process on the machine, other sessions' too. Each node has its own
temp folder and its own job work folder (LMI_COMPILE_BATCH_WORK), so a job that assumed a disk shared between
nodes fails. Logical resources stand for the hardware: `--num-gpus 1 --resources {"accelerator_type:A10G": 1}`
for a g5 node, `{"neuron_cores": 2}` for an inf2 node.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from servers.seaweedfs import free_ports

READY = "Ray runtime started"


@dataclass
class RayNode:
    name: str
    proc: subprocess.Popen
    temp: Path
    work: Path
    log: Path
    resources: dict = field(default_factory=dict)

    def node_id(self) -> str:
        """This node's Ray node id (the raylet names its port files after it)."""
        for p in (self.temp / "session_latest").glob("metrics_export_port_*"):
            return p.name.rsplit("_", 1)[1]
        raise AssertionError(f"{self.name}: no node id under {self.temp}")

    def alive(self) -> bool:
        return self.proc.poll() is None


class RayCluster:
    def __init__(self, env: dict):
        self.root = Path(tempfile.mkdtemp(prefix="lmi-ray-", dir="/tmp"))  # short: Ray's socket paths are limited
        self.env = env
        self.nodes: list[RayNode] = []
        self.address: str | None = None

    @staticmethod
    def client_env() -> dict:
        """What a driver needs to join: a loopback test cluster runs without Ray's token authentication."""
        return {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}

    def ray(self) -> list[str]:
        # This interpreter, not the `ray` script's shebang: workers run the Python that started their node.
        return [sys.executable, "-m", "ray.scripts.scripts"]

    def start_head(self, name: str = "head", **kw) -> RayNode:
        port, client = free_ports(2)
        self.address = f"127.0.0.1:{port}"
        return self._start(name, ["--head", "--port", str(port), "--ray-client-server-port", str(client),
                                  "--include-dashboard", "false"], **kw)

    def add_node(self, name: str, **kw) -> RayNode:
        assert self.address, "start the head first"
        return self._start(name, ["--address", self.address], **kw)

    def _start(self, name: str, args: list[str], *, num_cpus: int = 1, num_gpus: int = 0,
               resources: dict | None = None, env: dict | None = None, timeout: float = 60,
               sigint_ignored: bool = False) -> RayNode:
        """sigint_ignored: the node starts as a script's `ray start ... &` starts it (a shell without job control
        ignores SIGINT for background commands): its workers inherit SIGINT ignored."""
        temp, work = self.root / name / "ray", self.root / name / "work"
        temp.mkdir(parents=True)
        work.mkdir(parents=True)
        log = self.root / name / "node.log"
        cmd = [*self.ray(), "start", *args, "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp),
               "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus), "--resources", json.dumps(resources or {}),
               "--disable-usage-stats", "--block"]
        full_env = {**self.env, **(env or {}), **self.client_env(), "LMI_COMPILE_BATCH_WORK": str(work)}
        if sigint_ignored:
            cmd = ["bash", "-c", 'trap "" INT; exec "$@"', "ray-node", *cmd]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        node = RayNode(name, proc, temp, work, log, resources or {})
        self.nodes.append(node)
        deadline = time.monotonic() + timeout
        while READY not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.kill(node)
                raise RuntimeError(f"ray node {name} did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
        while not list((temp / "session_latest").glob("metrics_export_port_*")):  # its node id is known then
            if proc.poll() is not None or time.monotonic() > deadline:
                self.kill(node)
                raise RuntimeError(f"ray node {name} started but wrote no port file: "
                                   f"{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        return node

    def kill(self, node: RayNode) -> None:
        """The node is lost: SIGKILL to its whole process group (raylet, agents, workers and what they run). Twice:
        a process forking at the first signal can leave a child in the group that the first one missed."""
        for attempt in range(2):
            try:
                os.killpg(node.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if attempt == 0:
                node.proc.wait()
                time.sleep(0.2)

    def stop(self, node: RayNode, timeout: float = 20) -> None:
        """A graceful stop of one node: SIGTERM to its `ray start --block`, which ends its processes."""
        if node.alive():
            node.proc.send_signal(signal.SIGTERM)
            try:
                node.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill(node)

    def shutdown(self) -> None:
        """Stop every node (each by its PID: SIGKILL to its process group, as a test cluster keeps nothing worth a
        graceful stop, which takes seconds per node), then remove their folders."""
        for node in self.nodes:
            self.kill(node)
        shutil.rmtree(self.root, ignore_errors=True)
