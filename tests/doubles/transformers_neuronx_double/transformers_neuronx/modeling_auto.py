"""TEST DOUBLE: NeuronAutoModelForCausalLM resolves config.json's model_type to the class, as the real one."""

import importlib
import json
from pathlib import Path

CLASSES = {"llama": "llama.model.LlamaForSampling", "mistral": "mistral.model.MistralForSampling",
           "mixtral": "mixtral.model.MixtralForSampling"}


class NeuronAutoModelForCausalLM:
    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        model_type = json.loads((Path(path) / "config.json").read_text())["model_type"]
        module, _, name = CLASSES[model_type].rpartition(".")
        target = getattr(importlib.import_module(f"transformers_neuronx.{module}"), name)
        return target.from_pretrained(path, *args, **kwargs)
