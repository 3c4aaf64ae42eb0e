"""TEST DOUBLE."""

from transformers_neuronx.base import DoubleModel


class MixtralForSampling(DoubleModel):
    pass
