"""The Neuron compiler boundary: compile split weights into NEFF graphs with transformers-neuronx.

Run as a separate process (`python -m lmi_compile.neuron_entry ...`) so a compiler crash cannot take the
pipeline with it. It is the only code that imports the Neuron SDK. neuronx-cc itself runs on any x86
Linux host, but transformers-neuronx compiles without a Neuron device only through its CPU-compile
path (0.13, SDK 2.21); older versions need /dev/neuron* (an inf2/trn1 instance or the LMI Neuron image).

Contract (shared with tests/standins/neuron_compile_standin.py):
  --split-dir DIR --output DIR --model-class dotted.Class --batch-size N --tp-degree N --n-positions N
  --amp f16|bf16|f32 [--context-length-estimate A,B] --versions-file FILE
Writes OUTPUT/*.neff and FILE = {"neuronx_cc": ..., "transformers_neuronx": ..., "torch_neuronx": ...}.
Exit 3 when the SDK is not installed.
"""

import argparse
import importlib
import json
import sys
from importlib import metadata

EXIT_NO_SDK = 3


def parse(argv=None):
    p = argparse.ArgumentParser(prog="lmi_compile.neuron_entry")
    p.add_argument("--split-dir", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--model-class", required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--tp-degree", type=int, required=True)
    p.add_argument("--n-positions", type=int, required=True)
    p.add_argument("--amp", choices=["f16", "bf16", "f32"], required=True)
    p.add_argument("--context-length-estimate")
    p.add_argument("--versions-file", required=True)
    return p.parse_args(argv)


def versions() -> dict:
    out = {}
    for dist in ("neuronx-cc", "transformers-neuronx", "torch-neuronx", "optimum-neuron"):
        try:
            out[dist.replace("-", "_")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist.replace("-", "_")] = None
    return out


def main(argv=None) -> None:
    args = parse(argv)
    module, _, cls_name = args.model_class.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except ImportError as e:
        print(f"error: the Neuron SDK is not installed here ({e.name or e}); run in the LMI Neuron container "
              f"(deepjavalibrary/djl-serving:*-neuronx) or pip install 'lmi-compile[neuron]' from the Neuron "
              f"pip repository", file=sys.stderr)
        sys.exit(EXIT_NO_SDK)
    kwargs = dict(batch_size=args.batch_size, tp_degree=args.tp_degree, n_positions=args.n_positions, amp=args.amp)
    if args.context_length_estimate:
        kwargs["context_length_estimate"] = [int(x) for x in args.context_length_estimate.split(",")]
    model = cls.from_pretrained(args.split_dir, **kwargs)
    model.to_neuron()
    model.save(args.output)
    with open(args.versions_file, "w") as f:
        json.dump(versions(), f)


if __name__ == "__main__":
    main()
