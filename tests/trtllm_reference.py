"""A plain-torch forward pass that follows TensorRT-LLM's module semantics, run from rank files.

Fused qkv per rank, GQA with the rank's kv heads, row-parallel partial sums (the all-reduce), GatedMLP
proj(act(fc(x)) * gate(x)), vocab-parallel lm_head (concatenate, drop padding), pipeline stages in order.
Mixture of experts as TRT-LLM's MoE layer computes it: router logits in float32, softmax, top-k, renormalized
(normalization mode RENORMALIZE); each expert's fc output [w3 x; w1 x] goes through swiglu (silu of the
second half times the first), then proj; each rank holds experts tp_rank % moe_ep_size's block, sliced
over moe_tp, and its partial sums are all-reduced like a row-parallel layer.
FP8 weights are dequantized with their weights_scaling_factor, as FP8Linear does.
It reads only the TRT-LLM checkpoint (config.json + rank files), never the HF model.
"""

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file


def _inv_freq(cfg: dict, seq_len: int) -> torch.Tensor:
    hd = cfg["head_size"]
    base = cfg["rotary_base"]
    sc = cfg.get("rotary_scaling") or {}
    kind = sc.get("type")
    if kind == "dynamic" and seq_len > cfg["max_position_embeddings"]:
        # dynamic NTK as TRT-LLM's attention does it (update_rotary_base_n_scale, rotary_embedding_max_positions
        # = max_position_embeddings): beyond the trained length the base grows with the sequence length
        factor, max_pos = sc["factor"], cfg["max_position_embeddings"]
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (hd / (hd - 2))
    inv = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv.float()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _moe_settings(cfg: dict) -> dict:
    """num_experts, top_k, normalization mode, moe_tp, moe_ep and weight names, from either config style."""
    tp = cfg["mapping"]["tp_size"]
    if "moe" in cfg:  # nested (TRT-LLM 0.11+)
        m = cfg["moe"]
        return dict(experts=m["num_experts"], top_k=m["top_k"], norm=m["normalization_mode"],
                    moe_tp=cfg["mapping"]["moe_tp_size"], moe_ep=cfg["mapping"]["moe_ep_size"],
                    fc="mlp.fc.weight", proj="mlp.proj.weight")
    expert = cfg["moe_tp_mode"] == 1  # flat (0.9): EXPERT_PARALLEL=1 over the whole tp group, or TENSOR_PARALLEL=2
    return dict(experts=cfg["moe_num_experts"], top_k=cfg["moe_top_k"], norm=cfg["moe_normalization_mode"],
                moe_tp=1 if expert else tp, moe_ep=tp if expert else 1,
                fc="mlp.experts_weight_1", proj="mlp.experts_weight_2")


# TensorRT-LLM's ACT2FN names (layers/mlp.py) that a gated MLP of these families may carry
ACTIVATIONS = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu, "relu": torch.relu,
               "gelu_new": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
               "gelu_pytorch_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh")}


def _moe(h: torch.Tensor, stage: list[dict], pre: str, moe: dict) -> torch.Tensor:
    # a gated expert ([w3 x; w1 x] in one fc) only under TensorRT-LLM's gated activation name
    assert moe["act"] == "swiglu", f"SwiGLU experts need hidden_act swiglu; config.json says {moe['act']}"
    routers = [r[pre + "mlp.router.weight"] for r in stage]
    assert all(torch.equal(w, routers[0]) for w in routers), "the router is replicated"
    probs = torch.softmax(h.float() @ routers[0].float().T, dim=-1)
    top_w, top_i = torch.topk(probs, moe["top_k"], dim=-1)
    if moe["norm"] == 1:  # RENORMALIZE
        top_w = top_w / top_w.sum(-1, keepdim=True)
    per_rank = moe["experts"] // moe["moe_ep"]
    out = torch.zeros_like(h)
    for t, r in enumerate(stage):
        first = (t % moe["moe_ep"]) * per_rank  # this rank's block of experts
        fc, proj = r[pre + moe["fc"]], r[pre + moe["proj"]]
        assert fc.shape[0] == proj.shape[0] == per_rank
        for j in range(per_rank):
            weight = (top_w * (top_i == first + j)).sum(-1, keepdim=True)  # 0 for tokens not routed here
            x, gate = (h @ fc[j].T).chunk(2, dim=-1)
            out = out + weight * ((torch.nn.functional.silu(gate) * x) @ proj[j].T)
    return out


def dequantized(rank: dict) -> dict:
    """A rank's tensors in float32, FP8 weights as FP8Linear reads them: the stored value times weights_scaling_factor
    (tensorrt_llm/quantization/layers.py FP8Linear.forward). Activations are not fake-quantized here: the reference
    is the model the FP8 weights stand for."""
    out = {}
    for k, v in rank.items():
        if v.dtype == torch.float8_e4m3fn:
            v = v.float() * rank[k.removesuffix("weight") + "weights_scaling_factor"].float()
        out[k] = v.float()
    return out


def reference_logits(ckpt: Path, input_ids: torch.Tensor) -> torch.Tensor:
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    # _rope rotates halves (GPT-NeoX's rope, which TRT-LLM's llama family uses); rope_gptj rotates interleaved pairs
    assert cfg["position_embedding_type"] == "rope_gpt_neox", cfg["position_embedding_type"]
    tp, pp = cfg["mapping"]["tp_size"], cfg["mapping"]["pp_size"]
    ranks = {r: dequantized(load_file(str(Path(ckpt) / f"rank{r}.safetensors"))) for r in range(tp * pp)}
    H, hd, eps, V = cfg["num_attention_heads"], cfg["head_size"], cfg["norm_epsilon"], cfg["vocab_size"]
    L = cfg["num_hidden_layers"]
    S = input_ids.shape[-1]
    first = [ranks[t] for t in range(tp)]
    emb_parts = [r["transformer.vocab_embedding.weight"] for r in first]
    if cfg["use_parallel_embedding"]:
        emb = torch.cat(emb_parts, dim=cfg["embedding_sharding_dim"])[:V]
    else:
        assert all(torch.equal(p, emb_parts[0]) for p in emb_parts)
        emb = emb_parts[0]
    x = emb[input_ids]
    pos = torch.arange(S, dtype=torch.float32)
    freqs = torch.outer(pos, _inv_freq(cfg, S))
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    mask = torch.full((S, S), float("-inf")).triu(1)
    for p in range(pp):
        stage = [ranks[p * tp + t] for t in range(tp)]
        for i in range(L // pp):
            pre = f"transformer.layers.{i}."
            h = _rms(x, stage[0][pre + "input_layernorm.weight"], eps)
            attn = torch.zeros_like(x)
            for r in stage:
                qkv = h @ r[pre + "attention.qkv.weight"].T
                if pre + "attention.qkv.bias" in r:
                    qkv = qkv + r[pre + "attention.qkv.bias"]
                hq = H // tp
                # from config.json, as the engine's Attention allocates them (a KV head per rank where tp > heads)
                kvr = (cfg.get("num_key_value_heads", H) + tp - 1) // tp
                assert qkv.shape[-1] == (hq + 2 * kvr) * hd, (pre, qkv.shape, hq, kvr, "config.json disagrees")
                q, k, v = qkv.split([hq * hd, kvr * hd, kvr * hd], dim=-1)
                q = _rope(q.view(*q.shape[:-1], hq, hd).transpose(-3, -2), cos, sin)
                k = _rope(k.view(*k.shape[:-1], kvr, hd).transpose(-3, -2), cos, sin)
                v = v.view(*v.shape[:-1], kvr, hd).transpose(-3, -2)
                k = k.repeat_interleave(hq // kvr, dim=-3)
                v = v.repeat_interleave(hq // kvr, dim=-3)
                w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, dim=-1)
                o = (w @ v).transpose(-3, -2).reshape(*x.shape[:-1], hq * hd)
                attn = attn + o @ r[pre + "attention.dense.weight"].T  # row-parallel partial sum
            x = x + attn
            h = _rms(x, stage[0][pre + "post_layernorm.weight"], eps)
            if pre + "mlp.router.weight" in stage[0]:
                x = x + _moe(h, stage, pre, {**_moe_settings(cfg), "act": cfg["hidden_act"]})
                continue
            mlp = torch.zeros_like(x)
            act = ACTIVATIONS[cfg["hidden_act"]]  # GatedMLP: act(fc(x)) * gate(x), act as config.json names it
            for r in stage:
                inner = act(h @ r[pre + "mlp.fc.weight"].T) * (h @ r[pre + "mlp.gate.weight"].T)
                mlp = mlp + inner @ r[pre + "mlp.proj.weight"].T
            x = x + mlp
    last = [ranks[(pp - 1) * tp + t] for t in range(tp)]
    x = _rms(x, last[0]["transformer.ln_f.weight"], eps)
    logits = torch.cat([x @ r["lm_head.weight"].T for r in last], dim=-1)
    assert logits.shape[-1] % tp == 0
    pad = logits[..., V:]
    assert torch.all(pad == 0), "vocab padding rows must be zeros"
    return logits[..., :V]
