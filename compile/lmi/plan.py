"""`lmi-compile plan`: sizes and fit, from config.json (and the index for exact sizes) alone.

All numbers are bytes unless named otherwise. Per-rank weights follow the TRT-LLM split rules:
the embedding is replicated on the first pipeline stage, layers split over tp and pp, the lm_head
split over tp (vocab padded to a multiple of tp) on the last stage. The KV cache per rank holds its
share of kv heads, at least one (heads are repeated when kv heads < tp).
"""

import json
import math
from dataclasses import asdict, dataclass

from lmi_compile.model.architectures import Architecture, resolve
from lmi_compile.configs import load_json
from lmi_compile.errors import BadInput
from lmi_compile.model.config import ModelConfig
from lmi_compile.model.dtypes import AMP_DTYPES, DTYPE_AMPS, DTYPE_BYTES, FLOAT_DTYPES, FP8
from lmi_compile.model.quantization import DENSE, ROWWISE, read_quantization
from lmi_compile.model.limits import sequence_problem

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
    quantization: str | None = None  # the checkpoint's weight quantization (TensorRT-LLM's QuantAlgo name)


def param_counts(arch: Architecture) -> dict[str, int]:
    """Parameters by part, summed from the layout's tensor shapes (configs/architectures.json).

    embedding, layer (one decoder layer), norm (the rest of the last stage), lm_head (0 when tied);
    layer_experts: the part of a layer that is expert weights; layer_fixed / layer_fixed_bytes: the part
    stored in a dtype of its own whatever the model's (the MoE router: float32, replicated on every rank);
    layer_linear / layer_linears: the parameters and the number of the Linears a quantized checkpoint stores in
    FP8 (each with two float32 scales on every rank); layer_whole: the norms, whole on every rank;
    layer_kv_linear / layer_kv_other: the K and V parts of the fused QKV weight / bias, whose heads repeat on every
    rank when tp exceeds them.
    """
    d = arch.dims
    sym = arch.shape_symbols()
    c = dict.fromkeys(("embedding", "layer", "norm", "lm_head", "layer_experts", "layer_fixed", "layer_fixed_bytes",
                       "layer_linear", "layer_linears", "layer_whole", "layer_kv_linear", "layer_kv_other"), 0)
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
            if e.get("linear"):
                c["layer_linear"] += n
                c["layer_linears"] += 1
            if e.get("dtype"):
                c["layer_fixed"] += n
                c["layer_fixed_bytes"] += n * DTYPE_BYTES[e["dtype"]]
            elif e.get("rule") == "replicate":
                c["layer_whole"] += n
            kv = sum(math.prod(sym[w] for w in spec) for spec in specs if spec[0] == "kv")
            c["layer_kv_linear" if e.get("linear") else "layer_kv_other"] += kv
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


def plan_backend(backend: str | None, instance: str | None, lmi_version: str | None) -> str:
    """The backend `plan` sizes for: as given; else the instance's kind (inf2/trn1: neuron); else the backend whose
    table alone has the --lmi-version; else trtllm."""
    from lmi_compile.lmi.targets import BACKENDS

    if backend is not None:
        if backend not in BACKENDS:
            raise BadInput(f"--backend {backend!r}; use {' or '.join(BACKENDS)}")
        return backend
    if instance:
        spec = instance_spec(instance)[1]
        if spec:
            return "neuron" if spec["kind"] == "neuron" else "trtllm"
    if lmi_version:
        having = [b for b in BACKENDS if _has_release(b, lmi_version)]
        if len(having) == 1:
            return having[0]
    return "trtllm"


def _has_release(backend: str, release: str) -> bool:
    from lmi_compile.lmi.targets import resolve as resolve_target

    try:
        resolve_target(backend, release)
        return True
    except BadInput:
        return False


def plan_for(backend: str, config: ModelConfig, index_total: int | None, *, tp: int, pp: int, dtype: str,
             instance: str | None, lmi_version: str | None, max_batch_size: int | None,
             max_seq_len: int | None) -> Plan:
    """make_plan with the target release's defaults, and what that backend would refuse as warnings."""
    from lmi_compile.lmi.targets import resolve as resolve_target

    target = resolve_target(backend, lmi_version)
    if backend == "trtllm":
        from lmi_compile.trtllm.backend import check_target

        d = target["defaults"]
        if max_seq_len is None:
            max_seq_len = (d["max_input_len"] + d["max_output_len"] if d["max_output_len"]
                           else config.get("max_position_embeddings", 2048))
        p = make_plan(config, tp=tp, pp=pp, dtype=dtype, max_batch_size=max_batch_size or d["max_batch_size"],
                      max_seq_len=max_seq_len, instance=instance, index_total=index_total)
        checks = [lambda: check_target(target, config)]
    else:
        from lmi_compile.neuron.backend import DEFAULT_MAX_N_POSITIONS, VALID_TP, NeuronJob, check_dense
        from lmi_compile.neuron.calls import LMI_TO_AMP, loader_calls

        if pp != 1:
            raise BadInput("--pp: Neuron shards over NeuronCores with tp alone; drop --pp")
        amp = LMI_TO_AMP[target["dtype_default"]] if dtype == "auto" else DTYPE_AMPS.get(dtype, dtype)
        batch = max_batch_size or NeuronJob.batch_size
        seq = max_seq_len or min(DEFAULT_MAX_N_POSITIONS, config.get("max_position_embeddings", DEFAULT_MAX_N_POSITIONS))
        p = make_plan(config, tp=tp, dtype=AMP_DTYPES.get(amp, dtype), max_batch_size=batch, max_seq_len=seq,
                      instance=instance, index_total=index_total, tp_choices=VALID_TP)

        def neuron_tp():
            if tp not in VALID_TP:
                raise BadInput(f"--tp {tp} is not a NeuronCore count transformers-neuronx shards over; use one of "
                               f"{', '.join(map(str, VALID_TP))}")

        checks = [neuron_tp, lambda: check_dense(config),
                  lambda: loader_calls(target, resolve(config).name, batch_size=batch, tp=tp, n_positions=seq, amp=amp,
                                       context_length_estimate=[], layout=target["layouts"][0])]
    for check in checks:
        try:
            check()
        except BadInput as e:
            p.warnings.append(str(e).removeprefix(f"{config.path}: "))
    return p


def make_plan(config: ModelConfig, *, tp: int = 1, pp: int = 1, dtype: str = "auto", max_batch_size: int = 32,
              max_seq_len: int = 1536, instance: str | None = None, index_total: int | None = None,
              tp_choices: tuple[int, ...] | None = None) -> Plan:
    """`tp_choices`: the tp values the backend shards over (Neuron: NeuronCore counts, heads padded to them);
    None: TensorRT-LLM's rule, any tp that divides the heads."""
    arch = resolve(config)
    d = arch.dims
    if dtype == "auto":
        dtype = config.dtype if config.dtype in ("float16", "bfloat16") else "float16"  # as the converter does
    if dtype not in FLOAT_DTYPES:
        raise BadInput(f"--dtype {dtype!r}; use auto, float16, bfloat16 or float32")
    for flag, value in (("--tp", tp), ("--pp", pp), ("--max-batch-size", max_batch_size), ("--max-seq-len", max_seq_len)):
        if value < 1:
            raise BadInput(f"{flag} must be at least 1 (got {value})")
    if pp > d.num_layers:
        raise BadInput(f"{config.path}: --pp {pp} is larger than num_hidden_layers {d.num_layers}")
    b = DTYPE_BYTES[dtype]
    c = param_counts(arch)
    params = total_params(arch)
    warnings = []
    try:
        quant = read_quantization(config)
        quant.require_converted()
    except BadInput as e:  # the rule trtllm enforces, reported here as a warning; sized as if dense
        warnings.append(str(e).removeprefix(f"{config.path}: "))
        quant = DENSE
    if quant.quant_algo == "FP8":
        c = fp8_counts(c)
        weight_bytes = (params - arch.dims.num_layers * c["layer_linear"]) * b + arch.dims.num_layers * (
            c["layer_linear"] * DTYPE_BYTES[FP8] + c["layer_linears"] * FP8_SCALE_BYTES)
    elif quant.quant_algo == ROWWISE:
        weight_bytes = params * b - rowwise_saving(arch, b)
    else:
        # The index's total_size is exact (at the checkpoint's dtype); rescale it to the target dtype.
        src_b = DTYPE_BYTES.get(config.dtype or "", b)
        weight_bytes = index_total * b // src_b if index_total else params * b
    per_rank = rank_weight_bytes(c, d, tp, pp, b, pads_heads=tp_choices is not None)
    kv_token = 2 * d.num_layers * d.num_kv_heads * d.head_dim * b
    kv_token_rank = rank_kv_bytes_per_token(d, tp, pp, b)
    plan = Plan(architecture=arch.name, dtype=dtype, parameters=params, active_parameters=active_params(arch),
                weight_bytes=weight_bytes, tp=tp, pp=pp,
                weight_bytes_per_rank=per_rank, kv_bytes_per_token=kv_token, kv_bytes_per_token_per_rank=kv_token_rank,
                kv_bytes_for_batch=kv_token * max_batch_size * max_seq_len,
                kv_bytes_for_batch_per_rank=kv_token_rank * max_batch_size * max_seq_len,
                max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                disk_bytes=disk_needs(weight_bytes, c["embedding"] * b, tp, pp,
                                      fetched=index_total or params * DTYPE_BYTES.get(config.dtype or "", b)),
                warnings=warnings,
                quantization=quant.quant_algo)
    if d.num_heads % tp and tp_choices is None:
        plan.warnings.append(f"tp {tp} does not divide num_attention_heads {d.num_heads}: TRT-LLM refuses it")
    elif d.num_heads % tp:  # transformers-neuronx pads the heads (neuron/backend.py VALID_TP)
        plan.warnings.append(f"tp {tp} does not divide num_attention_heads {d.num_heads}: transformers-neuronx pads "
                             f"them to {-(-d.num_heads // tp) * tp}, and each core holds its share of the padding")
    if d.num_kv_heads < tp:
        plan.warnings.append(f"tp {tp} exceeds num_key_value_heads {d.num_kv_heads}: each kv head is repeated "
                             f"{tp // max(1, d.num_kv_heads)}x, so the KV cache costs {tp // max(1, d.num_kv_heads)}x "
                             f"the memory it needs")
    problem = sequence_problem(config, d, max_seq_len, allow_longer=False, flag="--max-seq-len")
    if problem:  # the rule trtllm and neuron enforce, reported here as a warning
        plan.warnings.append(problem[1].removeprefix(f"{config.path}: "))
    if instance:
        fit_instance(plan, instance, d, c, tp_choices)
    return plan


FP8_SCALE_BYTES = 2 * 4  # weights_scaling_factor and activation_scaling_factor, float32 (1,), on every rank


def rowwise_saving(arch: Architecture, b: int) -> int:
    """Bytes per-channel FP8 saves over the model dtype: the Linears TensorRT-LLM builds as Fp8RowwiseLinear in Meta's
    layout, which every target has (the MLP of every layer but the first and last), at one byte per parameter plus a
    float32 scale per output row. Where 1.x keeps every Linear in FP8 the engine is smaller still; ranks are sized as
    if dense. Both are upper bounds."""
    from lmi_compile.converters.trtllm_checkpoint import RowwiseLayout

    d, linears = arch.dims, RowwiseLayout().linears
    sym = {"hidden": d.hidden_size, "inter": d.intermediate_size, "q": d.num_heads * d.head_dim,
           "kv": d.num_kv_heads * d.head_dim}
    per_layer = 0
    for e in arch.layout["layer"]:
        if e.get("linear") and e["target"].removesuffix(".weight").endswith(linears):
            rows, cols = (sym[w] for w in e["shape"])
            per_layer += rows * cols * (b - DTYPE_BYTES[FP8]) - rows * 4
    return max(0, d.num_layers - 2) * per_layer


def fp8_counts(c: dict) -> dict:
    """Counts for a checkpoint whose Linears are FP8: rank_weight_bytes then sizes them at one byte per parameter,
    split over tp, plus their scales whole on every rank."""
    return {**c, "fp8_linear": c["layer_linear"]}


def rank_weight_bytes(c: dict, d, tp: int, pp: int, b: int, pads_heads: bool = False) -> int:
    """Weights on the largest rank: the first stage has the embedding, the last the norm and lm_head
    (written even when tied, its vocab padded to a multiple of tp). Layers are split over tp, but for their norms
    (whole on every rank) and their K and V heads (at least one a rank, repeated when tp exceeds them); under expert
    parallelism a rank holds num_experts / moe_ep whole experts, under MoE tensor parallelism a 1 / moe_tp
    slice of each, so expert bytes per rank are 1 / tp of them either way. The router is whole on every rank.
    `pads_heads` (Neuron): transformers-neuronx pads the query heads to a multiple of tp with zeros, in q_proj's
    rows and o_proj's columns alike (utils.py `get_qkv_padding`, decoder.py `to_neuron`, transformers-neuronx
    release-2.20 and release-2.21), so a core holds ceil(heads / tp) of them; its padding of the MLP to a multiple
    of tp is at most a row a matrix, not counted."""
    layers = -(-d.num_layers // pp)
    fp8 = c.get("fp8_linear", 0)  # FP8 Linears: one byte per parameter, split over tp, and their scales on every rank
    share = layers * (c["layer"] - c["layer_fixed"] - fp8) // tp * b + layers * c["layer_fixed_bytes"] + \
        (layers * (fp8 // tp * DTYPE_BYTES[FP8] + c["layer_linears"] * FP8_SCALE_BYTES) if fp8 else 0)

    def repeated(n: int) -> int:  # what a rank holds beyond n / tp: its kv heads, at least one, repeated
        return n // d.num_kv_heads * -(-d.num_kv_heads // tp) - n // tp

    linear_b = DTYPE_BYTES[FP8] if fp8 else b  # bytes per parameter of a Linear
    share += layers * (repeated(c["layer_kv_linear"]) * linear_b +
                       repeated(c["layer_kv_other"]) * b + (c["layer_whole"] - c["layer_whole"] // tp) * b)
    if pads_heads:
        q = d.head_dim * d.hidden_size  # one head's q_proj rows, as many o_proj columns
        share += layers * 2 * (-(-d.num_heads // tp) * q - d.num_heads * q // tp) * linear_b
    lm_head = -(-d.vocab_size // tp) * d.hidden_size
    if pp == 1:
        return (c["embedding"] + c["norm"] + lm_head) * b + share
    return max(c["embedding"] * b + share, share + (c["norm"] + lm_head) * b)


def rank_kv_bytes_per_token(d, tp: int, pp: int, b: int) -> int:
    """K and V of one token on one rank: its layers, its share of kv heads, rounded up: at least one (repeated
    when tp exceeds them), and a padded share where transformers-neuronx pads heads that tp does not divide."""
    return 2 * -(-d.num_layers // pp) * -(-d.num_kv_heads // tp) * d.head_dim * b


def needed_per_accelerator(weights: int, kv: int) -> int:
    return int((weights + kv) * (1 + OVERHEAD_FRACTION)) + OVERHEAD_FIXED


def instance_spec(instance: str) -> tuple[str, dict | None]:
    """(the instance's name, its row of configs/instances.json or None); g5.12xlarge and ml.g5.12xlarge alike."""
    name = instance if instance.startswith("ml.") else f"ml.{instance}"
    return name, load_json("instances.json")["instances"].get(name)


def fit_instance(plan: Plan, instance: str, d, counts: dict, tp_choices: tuple[int, ...] | None = None) -> None:
    instance, spec = instance_spec(instance)
    if spec is None:
        known = load_json("instances.json")["instances"]
        raise BadInput(f"--instance {instance!r} is not in the table; known: {', '.join(sorted(known))}")
    mem = spec["memory_gib"] * GiB
    plan.instance = instance
    plan.memory_per_accelerator = mem
    plan.needed_per_accelerator = needed_per_accelerator(plan.weight_bytes_per_rank, plan.kv_bytes_for_batch_per_rank)
    plan.fits = plan.tp * plan.pp <= spec["count"] and plan.needed_per_accelerator <= mem
    if plan.tp * plan.pp > spec["count"]:
        plan.warnings.append(f"tp*pp = {plan.tp * plan.pp} exceeds the {spec['count']} accelerators of {instance}")
    fitting = []
    for tp in range(1, spec["count"] + 1):
        if (tp not in tp_choices) if tp_choices else d.num_heads % tp:
            continue
        b = DTYPE_BYTES[plan.dtype]
        w = rank_weight_bytes(counts, d, tp, plan.pp, b, pads_heads=tp_choices is not None)
        kv = rank_kv_bytes_per_token(d, tp, plan.pp, b) * plan.max_batch_size * plan.max_seq_len
        if needed_per_accelerator(w, kv) <= mem:
            fitting.append(tp)
    plan.fitting_tp = fitting


def disk_needs(weight_bytes: int, embedding_bytes: int, tp: int, pp: int, fetched: int | None = None) -> dict:
    """Bytes each stage writes: the fetch the checkpoint as stored (`fetched`: its index's total_size, or its
    parameters at its own dtype), the others at the target dtype; rank files repeat the embedding on every
    first-stage rank."""
    ckpt = weight_bytes + embedding_bytes * (tp - 1)
    return {"fetch": fetched or weight_bytes, "convert": ckpt, "build": ckpt, "layout": 0, "split": weight_bytes,
            "note": "layout hard-links engines when on the same filesystem (else it needs the build size again)"}


def _count(n: float) -> str:
    """Parameters in the unit that fits: 6.74B, 13.0M, 52.3K."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}" if n < 100 * scale else f"{n / scale:.0f}{unit}"
    return str(int(n))


def _bytes(n: float) -> str:
    """Bytes in the binary unit that fits: 12.55 GiB, 3.0 MiB, 512 B."""
    for unit, scale in (("GiB", GiB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def render(plan: Plan) -> str:
    active = f" ({_count(plan.active_parameters)} active per token)" \
        if plan.active_parameters != plan.parameters else ""
    dtype = f"{plan.quantization} Linears, the rest in {plan.dtype}" if plan.quantization else plan.dtype
    lines = [f"{plan.architecture}: {_count(plan.parameters)} parameters{active}, {_bytes(plan.weight_bytes)} of "
             f"weights in {dtype}",
             f"tp={plan.tp} pp={plan.pp}: {_bytes(plan.weight_bytes_per_rank)} of weights per rank (largest rank)",
             f"KV cache: {_bytes(plan.kv_bytes_per_token)} per token ({_bytes(plan.kv_bytes_per_token_per_rank)} per "
             f"rank); {_bytes(plan.kv_bytes_for_batch)} for batch {plan.max_batch_size} x {plan.max_seq_len} tokens "
             f"({_bytes(plan.kv_bytes_for_batch_per_rank)} per rank)",
             "disk: " + ", ".join(f"{k} {_bytes(v)}" for k, v in plan.disk_bytes.items() if k != "note")]
    if plan.instance:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"{plan.instance}: {verdict} ({_bytes(plan.needed_per_accelerator)} needed per accelerator of "
                     f"{_bytes(plan.memory_per_accelerator)}); tp values that fit: {plan.fitting_tp or 'none'}")
    lines += [f"warning: {w}" for w in plan.warnings or []]
    return "\n".join(lines)


def as_json(plan: Plan) -> str:
    return json.dumps(asdict(plan), indent=2)
