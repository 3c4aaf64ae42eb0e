"""`lmi-compile plan`: sizes and fit, from config.json (and the index for exact sizes) alone.

All numbers are bytes unless named otherwise. Per-rank weights follow the TRT-LLM split rules:
the embedding is replicated on the first pipeline stage, layers split over tp and pp, the lm_head
split over tp (vocab padded to a multiple of tp) on the last stage. The KV cache per rank holds its
share of kv heads, at least one (heads are repeated when kv heads < tp).
"""

import json
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
    d = arch.dims
    q, kv = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    bias = (q + 2 * kv) if arch.entry.get("qkv_bias") else 0
    attn = d.hidden_size * q + 2 * d.hidden_size * kv + q * d.hidden_size + bias
    layer = attn + 3 * d.hidden_size * d.intermediate_size + 2 * d.hidden_size
    return {"embedding": d.vocab_size * d.hidden_size, "layer": layer, "norm": d.hidden_size,
            "lm_head": 0 if d.tie_word_embeddings else d.vocab_size * d.hidden_size}


def total_params(arch: Architecture) -> int:
    c = param_counts(arch)
    return c["embedding"] + arch.dims.num_layers * c["layer"] + c["norm"] + c["lm_head"]


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
    plan = Plan(architecture=arch.name, dtype=dtype, parameters=params, weight_bytes=weight_bytes, tp=tp, pp=pp,
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
    (written even when tied, its vocab padded to a multiple of tp)."""
    share = -(-d.num_layers // pp) * c["layer"] // tp
    lm_head = -(-d.vocab_size // tp) * d.hidden_size
    if pp == 1:
        return (c["embedding"] + share + c["norm"] + lm_head) * b
    return max(c["embedding"] + share, share + c["norm"] + lm_head) * b


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

    lines = [f"{plan.architecture}: {plan.parameters / 1e9:.2f}B parameters, {gib(plan.weight_bytes)} of weights in {plan.dtype}",
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
