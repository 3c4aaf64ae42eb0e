#!/usr/bin/env python3
"""Benchmark the Neuron split stage against what save_pretrained_split does, on a real-shape checkpoint.

  ours      lmi-compile's streaming split writer (lmi_compile.converters.neuron_split)
  baseline  transformers-neuronx's save_pretrained_split: load the whole model with transformers, then
            torch.save every state-dict tensor to p{idx}.{name} with key_to_filename.json
Each in its own process, best of --repeat; prints wall time, peak RSS and ratios.

  python scripts/bench_split.py --shape llama3-8b --layers 8 --dir /tmp/bench
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import SHAPES, make_model, measure, peak_rss_mib, read_all  # noqa: E402


def child_ours(model: Path, out: Path, amp: str) -> None:
    from lmi_compile.model.architectures import resolve
    from lmi_compile.converters.neuron_split import write_split
    from lmi_compile.model.validate import validate_model_dir

    m = validate_model_dir(model)
    write_split(resolve(m.config), m.checkpoint, out, amp or None)


def sanitize(key: str) -> str:
    return re.sub(r"(?u)[^-\w.]", "", key.strip().replace(" ", "_"))


def child_baseline(model: Path, out: Path, amp: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"": torch.bfloat16, "bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[amp]
    sd = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).state_dict()
    split = out / "pytorch_model.bin"
    split.mkdir(parents=True)
    names = {k: f"p{i}.{sanitize(k)}" for i, k in enumerate(sd)}
    (split / "key_to_filename.json").write_text(json.dumps(names, indent=2))
    for k, t in sd.items():
        torch.save(t, split / names[k])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--amp", default="", choices=["", "bf16", "f16", "f32"], help="cast while splitting")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/lmi-bench-split"))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        mode, model, out, amp = a.child[0], Path(a.child[1]), Path(a.child[2]), a.child[3] if len(a.child) > 3 else ""
        (child_ours if mode == "ours" else child_baseline)(model, out, amp)
        print(peak_rss_mib())
        return
    model = make_model(a.dir / f"{a.shape}-{a.layers or 'full'}", a.shape, a.layers)
    in_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    out = a.dir / "split-out"
    read_all(sorted(model.glob("*.safetensors")))
    ours = measure(__file__, ["--child", "ours", str(model), str(out), a.amp], out, a.repeat)
    base = measure(__file__, ["--child", "baseline", str(model), str(out), a.amp], out, a.repeat)
    print(f"\n{a.shape} ({a.layers or 'all'} layers), bf16 input {in_bytes / 2**30:.2f} GiB, amp={a.amp or 'keep'}, "
          f"{os.cpu_count()} cores, best of {a.repeat}")
    print(f"{'':<10} {'wall s':>8} {'peak MiB':>9}")
    print(f"{'ours':<10} {ours[0]:>8.1f} {ours[1]:>9.0f}")
    print(f"{'baseline':<10} {base[0]:>8.1f} {base[1]:>9.0f}")
    print(f"baseline/ours: time {base[0] / ours[0]:.2f}x, peak memory {base[1] / ours[1]:.1f}x")


if __name__ == "__main__":
    main()
