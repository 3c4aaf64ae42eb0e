"""The TensorRT-LLM backend: convert, the trtllm-build boundary (build.py) and the layouts LMI loads."""
