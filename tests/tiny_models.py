"""Write small HuggingFace checkpoints with random weights: for tests, the bundled example and benchmarks.

Configs are written by hand in the transformers 4.x Hub style (rope_theta, rope_scaling, torch_dtype),
tokenizers are trained for real with the `tokenizers` library, and weights stream tensor by tensor,
so the same code writes an 8B-shaped checkpoint in bounded memory.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

# What differs between the families this tool supports, as they appear in Hub configs.
FAMILIES = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
              "mlp_bias": False},
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": None},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False,
              "sliding_window": None, "max_window_layers": 28},
    # experts (num_local_experts, num_experts_per_tok) come from TinySpec
    "mixtral": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "sliding_window": None,
                "router_aux_loss_coef": 0.02, "router_jitter_noise": 0.0, "output_router_logits": False,
                "attention_dropout": 0.0},
}
QKV_BIAS = {"qwen2"}

CORPUS = [
    "lmi-compile turns a HuggingFace checkpoint into engines that LMI loads in seconds.",
    "Tensor parallel ranks each hold a slice of every attention and MLP weight.",
    "The quick brown fox jumps over the lazy dog while the model compiles.",
    "Neuron split weights live in a folder called pytorch_model.bin, which is not a typo.",
    "Serving properties name the model id, tensor parallel degree and rolling batch size.",
]


@dataclass
class TinySpec:
    family: str = "llama"
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 250  # deliberately not a multiple of tp: exercises vocab padding
    max_position_embeddings: int = 2048  # LMI's default lengths (1024 + 512) fit, as on real models
    tie_word_embeddings: bool = False
    rope_scaling: dict | None = None
    dtype: str = "float32"
    seed: int = 0
    extra_config: dict = field(default_factory=dict)
    num_experts: int = 4  # mixtral only
    experts_per_token: int = 2  # mixtral only
    # FP8 per tensor, as a Hub exporter writes it (FP8_FORMATS): every Linear of the decoder layers in e4m3 with a
    # weight_scale and an input_scale; kv_scales adds FP8 KV-cache scales in that format's naming
    fp8: str | None = None
    kv_scales: bool = False
    fp8_scale: float | None = None  # one weight scale for every Linear (default: each its own amax / 448)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# Each format as its published definition writes it. compressed-tensors (llm-compressor scheme "FP8"):
# quantization_config with quant_method compressed-tensors, format float-quantized, one config group of 8-bit float
# weights and static input activations, strategy tensor; scales shaped [1]; kv_cache_scheme puts k_scale / v_scale on
# self_attn. ModelOpt's HF export: hf_quant_config.json {"producer", "quantization": {quant_algo FP8,
# kv_cache_quant_algo, exclude_modules}}; scalar scales; k_scale / v_scale on k_proj / v_proj. AutoFP8 (transformers
# quant_method "fp8", activation_scheme static): scalar scales.
FP8_FORMATS = {
    "compressed-tensors": {"scale_shape": (1,), "kv": ("self_attn.k_scale", "self_attn.v_scale")},
    "modelopt": {"scale_shape": (), "kv": ("self_attn.k_proj.k_scale", "self_attn.v_proj.v_scale")},
    "fp8": {"scale_shape": (), "kv": None},
    # fbgemm_fp8 (transformers FbgemmFp8Linear, Meta's FP8 checkpoints): per-channel, the MLP Linears only, weight_scale
    # float32 [out, 1], no input scale (activations are quantized per token at run time)
    "fbgemm_fp8": {"scale_shape": "rows", "kv": None, "linears": ("gate_proj", "up_proj", "down_proj")},
    # compressed-tensors FP8_DYNAMIC (llm-compressor): per-channel, every decoder Linear, weight_scale [out, 1]
    "compressed-tensors-channel": {"scale_shape": "rows", "kv": None},
}
FP8_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fp8_quantization_config(spec: TinySpec) -> dict | None:
    if spec.fp8 == "compressed-tensors":
        fp8 = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False,
               "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax",
               "observer_kwargs": {}}
        return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": fp8, "input_activations": fp8,
                                              "output_activations": None}},
                "ignore": ["lm_head"], "global_compression_ratio": None, "sparsity_config": {},
                "kv_cache_scheme": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
                                    "dynamic": False} if spec.kv_scales else None}
    if spec.fp8 == "fp8":
        return {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}
    if spec.fp8 == "compressed-tensors-channel":
        arg = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None}
        return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"],
                                              "weights": {**arg, "strategy": "channel", "dynamic": False},
                                              "input_activations": {**arg, "strategy": "token", "dynamic": True}}},
                "ignore": ["lm_head"], "kv_cache_scheme": None}
    if spec.fp8 == "fbgemm_fp8":
        return {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                "modules_to_not_convert": [f"model.layers.{i}.self_attn.{p}_proj" for i in range(spec.num_layers)
                                           for p in ("q", "k", "v", "o")] + ["lm_head"]}
    return None


def is_fp8_linear(spec: TinySpec, name: str) -> bool:
    linears = FP8_FORMATS[spec.fp8].get("linears", FP8_LINEARS) if spec.fp8 else ()
    return name.endswith(".weight") and name.split(".")[-2] in linears


def hf_config(spec: TinySpec) -> dict:
    cfg = {
        **{k: v for k, v in FAMILIES[spec.family].items()},
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-6 if spec.family == "qwen2" else 1e-5,
        "rope_theta": 1000000.0 if spec.family == "qwen2" else 10000.0,
        "rope_scaling": spec.rope_scaling,
        "vocab_size": spec.vocab_size,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "initializer_range": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": spec.dtype,
        "transformers_version": "4.46.0",
        "use_cache": True,
        **({"num_local_experts": spec.num_experts, "num_experts_per_tok": spec.experts_per_token}
           if spec.family == "mixtral" else {}),
        **({"quantization_config": fp8_quantization_config(spec)} if fp8_quantization_config(spec) else {}),
        **spec.extra_config,
    }
    return cfg


def tensor_plan(spec: TinySpec) -> list[tuple[str, tuple[int, ...]]]:
    """HF parameter names and shapes in the model's state-dict order."""
    h, kv = spec.hidden_size, spec.num_kv_heads * spec.head_dim
    plan = [("model.embed_tokens.weight", (spec.vocab_size, h))]
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        plan += [(p + "self_attn.q_proj.weight", (spec.num_heads * spec.head_dim, h))]
        if spec.family in QKV_BIAS:
            plan += [(p + "self_attn.q_proj.bias", (spec.num_heads * spec.head_dim,))]
        plan += [(p + "self_attn.k_proj.weight", (kv, h))]
        if spec.family in QKV_BIAS:
            plan += [(p + "self_attn.k_proj.bias", (kv,))]
        plan += [(p + "self_attn.v_proj.weight", (kv, h))]
        if spec.family in QKV_BIAS:
            plan += [(p + "self_attn.v_proj.bias", (kv,))]
        plan += [(p + "self_attn.o_proj.weight", (h, spec.num_heads * spec.head_dim))]
        if spec.family == "mixtral":  # transformers 4.x module order: router, then each expert's w1, w2, w3
            moe, inter = p + "block_sparse_moe.", spec.intermediate_size
            plan += [(moe + "gate.weight", (spec.num_experts, h))]
            for e in range(spec.num_experts):
                plan += [(f"{moe}experts.{e}.w1.weight", (inter, h)), (f"{moe}experts.{e}.w2.weight", (h, inter)),
                         (f"{moe}experts.{e}.w3.weight", (inter, h))]
        else:
            plan += [
                (p + "mlp.gate_proj.weight", (spec.intermediate_size, h)),
                (p + "mlp.up_proj.weight", (spec.intermediate_size, h)),
                (p + "mlp.down_proj.weight", (h, spec.intermediate_size)),
            ]
        plan += [
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    plan.append(("model.norm.weight", (h,)))
    if not spec.tie_word_embeddings:
        plan.append(("lm_head.weight", (spec.vocab_size, h)))
    return plan


def _random_tensor(name: str, shape, dtype: str, gen):
    import torch

    if name.endswith("norm.weight"):
        t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    elif name.endswith("block_sparse_moe.gate.weight"):
        t = torch.randn(shape, generator=gen)  # decisive routing: no near-ties in top-k between implementations
    else:
        t = 0.02 * torch.randn(shape, generator=gen) * (5.0 if name.endswith(".bias") else 1.0)
    return t.to(getattr(torch, dtype))


def fp8_entries(spec: TinySpec, name: str, shape):
    """(name, dtype or None for the model's, shape, value(make)) for one parameter: itself, or for an FP8 Linear its
    e4m3 weight (amax / 448 scaling, round to nearest) and its weight_scale and input_scale; FP8 KV-cache scales
    follow v_proj. Values are made in order from one generator, so a checkpoint is the same on every run."""
    import torch

    if not is_fp8_linear(spec, name):
        return [(name, None, shape, lambda make: make(name, shape))]
    fmt = FP8_FORMATS[spec.fp8]
    rows = fmt["scale_shape"] == "rows"  # per channel: one scale per output row
    base, sshape = name.removesuffix("weight"), (shape[0], 1) if rows else fmt["scale_shape"]
    memo = {}

    def weight(make):
        w = make(name, shape).float()
        memo["scale"] = (w.abs().amax(dim=1, keepdim=True) / 448.0 if rows else
                         torch.tensor(spec.fp8_scale) if spec.fp8_scale else w.abs().max() / 448.0)
        return (w / memo["scale"]).clamp(-448, 448).to(torch.float8_e4m3fn)

    def scale(make):
        return memo["scale"].reshape(sshape).float()

    def input_scale(make):  # a static activation scale: distinct per Linear, as a calibration would give
        return torch.tensor(0.01 + 0.001 * (sum(map(ord, name)) % 97)).reshape(sshape)

    out = [(name, "float8_e4m3fn", shape, weight), (base + "weight_scale", "float32", sshape, scale)]
    if not rows:
        out.append((base + "input_scale", "float32", sshape, input_scale))
    if spec.kv_scales and name.endswith("v_proj.weight") and fmt["kv"]:
        layer = name.split(".self_attn.")[0]
        for i, kv in enumerate(fmt["kv"]):
            value = torch.tensor(0.05 + 0.02 * i + 0.001 * int(layer.split(".")[-1])).reshape(sshape)
            out.append((f"{layer}.{kv}", "float32", sshape, lambda make, v=value: v))
    return out


def _tiled_tensor(shape, dtype: str, block):
    """Random-looking values at memcpy speed: a 16M-element random block tiled over the tensor (benchmarks)."""
    import torch

    out = torch.empty(shape, dtype=getattr(torch, dtype))
    flat = out.view(-1)
    for i in range(0, flat.numel(), block.numel()):
        n = min(block.numel(), flat.numel() - i)
        flat[i:i + n] = block[:n]
    return out


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """Train a byte-level BPE tokenizer on a tiny corpus and save it in the transformers layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:vocab_size // 2],
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512, "clean_up_tokenization_spaces": False,
         **specials}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))


def write_checkpoint(out: Path, spec: TinySpec | None = None, *, fmt: str = "safetensors", shards: int = 1,
                     tokenizer: bool = True, fast_fill: bool = False) -> Path:
    """Write a model folder. fmt: "safetensors" or "bin"; shards > 1 adds the HF index file.

    fast_fill tiles one random block over every tensor: for multi-GB benchmark checkpoints, not numerics.
    """
    import torch

    from lmi_compile.converters.safetensors_writer import SafetensorsWriter

    spec = spec or TinySpec()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(spec), indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.46.0"}, indent=2))
    if tokenizer:
        write_tokenizer(out, min(spec.vocab_size, 400))
    plan = tensor_plan(spec)
    if spec.fp8 == "modelopt":
        (out / "hf_quant_config.json").write_text(json.dumps(
            {"producer": {"name": "modelopt", "version": "0.19.0"},
             "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8" if spec.kv_scales else None,
                              "exclude_modules": ["lm_head"]}}, indent=2))
    # Shard by contiguous runs, as save_pretrained does.
    per = -(-len(plan) // max(1, shards))
    groups = [plan[i:i + per] for i in range(0, len(plan), per)]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    base = "model" if fmt == "safetensors" else "pytorch_model"
    gen = torch.Generator().manual_seed(spec.seed)
    block = (0.02 * torch.randn(1 << 24, generator=gen)).to(getattr(torch, spec.dtype)) if fast_fill else None

    def make(n, s):
        return _tiled_tensor(s, spec.dtype, block) if fast_fill else _random_tensor(n, s, spec.dtype, gen)

    groups = [[e for n, s in group for e in fp8_entries(spec, n, s)] for group in groups]
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        name = f"{base}.{ext}" if len(groups) == 1 else f"{base}-{k + 1:05d}-of-{len(groups):05d}.{ext}"
        if fmt == "safetensors":
            with SafetensorsWriter(out / name, [(n, d or spec.dtype, s) for n, d, s, _ in group],
                                   metadata={"format": "pt"}) as w:
                for n, _, s, value in group:
                    w.write(n, value(make))
        else:
            torch.save({n: value(make) for n, _, s, value in group}, out / name)
        for n, d, s, _ in group:
            weight_map[n] = name
            numel = 1
            for x in s:
                numel *= x
            total += numel * torch.empty((), dtype=getattr(torch, d or spec.dtype)).element_size()
    if len(groups) > 1:
        index = f"{base}.{ext}.index.json"
        (out / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out
