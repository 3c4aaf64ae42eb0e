"""HuggingFace checkpoint -> TensorRT-LLM unified checkpoint (config.json + rank{N}.safetensors).

Each rank file is planned from source shapes alone, its header written first, then filled one output
tensor at a time; ranks are written in parallel. Memory follows the few tensors in flight, not the model.
"""

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path


from lmi_compile.model.architectures import Architecture
from lmi_compile.model.checkpoint import Checkpoint
from lmi_compile.errors import BadInput
from lmi_compile.model.config import ModelConfig
from lmi_compile.model.quantization import DENSE, ROWWISE, Quantization, read_quantization
from lmi_compile.pipeline.interrupts import check
from lmi_compile.pipeline.progress import bytes_bar
from lmi_compile.pipeline.stages import fingerprint, write_json_atomic

from lmi_compile.converters.safetensors_writer import SafetensorsWriter
from lmi_compile.converters.shard_rules import RankContext, pieces, shape_for
from lmi_compile.converters.tensor_reader import TensorReader
from lmi_compile.model.dtypes import FLOAT_DTYPES, FP8, itemsize

log = logging.getLogger("lmi_compile")


@dataclass(frozen=True)
class RowwiseLayout:
    """Which Linears TensorRT-LLM builds as Fp8RowwiseLinear (suffixes of their target names), whether it keeps the
    first and last layers unquantized ("Meta's recipe"), and the QuantConfig keys that select this layout. Every other
    FP8 Linear is written dequantized in the model dtype. The default is the layout of every version that has
    FP8_PER_CHANNEL_PER_TOKEN (0.12's only one)."""

    linears: tuple[str, ...] = ("mlp.fc", "mlp.gate", "mlp.proj")
    skip_edge_layers: bool = True
    config: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True)
class ConvertOptions:
    tp: int = 1
    pp: int = 1
    dtype: str = "auto"
    parallel_embedding: bool = False
    embedding_sharding_dim: int = 0
    workers: int = 1
    architecture: str | None = None  # the name the target TensorRT-LLM knows the family by (default: the table's)
    # Mixture of experts: moe_tp * moe_ep must equal tp. Unset: moe_tp = tp / moe_ep, moe_ep = tp / moe_tp,
    # and with neither given, tensor parallelism only (moe_tp = tp, moe_ep = 1), as TRT-LLM's Mapping does.
    moe_tp: int | None = None
    moe_ep: int | None = None
    # How the checkpoint config names MoE settings: a key of the architecture's moe_config_style table
    # (architectures.json): "nested" (TRT-LLM 0.11+) or "flat" (0.9).
    moe_config_style: str = "nested"
    # The KV cache: None (the model dtype) or "FP8", with one kv_cache_scaling_factor per layer: the largest of the
    # checkpoint's k/v scales ("max", TensorRT-LLM 1.x) or 1.0 whatever it stores ("one", 0.9-0.12, which force
    # 1.0 at build). The target table's toolchain row says which ("quantization" -> "kv_cache_scale").
    kv_cache_quant_algo: str | None = None
    kv_cache_scale: str = "max"
    # Per-channel FP8 (FP8_PER_CHANNEL_PER_TOKEN): the layouts the target's TensorRT-LLM builds, in order of preference
    # (configs/targets.json toolchains -> quantization -> fp8_rowwise); convert() keeps the one it writes first.
    rowwise_layouts: tuple["RowwiseLayout", ...] = ()

    def moe_split(self) -> tuple[int, int]:
        """(moe_tp, moe_ep) with unset values filled in; check_parallelism says whether they fit tp."""
        if self.moe_tp is None and self.moe_ep is None:
            return self.tp, 1
        if self.moe_tp is None:
            return max(1, self.tp // max(1, self.moe_ep)), self.moe_ep
        if self.moe_ep is None:
            return self.moe_tp, max(1, self.tp // max(1, self.moe_tp))
        return self.moe_tp, self.moe_ep


@dataclass(frozen=True)
class PlanEntry:
    target: str
    rule: str
    sources: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str | None = None  # written in this dtype whatever the checkpoint's (the MoE router: float32)


def resolve_dtype(opts: ConvertOptions, config: ModelConfig, ck: Checkpoint) -> str:
    if opts.dtype != "auto":
        return opts.dtype
    # As TensorRT-LLM's own conversion does for --dtype auto: a float32 or undeclared model becomes float16
    # (a float32 engine is rarely wanted and doubles the memory); float16 and bfloat16 are kept.
    return config.dtype if config.dtype in ("float16", "bfloat16") else "float16"


def check_parallelism(arch: Architecture, opts: ConvertOptions, where: Path) -> None:
    """Reject tp/pp values the model's shapes cannot honour, before any heavy work."""
    d, tp, pp = arch.dims, opts.tp, opts.pp
    if tp < 1 or pp < 1:
        raise BadInput(f"--tp and --pp must be at least 1 (got tp={tp}, pp={pp})")
    if tp > d.num_heads:
        raise BadInput(f"{where}: --tp {tp} is larger than num_attention_heads {d.num_heads}; use a tp that "
                       f"divides {d.num_heads}")
    if d.num_heads % tp:
        raise BadInput(f"{where}: num_attention_heads {d.num_heads} is not divisible by --tp {tp}; use a tp that "
                       f"divides it")
    if d.num_kv_heads >= tp and d.num_kv_heads % tp or d.num_kv_heads < tp and tp % d.num_kv_heads:
        raise BadInput(f"{where}: num_key_value_heads {d.num_kv_heads} and --tp {tp} do not divide one another")
    if arch.is_moe:
        check_moe(arch, opts, where)
    elif opts.moe_split() != (tp, 1):
        raise BadInput(f"{where}: {arch.name} has no experts; --moe-tp and --moe-ep apply to mixture-of-experts "
                       f"models only")
    elif d.intermediate_size % tp:
        raise BadInput(f"{where}: intermediate_size {d.intermediate_size} is not divisible by --tp {tp}")
    if pp > d.num_layers:
        raise BadInput(f"{where}: --pp {pp} is larger than num_hidden_layers {d.num_layers}")
    if d.num_layers % pp:
        raise BadInput(f"{where}: num_hidden_layers {d.num_layers} is not divisible by --pp {pp}")
    if opts.parallel_embedding and opts.embedding_sharding_dim == 1 and d.hidden_size % tp:
        raise BadInput(f"{where}: hidden_size {d.hidden_size} is not divisible by --tp {tp} for embedding "
                       f"sharding along dim 1")
    if opts.dtype not in ("auto", *FLOAT_DTYPES):
        raise BadInput(f"--dtype {opts.dtype!r} is not supported; use auto, float16, bfloat16 or float32")


def check_moe(arch: Architecture, opts: ConvertOptions, where: Path) -> None:
    """Expert parallelism holds whole experts, MoE tensor parallelism slices each: both must divide evenly."""
    d, tp = arch.dims, opts.tp
    moe_tp, moe_ep = opts.moe_split()
    if moe_tp < 1 or moe_ep < 1:
        raise BadInput(f"--moe-tp and --moe-ep must be at least 1 (got moe_tp={moe_tp}, moe_ep={moe_ep})")
    if moe_tp * moe_ep != tp:
        raise BadInput(f"--moe-tp {moe_tp} x --moe-ep {moe_ep} = {moe_tp * moe_ep} must equal --tp {tp}; choose "
                       f"them so their product is tp")
    if d.num_experts % moe_ep:
        raise BadInput(f"{where}: num_local_experts {d.num_experts} is not divisible by --moe-ep {moe_ep}; use an "
                       f"expert parallelism that divides it")
    if d.intermediate_size % moe_tp:
        raise BadInput(f"{where}: intermediate_size {d.intermediate_size} is not divisible by --moe-tp {moe_tp}")
    styles = {k: v for k, v in arch.entry.get("moe_config_style", {}).items() if not k.startswith("_")}
    style = styles.get(opts.moe_config_style)
    if style is None:
        raise BadInput(f"MoE config style {opts.moe_config_style!r} is not known for {arch.name}; known: "
                       f"{', '.join(sorted(styles))}")
    if "moe_tp_mode" in style and moe_tp > 1 and moe_ep > 1:
        raise BadInput(f"MoE config style {opts.moe_config_style!r} cannot mix MoE tensor and expert parallelism "
                       f"(--moe-tp {moe_tp}, --moe-ep {moe_ep}); use --moe-ep 1 or --moe-ep {tp}")


def moe_style(arch: Architecture, opts: ConvertOptions) -> dict:
    """The architecture's entry for the chosen MoE config style ({} for dense models)."""
    return arch.entry["moe_config_style"][opts.moe_config_style] if arch.is_moe else {}


def _fill(value, values: dict):
    """A style's config with every "$name" string replaced by its value."""
    if isinstance(value, dict):
        return {k: _fill(v, values) for k, v in value.items()}
    if isinstance(value, str) and value.startswith("$"):
        return values[value[1:]]
    return value


def _merge(into: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v
    return into


def _entries(arch: Architecture, ck: Checkpoint, pp_rank: int, pp: int, rename: dict):
    """(table entry, target, sources, source layer index or None) for one pipeline stage, layer indices renumbered
    from 0 in the targets."""
    d, lay = arch.dims, arch.layout
    per = d.num_layers // pp
    out = []
    if pp_rank == 0:
        out += [(e, None) for e in lay["first_stage"]]
    for local in range(per):
        out += [(e, (local, pp_rank * per + local)) for e in lay["layer"]]
    if pp_rank == pp - 1:
        out += [(e, None) for e in lay["last_stage"]]
    tied = arch.tied_sources()
    for e, idx in out:
        local, src_i = idx if idx else (None, None)
        target = rename.get(e["target"], e["target"]).format(i=local)
        sources = arch.sources(e, src_i)
        if not all(s in ck for s in sources) and all(s in tied for s in sources):
            sources = [tied[s] for s in sources]
        missing = [s for s in sources if s not in ck]
        if missing:
            if e.get("optional") and len(missing) == len(sources):
                continue
            raise BadInput(f"{ck.root}: tensor {missing[0]!r} is missing from the checkpoint "
                           f"({arch.name} needs it for {target}); the checkpoint is incomplete")
        yield e, target, tuple(sources), src_i


SCALES = {"weights_scaling_factor": "weight_scale", "activation_scaling_factor": "input_scale"}
"""TensorRT-LLM's per-tensor FP8 scales of a Linear -> the Hub name of the same scale beside its weight (compressed-
tensors, ModelOpt and AutoFP8 all use these); both are dequantization scales (compile/model/quantization.py)."""


def _scale_source(ck: Checkpoint, weight: str, suffix: str) -> str:
    name = weight.removesuffix("weight") + suffix
    info = ck.tensors.get(name)
    if info is None or _numel(info.shape) != 1 or info.dtype not in FLOAT_DTYPES:
        what = "is missing" if info is None else f"is {info.dtype} {list(info.shape)}"
        raise BadInput(f"{ck.tensors[weight].file}: FP8 tensor {weight!r} needs one per-tensor {suffix}, but {name!r} "
                       f"{what}; the checkpoint is incomplete or not per-tensor FP8")
    return name


def _fp8_sources(sources: tuple, ck: Checkpoint, what: str) -> tuple[tuple, tuple]:
    """(weight scale sources, input scale sources) of FP8 weights, each weight checked to be FP8."""
    for s in sources:
        if ck.tensors[s].dtype != FP8:
            raise BadInput(f"{ck.tensors[s].file}: tensor {s!r} is {ck.tensors[s].dtype} while its checkpoint declares "
                           f"FP8 weights; a mix of float and FP8 {what} is not converted")
    return (tuple(_scale_source(ck, s, SCALES["weights_scaling_factor"]) for s in sources),
            tuple(_scale_source(ck, s, SCALES["activation_scaling_factor"]) for s in sources))


def _fp8_linear(e: dict, target: str, sources: tuple, ck: Checkpoint, ctx: RankContext) -> list[PlanEntry]:
    """A Linear as TensorRT-LLM's FP8Linear holds it (tensorrt_llm/quantization/layers.py): the weight in fp8 split
    like the dense one, weights_scaling_factor and activation_scaling_factor float32 (1,) on every rank. Separate
    Linears keep their bytes and scales exactly (gate and up stay apart: fuse_gate_mlp fuses them at build, each with
    its own scale, models/modeling_utils.py); the fused qkv is requantized to its largest scale (FusedQKVFP8)."""
    weight_scales, input_scales = _fp8_sources(sources, ck, "Linears")
    fused = e["rule"] == "fused_qkv"
    rule = "fused_qkv_fp8" if fused else e["rule"]
    srcs = sources + weight_scales if fused else sources
    stem = target.removesuffix(".weight")
    shape = shape_for(rule, [ck.tensors[s].shape for s in srcs], ctx)
    return [PlanEntry(target, rule, srcs, shape, FP8),
            PlanEntry(f"{stem}.weights_scaling_factor", "scale_max", weight_scales, (1,), "float32"),
            PlanEntry(f"{stem}.activation_scaling_factor", "scale_max", input_scales, (1,), "float32")]


EXPERT_RULES = {"expert_column": "expert_column_fp8", "expert_row": "expert_row"}
"""The MoE expert rules and what FP8 experts use instead: w3 and w1 of an expert share one scale in TensorRT-LLM's
fc (requantized); w2 keeps its bytes."""


def _fp8_experts(e: dict, target: str, sources: tuple, ck: Checkpoint, ctx: RankContext) -> list[PlanEntry]:
    """FP8 experts as TensorRT-LLM's MoE holds them under quant_algo FP8 (layers/moe.py MOEWeightWrapper at v0.11.0,
    main be9cd719 and the 1.0 era): the stacked weight in fp8, weights_scaling_factor float32 (experts_per_node, 1),
    one per local expert, and activation_scaling_factor float32 (1,) for all experts: the largest input scale of any
    expert (every expert reads the same hidden states; the largest keeps them all in range). The router stays in
    float32 (quantization/quantize.py excludes '*router')."""
    weight_scales, input_scales = _fp8_sources(sources, ck, "experts")
    rule = EXPERT_RULES[e["rule"]]
    srcs = sources + weight_scales if rule != e["rule"] else sources
    stem = target.removesuffix(".weight")
    return [PlanEntry(target, rule, srcs, shape_for(rule, [ck.tensors[s].shape for s in srcs], ctx), FP8),
            PlanEntry(f"{stem}.weights_scaling_factor", "expert_scale_max", weight_scales,
                      shape_for("expert_scale_max", [], ctx), "float32"),
            PlanEntry(f"{stem}.activation_scaling_factor", "scale_max", input_scales, (1,), "float32")]


def _keeps_rowwise(layout: RowwiseLayout, arch: Architecture, target: str, layer: int | None) -> bool:
    """Whether the target's TensorRT-LLM builds this Linear as Fp8RowwiseLinear in this layout. Meta's recipe (0.12,
    1.x with use_meta_recipe): Fp8RowwiseGatedMLP replaces the MLP of every layer but the first and the last, attention
    stays in the model dtype (tensorrt_llm/quantization/quantize.py fp8_rowwise_quantize; models/llama/convert.py
    exclude_layers_id at main be9cd719). 1.x without it: every Linear but lm_head (Fp8RowwiseAttention too)."""
    if layer is None or not target.removesuffix(".weight").endswith(layout.linears):
        return False
    return not (layout.skip_edge_layers and layer in (0, arch.dims.num_layers - 1))


def choose_rowwise(arch: Architecture, ck: Checkpoint, opts: ConvertOptions) -> ConvertOptions:
    """The options with the one rowwise layout written: the first of the target's whose Fp8RowwiseLinears are all FP8
    in the checkpoint (nothing dequantized), else the last (plan_rank dequantizes or refuses)."""
    layouts = opts.rowwise_layouts or (RowwiseLayout(),)
    per_layer = [e for e in arch.layout["layer"] if e.get("linear")]
    for layout in layouts:
        if all(ck.tensors[s].dtype == FP8 for i in range(arch.dims.num_layers) for e in per_layer
               if _keeps_rowwise(layout, arch, e["target"].format(i=0), i)
               for s in arch.sources(e, i) if s in ck):
            break
    return replace(opts, rowwise_layouts=(layout,))


def _channel_scale_source(ck: Checkpoint, weight: str) -> str:
    name = weight.removesuffix("weight") + "weight_scale"
    info, rows = ck.tensors.get(name), ck.tensors[weight].shape[0]
    if info is None or _numel(info.shape) != rows or info.dtype not in FLOAT_DTYPES:
        what = "is missing" if info is None else f"is {info.dtype} {list(info.shape)}"
        raise BadInput(f"{ck.tensors[weight].file}: FP8 tensor {weight!r} needs one scale per output channel "
                       f"([{rows}, 1]), but {name!r} {what}; the checkpoint is incomplete or not per-channel FP8")
    return name


def _rowwise_linear(e: dict, target: str, sources: tuple, ck: Checkpoint, ctx: RankContext,
                    keep: bool) -> list[PlanEntry]:
    """A per-channel FP8 Linear. Kept (Fp8RowwiseLinear, tensorrt_llm/quantization/layers.py): the weight's bytes split
    like the dense one, per_channel_scale float32 (out_features,) split with the rows of a column-parallel Linear and
    whole for a row-parallel one (models/llama/convert.py fp8_rowwise_quantization, split_scale for gate/up only).
    Otherwise the weight is dequantized (q * its row's scale) into the model dtype, where TensorRT-LLM keeps it."""
    for s in sources:
        if ck.tensors[s].dtype != FP8:
            raise BadInput(f"{ck.tensors[s].file}: tensor {s!r} is {ck.tensors[s].dtype} while the other weights of "
                           f"{target} are FP8; a mix of float and FP8 weights in one Linear is not converted")
    scales = tuple(_channel_scale_source(ck, s) for s in sources)
    shape = shape_for(e["rule"], [ck.tensors[s].shape for s in sources], ctx)
    if not keep:
        return [PlanEntry(target, f"dequant_{e['rule']}", sources + scales, shape)]
    if e["rule"] not in ("column", "row", "fused_qkv"):
        raise BadInput(f"{target}: a {e['rule']} Linear is not written as FP8 per channel (only column, row and fused "
                       f"qkv ones are); the target table's fp8_rowwise linears do not fit this layout")
    # the fused qkv keeps q, k and v bytes and concatenates their rows' scales the same way: exact, no requantization
    stem = target.removesuffix(".weight")
    return [PlanEntry(target, e["rule"], sources, shape, FP8),
            PlanEntry(f"{stem}.per_channel_scale", f"channel_scale_{e['rule']}", scales,
                      (shape[0],), "float32")]


def kv_scale_sources(arch: Architecture, ck: Checkpoint, layer: int) -> tuple[str, ...]:
    """The checkpoint's [k, v] FP8 KV-cache scales of one layer, in whichever naming it uses; () when it has none."""
    spec = arch.layout.get("kv_cache_scale")
    for pair in (spec or {}).get("sources", []):
        names = tuple(n.format(i=layer) for n in pair)
        if all(n in ck for n in names):
            return names
        if any(n in ck for n in names):
            have = next(n for n in names if n in ck)
            raise BadInput(f"{ck.tensors[have].file}: {have!r} has no partner ({', '.join(names)} go together); the "
                           f"checkpoint is incomplete")
    return ()


def _all_kv_scales(arch: Architecture) -> set[str]:
    spec = arch.layout.get("kv_cache_scale") or {}
    return {n.format(i=i) for pair in spec.get("sources", []) for n in pair for i in range(arch.dims.num_layers)}


def plan_rank(arch: Architecture, ck: Checkpoint, opts: ConvertOptions, tp_rank: int, pp_rank: int,
              quant: Quantization = DENSE) -> list[PlanEntry]:
    ctx = rank_context(arch, opts, tp_rank)
    shapes = arch.source_shapes()
    rowwise = (opts.rowwise_layouts or (RowwiseLayout(),))[0]
    plan = []
    for e, target, sources, layer in _entries(arch, ck, pp_rank, opts.pp, moe_style(arch, opts).get("rename", {})):
        src_shapes = [ck.tensors[s].shape for s in sources]
        for s in sources:
            ck.require_shape(s, shapes[s])
        if quant.quant_algo == "FP8" and e.get("linear"):
            plan += _fp8_linear(e, target, sources, ck, ctx)
            continue
        if quant.quant_algo == "FP8" and e["rule"] in EXPERT_RULES:
            plan += _fp8_experts(e, target, sources, ck, ctx)
            continue
        if quant.quant_algo == ROWWISE and e.get("linear") and any(ck.tensors[s].dtype == FP8 for s in sources):
            plan += _rowwise_linear(e, target, sources, ck, ctx, _keeps_rowwise(rowwise, arch, target, layer))
            continue
        if quant.quant_algo == ROWWISE and e.get("linear") and _keeps_rowwise(rowwise, arch, target, layer):
            first = ck.tensors[sources[0]]
            raise BadInput(f"{first.file}: tensor {sources[0]!r} is {first.dtype}, but "
                           f"TensorRT-LLM builds {target.removesuffix('.weight')} as an FP8 per-channel Linear "
                           f"(Fp8RowwiseLinear) and reads no float weight there; the checkpoint does not follow the "
                           f"layout TensorRT-LLM's FP8_PER_CHANNEL_PER_TOKEN expects (every MLP but the first and last "
                           f"layers' in FP8); convert from the unquantized model")
        for s in sources:
            if ck.tensors[s].dtype in FLOAT_DTYPES:
                continue
            if quant.quant_algo and ck.tensors[s].dtype == FP8:
                why = (f"TensorRT-LLM keeps {target} in the model dtype (models/modeling_utils.py preprocess_weights, "
                       f"quantization/quantize.py exclude_modules), so an FP8 {s} is not converted")
            else:
                why = ("not supported (float16, bfloat16, float32) without a quantization_config in config.json that "
                       "declares it")
            raise BadInput(f"{ck.tensors[s].file}: tensor {s!r} has dtype {ck.tensors[s].dtype}: {why}")
        plan.append(PlanEntry(target, e["rule"], sources, shape_for(e["rule"], src_shapes, ctx), e.get("dtype")))
    if opts.kv_cache_quant_algo == "FP8":
        per = arch.dims.num_layers // opts.pp
        target = arch.layout["kv_cache_scale"]["target"]
        rule = "scale_max" if opts.kv_cache_scale == "max" else "scale_one"
        for local in range(per):
            plan.append(PlanEntry(target.format(i=local), rule, kv_scale_sources(arch, ck, pp_rank * per + local), (1,),
                                  "float32"))
    return plan


def check_all_used(arch: Architecture, ck: Checkpoint, plans) -> None:
    """Every source tensor goes into some rank file, unless the table says it is not a weight: a tensor the
    layout does not name would otherwise be dropped without a word."""
    # FP8 KV-cache scales are used only with an FP8 KV cache (--kv-cache-dtype fp8), as vLLM does with "auto"
    used = {s for plan in plans for p in plan for s in p.sources} | arch.ignored_sources() | _all_kv_scales(arch)
    extra = sorted(set(ck.tensors) - used)
    if extra:
        info = ck.tensors[extra[0]]
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise BadInput(f"{info.file}: tensor {extra[0]!r}{more} is not used by {arch.name}'s layout; the checkpoint "
                       f"does not match its config.json, or the layout in configs/architectures.json lacks it")


def check_quantization(arch: Architecture, quant: Quantization, opts: ConvertOptions, where: Path) -> None:
    """What the converter writes: dense or FP8 per-tensor weights; a dense or FP8 KV cache."""
    if quant.external or quant.quant_algo not in (None, "FP8", ROWWISE):
        raise BadInput(f"{where}: {quant.describe()} is not converted by lmi-compile")
    if quant.quant_algo == ROWWISE and arch.is_moe:
        raise BadInput(f"{where}: per-channel FP8 {arch.name} checkpoints are not converted: TensorRT-LLM's "
                       f"FP8_PER_CHANNEL_PER_TOKEN replaces dense GatedMLPs only (quantization/quantize.py "
                       f"fp8_rowwise_quantize), its MoE layer has no per-channel FP8; convert from the unquantized "
                       f"model or a per-tensor FP8 export")
    if opts.kv_cache_quant_algo not in (None, "FP8"):
        raise BadInput(f"KV cache {opts.kv_cache_quant_algo} is not converted by lmi-compile; use fp8")


def _log_kv_scales(arch: Architecture, ck: Checkpoint, opts: ConvertOptions, plans) -> None:
    stored = _all_kv_scales(arch) & set(ck.tensors)
    if opts.kv_cache_quant_algo != "FP8":
        if stored:
            log.info("convert: the checkpoint stores FP8 KV-cache scales; --kv-cache-dtype fp8 would use them")
        return
    if not stored:
        log.warning("convert: FP8 KV cache without calibrated k/v scales in the checkpoint: kv_cache_scaling_factor "
                    "1.0 (values beyond +-448 would saturate)")
    elif opts.kv_cache_scale == "one":
        log.warning("convert: the target's TensorRT-LLM uses kv_cache_scaling_factor 1.0 whatever the checkpoint "
                    "stores (models/modeling_utils.py preprocess_weights): its calibrated k/v scales are not used")


def rank_context(arch: Architecture, opts: ConvertOptions, tp_rank: int) -> RankContext:
    d = arch.dims
    moe_tp, moe_ep = opts.moe_split()
    return RankContext(tp=opts.tp, rank=tp_rank, num_heads=d.num_heads, num_kv_heads=d.num_kv_heads,
                       head_dim=d.head_dim, parallel_embedding=opts.parallel_embedding,
                       embedding_sharding_dim=opts.embedding_sharding_dim, num_experts=d.num_experts,
                       moe_tp=moe_tp, moe_ep=moe_ep)


def trtllm_config(arch: Architecture, config: ModelConfig, opts: ConvertOptions, dtype: str, attn_bias: bool,
                  quant: Quantization = DENSE) -> dict:
    """The checkpoint config.json TRT-LLM's PretrainedConfig.from_dict reads (formats.md section 2)."""
    d = arch.dims
    cfg = {
        "architecture": opts.architecture or arch.trtllm_architecture,
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": d.vocab_size,
        "max_position_embeddings": d.max_position_embeddings,
        "hidden_size": d.hidden_size,
        "num_hidden_layers": d.num_layers,
        "num_attention_heads": d.num_heads,
        "num_key_value_heads": d.num_kv_heads,
        "head_size": d.head_dim,
        "intermediate_size": d.intermediate_size,
        "hidden_act": d.hidden_act,
        "norm_epsilon": d.norm_epsilon,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": config.rope_theta if config.rope_theta is not None else 10000.0,
        "rotary_scaling": config.rope_scaling,
        "use_parallel_embedding": opts.parallel_embedding,
        "embedding_sharding_dim": opts.embedding_sharding_dim,
        "share_embedding_table": False,
        "tie_word_embeddings": d.tie_word_embeddings,
        "attn_bias": attn_bias,
        "mlp_bias": False,
        "mapping": {"world_size": opts.tp * opts.pp, "tp_size": opts.tp, "pp_size": opts.pp},
        "quantization": {"quant_algo": quant.quant_algo, "kv_cache_quant_algo": opts.kv_cache_quant_algo,
                         **(_rowwise_config(quant, opts) if quant.quant_algo == ROWWISE else {})},
        **arch.entry.get("trtllm_config", {}),
    }
    style = moe_style(arch, opts)
    if style:
        moe_tp, moe_ep = opts.moe_split()
        mode = style.get("moe_tp_mode", {}).get("expert" if moe_ep > 1 else "tensor")
        _merge(cfg, _fill(style["config"], {"num_experts": d.num_experts, "top_k": d.top_k, "moe_tp": moe_tp,
                                            "moe_ep": moe_ep, "moe_tp_mode": mode}))
    return cfg


def _rowwise_config(quant: Quantization, opts: ConvertOptions) -> dict:
    """QuantConfig keys of FP8_PER_CHANNEL_PER_TOKEN: clamp_val, which Fp8RowwiseGatedMLP needs (its forward reads
    clamp_val.value), and the target's own keys (1.x: use_meta_recipe, for the layout written here)."""
    return {"clamp_val": [-quant.clamp, quant.clamp], **dict((opts.rowwise_layouts or (RowwiseLayout(),))[0].config)}


def rank_id(tp_rank: int, pp_rank: int, tp: int) -> int:
    return pp_rank * tp + tp_rank


def _rank_done(path: Path, plan_fp: str) -> bool:
    """A rank file from an earlier run counts only if its header is sound and records the same plan."""
    from lmi_compile.model.checkpoint import read_safetensors_header, read_safetensors_metadata

    if not path.is_file():
        return False
    try:
        read_safetensors_header(path)
        return read_safetensors_metadata(path).get("lmi_compile_plan") == plan_fp
    except (BadInput, OSError):
        return False


def write_ranks(ck: Checkpoint, todo: list, contexts: dict, dtype: str, workers: int, bar, feed=None) -> None:
    """Write every planned rank file with one pool over (rank, tensor) tasks, so even a single rank uses
    every worker: each tensor has a fixed offset in its file. Memory: one row block per worker (byte
    ranges are copied by the kernel). `feed`, when given, is a model still downloading (remote/streaming.py
    Feed): it hears every task's sources first, and each task's before (it blocks until their bytes are
    readable) and after it reads them."""
    writers = {}
    left = {}
    lock = threading.Lock()
    readers = threading.local()
    opened: list[TensorReader] = []

    def task(r: int, i: int, p: PlanEntry, ctx: RankContext) -> None:
        check()
        if feed:
            feed.ready(p.sources)
        reader = getattr(readers, "r", None)
        if reader is None:
            reader = readers.r = TensorReader(ck)
            with lock:
                opened.append(reader)
        writers[r].write_pieces_at(i, pieces(p.rule, reader, list(p.sources), ctx), reader.read)
        if feed:
            feed.done(p.sources)
        bar.update(_numel(p.shape) * itemsize(p.dtype or dtype))
        with lock:
            left[r] -= 1
            last = left[r] == 0
        if last:
            writers[r].close()  # fsync and rename: this rank file is complete

    try:
        for r, tp_rank, plan, path, plan_fp in todo:
            left[r] = len(plan)  # before the writer exists: an interrupt right after its creation still aborts it
            writers[r] = SafetensorsWriter(path, [(p.target, p.dtype or dtype, p.shape) for p in plan],
                                           metadata={"format": "pt", "lmi_compile_plan": plan_fp})
        # interleave ranks so parallel workers spread over files and sources
        tasks = [(r, i, plan[i], contexts[tp_rank]) for i in range(max((len(t[2]) for t in todo), default=0))
                 for r, tp_rank, plan, _, _ in todo if i < len(plan)]
        if feed:
            feed.plan([t[2].sources for t in tasks])
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for f in [pool.submit(task, *t) for t in tasks]:
                f.result()
    except BaseException:
        for r, w in writers.items():
            if left.get(r):
                w.abort()
        raise
    finally:
        bar.close()
        for reader in opened:
            reader.close()


def convert(arch: Architecture, config: ModelConfig, ck: Checkpoint, out: Path, opts: ConvertOptions,
            feed=None) -> dict:
    """Write config.json and every rank file into `out`; ranks already complete there are kept. `feed`: see
    write_ranks."""
    check_parallelism(arch, opts, config.path)
    quant = read_quantization(config)
    check_quantization(arch, quant, opts, config.path)
    if quant.quant_algo == ROWWISE:
        opts = choose_rowwise(arch, ck, opts)
    dtype = resolve_dtype(opts, config, ck)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for pp_rank in range(opts.pp):
        for tp_rank in range(opts.tp):
            plan = plan_rank(arch, ck, opts, tp_rank, pp_rank, quant)
            jobs.append((rank_id(tp_rank, pp_rank, opts.tp), tp_rank, plan))
    check_all_used(arch, ck, [plan for _, _, plan in jobs])
    attn_bias = any(p.target.endswith("attention.qkv.bias") for _, _, plan in jobs for p in plan)
    cfg = trtllm_config(arch, config, opts, dtype, attn_bias, quant)
    _log_kv_scales(arch, ck, opts, [plan for _, _, plan in jobs])
    todo, total = [], 0
    for r, tp_rank, plan in jobs:
        plan_fp = fingerprint(plan=[(p.target, p.rule, p.sources, p.shape, p.dtype) for p in plan], dtype=dtype,
                              files=ck.identity(), opts=opts.__dict__ | {"workers": None})
        path = out / f"rank{r}.safetensors"
        if _rank_done(path, plan_fp):
            log.info("convert: rank %d already written, kept", r)
            continue
        nbytes = sum(_numel(p.shape) * itemsize(p.dtype or dtype) for p in plan)
        total += nbytes
        todo.append((r, tp_rank, plan, path, plan_fp))
    write_ranks(ck, todo, {tp_rank: rank_context(arch, opts, tp_rank) for tp_rank in range(opts.tp)}, dtype,
                opts.workers, bytes_bar(total, f"convert tp={opts.tp} pp={opts.pp}"), feed=feed)
    write_json_atomic(out / "config.json", cfg)
    return cfg


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

