"""FP8 Mixtral (issue #12): per-tensor FP8 experts as TensorRT-LLM 0.11+'s MoE holds them (one weight scale per
expert for the stacked [w3; w1], one activation scale for all experts), refused for 0.9 whose MoE has no FP8."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import error_line
from safetensors.torch import load_file, save_file
from test_fp8 import build, fake_gpu

from lmi_compile.converters.trtllm_checkpoint import ConvertOptions, convert
from lmi_compile.model.architectures import resolve
from lmi_compile.model.validate import validate_model_dir

EXPERTS, INTER, HIDDEN = 4, 128, 64
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3")


def fp8_mixtral(dense: Path, out: Path) -> Path:
    """compressed-tensors scheme FP8 (llm-compressor): every Linear but lm_head and the router in e4m3 with a [1]
    weight_scale (amax / 448) and a static [1] input_scale, from a dense tiny Mixtral."""
    out.mkdir()
    for f in dense.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, out / f.name)
    tensors = {}
    for name, t in load_file(str(dense / "model.safetensors")).items():
        if name.endswith(".weight") and name.split(".")[-2] in LINEARS:
            w = t.float()
            scale = w.abs().max().reshape(1) / 448.0
            tensors[name] = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            tensors[name.removesuffix("weight") + "weight_scale"] = scale
            static = 0.01 + 0.001 * (sum(map(ord, name)) % 97)  # distinct per Linear, as a calibration gives
            tensors[name.removesuffix("weight") + "input_scale"] = torch.tensor([static])
        else:
            tensors[name] = t
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dense / "config.json").read_text())
    arg = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized",
                                  "config_groups": {"group_0": {"targets": ["Linear"], "weights": arg,
                                                                "input_activations": arg}},
                                  "ignore": ["lm_head", "re:.*block_sparse_moe.gate"], "kv_cache_scheme": None}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tiny_models import TinySpec, write_checkpoint

    root = tmp_path_factory.mktemp("fp8moe")
    return fp8_mixtral(write_checkpoint(root / "dense", TinySpec(family="mixtral", num_layers=2, dtype="bfloat16",
                                                                  num_experts=EXPERTS)), root / "fp8")


def deq(t: dict, name: str) -> torch.Tensor:
    return t[name].float() * t[name.removesuffix("weight") + "weight_scale"].float()


def check_experts(src: dict, ck: Path, tp: int, moe_tp: int, moe_ep: int) -> None:
    per_ep = EXPERTS // moe_ep
    for r in range(tp):
        rank = load_file(str(ck / f"rank{r}.safetensors"))
        tp_rank, ep_rank = r // moe_ep, r % moe_ep  # TensorRT-LLM's Mapping: moe_tp_rank, moe_ep_rank
        rows = INTER // moe_tp
        for i in range(2):
            hf, trt = f"model.layers.{i}.block_sparse_moe.experts.", f"transformer.layers.{i}.mlp."
            fc, wsf = rank[trt + "fc.weight"], rank[trt + "fc.weights_scaling_factor"]
            assert fc.dtype == torch.float8_e4m3fn and wsf.shape == (per_ep, 1) and wsf.dtype == torch.float32
            for j, e in enumerate(range(ep_rank * per_ep, (ep_rank + 1) * per_ep)):
                got = fc[j].float() * wsf[j]
                parts = [deq(src, f"{hf}{e}.{w}.weight")[tp_rank * rows:(tp_rank + 1) * rows] for w in ("w3", "w1")]
                scales = [src[f"{hf}{e}.{w}.weight_scale"].item() for w in ("w3", "w1")]
                assert wsf[j].item() == max(scales)
                for k, (want, s) in enumerate(zip(parts, scales)):
                    mine = got[k * rows:(k + 1) * rows]
                    if s == max(scales):  # kept as it is
                        assert torch.equal(mine, want), (r, i, e)
                    else:  # requantized to the larger scale: one e4m3 rounding
                        assert ((mine - want).abs() <= want.abs() / 16 + max(scales) * 2.0 ** -10).all(), (r, i, e)
                proj = rank[trt + "proj.weight"][j].float() * rank[trt + "proj.weights_scaling_factor"][j]
                cols = INTER // moe_tp
                assert torch.equal(proj, deq(src, f"{hf}{e}.w2.weight")[:, tp_rank * cols:(tp_rank + 1) * cols])
            for name, ws in (("fc", ("w1", "w3")), ("proj", ("w2",))):
                want = max(src[f"{hf}{e}.{w}.input_scale"].item() for e in range(EXPERTS) for w in ws)
                assert rank[f"{trt}{name}.activation_scaling_factor"].item() == pytest.approx(want, rel=1e-7)
            router = rank[trt + "router.weight"]
            assert router.dtype == torch.float32
            assert torch.equal(router, src[f"model.layers.{i}.block_sparse_moe.gate.weight"].float())


@pytest.mark.parametrize("moe", [{}, {"moe_ep": 2}])
def test_fp8_experts_are_slices_of_the_dequantized_source(model, tmp_path, moe):
    m = validate_model_dir(model)
    src = load_file(str(model / "model.safetensors"))
    ck = tmp_path / "ckpt"
    opts = ConvertOptions(tp=2, workers=2, **moe)
    convert(resolve(m.config), m.config, m.checkpoint, ck, opts)
    assert json.loads((ck / "config.json").read_text())["quantization"]["quant_algo"] == "FP8"
    moe_tp, moe_ep = opts.moe_split()
    check_experts(src, ck, 2, moe_tp, moe_ep)
    # swapped expert scales fail the check
    rank = load_file(str(ck / "rank0.safetensors"))
    rank["transformer.layers.1.mlp.fc.weights_scaling_factor"] = \
        rank["transformer.layers.1.mlp.fc.weights_scaling_factor"].flip(0)
    save_file(rank, str(ck / "rank0.safetensors"))
    with pytest.raises(AssertionError):
        check_experts(src, ck, 2, moe_tp, moe_ep)


def test_fp8_mixtral_through_the_standin_and_refused_where_moe_has_no_fp8(model, tmp_path):
    proc = build(model, tmp_path / "a", "0.29", "--tp", "2", "--moe-ep", "2",
                 env=fake_gpu(tmp_path, "NVIDIA H100 80GB HBM3", "9.0"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = build(model, tmp_path / "b", "0.28", "--until", "convert")
    assert proc.returncode == 2
    line = error_line(proc)
    assert "FP8 experts cannot be served" in line and "TensorRT-LLM 0.9.0 has no FP8" in line
    assert "first LMI release that can is 0.29" in line
