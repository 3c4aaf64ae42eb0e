"""Mixtral (mixture of experts): TRT-LLM rank files under MoE tensor and expert parallelism reproduce the HF
logits through a TRT-LLM-semantics forward pass; refusals; parameter counts for the real shapes."""

import json

import pytest
from safetensors import safe_open
from test_trtllm_convert import INPUT, assert_close, hf_cached, run_convert
from trtllm_reference import reference_logits

from lmi_compile.converters.trtllm_checkpoint import ConvertOptions, check_parallelism
from lmi_compile.errors import BadInput
from lmi_compile.lmi.plan import make_plan
from lmi_compile.model.architectures import resolve
from lmi_compile.model.config import ModelConfig
from lmi_compile.model.validate import validate_model_dir

# tiny Mixtral: 4 experts, top 2, hidden 64, intermediate 128 per expert, 4 layers, 8 heads, 2 kv heads
CASES = [dict(tp=1), dict(tp=2, pp=2), dict(tp=2, moe_ep=2), dict(tp=4, moe_ep=2), dict(tp=4, moe_ep=4, pp=2)]


@pytest.mark.parametrize("opts", CASES, ids=["tp1", "moe_tp2-pp2", "ep2", "moe_tp2-ep2", "ep4-pp2"])
def test_logits_match_hf(model_factory, tmp_path, opts):
    model = model_factory(family="mixtral", shards=2)
    ck = run_convert(model, tmp_path / "ckpt", **opts)
    tp, ep = opts["tp"], opts.get("moe_ep", 1)
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["architecture"] == "MixtralForCausalLM" and cfg["hidden_act"] == "swiglu"
    assert cfg["moe"] == {"num_experts": 4, "top_k": 2, "normalization_mode": 1}
    assert cfg["mapping"] == {"world_size": tp * opts.get("pp", 1), "tp_size": tp, "pp_size": opts.get("pp", 1),
                              "moe_tp_size": tp // ep, "moe_ep_size": ep}
    with safe_open(str(ck / "rank0.safetensors"), "pt") as f:
        assert f.get_slice("transformer.layers.0.mlp.router.weight").get_dtype() == "F32"
        assert f.get_slice("transformer.layers.0.mlp.router.weight").get_shape() == [4, 64]
        assert f.get_slice("transformer.layers.0.mlp.fc.weight").get_shape() == [4 // ep, 2 * 128 // (tp // ep), 64]
        assert f.get_slice("transformer.layers.0.mlp.proj.weight").get_shape() == [4 // ep, 64, 128 // (tp // ep)]
        assert not any(".mlp.gate." in n for n in f.keys())
    assert_close(reference_logits(ck, INPUT), hf_cached(model))


def test_flat_config_style(model_factory, tmp_path):
    """TRT-LLM 0.9: flat moe_* keys, moe_tp_mode picks expert parallelism, experts_weight_1/2 names."""
    model = model_factory(family="mixtral", shards=2)
    ck = run_convert(model, tmp_path / "ckpt", tp=2, moe_ep=2, moe_config_style="flat")
    cfg = json.loads((ck / "config.json").read_text())
    assert "moe" not in cfg and cfg["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    moe = (cfg["moe_num_experts"], cfg["moe_top_k"], cfg["moe_normalization_mode"], cfg["moe_tp_mode"])
    assert moe == (4, 2, 1, 1)
    with safe_open(str(ck / "rank1.safetensors"), "pt") as f:
        assert f.get_slice("transformer.layers.3.mlp.experts_weight_1").get_shape() == [2, 256, 64]
    assert_close(reference_logits(ck, INPUT), hf_cached(model))


@pytest.mark.parametrize("opts,needle", [
    (dict(tp=4, moe_tp=2, moe_ep=1), "--moe-tp 2 x --moe-ep 1 = 2 must equal --tp 4"),
    (dict(tp=4, moe_ep=3), "--moe-tp 1 x --moe-ep 3 = 3 must equal --tp 4"),
    (dict(tp=8, moe_ep=8), "num_local_experts 4 is not divisible by --moe-ep 8"),
    (dict(tp=4, moe_ep=2, moe_config_style="flat"), "cannot mix MoE tensor and expert parallelism"),
    (dict(tp=2, moe_config_style="v2"), "MoE config style 'v2' is not known for MixtralForCausalLM; known: flat, nested"),
])
def test_bad_moe_parallelism(model_factory, opts, needle):
    m = validate_model_dir(model_factory(family="mixtral", shards=2))
    with pytest.raises(BadInput) as e:
        check_parallelism(resolve(m.config), ConvertOptions(**opts), m.config.path)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_moe_options_refused_for_dense_models(model_factory):
    m = validate_model_dir(model_factory())
    with pytest.raises(BadInput, match="has no experts"):
        check_parallelism(resolve(m.config), ConvertOptions(tp=2, moe_ep=2), m.config.path)


def mixtral_8x7b(tmp_path) -> ModelConfig:
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 32000, "num_local_experts": 8, "num_experts_per_tok": 2, "torch_dtype": "bfloat16",
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None,
        "router_aux_loss_coef": 0.02, "tie_word_embeddings": False}))
    return ModelConfig.load(tmp_path / "config.json")


def test_plan_mixtral_8x7b_by_hand(tmp_path):
    # per layer: q 4096*4096 + k, v 2 * 1024*4096 + o 4096*4096 = 41,943,040; router 8*4096 = 32,768;
    # one expert 3 * 4096*14336 = 176,160,768, eight 1,409,286,144; norms 2*4096 -> 1,451,270,144
    layer, router, expert = 1_451_270_144, 32_768, 176_160_768
    total = 32 * layer + 2 * 32000 * 4096 + 4096
    assert total == 46_702_792_704  # the published count
    active = total - 32 * 6 * expert  # each token skips 6 of 8 experts per layer
    assert active == 12_879_925_248
    p = make_plan(mixtral_8x7b(tmp_path), tp=8)
    assert (p.parameters, p.active_parameters, p.weight_bytes) == (total, active, total * 2)
    # tp=8, any moe_tp x moe_ep: 1/8 of attention and experts; router whole in float32, the two norms whole in
    # bf16; embedding whole, lm_head 32000/8 rows; bf16
    assert p.weight_bytes_per_rank == (32 * (layer - router - 8192) // 8 * 2 + 32 * router * 4 + 32 * 8192 * 2
                                       + (32000 * 4096 + 4096 + 4000 * 4096) * 2)
    assert p.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
