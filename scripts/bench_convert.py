#!/usr/bin/env python3
"""Benchmark the TRT-LLM checkpoint converter against a load-everything baseline and the copy floor.

In one run, on a random checkpoint of a real shape, for each tp it measures wall time and peak RSS of:
  floor     reading every input byte and writing every output byte with plain file I/O (sequential)
  ours      lmi-compile's streaming converter (lmi_compile.converters.trtllm_checkpoint)
  baseline  what TensorRT-LLM's own converter does: load the whole model with transformers, slice each
            rank's weights in memory, save them with safetensors
Each runs in its own process; peak RSS is that process's ru_maxrss. Prints a table with ratios.

  python scripts/bench_convert.py --shape llama3-8b --layers 8 --tp 1 2 4 8 --dir /tmp/bench
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "llama2-7b": dict(family="llama", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                      intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096),
    "llama3-8b": dict(family="llama", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                      intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192),
}
CHUNK = 64 * 1024 * 1024


def make_model(dst: Path, shape: str, layers: int | None) -> Path:
    from lmi_compile.tiny_checkpoint import TinySpec, tensor_plan, write_checkpoint

    spec = TinySpec(**{**SHAPES[shape], **({"num_layers": layers} if layers else {})}, dtype="bfloat16")
    if (dst / "config.json").exists():
        return dst
    total = sum(__import__("math").prod(s) for _, s in tensor_plan(spec)) * 2
    shards = max(1, round(total / (4.5 * 2**30)))  # ~4.5 GB shards, like Hub checkpoints
    print(f"writing {total / 2**30:.1f} GiB {shape} checkpoint ({spec.num_layers} layers) to {dst}", flush=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(tmp, spec, shards=shards, fast_fill=True)
    tmp.rename(dst)
    return dst


def input_files(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


# -- the three contenders, each run in a child process ------------------------------------------------

def child_floor(model: Path, out: Path, out_bytes: int) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for f in input_files(model):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "floor.bin", "wb", buffering=0) as fh:
        left = out_bytes
        while left:
            n = min(left, CHUNK)
            fh.write(view[:n])
            left -= n
        os.fsync(fh.fileno())


def child_ours(model: Path, out: Path, tp: int) -> None:
    from lmi_compile.architectures import resolve
    from lmi_compile.converters.trtllm_checkpoint import ConvertOptions, convert
    from lmi_compile.validate import validate_model_dir

    m = validate_model_dir(model)
    convert(resolve(m.config), m.config, m.checkpoint, out,
            ConvertOptions(tp=tp, workers=max(1, min(8, os.cpu_count() or 1))))


def child_baseline(model: Path, out: Path, tp: int) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    cfg = hf.config
    sd = dict(hf.named_parameters())
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // H
    out.mkdir(parents=True, exist_ok=True)
    for rank in range(tp):
        w = {"transformer.vocab_embedding.weight": sd["model.embed_tokens.weight"]}
        for i in range(cfg.num_hidden_layers):
            p, t = f"model.layers.{i}.", f"transformer.layers.{i}."
            q, k, v = (sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
            if KV < tp:
                k = k.view(KV, hd, -1).repeat_interleave(tp // KV, 0).reshape(-1, k.shape[-1])
                v = v.view(KV, hd, -1).repeat_interleave(tp // KV, 0).reshape(-1, v.shape[-1])
            w[t + "attention.qkv.weight"] = torch.cat([x.chunk(tp, 0)[rank] for x in (q, k, v)])
            w[t + "attention.dense.weight"] = sd[p + "self_attn.o_proj.weight"].chunk(tp, 1)[rank]
            w[t + "mlp.fc.weight"] = sd[p + "mlp.gate_proj.weight"].chunk(tp, 0)[rank]
            w[t + "mlp.gate.weight"] = sd[p + "mlp.up_proj.weight"].chunk(tp, 0)[rank]
            w[t + "mlp.proj.weight"] = sd[p + "mlp.down_proj.weight"].chunk(tp, 1)[rank]
            w[t + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"]
            w[t + "post_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"]
        w["transformer.ln_f.weight"] = sd["model.norm.weight"]
        lm = sd["lm_head.weight"]
        pad = -lm.shape[0] % tp
        if pad:
            lm = torch.nn.functional.pad(lm, (0, 0, 0, pad))
        w["lm_head.weight"] = lm.chunk(tp, 0)[rank]
        save_file({k: x.detach().contiguous() for k, x in w.items()}, str(out / f"rank{rank}.safetensors"))
        with open(out / f"rank{rank}.safetensors", "rb") as fh:
            os.fsync(fh.fileno())
        del w


def peak_rss_mib() -> float:
    """This process's own high-water RSS (VmHWM). ru_maxrss from wait4 is no good here: Linux carries the
    parent's high-water mark into a child across fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(args: list[str], repeat: int) -> tuple[float, float]:
    """Run this script as a child `repeat` times; return (best wall seconds, its peak RSS MiB)."""
    best = (float("inf"), float("nan"))
    out = Path(args[3])
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        os.sync()  # earlier runs' dirty pages must not be flushed on this run's time
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"child {args[:2]} failed: {proc.stderr[-2000:]}")
        rss = float(proc.stdout.strip().splitlines()[-1])
        best = min(best, (wall, rss))
    return best


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--layers", type=int, help="fewer layers than the real model (same tensor shapes)")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/lmi-bench-convert"))
    ap.add_argument("--repeat", type=int, default=2, help="runs per contender; the fastest counts")
    ap.add_argument("--skip-baseline", action="store_true", help="e.g. when the model does not fit in RAM twice")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        mode, model, out, n = a.child[0], Path(a.child[1]), Path(a.child[2]), int(a.child[3])
        {"floor": lambda: child_floor(model, out, n), "ours": lambda: child_ours(model, out, n),
         "baseline": lambda: child_baseline(model, out, n)}[mode]()
        print(peak_rss_mib())
        return
    model = make_model(a.dir / f"{a.shape}-{a.layers or 'full'}", a.shape, a.layers)
    in_bytes = sum(f.stat().st_size for f in input_files(model))
    rows = []
    for tp in a.tp:
        out = a.dir / f"out-tp{tp}"
        shutil.rmtree(out, ignore_errors=True)
        # Warm the page cache the same way for every contender.
        child_floor(model, a.dir / "warm", 0)
        ours = measure(["--child", "ours", str(model), str(out), str(tp)], a.repeat)
        out_bytes = dir_bytes(out)
        floor = measure(["--child", "floor", str(model), str(out), str(out_bytes)], a.repeat)
        base = (float("nan"), float("nan"))
        if not a.skip_baseline:
            base = measure(["--child", "baseline", str(model), str(out), str(tp)], a.repeat)
        shutil.rmtree(out)
        rows.append((tp, in_bytes, out_bytes, floor, ours, base))
    print(f"\n{a.shape} ({a.layers or 'all'} layers), bf16, input {in_bytes / 2**30:.2f} GiB, "
          f"{os.cpu_count()} cores, workers={max(1, min(8, os.cpu_count() or 1))}, best of {a.repeat}")
    print(f"{'tp':>3} {'out GiB':>8} | {'floor s':>8} {'ours s':>8} {'base s':>8} | {'ours/floor':>10} "
          f"{'base/ours':>9} | {'floor MiB':>9} {'ours MiB':>9} {'base MiB':>9}")
    for tp, ib, ob, (fw, fr), (ow, orss), (bw, brss) in rows:
        print(f"{tp:>3} {ob / 2**30:>8.2f} | {fw:>8.1f} {ow:>8.1f} {bw:>8.1f} | {ow / fw:>10.2f} {bw / ow:>9.2f} | "
              f"{fr:>9.0f} {orss:>9.0f} {brss:>9.0f}")
    (a.dir / "results.json").write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
