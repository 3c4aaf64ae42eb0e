"""The HuggingFace model being compiled: its config, architecture facts, weights and validation."""
