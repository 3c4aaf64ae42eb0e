"""Helpers shared by the benchmark scripts: real-shape random checkpoints and per-process measurement."""

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test-model factory

SHAPES = {
    # 0.53 GB: a model a 2-core machine moves in about a second (Llama's layout, 2048 wide, 3 layers)
    "small": dict(family="llama", hidden_size=2048, num_layers=3, num_heads=16, num_kv_heads=4,
                  intermediate_size=5632, vocab_size=32000, max_position_embeddings=4096),
    "llama2-7b": dict(family="llama", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                      intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096),
    "llama3-8b": dict(family="llama", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                      intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192),
    # 46.7B parameters, 1.45B per layer: --layers 8 is a quarter of the model
    "mixtral-8x7b": dict(family="mixtral", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                         intermediate_size=14336, vocab_size=32000, max_position_embeddings=32768, num_experts=8,
                         experts_per_token=2),
}


def make_model(dst: Path, shape: str, layers: int | None, fp8: str | None = None, shard_gib: float = 4.5) -> Path:
    """A bf16 checkpoint of a real model's tensor shapes (optionally fewer layers), ~`shard_gib` GiB shards; with
    `fp8` (a tiny_models.FP8_FORMATS key) its Linears in FP8 per tensor, as that Hub format stores them."""
    from tiny_models import TinySpec, tensor_plan, write_checkpoint

    spec = TinySpec(**{**SHAPES[shape], **({"num_layers": layers} if layers else {})}, dtype="bfloat16", fp8=fp8)
    if (dst / "config.json").exists():
        return dst
    total = sum(math.prod(s) for _, s in tensor_plan(spec)) * 2
    shards = max(1, round(total / (shard_gib * 2**30)))
    print(f"writing {total / 2**30:.1f} GiB {shape} checkpoint ({spec.num_layers} layers) to {dst}", flush=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(tmp, spec, shards=shards, fast_fill=True)
    tmp.rename(dst)
    return dst


def compile_package(env: dict | None = None) -> None:
    """Write the bytecode of the lmi_compile that `env` (its PYTHONPATH) imports, as `pip install` does: with
    PYTHONDONTWRITEBYTECODE set (as on these machines and the lent host) a checkout would otherwise compile its
    modules again in every timed run, 50-80 ms of a command there."""
    code = ("import compileall, importlib\n"
            "for name in ('lmi_compile', 'lmi_compile.converters'):\n"
            "    for path in importlib.import_module(name).__path__:\n"
            "        compileall.compile_dir(path, quiet=1)\n")
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def peak_rss_mib() -> float:
    """This process's own high-water RSS (VmHWM). ru_maxrss from wait4 is no good here: Linux carries the
    parent's high-water mark into a child across fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(script: str, args: list[str], out: Path, repeat: int) -> tuple[float, float]:
    """Run `script args` as a child `repeat` times (it prints its peak RSS last); (best wall s, its RSS MiB)."""
    best = (float("inf"), float("nan"))
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        os.sync()  # earlier runs' dirty pages must not be flushed on this run's time
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"child {args[:2]} failed: {proc.stderr[-2000:]}")
        best = min(best, (wall, float(proc.stdout.strip().splitlines()[-1])))
    return best


def read_all(files, chunk: int = 64 * 1024 * 1024) -> None:
    """Read every byte once (warms the page cache equally for every contender)."""
    buf = memoryview(bytearray(chunk))
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
