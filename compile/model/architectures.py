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
    num_experts: int = 0  # MoE: experts per layer (0 for dense models)
    top_k: int = 0  # MoE: experts each token is routed to


@dataclass(frozen=True)
class Architecture:
    name: str
    entry: dict
    layout: dict
    dims: ModelDims

    @property
    def trtllm_architecture(self) -> str:
        return self.entry["trtllm_architecture"]

    def tensor_entries(self) -> list[tuple[str, dict]]:
        """(section, entry) for every TRT-LLM tensor of the layout: first_stage, layer, last_stage."""
        return [(sec, e) for sec in ("first_stage", "layer", "last_stage") for e in self.layout[sec]]

    def shape_symbols(self) -> dict[str, int]:
        """The sizes the layout's `shape` entries name, from config.json."""
        d = self.dims
        return {"hidden": d.hidden_size, "vocab": d.vocab_size, "inter": d.intermediate_size,
                "q": d.num_heads * d.head_dim, "kv": d.num_kv_heads * d.head_dim, "experts": d.num_experts}

    def source_shapes(self) -> dict[str, tuple[int, ...]]:
        """{HF tensor name: the shape config.json implies} for every tensor of the layout, every layer and expert:
        what the converters check a checkpoint's tensors against."""
        sym, out = self.shape_symbols(), {}
        for section, e in self.tensor_entries():
            specs = e["shape"] if isinstance(e["shape"][0], list) else [e["shape"]]
            for i in range(self.dims.num_layers) if section == "layer" else [None]:
                names = self.sources(e, i)
                for name, want in zip(names, specs * (len(names) // len(specs))):
                    out[name] = tuple(sym[w] for w in want)
        return out

    @property
    def is_moe(self) -> bool:
        return any("{e}" in s for _, e in self.tensor_entries() for s in e["sources"])

    def sources(self, entry: dict, layer: int | None = None) -> list[str]:
        """An entry's source names for one layer; sources naming {e} are listed for every expert in turn."""
        if not any("{e}" in s for s in entry["sources"]):
            return [s.format(i=layer) for s in entry["sources"]]
        return [s.format(i=layer, e=x) for x in range(self.dims.num_experts) for s in entry["sources"]]

    @property
    def embedding_source(self) -> str:
        """The HF tensor the token embedding comes from."""
        return next(e["sources"][0] for _, e in self.tensor_entries() if e["rule"] == "embedding")

    def tied_sources(self) -> dict[str, str]:
        """{source: the tensor it is tied to} for weights a tied checkpoint does not store (lm_head)."""
        if not self.dims.tie_word_embeddings:
            return {}
        return {s: t for _, e in self.tensor_entries() if e.get("tied_sources")
                for s, t in zip(e["sources"], e["tied_sources"])}

    def ignored_sources(self) -> set[str]:
        """Tensors a checkpoint may hold that are not weights of the model (e.g. rotary inv_freq buffers)."""
        return {t.format(i=i) for t in self.layout.get("ignored_sources", []) for i in range(self.dims.num_layers)}


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
    for name in ("num_experts", "top_k"):
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise BadInput(f"{config.path}: {fields[name][0][0]!r} must be a non-negative integer (found {v!r})")
    return ModelDims(**values)


def _layout(layouts: dict, name: str) -> dict:
    """A layout from the table; one with a "base" is that layout with items replaced: each key of "replace"
    (a TRT-LLM target or a neuron_order name) stands for the list of items that take its place."""
    lay = layouts[name]
    if "base" not in lay:
        return lay
    base, replace, used = _layout(layouts, lay["base"]), lay.get("replace", {}), set()
    out = {}
    for key, items in base.items():
        if not isinstance(items, list):
            out[key] = items
            continue
        out[key] = []
        for item in items:
            k = item["target"] if isinstance(item, dict) else item
            out[key] += replace[k] if k in replace else [item]
            used.add(k)
    unknown = sorted(set(replace) - used)
    if unknown:
        raise ValueError(f"architectures.json: layout {name!r} replaces {unknown}, not in layout {lay['base']!r}")
    out.update({k: v for k, v in lay.items() if k not in ("base", "replace")})
    return out


def resolve(config: ModelConfig) -> Architecture:
    """The table entry and dimensions for a model, or a BadInput listing what is supported."""
    table = _table()
    entry = table["architectures"].get(config.architecture or "")
    if entry is None:
        raise BadInput(f"{config.path}: architecture {config.architecture!r} is not supported; supported: "
                       f"{', '.join(supported())}")
    arch = Architecture(config.architecture, entry, _layout(table["layouts"], entry["layout"]), read_dims(config))
    if arch.is_moe and not (arch.dims.num_experts and arch.dims.top_k):
        fields = table["config_fields"]
        raise BadInput(f"{config.path}: {config.architecture} is a mixture of experts but "
                       f"{fields['num_experts'][0][0]!r} or {fields['top_k'][0][0]!r} is missing or 0; the config "
                       f"is incomplete")
    if arch.is_moe and arch.dims.top_k > arch.dims.num_experts:
        fields = table["config_fields"]
        raise BadInput(f"{config.path}: {fields['top_k'][0][0]!r} {arch.dims.top_k} is larger than "
                       f"{fields['num_experts'][0][0]!r} {arch.dims.num_experts}; the config is contradictory")
    return arch
