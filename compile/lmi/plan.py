"""`lmi-compile plan`: sizes and fit, from config.json (and the index for exact sizes) alone.

All numbers are bytes unless named otherwise. Per-rank weights follow the TRT-LLM split rules:
the embedding is replicated on the first pipeline stage, layers split over tp and pp, the lm_head
split over tp (vocab padded to a multiple of tp) on the last stage. The KV cache per rank holds its
share of kv heads, at least one (heads are repeated when kv heads < tp).
"""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from lmi_compile.model.architectures import Architecture, resolve
from lmi_compile.configs import load_json
from lmi_compile.errors import BadInput
from lmi_compile.model.config import ModelConfig
from lmi_compile.model.dtypes import DTYPE_BYTES, FLOAT_DTYPES

GiB = 1024 ** 3
# Activations, CUDA context and runtime buffers that are not weights or KV cache.
OVERHEAD_FRACTION = 0.10
OVERHEAD_FIXED = 1 * GiB


@dataclass
class Plan:
    architecture: str
    dtype: str
    parameters: int
    active_parameters: int
    weight_bytes: int
    tp: int
    pp: int
    weight_bytes_per_rank: int
    kv_bytes_per_token: int
    kv_bytes_per_token_per_rank: int
    kv_bytes_for_batch: int
    kv_bytes_for_batch_per_rank: int
    max_batch_size: int
    max_seq_len: int
    disk_bytes: dict
    instance: str | None = None
    fits: bool | None = None
    memory_per_accelerator: int | None = None
    needed_per_accelerator: int | None = None
    fitting_tp: list | None = None
    warnings: list | None = None


def param_counts(arch: Architecture) -> dict[str, int]:
    """Parameters by part, summed from the layout's tensor shapes (configs/architectures.json).

    embedding, layer (one decoder layer), norm (the rest of the last stage), lm_head (0 when tied);
    layer_experts: the part of a layer that is expert weights; layer_fixed / layer_fixed_bytes: the part
    stored in a dtype of its own whatever the model's (the MoE router: float32, replicated on every rank).
    """
    d = arch.dims
    sym = {"hidden": d.hidden_size, "vocab": d.vocab_size, "inter": d.intermediate_size,
           "q": d.num_heads * d.head_dim, "kv": d.num_kv_heads * d.head_dim, "experts": d.num_experts}
    c = dict.fromkeys(("embedding", "layer", "norm", "lm_head", "layer_experts", "layer_fixed", "layer_fixed_bytes"), 0)
    tied = arch.tied_sources()
    for section, e in arch.tensor_entries():
        if e.get("optional") and not arch.entry.get(e["optional"]):
            continue
        specs = e["shape"] if isinstance(e["shape"][0], list) else [e["shape"]]
        n = sum(math.prod(sym[w] for w in spec) for spec in specs)
        if section == "first_stage":
            c["embedding"] += n
        elif section == "last_stage":
            if e["sources"][0] not in tied:  # a tied lm_head is the embedding, counted once
                c["lm_head" if e.get("tied_sources") else "norm"] += n
        else:
            if any("{e}" in src for src in e["sources"]):
                n *= d.num_experts
                c["layer_experts"] += n
            if e.get("dtype"):
                c["layer_fixed"] += n
                c["layer_fixed_bytes"] += n * DTYPE_BYTES[e["dtype"]]
            c["layer"] += n
    return c


def total_params(arch: Architecture) -> int:
    c = param_counts(arch)
    return c["embedding"] + arch.dims.num_layers * c["layer"] + c["norm"] + c["lm_head"]


def active_params(arch: Architecture) -> int:
    """Parameters one token uses: all but the experts it is not routed to (top_k of num_experts per layer)."""
    c, d = param_counts(arch), arch.dims
    if not d.num_experts:
        return total_params(arch)
    return total_params(arch) - d.num_layers * c["layer_experts"] * (d.num_experts - d.top_k) // d.num_experts


def make_plan(config: ModelConfig, *, tp: int = 1, pp: int = 1, dtype: str = "auto", max_batch_size: int = 32,
              max_seq_len: int = 1536, instance: str | None = None, index_total: int | None = None) -> Plan:
    arch = resolve(config)
    d = arch.dims
    if dtype == "auto":
        dtype = config.dtype or "float16"
    if dtype not in FLOAT_DTYPES:
        raise BadInput(f"--dtype {dtype!r}; use auto, float16, bfloat16 or float32")
    if tp < 1 or pp < 1:
        raise BadInput("--tp and --pp must be at least 1")
    if pp > d.num_layers:
        raise BadInput(f"{config.path}: --pp {pp} is larger than num_hidden_layers {d.num_layers}")
    b = DTYPE_BYTES[dtype]
    c = param_counts(arch)
    params = total_params(arch)
    # The index's total_size is exact (at the checkpoint's dtype); rescale it to the target dtype.
    src_b = DTYPE_BYTES.get(config.dtype or "", b)
    weight_bytes = index_total * b // src_b if index_total else params * b
    per_rank = rank_weight_bytes(c, d, tp, pp, b)
    kv_token = 2 * d.num_layers * d.num_kv_heads * d.head_dim * b
    kv_token_rank = rank_kv_bytes_per_token(d, tp, pp, b)
    plan = Plan(architecture=arch.name, dtype=dtype, parameters=params, active_parameters=active_params(arch),
                weight_bytes=weight_bytes, tp=tp, pp=pp,
                weight_bytes_per_rank=per_rank, kv_bytes_per_token=kv_token, kv_bytes_per_token_per_rank=kv_token_rank,
                kv_bytes_for_batch=kv_token * max_batch_size * max_seq_len,
                kv_bytes_for_batch_per_rank=kv_token_rank * max_batch_size * max_seq_len,
                max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                disk_bytes=disk_needs(weight_bytes, c["embedding"] * b, tp, pp), warnings=[])
    if d.num_heads % tp:
        plan.warnings.append(f"tp {tp} does not divide num_attention_heads {d.num_heads}: TRT-LLM and Neuron refuse it")
    if d.num_kv_heads < tp:
        plan.warnings.append(f"tp {tp} exceeds num_key_value_heads {d.num_kv_heads}: each kv head is repeated "
                             f"{tp // max(1, d.num_kv_heads)}x, so the KV cache costs {tp // max(1, d.num_kv_heads)}x "
                             f"the memory it needs")
    if instance:
        fit_instance(plan, instance, d, c)
    return plan


def rank_weight_bytes(c: dict, d, tp: int, pp: int, b: int) -> int:
    """Weights on the largest rank: the first stage has the embedding, the last the norm and lm_head
    (written even when tied, its vocab padded to a multiple of tp). Layers are split over tp; under expert
    parallelism a rank holds num_experts / moe_ep whole experts, under MoE tensor parallelism a 1 / moe_tp
    slice of each, so expert bytes per rank are 1 / tp of them either way. The router is whole on every rank."""
    layers = -(-d.num_layers // pp)
    share = layers * (c["layer"] - c["layer_fixed"]) // tp * b + layers * c["layer_fixed_bytes"]
    lm_head = -(-d.vocab_size // tp) * d.hidden_size
    if pp == 1:
        return (c["embedding"] + c["norm"] + lm_head) * b + share
    return max(c["embedding"] * b + share, share + (c["norm"] + lm_head) * b)


def rank_kv_bytes_per_token(d, tp: int, pp: int, b: int) -> int:
    """K and V of one token on one rank: its layers, its share of kv heads (at least one, repeated)."""
    return 2 * -(-d.num_layers // pp) * max(1, d.num_kv_heads // tp) * d.head_dim * b


def needed_per_accelerator(weights: int, kv: int) -> int:
    return int((weights + kv) * (1 + OVERHEAD_FRACTION)) + OVERHEAD_FIXED


def fit_instance(plan: Plan, instance: str, d, counts: dict) -> None:
    table = load_json("instances.json")["instances"]
    spec = table.get(instance)
    if spec is None:
        raise BadInput(f"--instance {instance!r} is not in the table; known: {', '.join(sorted(table))}")
    mem = spec["memory_gib"] * GiB
    plan.instance = instance
    plan.memory_per_accelerator = mem
    plan.needed_per_accelerator = needed_per_accelerator(plan.weight_bytes_per_rank, plan.kv_bytes_for_batch_per_rank)
    plan.fits = plan.tp * plan.pp <= spec["count"] and plan.needed_per_accelerator <= mem
    if plan.tp * plan.pp > spec["count"]:
        plan.warnings.append(f"tp*pp = {plan.tp * plan.pp} exceeds the {spec['count']} accelerators of {instance}")
    fitting = []
    for tp in range(1, spec["count"] + 1):
        if d.num_heads % tp:
            continue
        b = DTYPE_BYTES[plan.dtype]
        w = rank_weight_bytes(counts, d, tp, plan.pp, b)
        kv = rank_kv_bytes_per_token(d, tp, plan.pp, b) * plan.max_batch_size * plan.max_seq_len
        if needed_per_accelerator(w, kv) <= mem:
            fitting.append(tp)
    plan.fitting_tp = fitting


def disk_needs(weight_bytes: int, embedding_bytes: int, tp: int, pp: int) -> dict:
    """Bytes each stage writes: rank files repeat the embedding on every first-stage rank."""
    ckpt = weight_bytes + embedding_bytes * (tp - 1)
    return {"fetch": weight_bytes, "convert": ckpt, "build": ckpt, "layout": 0, "split": weight_bytes,
            "note": "layout hard-links engines when on the same filesystem (else it needs the build size again)"}


def read_remote_config(model: str, revision: str | None, token: str | None) -> tuple[ModelConfig, int | None]:
    """config.json and the index's total_size, without downloading weights."""
    import tempfile

    from lmi_compile.remote.fetch import parse_source

    source = parse_source(model, revision)
    tmp = Path(tempfile.mkdtemp(prefix="lmi-plan-"))
    if source.kind == "local":
        root = Path(source.location)
        if not (root / "config.json").is_file():
            raise BadInput(f"{root / 'config.json'}: missing")
    elif source.kind == "hub":
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        from lmi_compile.remote.hub import translate_error

        root = tmp
        for name in ("config.json", "model.safetensors.index.json"):
            try:
                hf_hub_download(model, name, revision=revision, token=token, local_dir=tmp)
            except EntryNotFoundError:
                if name == "config.json":
                    raise BadInput(f"{model}: config.json is missing") from None
            except Exception as e:
                raise translate_error(e, model, revision) from None
    else:
        from lmi_compile.remote.s3 import make_client, parse_s3_uri, translate

        uri = parse_s3_uri(source.location)
        client = make_client()
        root = tmp
        for name in ("config.json", "model.safetensors.index.json"):
            try:
                client.download_file(uri.bucket, uri.key(name), str(tmp / name))
            except Exception as e:
                if name == "config.json":
                    raise translate(e, f"{uri}{name}") from None
    config = ModelConfig.load(root / "config.json")
    total = None
    idx = root / "model.safetensors.index.json"
    if idx.is_file():
        try:
            total = int(json.loads(idx.read_text()).get("metadata", {}).get("total_size") or 0) or None
        except (ValueError, TypeError):
            total = None
    return config, total


def render(plan: Plan) -> str:
    def gib(n):
        return f"{n / GiB:.2f} GiB"

    active = f" ({plan.active_parameters / 1e9:.2f}B active per token)" \
        if plan.active_parameters != plan.parameters else ""
    lines = [f"{plan.architecture}: {plan.parameters / 1e9:.2f}B parameters{active}, {gib(plan.weight_bytes)} of "
             f"weights in {plan.dtype}",
             f"tp={plan.tp} pp={plan.pp}: {gib(plan.weight_bytes_per_rank)} of weights per rank (largest rank)",
             f"KV cache: {plan.kv_bytes_per_token / 1024:.0f} KiB per token ({plan.kv_bytes_per_token_per_rank / 1024:.0f} KiB per rank); "
             f"{gib(plan.kv_bytes_for_batch)} for batch {plan.max_batch_size} x {plan.max_seq_len} tokens "
             f"({gib(plan.kv_bytes_for_batch_per_rank)} per rank)",
             "disk: " + ", ".join(f"{k} {gib(v)}" for k, v in plan.disk_bytes.items() if k != "note")]
    if plan.instance:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"{plan.instance}: {verdict} ({gib(plan.needed_per_accelerator)} needed per accelerator of "
                     f"{gib(plan.memory_per_accelerator)}); tp values that fit: {plan.fitting_tp or 'none'}")
    lines += [f"warning: {w}" for w in plan.warnings or []]
    return "\n".join(lines)


def as_json(plan: Plan) -> str:
    return json.dumps(asdict(plan), indent=2)
