"""TEST DOUBLE of transformers-neuronx's model base: records calls, names graphs by a hash of the arguments.

The real library hashes the HLO it builds from the construction arguments, one kernel per context bucket
and per token bucket (bucket.py: an int n_positions gives 128, 256, ... N; a list only its entries; no
context_length_estimate gives half of each token bucket; continuous batching encodes context at batch 1).
Here each kernel's name is sha256 of those same inputs, so two constructions agree on a name exactly when
their arguments agree.
"""

import hashlib
import json
import os
from pathlib import Path

from transformers_neuronx.config import NeuronConfig

DIMS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "intermediate_size", "vocab_size", "rms_norm_eps")
MARK = b"TRANSFORMERS-NEURONX TEST DOUBLE - NOT A COMPILED GRAPH\n"


def api() -> tuple:
    return tuple(int(p) for p in os.environ.get("TNX_DOUBLE_VERSION", "0.13.380").split(".")[:2])


def record(event: dict) -> None:
    path = os.environ.get("TNX_DOUBLE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(event, sort_keys=True) + "\n")


def token_sizes(n_positions) -> list:
    if isinstance(n_positions, list):
        return sorted(n_positions)
    out, b = [], 128
    while b < n_positions:
        out.append(b)
        b *= 2
    return out + [n_positions]


def context_sizes(cle, token_buckets) -> list:
    if cle is None:
        return [b // 2 for b in token_buckets]
    return sorted(cle) if isinstance(cle, list) else ([cle] if cle > 0 else [])


class DoubleModel:
    def __init__(self, config: dict, *, batch_size=1, amp="f32", tp_degree=2, n_positions=2048,
                 context_length_estimate=None, neuron_config=None, **kwargs):
        self.config = config
        self.args = {"batch_size": batch_size, "amp": amp, "tp_degree": tp_degree, "n_positions": n_positions,
                     "context_length_estimate": context_length_estimate}
        self.neuron_config = neuron_config or NeuronConfig()
        nc = self.neuron_config.as_dict()
        cb = "continuous_batching" in nc
        if cb:  # module.py sanity checks
            assert nc["continuous_batching"]["batch_size_for_shared_caches"] == batch_size
            assert isinstance(n_positions, list), "continuous batching needs n_positions as a list"
        tokens = token_sizes(n_positions)
        contexts = context_sizes(context_length_estimate, tokens)
        assert not contexts or max(contexts) <= max(tokens)
        self.kernels = [("context", c, 1 if cb else batch_size) for c in contexts] + \
                       [("token", t, batch_size) for t in tokens]
        self.presharded = bool(config.get("is_presharded_checkpoint"))
        self.graph_dir = None
        self.made = None  # "compiled" or "loaded"

    @classmethod
    def from_pretrained(cls, path, *model_args, **kwargs):
        path = Path(path)
        config = json.loads((path / "config.json").read_text())  # AutoConfig would fail without it
        if not (config.get("is_presharded_checkpoint") or (path / "pytorch_model.bin" / "key_to_filename.json").is_file()
                or list(path.glob("*.safetensors")) or (path / "pytorch_model.bin").is_file()):
            raise FileNotFoundError(f"{path}: no weights transformers-neuronx can load")
        nc = kwargs.get("neuron_config")
        record({"call": "from_pretrained", "class": f"{cls.__module__}.{cls.__name__}", "path": str(path),
                "kwargs": {k: v for k, v in kwargs.items() if k != "neuron_config"},
                "neuron_config": nc.as_dict() if nc else {}})
        return cls(config, **kwargs)

    def graph_names(self) -> list[str]:
        dims = {k: self.config.get(k) for k in DIMS}
        cls = f"{type(self).__module__}.{type(self).__name__}"
        return [hashlib.sha256(json.dumps([cls, dims, self.args, self.neuron_config.as_dict(), list(k)],
                                          sort_keys=True).encode()).hexdigest()[:20] + ".neff"
                for k in self.kernels]

    def load(self, directory):
        record({"call": "load", "path": str(directory)})
        self.graph_dir = Path(directory)

    def _build(self, how: str):
        if self.presharded:
            assert self.neuron_config.on_device_embedding, "presharded weights need on_device_embedding"
        if self.graph_dir is not None:
            for name in self.graph_names():
                if not (self.graph_dir / name).is_file():
                    raise FileNotFoundError(f"Could not find a matching NEFF for your HLO in this directory. "
                                            f"Ensure that the model you are trying to load is the same type and has "
                                            f"the same parameters as the one you saved ({name})")
            self.made = "loaded"
        else:
            self.made = "compiled"
        record({"call": how, "made": self.made, "graphs": self.graph_names()})

    def to_neuron(self):
        self._build("to_neuron")

    if api() >= (0, 13):
        def cpu_compile(self):
            self._build("cpu_compile")

    def save(self, directory, sharded_weights=False):
        if sharded_weights and api() < (0, 12):
            raise TypeError("save() got an unexpected keyword argument 'sharded_weights'")
        assert self.made == "compiled", "save() after to_neuron()/cpu_compile()"
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for name in self.graph_names():
            (out / name).write_bytes(MARK)
        if sharded_weights:
            assert self.neuron_config.on_device_embedding, "save(sharded_weights=True) needs on_device_embedding"
            (out / "DecoderLMHead.safetensors").write_bytes(MARK)
            for i in range(self.config["num_hidden_layers"]):
                (out / f"decoder_layer_{i}.safetensors").write_bytes(MARK)
            cfg = {**self.config, **{k: v for k, v in self.args.items() if k != "context_length_estimate"},
                   "is_presharded_checkpoint": True}
            (out / "config.json").write_text(json.dumps(cfg))
        record({"call": "save", "path": str(out), "sharded_weights": sharded_weights})
