#!/usr/bin/env python3
"""STAND-IN for TensorRT-LLM's examples/llama/convert_checkpoint.py on a 4-bit (GPTQ / AutoAWQ) checkpoint, one per
TensorRT-LLM version. It quantizes and packs nothing.

Its version comes from its name (`convert_checkpoint_standin-0.12.0.py` is a link to this file) or from
TRTLLM_STANDIN_VERSION. It enforces that version's real command line, read from its sources into
convert_checkpoint_interfaces.json beside this file (exactly its flags, types, choices and defaults: argparse
rejects any other with exit 2), and what that version does with a 4-bit checkpoint:
- 0.9-0.12: GPTQ only, through --weight_only_precision int4_gptq plus one safetensors file (--ammo_quant_ckpt_path in
  0.9, --quant_ckpt_path later) whose Linears hold model.*.qweight / qzeros / scales; the config's quantization_config
  is not read (an AutoAWQ or GPTQ model without the flags fails as the real script does, on a missing dense weight);
- 1.x: GPTQ and AutoAWQ read from --model_dir's quantization_config (desc_act raises, as the real one does).
It writes what the real script writes: config.json (quantization W4A16_GPTQ with its group size) and
rank{N}.safetensors per rank with the WeightOnlyGroupwiseQuantLinear tensors (placeholder zeros). Its config carries
"lmi_compile_standin", so nothing downstream takes its output for a converted model. Standard library only.
"""

import argparse
import json
import os
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LINEARS = {"attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "attention.dense": ("self_attn.o_proj",), "mlp.fc": ("mlp.gate_proj",), "mlp.gate": ("mlp.up_proj",),
           "mlp.proj": ("mlp.down_proj",)}


def fail(msg: str, code: int = 1) -> None:
    print(f"convert_checkpoint (STAND-IN): {msg}", file=sys.stderr)
    sys.exit(code)


def interface(version: str) -> dict:
    data = json.loads((HERE / "convert_checkpoint_interfaces.json").read_text())["versions"]
    if version not in data:
        fail(f"no interface data for TensorRT-LLM {version}")
    spec = data[version]
    while "like" in spec:
        spec = {**data[spec["like"]], **{k: v for k, v in spec.items() if k != "like"}}
    return spec


def parser(spec: dict) -> argparse.ArgumentParser:
    types = {"str": str, "int": int, "float": float}
    p = argparse.ArgumentParser(prog="convert_checkpoint.py")
    for flag, f in spec["flags"].items():
        kw = {k: f[k] for k in ("default", "choices", "nargs", "const", "action") if k in f}
        if "type" in f:
            kw["type"] = types[f["type"]]
        p.add_argument(flag, *f.get("aliases", []), **kw)
    return p


def header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return {k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}


def model_tensors(model_dir: Path) -> dict:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(header(f))
    return out


def require_quantized(tensors: dict, layers: int, where: str) -> None:
    """The packed tensors the real loader reads for every Linear (load_weights_from_gptq / the 1.x hf loader)."""
    for i in range(layers):
        for hf in [n for names in LINEARS.values() for n in names]:
            for suffix in ("qweight", "qzeros", "scales"):
                name = f"model.layers.{i}.{hf}.{suffix}"
                if name not in tensors:
                    fail(f"KeyError: {name!r} (reading {where})")


def write_safetensors(path: Path, tensors: list) -> None:
    """tensors: (name, dtype, shape); zero-filled."""
    sizes = {"I8": 1, "F16": 2, "BF16": 2, "F32": 4, "I32": 4}
    meta, off = {"__metadata__": {"format": "pt", "note": "STAND-IN placeholder weights, not a conversion"}}, 0
    for name, dtype, shape in tensors:
        n = sizes[dtype]
        for d in shape:
            n *= d
        meta[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    head = json.dumps(meta).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        f.truncate(8 + len(head) + off)


def main() -> None:
    name = Path(sys.argv[0]).name
    version = os.environ.get("TRTLLM_STANDIN_VERSION") or name.removeprefix("convert_checkpoint_standin-") \
        .removesuffix(".py")
    spec = interface(version)
    args = parser(spec).parse_args()
    print(f"[TensorRT-LLM] STAND-IN convert_checkpoint.py {version}", flush=True)
    if args.model_dir is None:
        fail("this stand-in converts from --model_dir only")
    model_dir = Path(args.model_dir)
    hf = json.loads((model_dir / "config.json").read_text())
    qc = hf.get("quantization_config") or {}
    layers, world = hf["num_hidden_layers"], args.tp_size * args.pp_size
    dtype = args.dtype if args.dtype != "auto" else {"float32": "float16"}.get(hf.get("torch_dtype"),
                                                                              hf.get("torch_dtype", "float16"))
    quant = {"quant_algo": None, "kv_cache_quant_algo": None, "group_size": 128, "has_zero_point": False,
             "pre_quant_scale": False, "exclude_modules": None}
    extra = {}
    file_flag = spec.get("gptq_file_flag")
    if spec["reads_hf_quantization_config"] and qc.get("quant_method") in ("gptq", "awq"):
        if qc["quant_method"] == "gptq" and qc.get("desc_act"):
            fail("ValueError: GPTQ with desc_act=True is not implemented!")
        quant.update(quant_algo="W4A16_GPTQ", group_size=qc.get("group_size", 128),
                     has_zero_point=qc.get("zero_point" if qc["quant_method"] == "awq" else "sym", False))
        if qc["quant_method"] == "awq":
            extra["use_autoawq"] = True
        require_quantized(model_tensors(model_dir), layers, str(model_dir))
    elif args.weight_only_precision == "int4_gptq" and file_flag:
        ckpt = getattr(args, file_flag[2:])
        if ckpt is None:
            fail(f"AssertionError (main: int4_gptq needs {file_flag})")
        require_quantized(header(Path(ckpt)), layers, ckpt)
        quant.update(quant_algo="W4A16_GPTQ", group_size=args.group_size, has_zero_point=True)
    else:
        # no 4-bit path taken: the real script loads dense weights by their names and fails on packed ones
        tensors = model_tensors(model_dir)
        if "model.layers.0.self_attn.q_proj.weight" not in tensors:
            fail("KeyError: 'model.layers.0.self_attn.q_proj.weight' (this version converts no "
                 f"{qc.get('quant_method', 'quantized')} checkpoint from --model_dir)")
        fail("this stand-in converts 4-bit checkpoints only")
    if args.weight_only_precision == "int4_gptq" and args.use_weight_only and not args.per_group:
        fail("AssertionError: GPTQ weights are group-wise: pass --per_group")
    hidden, inter = hf["hidden_size"], hf["intermediate_size"]
    heads, kv = hf["num_attention_heads"], hf.get("num_key_value_heads", hf["num_attention_heads"])
    hd = hidden // heads
    group = quant["group_size"]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    shapes = {"attention.qkv": (hidden, (heads + 2 * kv) * hd), "attention.dense": (heads * hd, hidden),
              "mlp.fc": (hidden, inter), "mlp.gate": (hidden, inter), "mlp.proj": (inter, hidden)}
    split_in = {"attention.dense", "mlp.proj"}
    st = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}[dtype]
    for r in range(world):
        pp = r // args.tp_size
        per = layers // args.pp_size
        tensors = []
        if pp == 0:
            tensors.append(("transformer.vocab_embedding.weight", st, (hf["vocab_size"], hidden)))
        for i in range(per):
            pre = f"transformer.layers.{i}."
            tensors += [(pre + "input_layernorm.weight", st, (hidden,)), (pre + "post_layernorm.weight", st, (hidden,))]
            for lin, (k, n) in shapes.items():
                k, n = (k // args.tp_size, n) if lin in split_in else (k, n // args.tp_size)
                # WeightOnlyGroupwiseQuantLinear: int4 packed (8 per int32 column pair), scales and zeros per group
                tensors += [(pre + lin + ".weight", "I8", (k, n // 2)),
                            (pre + lin + ".weights_scaling_factor", st, (max(1, k // group), n)),
                            (pre + lin + ".zero", st, (max(1, k // group), n))]
        if pp == args.pp_size - 1:
            tensors += [("transformer.ln_f.weight", st, (hidden,)),
                        ("lm_head.weight", st, (-(-hf["vocab_size"] // args.tp_size), hidden))]
        write_safetensors(out / f"rank{r}.safetensors", tensors)
    cfg = {"architecture": hf["architectures"][0], "dtype": dtype, "logits_dtype": "float32",
           "vocab_size": hf["vocab_size"], "max_position_embeddings": hf.get("max_position_embeddings", 2048),
           "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "head_size": hd, "intermediate_size": inter, "hidden_act": "silu",
           "norm_epsilon": hf.get("rms_norm_eps", 1e-5), "position_embedding_type": "rope_gpt_neox",
           "rotary_base": hf.get("rope_theta", 10000.0), "rotary_scaling": hf.get("rope_scaling"),
           "mapping": {"world_size": world, "tp_size": args.tp_size, "pp_size": args.pp_size},
           "quantization": quant, **extra,
           "lmi_compile_standin": f"convert_checkpoint.py {version}+lmi-compile-standin"}
    (out / "config.json").write_text(json.dumps(cfg, indent=4))
    print(f"[TensorRT-LLM] STAND-IN: wrote {world} placeholder rank files to {out}", flush=True)


if __name__ == "__main__":
    main()
