"""lmi-compile: ahead-of-time compilation of HuggingFace models for AWS LMI containers."""

__version__ = "0.1.0"
