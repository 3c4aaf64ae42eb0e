"""Read a HuggingFace config.json, written by transformers 4.x or 5.x, into one normalized shape."""

import json
from dataclasses import dataclass, field
from pathlib import Path

from lmi_compile.errors import BadInput

# HF dtype names as written in config.json -> canonical torch names.
DTYPE_NAMES = {
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}


def read_json(path: Path, *, what: str | None = None) -> dict:
    """Parse a JSON object file, turning every failure into a one-line BadInput naming the file."""
    what = what or str(path)
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BadInput(f"{what}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{what}: not valid JSON ({e}); re-save it with save_pretrained") from None
    if not isinstance(data, dict):
        raise BadInput(f"{what}: expected a JSON object, found {type(data).__name__}")
    return data


def _rope(raw: dict) -> tuple[float | None, dict | None]:
    """rope_theta and a non-default rope scaling dict, from either config generation."""
    params = raw.get("rope_parameters")
    theta = raw.get("rope_theta")
    scaling = raw.get("rope_scaling")
    if isinstance(params, dict):  # transformers 5.x
        theta = params.get("rope_theta", theta)
        if scaling is None:
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if isinstance(scaling, dict):
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind in (None, "default"):
            scaling = None
        else:
            scaling = dict(scaling)
            # TRT-LLM versions read either key; writing both keeps old and new happy.
            scaling["type"] = scaling["rope_type"] = kind
    else:
        scaling = None
    return (float(theta) if theta is not None else None), scaling


@dataclass(frozen=True)
class ModelConfig:
    """The fields lmi-compile needs, read the same from 4.x and 5.x configs."""

    path: Path
    raw: dict = field(repr=False)
    architecture: str | None
    model_type: str | None
    dtype: str | None
    rope_theta: float | None
    rope_scaling: dict | None

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        raw = read_json(path)
        archs = raw.get("architectures")
        arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
        dtype_raw = raw.get("torch_dtype", raw.get("dtype"))
        dtype = DTYPE_NAMES.get(str(dtype_raw).replace("torch.", "")) if dtype_raw else None
        theta, scaling = _rope(raw)
        return cls(path=Path(path), raw=raw, architecture=arch, model_type=raw.get("model_type"),
                   dtype=dtype, rope_theta=theta, rope_scaling=scaling)

    def get(self, key, default=None):
        return self.raw.get(key, default)

    @property
    def uses_custom_code(self) -> bool:
        return bool(self.raw.get("auto_map"))
