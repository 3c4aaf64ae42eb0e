#!/usr/bin/env python3
"""Benchmark the TRT-LLM checkpoint converter against a load-everything baseline and the copy floor.

In one run, on a random checkpoint of a real shape, for each tp it measures wall time and peak RSS of:
  floor     reading every input byte and writing every output byte with plain file I/O (sequential)
  ours      lmi-compile's streaming converter (lmi_compile.converters.trtllm_checkpoint)
  baseline  what TensorRT-LLM's own converter does: load the whole model with transformers, slice each
            rank's weights in memory, save them with safetensors
Each runs in its own process; peak RSS is that process's ru_maxrss. Prints a table with ratios.

  python scripts/bench_convert.py --shape llama3-8b --layers 8 --tp 1 2 4 8 --dir /tmp/bench
  python scripts/bench_convert.py --shape mixtral-8x7b --layers 8 --tp 2 4 8 --moe-ep 1
  python scripts/bench_convert.py --shape llama3-8b --fp8 compressed-tensors --tp 1 2 4 8 --skip-baseline
  python scripts/bench_convert.py --shape llama3-8b --fp8 fbgemm_fp8 --tp 1 2 4 8 --skip-baseline
  python scripts/bench_convert.py --shape llama3-8b --fp8 compressed-tensors-channel --tp 1 2 4 8 --skip-baseline
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import SHAPES, make_model, measure, peak_rss_mib, read_all  # noqa: E402

CHUNK = 64 * 1024 * 1024


def input_files(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


# -- the three contenders, each run in a child process ------------------------------------------------

def child_floor(model: Path, out: Path, out_bytes: int) -> None:
    view = memoryview(bytearray(CHUNK))
    read_all(input_files(model), CHUNK)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "floor.bin", "wb", buffering=0) as fh:
        left = out_bytes
        while left:
            n = min(left, CHUNK)
            fh.write(view[:n])
            left -= n
        os.fsync(fh.fileno())


def child_ours(model: Path, out: Path, tp: int, moe_ep: int) -> None:
    from lmi_compile.model.architectures import resolve
    from lmi_compile.converters.trtllm_checkpoint import ConvertOptions, convert
    from lmi_compile.model.validate import validate_model_dir

    from lmi_compile.lmi.targets import resolve as resolve_target
    from lmi_compile.trtllm.backend import rowwise_options

    m = validate_model_dir(model)
    # per-channel FP8 in the layouts of the default target's TensorRT-LLM, as `lmi-compile trtllm` converts it
    convert(resolve(m.config), m.config, m.checkpoint, out,
            ConvertOptions(tp=tp, moe_ep=moe_ep, workers=max(1, min(8, os.cpu_count() or 1)),
                           **rowwise_options(resolve_target("trtllm", None)["tool"])))


def child_baseline(model: Path, out: Path, tp: int, moe_ep: int = 1) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if json.loads((model / "config.json").read_text()).get("num_local_experts"):
        # transformers 5 fuses Mixtral's experts into new parameter names: load the checkpoint's own tensors,
        # all of them, into memory (what loading the model does), then slice as TensorRT-LLM's convert does
        from safetensors.torch import load_file
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model)
        sd = {}
        for f in input_files(model):
            sd.update(load_file(str(f)))
    else:
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
            if getattr(cfg, "num_local_experts", 0):
                # as TensorRT-LLM's llama convert does for MoE: stack the rank's experts, [w3; w1] per expert
                moe_tp, ep_rank, mtp_rank = tp // moe_ep, rank % moe_ep, rank // moe_ep
                per = cfg.num_local_experts // moe_ep
                experts = range(ep_rank * per, (ep_rank + 1) * per)
                ex = p + "block_sparse_moe.experts.{}.{}.weight"
                w[t + "mlp.router.weight"] = sd[p + "block_sparse_moe.gate.weight"].float()
                w[t + "mlp.fc.weight"] = torch.stack([torch.cat([sd[ex.format(e, "w3")].chunk(moe_tp, 0)[mtp_rank],
                                                                 sd[ex.format(e, "w1")].chunk(moe_tp, 0)[mtp_rank]])
                                                      for e in experts])
                w[t + "mlp.proj.weight"] = torch.stack([sd[ex.format(e, "w2")].chunk(moe_tp, 1)[mtp_rank]
                                                        for e in experts])
            else:
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


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--layers", type=int, help="fewer layers than the real model (same tensor shapes)")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/lmi-bench-convert"))
    ap.add_argument("--repeat", type=int, default=2, help="runs per contender; the fastest counts")
    ap.add_argument("--moe-ep", type=int, default=1, help="expert parallelism for MoE shapes (moe_tp = tp / moe_ep)")
    ap.add_argument("--skip-baseline", action="store_true", help="e.g. when the model does not fit in RAM twice")
    ap.add_argument("--fp8", choices=["compressed-tensors", "modelopt", "fp8", "fbgemm_fp8",
                                      "compressed-tensors-channel"],
                    help="FP8 Linears in this Hub format: per tensor (the fused qkv is requantized), or per channel: "
                         "fbgemm_fp8 (MLPs in FP8; the first and last layers' dequantized) or compressed-tensors-channel "
                         "(every Linear in FP8, kept as it is for the default target); needs --skip-baseline")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        mode, model, out, n = a.child[0], Path(a.child[1]), Path(a.child[2]), int(a.child[3])
        {"floor": lambda: child_floor(model, out, n), "ours": lambda: child_ours(model, out, n, int(a.child[4])),
         "baseline": lambda: child_baseline(model, out, n, int(a.child[4]))}[mode]()
        print(peak_rss_mib())
        return
    if a.fp8 and not a.skip_baseline:
        ap.error("the baseline slices unquantized weights only; use --skip-baseline with --fp8")
    model = make_model(a.dir / f"{a.shape}-{a.layers or 'full'}{'-fp8-' + a.fp8 if a.fp8 else ''}", a.shape,
                       a.layers, a.fp8)
    in_bytes = sum(f.stat().st_size for f in input_files(model))
    rows = []
    for tp in a.tp:
        out = a.dir / f"out-tp{tp}"
        shutil.rmtree(out, ignore_errors=True)
        read_all(input_files(model))  # warm the page cache the same way for every contender
        ours = measure(__file__, ["--child", "ours", str(model), str(out), str(tp), str(a.moe_ep)], out, a.repeat)
        out_bytes = dir_bytes(out)
        floor = measure(__file__, ["--child", "floor", str(model), str(out), str(out_bytes)], out, a.repeat)
        base = (float("nan"), float("nan"))
        if not a.skip_baseline:
            base = measure(__file__, ["--child", "baseline", str(model), str(out), str(tp), str(a.moe_ep)], out,
                           a.repeat)
        shutil.rmtree(out)
        rows.append((tp, in_bytes, out_bytes, floor, ours, base))
    print(f"\n{a.shape} ({a.layers or 'all'} layers), {'FP8 ' + a.fp8 if a.fp8 else 'bf16'}, moe_ep={a.moe_ep}, input {in_bytes / 2**30:.2f} GiB, "
          f"{os.cpu_count()} cores, workers={max(1, min(8, os.cpu_count() or 1))}, best of {a.repeat}")
    print(f"{'tp':>3} {'out GiB':>8} | {'floor s':>8} {'ours s':>8} {'base s':>8} | {'ours/floor':>10} "
          f"{'base/ours':>9} | {'floor MiB':>9} {'ours MiB':>9} {'base MiB':>9}")
    for tp, ib, ob, (fw, fr), (ow, orss), (bw, brss) in rows:
        print(f"{tp:>3} {ob / 2**30:>8.2f} | {fw:>8.1f} {ow:>8.1f} {bw:>8.1f} | {ow / fw:>10.2f} {bw / ow:>9.2f} | "
              f"{fr:>9.0f} {orss:>9.0f} {brss:>9.0f}")
    (a.dir / "results.json").write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
