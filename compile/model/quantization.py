"""What a checkpoint's quantization is, read from config.json's `quantization_config` (and ModelOpt's
hf_quant_config.json) before any weight is read.

Every scheme ends in one of two places: a `Quantization` the TensorRT-LLM converter writes correctly (FP8 per
tensor with static activation scales, under the name TensorRT-LLM gives it), or a BadInput that names the
scheme, why it is not converted and what to do instead. A declared scheme is never converted as if the
weights were dense.

Scale convention, the same in every accepted format and in TensorRT-LLM: a stored FP8 value q stands for
q * scale (a dequantization scale, amax / 448):
- compressed-tensors "float-quantized": compressed_tensors/quantization/lifecycle/forward.py (dequantize:
  x_q * scale), weight_scale and input_scale per Linear;
- ModelOpt's HF export: modelopt/torch/export/quant_utils.py (weight scaling factor = amax / maxbound),
  weight_scale / input_scale per Linear, k_scale / v_scale on k_proj / v_proj;
- AutoFP8 / vLLM "fp8" (static): auto_fp8/quantize.py per_tensor_quantize (the stored scale is the reciprocal
  of finfo.max / amax);
- TensorRT-LLM: tensorrt_llm/quantization/layers.py FP8Linear.forward dequantizes the weight with
  weights_scaling_factor and the input with activation_scaling_factor (read at v0.11.0 and main b8fc6633).

Per-channel FP8 (TensorRT-LLM's FP8_PER_CHANNEL_PER_TOKEN, "fp8 rowwise") uses the same convention with one scale
per output row and activation scales computed per token at run time:
- fbgemm_fp8 (transformers integrations/fbgemm_fp8.py FbgemmFp8Linear): weight e4m3 [out, in], weight_scale float32
  [out, 1], no stored input scale; quantization_config.activation_scale_ub bounds the activations (default 1200);
- compressed-tensors "float-quantized" with weights strategy channel and dynamic token input activations
  (llm-compressor scheme FP8_DYNAMIC): weight_scale [out, 1];
- TensorRT-LLM: quantization/layers.py Fp8RowwiseLinear holds per_channel_scale float32 (out_features,) and
  fp8_rowwise_gemm multiplies the product by it and the per-token scale (main be9cd719, 0.12.0.dev2024080600).
"""

from dataclasses import dataclass
from pathlib import Path

from lmi_compile.errors import BadInput
from lmi_compile.model.config import ModelConfig, read_json

MODELOPT_FILE = "hf_quant_config.json"
# A remote model's hf_quant_config.json read before its download (remote/peek.py): carried in the config's raw dict
MODELOPT_KEY = "_lmi_compile_hf_quant_config"


def with_modelopt_file(config: ModelConfig, data, where: str) -> ModelConfig:
    """The config with a hf_quant_config.json read from elsewhere (`where`: its name in messages)."""
    import dataclasses

    return dataclasses.replace(config, raw={**config.raw, MODELOPT_KEY: {"where": where, "data": data}})

FOUR_BIT = ("4-bit weights are written by TensorRT-LLM's own converter, preprocessed for its mixed-GEMM kernels "
            "by a C++ op whose layout depends on the GPU architecture (torch.ops.trtllm."
            "preprocess_weights_for_mixed_gemm, tensorrt_llm/models/modeling_utils.py preprocess_weights), so "
            "lmi-compile does not reimplement it")
FOUR_BIT_FIX = ("run TensorRT-LLM's own examples/<family>/convert_checkpoint.py for this model inside the target "
                "LMI container ({how}), then trtllm-build")
RECALIBRATE = ("convert from the unquantized model, or quantize it with TensorRT-LLM's "
               "examples/quantization/quantize.py inside the target LMI container")


@dataclass(frozen=True)
class Quantization:
    """A scheme the converter writes. `quant_algo`: TensorRT-LLM's QuantAlgo name for the weights (None: dense);
    `kv_cache`: "FP8" when the checkpoint declares an FP8 KV cache (its k/v scales may be stored)."""

    source: str | None = None  # the format that declared it: compressed-tensors, modelopt, fp8 (AutoFP8), ...
    quant_algo: str | None = None
    kv_cache: str | None = None
    unconverted: str | None = None  # why lmi-compile does not write this scheme although TensorRT-LLM may read it
    where: str = ""
    # FP8_PER_CHANNEL_PER_TOKEN: activations are clamped to [-clamp, clamp] before their per-token quantization
    # (TensorRT-LLM's QuantConfig.clamp_val; its Fp8RowwiseGatedMLP needs one)
    clamp: float | None = None
    # 4-bit: the scheme TensorRT-LLM's own convert_checkpoint.py converts ("gptq", "awq"; the target's
    # toolchains -> convert_checkpoint -> schemes row), and its group size
    external: str | None = None
    group_size: int | None = None

    def require_converted(self) -> None:
        """Refuse a scheme the converter does not write (after the target has said whether it could serve it)."""
        if self.unconverted:
            raise BadInput(f"{self.where}: {self.unconverted}")

    def describe(self) -> str:
        if self.external:
            return (f"4-bit {self.source} (group size {self.group_size}), converted by TensorRT-LLM's "
                    f"convert_checkpoint.py")
        if not self.quant_algo and not self.kv_cache:
            return "dense"
        parts = [f"{self.quant_algo} weights" if self.quant_algo else "dense weights"]
        if self.kv_cache:
            parts.append(f"{self.kv_cache} KV-cache scales")
        return f"{', '.join(parts)} ({self.source})"


DENSE = Quantization()


def declared_scheme(config: ModelConfig) -> tuple[str, str] | None:
    """(the quant_method a checkpoint declares, where) from config.json's quantization_config or a
    hf_quant_config.json beside it (or read before the download); None for a dense checkpoint. For backends that
    read no quantized checkpoint at all (Neuron), so any declared scheme is refused without judging it."""
    qc = config.raw.get("quantization_config")
    if qc is not None:
        method = qc.get("quant_method", "unnamed") if isinstance(qc, dict) else "unreadable"
        return str(method), f"{config.path}: quantization_config"
    carried = config.raw.get(MODELOPT_KEY)
    if carried:
        return "modelopt", carried["where"]
    modelopt = Path(config.path).parent / MODELOPT_FILE
    if modelopt.is_file():
        return "modelopt", str(modelopt)
    return None


def read_quantization(config: ModelConfig) -> Quantization:
    """The checkpoint's quantization (DENSE when none is declared), or a one-line BadInput for a scheme that is
    not converted. Reads config.json's quantization_config, and hf_quant_config.json when it lies beside it."""
    qc = config.raw.get("quantization_config")
    modelopt = Path(config.path).parent / MODELOPT_FILE
    carried = config.raw.get(MODELOPT_KEY)
    if qc is None and (carried or modelopt.is_file()):
        data, where = (carried["data"], carried["where"]) if carried else (read_json(modelopt), str(modelopt))
        if not isinstance(data, dict):
            raise BadInput(f"{where} is not a JSON object; fix or remove it")
        qc = {"quant_method": "modelopt", **(data.get("quantization") or {})}
    else:
        where = f"{config.path}: quantization_config"
    if qc is None:
        return DENSE
    if not isinstance(qc, dict):
        raise BadInput(f"{where} is not a JSON object; fix config.json")
    method = str(qc.get("quant_method", "")).lower().replace("_", "-")
    reader = _READERS.get(method)
    if reader is None:
        raise BadInput(f"{where}: quant_method {qc.get('quant_method')!r} is not converted by lmi-compile; "
                       f"{RECALIBRATE}")
    return reader(qc, where)


def _four_bit(qc: dict, where: str, scheme: str) -> Quantization:
    """GPTQ and AutoAWQ 4-bit checkpoints: converted by the target's own TensorRT-LLM convert_checkpoint.py (a compiler
    boundary, compile/trtllm/convert_checkpoint.py), since its packing for the mixed-GEMM kernels depends on the GPU
    architecture and the version. TensorRT-LLM writes both as W4A16_GPTQ (1.x examples/llama/convert_checkpoint.py
    update_quant_config_from_hf: AutoAWQ is W4A16_GPTQ with use_autoawq)."""
    bits = qc.get("bits", qc.get("w_bit", 4))
    name = "GPTQ" if scheme == "gptq" else "AWQ"
    if bits != 4:
        raise BadInput(f"{where}: {name} {bits}-bit is not converted: TensorRT-LLM's convert_checkpoint.py reads "
                       f"4-bit {name} (int4_gptq) only; {RECALIBRATE}")
    if scheme == "gptq" and qc.get("desc_act"):
        raise BadInput(f"{where}: GPTQ with desc_act (act-order: input channels permuted by g_idx) is not converted: "
                       f"TensorRT-LLM 0.9-0.12 read qweight, qzeros and scales and ignore g_idx "
                       f"(models/llama/convert.py load_weights_from_gptq), 1.x refuses it "
                       f"('GPTQ with desc_act=True is not implemented!'); "
                       f"use a GPTQ export with desc_act false, or convert from the unquantized model")
    if scheme == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
        raise BadInput(f"{where}: AWQ version {qc.get('version')!r} is not converted: TensorRT-LLM reads AutoAWQ's "
                       f"GEMM layout; re-export with version gemm, or convert from the unquantized model")
    group = qc.get("group_size", qc.get("q_group_size", 128))
    if not isinstance(group, int) or group <= 0:
        raise BadInput(f"{where}: {name} group_size {group!r} is not converted: TensorRT-LLM's 4-bit weights are "
                       f"group-wise (--per_group --group_size N); use a group-wise export, e.g. group_size 128")
    return Quantization(source=scheme, quant_algo="W4A16_GPTQ", external=scheme, group_size=group, where=where)


def _gptq(qc: dict, where: str) -> Quantization:
    return _four_bit(qc, where, "gptq")


def _awq(qc: dict, where: str) -> Quantization:
    return _four_bit(qc, where, "awq")


ROWWISE = "FP8_PER_CHANNEL_PER_TOKEN"
# compressed-tensors' dynamic per-token scheme clamps nothing: a bound no float16 activation can pass stands for none
NO_CLAMP = 65504.0


def _per_channel(where: str, source: str, clamp: float) -> Quantization:
    """Per-channel FP8 weights with dynamic per-token activations: TensorRT-LLM 0.12+'s FP8_PER_CHANNEL_PER_TOKEN
    (tensorrt_llm/quantization/mode.py). Which Linears it keeps in FP8 is the target's (configs/targets.json
    toolchains -> quantization -> fp8_rowwise); the converter dequantizes the others."""
    return Quantization(source=source, quant_algo=ROWWISE, where=where, clamp=clamp)


def _fbgemm(qc: dict, where: str) -> Quantization:
    # TensorRT-LLM's own reading of the same config: examples/llama/convert_checkpoint.py update_quant_config_from_hf
    # (clamp_val = +-activation_scale_ub, default 1200; main be9cd719)
    ub = qc.get("activation_scale_ub", 1200.0)
    if not isinstance(ub, (int, float)) or ub <= 0:
        raise BadInput(f"{where}: activation_scale_ub {ub!r} is not a positive number; fix config.json")
    return _per_channel(where, "fbgemm_fp8", float(ub))


def _autofp8(qc: dict, where: str) -> Quantization:
    """transformers' "fp8": block-scaled FineGrainedFP8 when weight_block_size is set, else AutoFP8's per-tensor
    format (activation_scheme static or dynamic)."""
    if qc.get("weight_block_size"):
        raise BadInput(f"{where}: block-scaled FP8 (weight_block_size {qc['weight_block_size']}) is not converted: "
                       f"TensorRT-LLM's FP8 (per tensor) has one scale per weight; {RECALIBRATE}")
    if str(qc.get("activation_scheme", "dynamic")).lower() != "static":
        raise _dynamic(where)
    # AutoFP8 with kv_cache_quant_targets writes "kv_cache_scheme": "static" and the scales as self_attn.k_scale /
    # v_scale (neuralmagic/AutoFP8 auto_fp8/quantize.py, save_quantized_model and quantize_activations)
    kv = str(qc.get("kv_cache_scheme")).lower() == "static" or qc.get("kv_cache_quant_method")
    return Quantization(source="fp8", quant_algo="FP8", kv_cache="FP8" if kv else None)


def _dynamic(where: str) -> BadInput:
    return BadInput(f"{where}: FP8 with dynamic activation scales is not converted: TensorRT-LLM's FP8 needs a static "
                    f"per-tensor input scale for every Linear (activation_scaling_factor); use an export with static "
                    f"activation scales (llm-compressor scheme FP8, ModelOpt FP8) or {RECALIBRATE}")


def _is_fp8(args: dict | None) -> bool:
    return bool(args) and str(args.get("type")).lower() == "float" and args.get("num_bits") == 8


def _compressed_tensors(qc: dict, where: str) -> Quantization:
    sparsity = qc.get("sparsity_config")
    if isinstance(sparsity, dict) and str(sparsity.get("format", "dense")).lower() != "dense":
        raise BadInput(f"{where}: sparsity format {sparsity.get('format')!r} is not converted; {RECALIBRATE}")
    groups = [g for g in (qc.get("config_groups") or {}).values() if isinstance(g, dict)]
    kinds = set()
    for g in groups:
        w, a = g.get("weights") or {}, g.get("input_activations")
        strategy = str(w.get("strategy", "tensor")).lower()
        if not _is_fp8(w):
            bits = w.get("num_bits")
            if bits == 4:
                raise BadInput(f"{where}: compressed-tensors {bits}-bit {w.get('type', 'int')} weights are not "
                               f"converted: {FOUR_BIT}; " + FOUR_BIT_FIX.format(
                                   how="--use_weight_only --weight_only_precision int4_gptq for GPTQ-style weights"))
            raise BadInput(f"{where}: compressed-tensors {bits}-bit {w.get('type', 'int')} weights "
                           f"(format {qc.get('format')!r}) are not converted; {RECALIBRATE}")
        if strategy == "channel":
            # llm-compressor's FP8_DYNAMIC: one scale per output row, activations quantized per token at run time
            if a and a.get("dynamic") and _is_fp8(a) and str(a.get("strategy", "token")).lower() == "token":
                kinds.add(ROWWISE)
                continue
            raise BadInput(f"{where}: compressed-tensors FP8 with channel strategy and static or no input scales is "
                           f"not converted: TensorRT-LLM's per-channel FP8 (FP8_PER_CHANNEL_PER_TOKEN) quantizes "
                           f"activations per token at run time; {RECALIBRATE}")
        if strategy != "tensor":
            raise BadInput(f"{where}: compressed-tensors FP8 with {strategy} strategy is not converted: TensorRT-LLM's "
                           f"FP8 has one scale per weight or per output channel; {RECALIBRATE}")
        if not _is_fp8(a):
            raise BadInput(f"{where}: compressed-tensors FP8 weight-only quantization is not converted: "
                           f"TensorRT-LLM's FP8 also quantizes activations with a static scale; {RECALIBRATE}")
        if a.get("dynamic") or str(a.get("strategy", "tensor")).lower() != "tensor":
            raise _dynamic(where)
        kinds.add("FP8")
    if not kinds:
        raise BadInput(f"{where}: compressed-tensors config without config_groups; re-save it with llm-compressor")
    if len(kinds) > 1:
        raise BadInput(f"{where}: config groups mix per-tensor and per-channel FP8, which TensorRT-LLM cannot hold in "
                       f"one checkpoint (one quant_algo); re-export with one scheme")
    kv = qc.get("kv_cache_scheme")
    if kv:
        _kv_scheme(kv, where)
    algo = kinds.pop()
    return Quantization(source="compressed-tensors", quant_algo=algo, kv_cache="FP8" if kv else None,
                        clamp=NO_CLAMP if algo == ROWWISE else None)


def _kv_scheme(kv: dict, where: str) -> None:
    if not _is_fp8(kv):
        raise BadInput(f"{where}: a {kv.get('num_bits')}-bit {kv.get('type')} KV-cache scheme is not converted; "
                       f"{INT8_KV}")
    if kv.get("dynamic") or str(kv.get("strategy", "tensor")).lower() != "tensor":
        raise BadInput(f"{where}: a KV-cache scheme with dynamic or per-head scales is not converted: TensorRT-LLM "
                       f"keeps one kv_cache_scaling_factor per layer; drop kv_cache_scheme or re-export it per tensor")


INT8_KV = ("an INT8 KV cache needs scales calibrated from activations (TensorRT-LLM's convert_checkpoint.py "
           "--int8_kv_cache runs the model on calibration data), which a converter of stored weights cannot make; "
           "use --kv-cache-dtype fp8 (Ada or Hopper GPUs), or run convert_checkpoint.py inside the target LMI "
           "container")


def _modelopt(qc: dict, where: str) -> Quantization:
    algo = str(qc.get("quant_algo") or "").upper() or None
    kv = str(qc.get("kv_cache_quant_algo") or "").upper() or None
    if kv not in (None, "FP8"):
        raise BadInput(f"{where}: kv_cache_quant_algo {kv} is not converted; {INT8_KV}")
    if algo == ROWWISE:
        return Quantization(source="modelopt", quant_algo=algo, where=where,
                            unconverted=f"ModelOpt {ROWWISE} is not converted: lmi-compile reads per-channel FP8 from "
                                        f"fbgemm_fp8 and compressed-tensors (FP8_DYNAMIC) exports; ModelOpt writes a "
                                        f"TensorRT-LLM checkpoint itself (examples/quantization/quantize.py inside the "
                                        f"target LMI container)")
    if algo and "AWQ" in algo or algo in ("W4A16", "NVFP4", "W4A8_NVFP4_FP8", "W4A16_GPTQ"):
        raise BadInput(f"{where}: ModelOpt {algo} is not converted: {FOUR_BIT}; ModelOpt can export a "
                       f"TensorRT-LLM checkpoint itself: run examples/quantization/quantize.py --qformat "
                       f"{algo.lower()} inside the target LMI container, then trtllm-build")
    if algo not in (None, "FP8"):
        raise BadInput(f"{where}: ModelOpt quant_algo {algo} is not converted; {RECALIBRATE}")
    return Quantization(source="modelopt", quant_algo=algo, kv_cache=kv)


_READERS = {
    "gptq": _gptq, "awq": _awq, "fbgemm-fp8": _fbgemm, "fp8": _autofp8, "compressed-tensors": _compressed_tensors,
    "modelopt": _modelopt,
}
