"""TEST DOUBLE of neuronxcc: only a version, marked as a stand-in."""

__version__ = "0.0.0+lmi-compile-standin-double"
