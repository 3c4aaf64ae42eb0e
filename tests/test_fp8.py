"""Quantized checkpoints (issue #12): FP8 per tensor from the Hub formats, an FP8 KV cache, and every other scheme
refused with its reason. Rank tensors are compared after dequantization with the rank's slice of the dequantized
source: exactly where a weight keeps its bytes, within FP8 rounding for the requantized fused qkv."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import error_line, run_cli, trtllm_standin
from safetensors.torch import load_file, save_file
from trtllm_reference import reference_logits

from lmi_compile.converters.trtllm_checkpoint import ConvertOptions, convert
from lmi_compile.errors import BadInput
from lmi_compile.model.architectures import resolve
from lmi_compile.model.config import ModelConfig
from lmi_compile.model.quantization import read_quantization
from lmi_compile.model.validate import validate_model_dir

FORMATS = ["compressed-tensors", "modelopt", "fp8"]
SPEC = dict(num_layers=2, kv_scales=True)
INPUT = torch.tensor([[1, 17, 42, 99, 3, 200, 7, 128]])


def source(model: Path) -> dict:
    out = {}
    for f in sorted(model.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def deq(t: dict, weight: str) -> torch.Tensor:
    """An FP8 weight as the value it stands for (the same rule for every format and for TensorRT-LLM)."""
    scale = t.get(weight.removesuffix("weight") + "weight_scale", t.get(weight.removesuffix("weight") +
                                                                         "weights_scaling_factor"))
    return t[weight].float() * scale.float().reshape(-1)[0]


def convert_fp8(model: Path, out: Path, **opts) -> Path:
    m = validate_model_dir(model)
    convert(resolve(m.config), m.config, m.checkpoint, out, ConvertOptions(workers=2, **opts))
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_rank_tensors_are_slices_of_the_dequantized_source(model_factory, tmp_path, fmt):
    model = model_factory(fp8=fmt, **SPEC)
    src = source(model)
    tp, hd, kvh = 2, 8, 2
    ck = convert_fp8(model, tmp_path / "ckpt", tp=tp, kv_cache_quant_algo="FP8")
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["quantization"] == {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}
    for r in range(tp):
        rank = load_file(str(ck / f"rank{r}.safetensors"))
        assert rank["lm_head.weight"].dtype == torch.float16 and "lm_head.weights_scaling_factor" not in rank
        for i in range(2):
            hf, trt = f"model.layers.{i}.", f"transformer.layers.{i}."
            # separate Linears keep their bytes and their scales: exact
            for name, src_name, dim in (("attention.dense", "self_attn.o_proj", 1), ("mlp.fc", "mlp.gate_proj", 0),
                                        ("mlp.gate", "mlp.up_proj", 0), ("mlp.proj", "mlp.down_proj", 1)):
                w = src[f"{hf}{src_name}.weight"]
                part = w.shape[dim] // tp
                want = w.narrow(dim, r * part, part)
                assert rank[f"{trt}{name}.weight"].dtype == torch.float8_e4m3fn
                assert torch.equal(rank[f"{trt}{name}.weight"].view(torch.uint8), want.view(torch.uint8)), name
                assert torch.equal(deq(rank, f"{trt}{name}.weight"), deq(src, f"{hf}{src_name}.weight")
                                   .narrow(dim, r * part, part)), name
                assert rank[f"{trt}{name}.activation_scaling_factor"].item() == \
                    src[f"{hf}{src_name}.input_scale"].item(), name
            # the fused qkv: the rank's q heads and its kv head, each dequantized, requantized to the largest scale
            qkv = [f"{hf}self_attn.{p}_proj" for p in "qkv"]
            q_rows = 8 // tp * hd
            want = torch.cat([deq(src, qkv[0] + ".weight")[r * q_rows:(r + 1) * q_rows],
                              *(deq(src, n + ".weight")[r * (kvh // tp) * hd:(r + 1) * (kvh // tp) * hd]
                                for n in qkv[1:])])
            scales = [src[n + ".weight_scale"].item() for n in qkv]
            top = max(scales)
            assert rank[f"{trt}attention.qkv.weights_scaling_factor"].item() == pytest.approx(top, rel=1e-7)
            got = deq(rank, f"{trt}attention.qkv.weight")
            # e4m3: 3 mantissa bits, so one rounding moves a value by at most 1/16 of it (plus half a subnormal step)
            assert ((got - want).abs() <= want.abs() / 16 + top * 2.0 ** -10).all()
            assert rank[f"{trt}attention.qkv.activation_scaling_factor"].item() == \
                max(src[n + ".input_scale"].item() for n in qkv)
            kv = [src[k].item() for k in src if k.startswith(hf) and k.endswith(("k_scale", "v_scale"))]
            assert rank[f"{trt}attention.kv_cache_scaling_factor"].item() == pytest.approx(max(kv) if kv else 1.0)


def test_fp8_logits_match_the_dequantized_model(model_factory, tmp_path):
    """The FP8 conversion, run with TensorRT-LLM's FP8 semantics, computes what the model its weights stand for
    computes (HF transformers on the dequantized float32 weights). One scale for every weight, so the fused qkv
    needs no requantization and the match is to float precision (requantization is bounded above)."""
    from transformers import AutoModelForCausalLM

    model = model_factory(fp8="compressed-tensors", fp8_scale=0.12 / 448, **SPEC)
    dense = tmp_path / "dense"
    dense.mkdir()
    src = source(model)
    weights = {k: (deq(src, k) if v.dtype == torch.float8_e4m3fn else v) for k, v in src.items()
               if not k.endswith(("_scale",))}
    save_file(weights, str(dense / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((model / "config.json").read_text())
    del cfg["quantization_config"]
    (dense / "config.json").write_text(json.dumps(cfg))
    hf = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        want = hf(INPUT).logits
    got = reference_logits(convert_fp8(model, tmp_path / "ckpt", tp=2, pp=2, dtype="float32"), INPUT)
    rel = (got - want).abs().max() / want.abs().max()
    assert rel < 1e-4, f"relative error {rel:.2e}"


def qc(tmp_path: Path, quantization_config: dict, *, file: dict | None = None) -> ModelConfig:
    d = tmp_path / "cfg"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                              **({"quantization_config": quantization_config}
                                                 if quantization_config else {})}))
    if file:
        (d / "hf_quant_config.json").write_text(json.dumps(file))
    return ModelConfig.load(d / "config.json")


CT_FP8 = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}
REFUSED = {
    "gptq-desc-act": ({"quant_method": "gptq", "bits": 4, "desc_act": True}, ["GPTQ with desc_act", "g_idx",
                                                                             "desc_act false"]),
    "gptq-8bit": ({"quant_method": "gptq", "bits": 8, "desc_act": False}, ["GPTQ 8-bit", "int4_gptq"]),
    "gptq-per-channel": ({"quant_method": "gptq", "bits": 4, "group_size": -1}, ["group_size -1", "group-wise"]),
    "gptq-group-0": ({"quant_method": "gptq", "bits": 4, "group_size": 0}, ["group_size 0", "group-wise"]),
    "awq-gemv": ({"quant_method": "awq", "bits": 4, "version": "gemv"}, ["AWQ version 'gemv'", "GEMM"]),
    "ct-int4": ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "weights": {"num_bits": 4, "type": "int", "strategy": "group"}}}}, ["4-bit int weights"]),
    "ct-dynamic": ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "weights": CT_FP8, "input_activations": {**CT_FP8, "dynamic": True, "strategy": "token"}}}},
        ["dynamic activation scales", "static"]),
    "fp8-block": ({"quant_method": "fp8", "weight_block_size": [128, 128]}, ["block-scaled FP8"]),
    # transformers' "fp8" without activation_scheme is dynamic (FineGrainedFP8Config's default)
    "fp8-no-activation-scheme": ({"quant_method": "fp8"}, ["dynamic activation scales"]),
    "ct-sparse-24": ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": CT_FP8,
                      "input_activations": CT_FP8}}, "sparsity_config": {"format": "sparse-24-bitmask"}},
                     ["sparsity format 'sparse-24-bitmask'"]),
    # llm-compressor's NVFP4: 4-bit floats, one scale per 16 (compressed-tensors nvfp4-pack-quantized)
    "ct-nvfp4": ({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {"g": {
        "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16},
        "input_activations": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "dynamic": "local"}}}},
        ["4-bit float weights"]),
    "ct-int8-kv": ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": CT_FP8,
                    "input_activations": CT_FP8}}, "kv_cache_scheme": {"num_bits": 8, "type": "int"}},
                   ["calibrated from activations"]),
    "bnb": ({"quant_method": "bitsandbytes", "load_in_4bit": True}, ["'bitsandbytes' is not converted"]),
    "ct-channel-static": ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "weights": {**CT_FP8, "strategy": "channel"}, "input_activations": CT_FP8}}}, ["channel strategy and static"]),
    "ct-fp8-block": ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "weights": {**CT_FP8, "strategy": "block", "block_structure": [128, 128]},
        "input_activations": {**CT_FP8, "dynamic": True, "strategy": "group", "group_size": 128}}}},
        ["FP8 with block strategy"]),
    "ct-int8-activations": ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "weights": CT_FP8, "input_activations": {**CT_FP8, "type": "int"}}}}, ["FP8 weight-only", "static scale"]),
    "ct-static-per-token": ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "weights": CT_FP8, "input_activations": {**CT_FP8, "strategy": "token"}}}}, ["static per-tensor input scale"]),
    "ct-tensor-and-channel": ({"quant_method": "compressed-tensors", "config_groups": {
        "a": {"weights": CT_FP8, "input_activations": CT_FP8},
        "b": {"weights": {**CT_FP8, "strategy": "channel"}, "input_activations": {**CT_FP8, "dynamic": True,
                                                                                   "strategy": "token"}}}},
        ["mix per-tensor and per-channel FP8"]),
    "ct-dynamic-kv": ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": CT_FP8,
                       "input_activations": CT_FP8}}, "kv_cache_scheme": {**CT_FP8, "dynamic": True}},
                      ["KV-cache scheme with dynamic or per-head scales"]),
    "modelopt-int8-kv": ({"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "INT8"},
                         ["kv_cache_quant_algo INT8 is not converted", "calibrated from activations"]),
    "modelopt-awq": ({"quant_method": "modelopt", "quant_algo": "W4A16_AWQ"},
                     ["ModelOpt W4A16_AWQ is not converted: 4-bit weights"]),
    "modelopt-int8-sq": ({"quant_method": "modelopt", "quant_algo": "INT8_SQ"},
                         ["ModelOpt quant_algo INT8_SQ is not converted"]),
    "fbgemm-zero-bound": ({"quant_method": "fbgemm_fp8", "activation_scale_ub": 0},
                          ["activation_scale_ub 0 is not a positive number"]),
    "modelopt-rowwise": ({"quant_method": "modelopt", "quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"},
                         ["ModelOpt FP8_PER_CHANNEL_PER_TOKEN is not converted", "fbgemm_fp8"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_every_other_scheme_is_refused_with_its_reason(tmp_path, case):
    config, words = REFUSED[case]
    with pytest.raises(BadInput) as e:
        read_quantization(qc(tmp_path, config)).require_converted()
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert "\n" not in str(e.value)


def test_modelopt_file_and_dense(tmp_path):
    q = read_quantization(qc(tmp_path, None, file={"producer": {"name": "modelopt"}, "quantization": {
        "quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}}))
    assert (q.quant_algo, q.kv_cache, q.source) == ("FP8", "FP8", "modelopt")
    with pytest.raises(BadInput, match="W4A16_AWQ is not converted.*quantize.py"):
        read_quantization(qc(tmp_path, {"quant_method": "modelopt", "quant_algo": "W4A16_AWQ"}))
    assert read_quantization(qc(tmp_path / "d", None)).quant_algo is None


def test_autofp8_declares_its_kv_cache_scales(tmp_path):
    """AutoFP8 marks a checkpoint with FP8 KV-cache scales by "kv_cache_scheme": "static" (its save_quantized_model)."""
    autofp8 = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}
    q = read_quantization(qc(tmp_path, {**autofp8, "kv_cache_scheme": "static"}))
    assert (q.quant_algo, q.kv_cache) == ("FP8", "FP8") and "FP8 KV-cache scales" in q.describe()
    assert read_quantization(qc(tmp_path / "d", autofp8)).kv_cache is None


def build(model, tmp_path, release, *args, env=None):
    return run_cli("trtllm", model, "--lmi-version", release, "--work-dir", tmp_path / "work", "--output",
                   tmp_path / "out", "--trtllm-build", trtllm_standin(release), *args, env=env)


def fake_gpu(tmp_path: Path, name: str, cc: str) -> dict:
    """nvidia-smi that reports one GPU, as `--query-gpu=name,compute_cap,memory.total,driver_version` does."""
    bin_dir = tmp_path / f"bin-{cc}"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho '{name}, {cc}, 23028 MiB, 535.104.05'\n")
    smi.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize("release,kv_scale", [("0.33", "max"), ("0.30", "one")])
def test_fp8_pipeline_through_the_release_standin(model_factory, tmp_path, release, kv_scale):
    """FP8 weights and an FP8 KV cache through the stand-in of that release's TensorRT-LLM (which checks the
    quantization keys, dtypes and scales its FP8 layers need) to a tree `check` reports as FP8."""
    model = model_factory(fp8="modelopt", **SPEC)
    proc = build(model, tmp_path, release, "--tp", "2", "--kv-cache-dtype", "fp8",
                 env=fake_gpu(tmp_path, "NVIDIA H100 80GB HBM3", "9.0"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rank = load_file(str(tmp_path / "work" / "checkpoint" / "rank0.safetensors"))
    stored = max(load_file(str(model / "model.safetensors"))["model.layers.0.self_attn.v_proj.v_scale"].item(),
                 load_file(str(model / "model.safetensors"))["model.layers.0.self_attn.k_proj.k_scale"].item())
    want = stored if kv_scale == "max" else 1.0
    assert rank["transformer.layers.0.attention.kv_cache_scaling_factor"].item() == pytest.approx(want)
    report = json.loads(run_cli("check", tmp_path / "out", "--lmi-version", release, "--json").stdout)
    assert report["quantization"] == {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}
    assert [p for p in report["problems"] if "stand-in" not in p] == []
    assert json.loads((tmp_path / "out" / "lmi-compile.json").read_text())["quantization"]["quant_algo"] == "FP8"


def test_fp8_refused_where_it_cannot_run(model_factory, tmp_path):
    model = model_factory(fp8="compressed-tensors", **SPEC)
    # an A10G (8.6) has no FP8: refused from config.json and nvidia-smi, before any stage
    proc = build(model, tmp_path / "a", "0.33", env=fake_gpu(tmp_path, "NVIDIA A10G", "8.6"))
    assert proc.returncode == 2
    line = error_line(proc)
    assert "FP8 weights need Ada or Hopper" in line and "NVIDIA A10G (8.6)" in line
    assert not (tmp_path / "a" / "work").exists()
    # per-channel FP8: TensorRT-LLM 0.11 (LMI 0.29) has no FP8_PER_CHANNEL_PER_TOKEN; the refusal names the first
    # release whose TensorRT-LLM has it
    cfg = json.loads((model / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}
    other = tmp_path / "fbgemm"
    other.mkdir()
    for f in model.iterdir():
        (other / f.name).symlink_to(f)
    (other / "config.json").unlink()
    (other / "config.json").write_text(json.dumps(cfg))
    proc = build(other, tmp_path / "b", "0.29", "--until", "convert")
    assert proc.returncode == 2
    assert "TensorRT-LLM 0.11.0 has no FP8_PER_CHANNEL_PER_TOKEN" in error_line(proc)
    assert "first LMI release that can is 0.30" in error_line(proc)
    # an INT8 KV cache needs calibration
    proc = build(model, tmp_path / "c", "0.33", "--kv-cache-dtype", "int8", "--until", "convert")
    assert proc.returncode == 2 and "calibrated from activations" in error_line(proc)


def test_plan_counts_fp8_bytes(model_factory):
    from lmi_compile.lmi.plan import make_plan

    dense = make_plan(ModelConfig.load(model_factory(num_layers=2, dtype="bfloat16") / "config.json"), tp=1)
    fp8 = make_plan(ModelConfig.load(model_factory(fp8="compressed-tensors", dtype="bfloat16", **SPEC) / "config.json"),
                    tp=1)
    h, q, kv, inter = 64, 64, 16, 128
    linears = 2 * (q * h + 2 * kv * h + h * q + 3 * inter * h)
    assert dense.weight_bytes - fp8.weight_bytes == linears * (2 - 1) - 2 * 5 * 2 * 4  # minus the two scales each
    assert fp8.quantization == "FP8"
