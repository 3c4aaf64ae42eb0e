"""Format converters: HuggingFace checkpoints into TensorRT-LLM rank files and Neuron split weights."""

from lmi_compile.pipeline.interrupts import import_held

import_held("torch")  # every converter needs it; a Ctrl-C during its import would abort the process
