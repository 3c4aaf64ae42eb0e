#!/usr/bin/env python3
"""STAND-IN for the Neuron compile entry point (lmi_compile.neuron.entry). It compiles nothing.

Same command-line contract as the real entry point (absolute paths, --check-sdk, a calls file). It checks
what transformers-neuronx would need: a split checkpoint (config.json, pytorch_model.bin/key_to_filename.json,
every listed file loadable as one tensor), a model class transformers-neuronx has, and arguments its
from_pretrained accepts (n_positions within the model, amp in f16/bf16/f32, continuous batching with list
n_positions, sharded saves only with on-device embedding). Heads need not divide tp: transformers-neuronx
pads them. It writes placeholder .neff files named by a hash of the calls, as the real save() names graphs
by hash, and a versions file whose compiler version says standin.
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

REAL_CLASSES = {"transformers_neuronx.llama.model.LlamaForSampling",
                "transformers_neuronx.mistral.model.MistralForSampling",
                "transformers_neuronx.mixtral.model.MixtralForSampling"}
VERSIONS = {"neuronx_cc": "0.0.0+lmi-compile-standin", "transformers_neuronx": "0.0.0+lmi-compile-standin",
            "torch_neuronx": None, "optimum_neuron": None}
MARK = b"LMI-COMPILE STAND-IN NEFF - NOT A COMPILED GRAPH\n"


def fail(msg: str) -> None:
    print(f"STAND-IN neuron compile: {msg}", file=sys.stderr)
    sys.exit(1)


def parse(argv=None):
    """The contract of lmi_compile/neuron/entry.py's docstring, written out here rather than imported, so a
    change to the code under test cannot change what the stand-in accepts."""
    p = argparse.ArgumentParser(prog="neuron_compile_standin")
    p.add_argument("--check-sdk", action="store_true")
    for flag in ("--split-dir", "--output", "--calls", "--versions-file"):
        p.add_argument(flag)
    args = p.parse_args(argv)
    if not args.check_sdk:
        for flag in ("--split-dir", "--output", "--calls", "--versions-file"):
            value = getattr(args, flag[2:].replace("-", "_"))
            if not value or not os.path.isabs(value):
                fail(f"{flag} must be given as an absolute path (got {value!r})")
    return args


def main() -> None:
    args = parse()
    if args.check_sdk:
        print(json.dumps({**VERSIONS, "neuron_device": False}))
        return
    import torch

    calls = json.loads(Path(args.calls).read_text())
    kw, nc = calls["kwargs"], calls["neuron_config"]
    if calls["model_class"] not in REAL_CLASSES:
        fail(f"unknown model class {calls['model_class']}")
    split = Path(args.split_dir)
    cfg = json.loads((split / "config.json").read_text())
    mapping = json.loads((split / "pytorch_model.bin" / "key_to_filename.json").read_text())
    for key, fname in mapping.items():
        t = torch.load(split / "pytorch_model.bin" / fname, weights_only=True)
        if not isinstance(t, torch.Tensor):
            fail(f"{fname} is not a tensor")
    for required in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        if required not in mapping:
            fail(f"split checkpoint lacks {required}")
    positions = kw["n_positions"] if isinstance(kw["n_positions"], list) else [kw["n_positions"]]
    if max(positions) > cfg["max_position_embeddings"] and not cfg.get("rope_scaling"):
        fail("n_positions exceeds max_position_embeddings")
    if kw["amp"] not in ("f16", "bf16", "f32") or kw["batch_size"] < 1:
        fail(f"bad amp or batch_size: {kw}")
    if "continuous_batching" in nc and not isinstance(kw["n_positions"], list):
        fail("continuous batching needs n_positions as a list")
    if calls["sharded_weights"] and not nc.get("on_device_embedding"):
        fail("save(sharded_weights=True) needs neuron_config.on_device_embedding")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    buckets = kw.get("context_length_estimate") or ["default"]
    for b in [*buckets, "token-gen"]:
        key = json.dumps([calls["model_class"], kw, nc, b], sort_keys=True)
        (out / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.neff").write_bytes(MARK + key.encode())
    if calls["sharded_weights"]:
        (out / "DecoderLMHead.safetensors").write_bytes(MARK)
        for i in range(cfg["num_hidden_layers"]):
            (out / f"decoder_layer_{i}.safetensors").write_bytes(MARK)
        (out / "config.json").write_text(json.dumps({**cfg, **kw, "is_presharded_checkpoint": True}))
    Path(args.versions_file).write_text(json.dumps(VERSIONS))


if __name__ == "__main__":
    main()
