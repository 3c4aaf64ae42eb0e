"""TEST DOUBLE."""

from transformers_neuronx.base import DoubleModel


class LlamaForSampling(DoubleModel):
    pass
