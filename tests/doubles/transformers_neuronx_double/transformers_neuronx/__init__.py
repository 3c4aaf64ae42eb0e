"""TEST DOUBLE of transformers-neuronx (see ../README.md). Nothing here compiles."""

import os

from transformers_neuronx.base import DoubleModel  # noqa: F401
from transformers_neuronx.modeling_auto import NeuronAutoModelForCausalLM  # noqa: F401

__version__ = os.environ.get("TNX_DOUBLE_VERSION", "0.13.380") + "+lmi-compile-standin-double"
