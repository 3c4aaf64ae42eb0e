"""Per-architecture facts, read from configs/architectures.json (the only place they live)."""

from dataclasses import dataclass

from lmi_compile.errors import BadInput
from lmi_compile.model.config import ModelConfig


def _table() -> dict:
    from lmi_compile.configs import load_json as _load

    return _load("architectures.json")


def supported() -> list[str]:
    return sorted(_table()["architectures"])


@dataclass(frozen=True)
class ModelDims:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    norm_epsilon: float
    hidden_act: str
    tie_word_embeddings: bool


@dataclass(frozen=True)
class Architecture:
    name: str
    entry: dict
    layout: dict
    dims: ModelDims

    @property
    def trtllm_architecture(self) -> str:
        return self.entry["trtllm_architecture"]


def read_dims(config: ModelConfig) -> ModelDims:
    fields = _table()["config_fields"]
    values = {}
    for name, spec in fields.items():
        if name.startswith("_"):
            continue
        keys, default = spec
        value = next((config.raw[k] for k in keys if config.raw.get(k) is not None), default)
        if value is None:
            raise BadInput(f"{config.path}: field {keys[0]!r} is missing; the config is incomplete, re-save it "
                           f"with save_pretrained")
        values[name] = value
    for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise BadInput(f"{config.path}: {fields[name][0][0]!r} must be a positive integer (found {v!r})")
    if values["hidden_size"] % values["num_heads"] and not values["head_dim"]:
        raise BadInput(f"{config.path}: hidden_size {values['hidden_size']} is not divisible by "
                       f"num_attention_heads {values['num_heads']} and no head_dim is given")
    if values["num_heads"] % values["num_kv_heads"]:
        raise BadInput(f"{config.path}: num_attention_heads {values['num_heads']} is not a multiple of "
                       f"num_key_value_heads {values['num_kv_heads']}; the config is contradictory")
    values["head_dim"] = values["head_dim"] or values["hidden_size"] // values["num_heads"]
    return ModelDims(**values)


def resolve(config: ModelConfig) -> Architecture:
    """The table entry and dimensions for a model, or a BadInput listing what is supported."""
    table = _table()
    entry = table["architectures"].get(config.architecture or "")
    if entry is None:
        raise BadInput(f"{config.path}: architecture {config.architecture!r} is not supported; supported: "
                       f"{', '.join(supported())}")
    return Architecture(config.architecture, entry, table["layouts"][entry["layout"]], read_dims(config))
