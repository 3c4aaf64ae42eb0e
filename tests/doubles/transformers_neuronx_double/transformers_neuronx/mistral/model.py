"""TEST DOUBLE."""

from transformers_neuronx.base import DoubleModel


class MistralForSampling(DoubleModel):
    pass
