"""The Neuron compiler boundary: compile split weights into NEFF graphs with transformers-neuronx.

Run as a separate process (`python -m lmi_compile.neuron_entry ...`) so a compiler crash cannot take the
pipeline with it. It is the only code that imports the Neuron SDK. It makes exactly the calls it is handed
(neuron/calls.py: what the target LMI release's loader makes), so the graphs carry the hashes LMI looks up.
Where no Neuron device is present and transformers-neuronx has `cpu_compile()` (0.13, Neuron SDK 2.21, LMI
0.32-0.34) it compiles on the CPU; older versions compile only inside `to_neuron()`, on an inf2/trn1 host.

Contract (shared with tests/standins/neuron_compile_standin.py); every path absolute:
  --check-sdk: import the SDK, print the versions as JSON, exit 0 (3 when it is missing)
  --split-dir DIR --output DIR --calls FILE.json --versions-file FILE
    FILE.json = {"model_class", "kwargs", "neuron_config", "sharded_weights"} (LoaderCalls.to_json)
Writes OUTPUT/*.neff (plus, with sharded_weights, the presharded weights and config.json that
`save(dir, sharded_weights=True)` writes) and the versions file
{"neuronx_cc": ..., "transformers_neuronx": ..., "torch_neuronx": ..., "optimum_neuron": ...}.
Exit 3 when the SDK is not installed.
"""

import argparse
import glob
import importlib
import json
import os
import sys
from importlib import metadata

EXIT_NO_SDK = 3
SDK_MODULES = ("transformers_neuronx", "neuronxcc")


def parse(argv=None):
    p = argparse.ArgumentParser(prog="lmi_compile.neuron_entry")
    p.add_argument("--check-sdk", action="store_true", help="import the Neuron SDK, print its versions, exit")
    p.add_argument("--split-dir")
    p.add_argument("--output")
    p.add_argument("--calls")
    p.add_argument("--versions-file")
    args = p.parse_args(argv)
    if not args.check_sdk:
        for name in ("split_dir", "output", "calls", "versions_file"):
            value = getattr(args, name)
            if not value:
                p.error(f"--{name.replace('_', '-')} is required")
            if not os.path.isabs(value):
                p.error(f"--{name.replace('_', '-')} {value}: must be an absolute path")
    return args


def versions() -> dict:
    out = {}
    for key, dist, module in (("neuronx_cc", "neuronx-cc", "neuronxcc"),
                              ("transformers_neuronx", "transformers-neuronx", "transformers_neuronx"),
                              ("torch_neuronx", "torch-neuronx", "torch_neuronx"),
                              ("optimum_neuron", "optimum-neuron", "optimum.neuron")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # a source install: the module's own __version__
            out[key] = getattr(sys.modules.get(module), "__version__", None)
    return out


def import_sdk() -> None:
    try:
        for name in SDK_MODULES:
            importlib.import_module(name)
    except ImportError as e:
        print(f"error: the Neuron SDK is not installed here ({e.name or e}); run in the LMI Neuron container "
              f"of the release you serve with (see lmi-compile neuron --lmi-version) or pip install "
              f"'lmi-compile[neuron]' from the Neuron pip repository", file=sys.stderr)
        sys.exit(EXIT_NO_SDK)


def has_neuron_device() -> bool:
    return bool(glob.glob("/dev/neuron*"))


def build(calls: dict, split_dir: str):
    """`Class.from_pretrained(split_dir, neuron_config=NeuronConfig(...), **kwargs)`, as the loader calls it."""
    from transformers_neuronx.config import ContinuousBatchingConfig, NeuronConfig

    module, _, cls_name = calls["model_class"].rpartition(".")
    cls = getattr(importlib.import_module(module), cls_name)
    nc = dict(calls["neuron_config"])
    if "continuous_batching" in nc:
        nc["continuous_batching"] = ContinuousBatchingConfig(**nc["continuous_batching"])
    return cls.from_pretrained(split_dir, neuron_config=NeuronConfig(**nc), **calls["kwargs"])


def main(argv=None) -> None:
    args = parse(argv)
    import_sdk()
    if args.check_sdk:
        print(json.dumps({**versions(), "neuron_device": has_neuron_device()}))
        return
    with open(args.calls) as f:
        calls = json.load(f)
    model = build(calls, args.split_dir)
    if not has_neuron_device() and hasattr(model, "cpu_compile"):
        model.cpu_compile()  # transformers-neuronx 0.13: compile without /dev/neuron*
    else:
        model.to_neuron()
    if calls["sharded_weights"]:
        model.save(args.output, sharded_weights=True)
    else:
        model.save(args.output)
    with open(args.versions_file, "w") as f:
        json.dump(versions(), f)


if __name__ == "__main__":
    main()
