#!/usr/bin/env python3
"""STAND-IN for the Neuron compile entry point (lmi_compile.neuron.entry). It compiles nothing.

Same command-line contract as the real entry point. It checks what transformers-neuronx would need:
a split checkpoint (config.json, pytorch_model.bin/key_to_filename.json, every listed file loadable as
one tensor), a model class transformers-neuronx has, and arguments its from_pretrained accepts
(tp_degree dividing the attention heads, n_positions within the model, amp in f16/bf16/f32). It writes
placeholder .neff files named by a hash of the settings, as the real save() names graphs by hash, and a
versions file whose compiler version says standin.
"""

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lmi_compile.neuron.entry import parse  # noqa: E402  (the shared contract)

REAL_CLASSES = {"transformers_neuronx.llama.model.LlamaForSampling",
                "transformers_neuronx.mistral.model.MistralForSampling",
                "transformers_neuronx.qwen2.model.Qwen2ForSampling"}


def fail(msg: str) -> None:
    print(f"STAND-IN neuron compile: {msg}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    import torch

    args = parse()
    if args.model_class not in REAL_CLASSES:
        fail(f"unknown model class {args.model_class}")
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
    if cfg["num_attention_heads"] % args.tp_degree:
        fail(f"tp_degree {args.tp_degree} does not divide {cfg['num_attention_heads']} heads")
    if args.n_positions > cfg["max_position_embeddings"] and not cfg.get("rope_scaling"):
        fail("n_positions exceeds max_position_embeddings")
    if args.batch_size < 1:
        fail("batch_size must be positive")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    buckets = args.context_length_estimate.split(",") if args.context_length_estimate else [str(args.n_positions)]
    for b in buckets + ["token-gen"]:
        key = f"{args.model_class}|{args.batch_size}|{args.tp_degree}|{args.n_positions}|{args.amp}|{b}"
        (out / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.neff").write_bytes(
            b"LMI-COMPILE STAND-IN NEFF - NOT A COMPILED GRAPH\n" + key.encode())
    Path(args.versions_file).write_text(json.dumps({"neuronx_cc": "0.0.0+lmi-compile-standin",
                                                    "transformers_neuronx": "0.0.0+lmi-compile-standin",
                                                    "torch_neuronx": None, "optimum_neuron": None}))


if __name__ == "__main__":
    main()
