"""Format converters: HuggingFace checkpoints into TensorRT-LLM rank files and Neuron split weights."""
