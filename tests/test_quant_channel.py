"""Per-channel FP8 checkpoints (issue #12): fbgemm_fp8 and compressed-tensors FP8_DYNAMIC (channel weights, dynamic
per-token activations) converted as TensorRT-LLM's FP8_PER_CHANNEL_PER_TOKEN. The Linears the target's TensorRT-LLM
builds as Fp8RowwiseLinear (the MLP of every layer but the first and last) keep their bytes and get their rows'
scales; every other FP8 Linear is written dequantized in the model dtype. Rank tensors are compared, after
dequantization, with the rank's slice of the dequantized source."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import run_cli, trtllm_standin
from safetensors.torch import load_file, save_file
from test_fp8 import build, fake_gpu

from lmi_compile.converters.trtllm_checkpoint import ConvertOptions, RowwiseLayout, convert
from lmi_compile.errors import BadInput
from lmi_compile.lmi.check import check
from lmi_compile.model.architectures import resolve
from lmi_compile.model.validate import validate_model_dir

LAYERS, TP, HD, KVH, HEADS = 4, 2, 8, 2, 8
SPEC = dict(num_layers=LAYERS, dtype="bfloat16")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# TensorRT-LLM name -> (HF Linear, split dim)
MLP_TARGETS = {"mlp.fc": ("mlp.gate_proj", 0), "mlp.gate": ("mlp.up_proj", 0), "mlp.proj": ("mlp.down_proj", 1)}


def per_channel(dense: Path, out: Path, fmt: str) -> Path:
    """A per-channel FP8 checkpoint as its format defines it, made from a dense tiny model: each quantized Linear's
    rows scaled by their own amax / 448 (weight_scale [out, 1], the dequantization scale), q = w / scale rounded to
    e4m3. fbgemm_fp8 (transformers integrations/fbgemm_fp8.py FbgemmFp8Linear; Meta's checkpoints): the MLP Linears,
    float32 scales, attention listed in modules_to_not_convert. compressed-tensors FP8_DYNAMIC (llm-compressor): every
    decoder Linear, channel weights and dynamic token activations, scales in the model dtype."""
    out.mkdir()
    for f in dense.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, out / f.name)
    src = load_file(str(dense / "model.safetensors"))
    linears = MLP if fmt == "fbgemm_fp8" else ATTN + MLP
    scale_dtype = torch.float32 if fmt == "fbgemm_fp8" else torch.bfloat16
    tensors = {}
    for name, t in src.items():
        if name.split(".")[-2] in linears and name.endswith(".weight"):
            w = t.float()
            scale = (w.abs().amax(dim=1, keepdim=True) / 448.0).to(scale_dtype)
            tensors[name] = (w / scale.float()).clamp(-448, 448).to(torch.float8_e4m3fn)
            tensors[name.removesuffix("weight") + "weight_scale"] = scale
        else:
            tensors[name] = t
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dense / "config.json").read_text())
    if fmt == "fbgemm_fp8":
        cfg["quantization_config"] = {
            "quant_method": "fbgemm_fp8", "activation_scale_ub": 1000.0,
            "modules_to_not_convert": [f"model.layers.{i}.self_attn.{p}" for i in range(LAYERS) for p in ATTN] +
                                      ["lm_head"]}
    else:
        arg = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "block_structure": None,
               "actorder": None, "observer": "minmax", "observer_kwargs": {}}
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "output_activations": None,
                                          "weights": {**arg, "strategy": "channel", "dynamic": False},
                                          "input_activations": {**arg, "strategy": "token", "dynamic": True,
                                                                "observer": None}}},
            "ignore": ["lm_head"], "sparsity_config": {}, "kv_cache_scheme": None}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tiny_models import TinySpec, write_checkpoint

    root = tmp_path_factory.mktemp("perchannel")
    dense = write_checkpoint(root / "dense", TinySpec(**SPEC))
    return {fmt: per_channel(dense, root / fmt, fmt) for fmt in ("fbgemm_fp8", "compressed-tensors")}


def deq(t: dict, weight: str) -> torch.Tensor:
    """A weight as the value it stands for: FP8 rows times their scales (float32), or the float weight itself."""
    w = t[weight]
    if w.dtype != torch.float8_e4m3fn:
        return w.float()
    scale = t.get(weight.removesuffix("weight") + "weight_scale", t.get(weight.removesuffix("weight") +
                                                                         "per_channel_scale"))
    return w.float() * scale.float().reshape(-1, 1)


def meta(layer: int, target: str) -> bool:
    """What TensorRT-LLM 0.12 / 1.x (use_meta_recipe) build as Fp8RowwiseLinear: the MLP of the middle layers."""
    return target.startswith("mlp.") and layer not in (0, LAYERS - 1)


def every(layer: int, target: str) -> bool:
    """1.x without use_meta_recipe: every Linear of every layer (Fp8RowwiseAttention included)."""
    return True


ALL = RowwiseLayout(("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj"), False,
                    (("use_meta_recipe", False),))


def check_ranks(src: dict, ck: Path, tp: int, pp: int, kept=meta) -> None:
    """Every rank's Linears against the rank's slice of the dequantized source: kept ones exactly in FP8 with their
    rows' scales, the others exactly the dequantized values rounded once to bfloat16."""
    per = LAYERS // pp
    for r in range(tp * pp):
        rank, tp_rank, pp_rank = load_file(str(ck / f"rank{r}.safetensors")), r % tp, r // tp
        for local in range(per):
            g = pp_rank * per + local
            hf, trt = f"model.layers.{g}.", f"transformer.layers.{local}."
            targets = dict(MLP_TARGETS, **{"attention.dense": ("self_attn.o_proj", 1)})
            for name, (src_name, dim) in targets.items():
                full = deq(src, f"{hf}{src_name}.weight")
                part = full.shape[dim] // tp
                want = full.narrow(dim, tp_rank * part, part)
                got = rank[f"{trt}{name}.weight"]
                if kept(g, name):
                    assert got.dtype == torch.float8_e4m3fn, (r, g, name)
                    assert rank[f"{trt}{name}.per_channel_scale"].dtype == torch.float32
                    assert torch.equal(deq(rank, f"{trt}{name}.weight"), want), (r, g, name)
                else:
                    assert got.dtype == torch.bfloat16 and f"{trt}{name}.per_channel_scale" not in rank, (r, g, name)
                    assert torch.equal(got, want.to(torch.bfloat16)), (r, g, name)
            q_rows, kv_rows = HEADS // tp * HD, KVH // tp * HD
            want = torch.cat([deq(src, f"{hf}self_attn.q_proj.weight")[tp_rank * q_rows:(tp_rank + 1) * q_rows],
                              *(deq(src, f"{hf}self_attn.{p}_proj.weight")[tp_rank * kv_rows:(tp_rank + 1) * kv_rows]
                                for p in "kv")])
            if kept(g, "attention.qkv"):  # q, k, v bytes kept, their rows' scales concatenated alike
                assert rank[f"{trt}attention.qkv.weight"].dtype == torch.float8_e4m3fn
                assert torch.equal(deq(rank, f"{trt}attention.qkv.weight"), want), (r, g)
            else:
                assert torch.equal(rank[f"{trt}attention.qkv.weight"], want.to(torch.bfloat16)), (r, g)


@pytest.mark.parametrize("fmt", ["fbgemm_fp8", "compressed-tensors"])
def test_rank_tensors_are_slices_of_the_dequantized_source(models, tmp_path, fmt):
    m = validate_model_dir(models[fmt])
    src = load_file(str(models[fmt] / "model.safetensors"))
    ck = tmp_path / "ckpt"
    convert(resolve(m.config), m.config, m.checkpoint, ck, ConvertOptions(tp=TP, pp=2, workers=2))
    q = json.loads((ck / "config.json").read_text())["quantization"]
    clamp = 1000.0 if fmt == "fbgemm_fp8" else 65504.0
    assert q == {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN", "kv_cache_quant_algo": None, "clamp_val": [-clamp, clamp]}
    check_ranks(src, ck, TP, 2)
    # the check catches misassigned scales: fc and gate (same shape) swapped, or one Linear's rows reversed
    for tamper in ("swap", "reverse"):
        bad = tmp_path / tamper
        shutil.copytree(ck, bad)
        rank = load_file(str(bad / "rank2.safetensors"))  # pp stage 1: its layer 0 is layer 2, a kept one
        pre = "transformer.layers.0.mlp."
        if tamper == "swap":
            rank[pre + "fc.per_channel_scale"], rank[pre + "gate.per_channel_scale"] = \
                rank[pre + "gate.per_channel_scale"], rank[pre + "fc.per_channel_scale"]
        else:
            rank[pre + "proj.per_channel_scale"] = rank[pre + "proj.per_channel_scale"].flip(0)
        save_file(rank, str(bad / "rank2.safetensors"))
        with pytest.raises(AssertionError):
            check_ranks(src, bad, TP, 2)


def test_every_linear_kept_where_the_target_has_that_layout(models, tmp_path):
    """compressed-tensors FP8_DYNAMIC quantizes every Linear: where the target also builds every one as
    Fp8RowwiseLinear (1.x without use_meta_recipe), nothing is dequantized; the fbgemm model (attention in bfloat16)
    takes Meta's layout from the same list."""
    for fmt, kept, want in (("compressed-tensors", every, False), ("fbgemm_fp8", meta, True)):
        m = validate_model_dir(models[fmt])
        ck = tmp_path / fmt
        layouts = (ALL, RowwiseLayout(config=(("use_meta_recipe", True),)))
        convert(resolve(m.config), m.config, m.checkpoint, ck,
                ConvertOptions(tp=TP, workers=2, rowwise_layouts=layouts))
        assert json.loads((ck / "config.json").read_text())["quantization"]["use_meta_recipe"] is want
        check_ranks(load_file(str(models[fmt] / "model.safetensors")), ck, TP, 1, kept)


# (release, model, its QuantConfig keys, how the config under the other layout's keys fails that stand-in)
THROUGH = {
    "0.30-fbgemm": ("0.30", "fbgemm_fp8", {"clamp_val": [-1000.0, 1000.0]},
                    ({"use_meta_recipe": True}, "unexpected keyword argument 'use_meta_recipe'")),
    "0.33-compressed-tensors": ("0.33", "compressed-tensors", {"clamp_val": [-65504.0, 65504.0],
                                                               "use_meta_recipe": False},
                                ({"use_meta_recipe": True}, "keeps it in bfloat16")),
}


@pytest.mark.parametrize("case", sorted(THROUGH))
def test_per_channel_through_the_release_standin(models, tmp_path, case):
    """Through the CLI and the stand-in of the release's TensorRT-LLM, which enforces its QuantConfig keys (0.12 has
    no use_meta_recipe; 1.x builds every Linear as Fp8RowwiseLinear without it, Meta's layout with it) and its
    Fp8RowwiseLinear tensors, to a tree `check` reports."""
    release, fmt, keys, (flip, failure) = THROUGH[case]
    proc = build(models[fmt], tmp_path, release, "--tp", "2", "--kv-cache-dtype", "fp8",
                 env=fake_gpu(tmp_path, "NVIDIA L40S", "8.9"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = json.loads((tmp_path / "work" / "checkpoint" / "config.json").read_text())
    assert cfg["quantization"] == {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN", "kv_cache_quant_algo": "FP8", **keys}
    report = json.loads(run_cli("check", tmp_path / "out", "--lmi-version", release, "--json").stdout)
    assert report["quantization"] == {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN", "kv_cache_quant_algo": "FP8"}
    assert [p for p in report["problems"] if "stand-in" not in p] == []
    # LMI 0.29's TensorRT-LLM 0.11 has no FP8_PER_CHANNEL_PER_TOKEN (test_fp8.py refuses the compile for it)
    assert "quant_algo FP8_PER_CHANNEL_PER_TOKEN is not one TensorRT-LLM 0.11.0 has" in \
        check(str(tmp_path / "out"), lmi_version="0.29").problems
    # the same checkpoint under the other layout's keys fails this version's stand-in, as its TensorRT-LLM would
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "work" / "checkpoint", other)
    (other / "config.json").write_text(json.dumps(dict(cfg, quantization={**cfg["quantization"], **flip})))
    proc = subprocess.run([str(trtllm_standin(release)), "--checkpoint_dir", str(other), "--output_dir",
                           str(tmp_path / "engines")], capture_output=True, text=True)
    assert proc.returncode != 0 and failure in proc.stderr + proc.stdout, proc.stderr


def test_a_float_mlp_where_tensorrt_llm_wants_fp8_is_refused(models, tmp_path):
    """A checkpoint whose middle-layer MLP is not FP8 does not fit FP8_PER_CHANNEL_PER_TOKEN's layout."""
    model = tmp_path / "m"
    shutil.copytree(models["fbgemm_fp8"], model)
    t = load_file(str(model / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    t[name] = deq(t, name).to(torch.bfloat16)
    del t["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(t, str(model / "model.safetensors"), metadata={"format": "pt"})
    m = validate_model_dir(model)
    with pytest.raises(BadInput) as e:
        convert(resolve(m.config), m.config, m.checkpoint, tmp_path / "ck", ConvertOptions(tp=TP))
    assert "model.layers.1.mlp.up_proj.weight" in str(e.value) and "Fp8RowwiseLinear" in str(e.value)
    assert not list((tmp_path / "ck").glob("rank*.safetensors"))


def test_plan_counts_per_channel_bytes(models, tmp_path):
    """plan sizes the middle layers' MLP at one byte per parameter plus a float32 scale per row: exactly the bytes
    the converter writes (tp 1)."""
    from lmi_compile.lmi.plan import make_plan
    from lmi_compile.model.config import ModelConfig

    plan = make_plan(ModelConfig.load(models["fbgemm_fp8"] / "config.json"), tp=1)
    assert plan.quantization == "FP8_PER_CHANNEL_PER_TOKEN"
    h, inter = 64, 128
    dense = make_plan(ModelConfig.load(models["fbgemm_fp8"].parent / "dense" / "config.json"), tp=1)
    assert dense.weight_bytes - plan.weight_bytes == (LAYERS - 2) * (3 * inter * h * (2 - 1) - (2 * inter + h) * 4)
    m = validate_model_dir(models["fbgemm_fp8"])
    convert(resolve(m.config), m.config, m.checkpoint, tmp_path / "ck", ConvertOptions())
    written = load_file(str(tmp_path / "ck" / "rank0.safetensors"))
    assert sum(t.numel() * t.element_size() for t in written.values()) == plan.weight_bytes
