"""A plain-torch forward pass that follows TensorRT-LLM's module semantics, run from rank files.

Fused qkv per rank, GQA with the rank's kv heads, row-parallel partial sums (the all-reduce), GatedMLP
proj(act(fc(x)) * gate(x)), vocab-parallel lm_head (concatenate, drop padding), pipeline stages in order.
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


def reference_logits(ckpt: Path, input_ids: torch.Tensor) -> torch.Tensor:
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    tp, pp = cfg["mapping"]["tp_size"], cfg["mapping"]["pp_size"]
    ranks = {r: {k: v.float() for k, v in load_file(str(Path(ckpt) / f"rank{r}.safetensors")).items()}
             for r in range(tp * pp)}
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
                kvr = (qkv.shape[-1] // hd - hq) // 2
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
            mlp = torch.zeros_like(x)
            for r in stage:
                inner = torch.nn.functional.silu(h @ r[pre + "mlp.fc.weight"].T) * (h @ r[pre + "mlp.gate.weight"].T)
                mlp = mlp + inner @ r[pre + "mlp.proj.weight"].T
            x = x + mlp
    last = [ranks[(pp - 1) * tp + t] for t in range(tp)]
    x = _rms(x, last[0]["transformer.ln_f.weight"], eps)
    logits = torch.cat([x @ r["lm_head.weight"].T for r in last], dim=-1)
    assert logits.shape[-1] % tp == 0
    pad = logits[..., V:]
    assert torch.all(pad == 0), "vocab padding rows must be zeros"
    return logits[..., :V]
