"""The one table of dtypes: safetensors tags, torch names, element sizes, and the float names each tool uses.

Everything else (header parsing, rank-file planning, size estimates, --dtype/--amp checks) looks dtypes
up here instead of keeping its own dict.
"""

# safetensors tag -> (torch dtype name or None when this tool has no torch name for it, bytes per element)
SAFETENSORS = {
    "BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1), "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": (None, 1),
    "I16": ("int16", 2), "U16": (None, 2), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I32": ("int32", 4), "U32": (None, 4), "F32": ("float32", 4), "I64": ("int64", 8), "U64": (None, 8),
    "F64": ("float64", 8),
}
ST_DTYPE_SIZE = {tag: size for tag, (_, size) in SAFETENSORS.items()}
ST_TO_TORCH = {tag: name for tag, (name, _) in SAFETENSORS.items() if name}
TORCH_TO_ST = {name: tag for tag, name in ST_TO_TORCH.items()}
DTYPE_BYTES = {name: SAFETENSORS[tag][1] for name, tag in TORCH_TO_ST.items()}

# The float dtypes weights are converted to and from; anything else is a quantized checkpoint.
FLOAT_DTYPES = ("float16", "bfloat16", "float32")
# transformers-neuronx's amp names (--amp) and LMI's option.dtype names, for the same three floats.
AMP_DTYPES = {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}
DTYPE_AMPS = {v: k for k, v in AMP_DTYPES.items()}
LMI_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
# FP8 as TensorRT-LLM stores it: e4m3 (its Parameter dtype 'fp8'; tensorrt_llm/quantization/layers.py FP8Linear),
# largest finite value 448.
FP8 = "float8_e4m3fn"
FP8_MAX = 448.0


def itemsize(dtype: str) -> int:
    """Bytes per element of a torch dtype name ("bfloat16" -> 2)."""
    return DTYPE_BYTES[dtype]
