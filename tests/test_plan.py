"""`lmi-compile plan` against hand-computed numbers for real model shapes (configs as on the Hub)."""

import json

import pytest
from conftest import error_line, run_cli

from lmi_compile.model.config import ModelConfig
from lmi_compile.lmi.plan import GiB, make_plan

SHAPES = {
    # name: (architecture, hidden, inter, layers, heads, kv heads, vocab, dtype, tied)
    "llama-2-7b": ("LlamaForCausalLM", 4096, 11008, 32, 32, 32, 32000, "float16", False),
    "llama-2-13b": ("LlamaForCausalLM", 5120, 13824, 40, 40, 40, 32000, "float16", False),
    "llama-2-70b": ("LlamaForCausalLM", 8192, 28672, 80, 64, 8, 32000, "float16", False),
    "llama-3-8b": ("LlamaForCausalLM", 4096, 14336, 32, 32, 8, 128256, "bfloat16", False),
    "mistral-7b": ("MistralForCausalLM", 4096, 14336, 32, 32, 8, 32000, "bfloat16", False),
    "qwen2.5-7b": ("Qwen2ForCausalLM", 3584, 18944, 28, 28, 4, 152064, "bfloat16", False),
}
# Published parameter counts (and each is the sum of its tensor shapes, worked by hand in the note).
PARAMS = {"llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192,
          "llama-3-8b": 8_030_261_248, "mistral-7b": 7_241_732_096, "qwen2.5-7b": 7_615_616_512}
# 2 (K and V) x layers x kv heads x head_dim x 2 bytes
KV_PER_TOKEN = {"llama-2-7b": 2 * 32 * 32 * 128 * 2, "llama-2-13b": 2 * 40 * 40 * 128 * 2,
                "llama-2-70b": 2 * 80 * 8 * 128 * 2, "llama-3-8b": 2 * 32 * 8 * 128 * 2,
                "mistral-7b": 2 * 32 * 8 * 128 * 2, "qwen2.5-7b": 2 * 28 * 4 * 128 * 2}


def write_config(tmp_path, name):
    arch, h, inter, layers, heads, kv, vocab, dtype, tied = SHAPES[name]
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": [arch], "hidden_size": h, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab, "torch_dtype": dtype,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": tied, "hidden_act": "silu"}))
    return d


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_parameters_and_kv_cache(tmp_path, name):
    p = make_plan(ModelConfig.load(write_config(tmp_path, name) / "config.json"))
    assert p.parameters == PARAMS[name]
    assert p.weight_bytes == PARAMS[name] * 2
    assert p.kv_bytes_per_token == KV_PER_TOKEN[name]
    assert p.kv_bytes_for_batch == KV_PER_TOKEN[name] * 32 * 1536


def test_llama2_7b_tp2_on_g5_12xlarge_by_hand(tmp_path):
    cfg = ModelConfig.load(write_config(tmp_path, "llama-2-7b") / "config.json")
    p = make_plan(cfg, tp=2, instance="ml.g5.12xlarge")
    # embedding 32000*4096 (replicated) + 32 layers of 202,383,360, split in 2 but for their two norms of 4096
    # (whole on each rank) + norm 4096 + lm_head 16000*4096, x 2 bytes
    assert p.weight_bytes_per_rank == (131_072_000 + 32 * ((202_383_360 - 8192) // 2 + 8192) + 4096 +
                                       16_000 * 4096) * 2
    assert p.kv_bytes_per_token_per_rank == 2 * 32 * 16 * 128 * 2
    assert p.fits is True and p.fitting_tp == [2, 4]  # tp=1 needs 12.6 GiB weights + 24 GiB KV > 24 GiB
    assert p.memory_per_accelerator == 24 * GiB
    p = make_plan(cfg, tp=8, instance="ml.g5.12xlarge")  # each rank's memory would fit; 8 ranks on 4 GPUs do not
    assert p.needed_per_accelerator <= p.memory_per_accelerator
    assert p.fits is False and any("exceeds the 4 accelerators" in w for w in p.warnings)


def test_padded_vocab_and_the_larger_pipeline_stage_by_hand(tmp_path):
    """The lm_head's vocab padded to a multiple of tp (rows per rank rounded up, as the converter writes them); with
    pp the largest rank is the larger stage (first: embedding; last: norm and lm_head); each stage caches only the
    K and V of its own layers. The tiny model of tests/tiny_models.py, whose vocab 250 no tp above 2 divides."""
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 250, "torch_dtype": "float16",
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu"}))
    cfg = ModelConfig.load(d / "config.json")
    # a layer: q 64x64, k and v 64x16 (2 kv heads of 8), o 64x64, gate, up and down 64x128, two norms of 64
    layer = 4096 + 2 * 1024 + 4096 + 3 * 8192 + 2 * 64
    assert make_plan(cfg).parameters == 250 * 64 + 4 * layer + 64 + 250 * 64
    # tp=4: 250 rows padded to 252, 63 a rank; a layer split in 4 but for its two norms (whole on each rank) and
    # its k and v (2 kv heads over 4 ranks: one head of 8 each, repeated)
    rank_layer = (layer - 2 * 64 - 2 * 1024) // 4 + 2 * 64 + 2 * 8 * 64
    assert make_plan(cfg, tp=4).weight_bytes_per_rank == (250 * 64 + 64 + 63 * 64 + 4 * rank_layer) * 2
    p = make_plan(cfg, pp=2)  # 2 layers a stage; the last stage (norm 64 more) is the larger
    assert p.weight_bytes_per_rank == (2 * layer + 64 + 250 * 64) * 2 > (250 * 64 + 2 * layer) * 2
    assert p.kv_bytes_per_token_per_rank == 2 * 2 * 2 * 8 * 2  # K and V, 2 layers, 2 kv heads of 8, 2 bytes


def test_plan_takes_the_releases_default_lengths(tmp_path):
    """Without --max-seq-len the KV cache is sized for the target release's own lengths: LMI 0.28-0.32 build 1024
    input + 512 output tokens by default, 0.33+ leave max_seq_len to TensorRT-LLM (the model's 4096 positions)."""
    from lmi_compile.lmi.plan import plan_for

    cfg = ModelConfig.load(write_config(tmp_path, "llama-2-7b") / "config.json")
    for release, seq, batch in (("0.30", 1536, 256), ("0.33", 4096, 32)):
        p = plan_for("trtllm", cfg, None, tp=1, pp=1, dtype="auto", instance=None, lmi_version=release,
                     max_batch_size=None, max_seq_len=None)
        assert (p.max_seq_len, p.max_batch_size) == (seq, batch), release
        assert p.kv_bytes_for_batch == KV_PER_TOKEN["llama-2-7b"] * batch * seq


def test_llama2_70b_on_g5_48xlarge_depends_on_batch(tmp_path):
    cfg = ModelConfig.load(write_config(tmp_path, "llama-2-70b") / "config.json")
    # per rank: (embedding 262,144,000 + 80 layers of 855,654,400 / 8 but for their two norms of 8192 + norm 8192 +
    # lm_head 4000 * 8192) * 2 bytes
    weights = (262_144_000 + 80 * ((855_654_400 - 16_384) // 8 + 16_384) + 8192 + 4000 * 8192) * 2
    kv_token = 2 * 80 * 1 * 128 * 2  # 8 kv heads over 8 ranks: one each
    p = make_plan(cfg, tp=8, instance="ml.g5.48xlarge", max_batch_size=8, max_seq_len=4096)
    assert p.weight_bytes_per_rank == weights
    assert p.needed_per_accelerator == int((weights + kv_token * 8 * 4096) * 1.1) + GiB  # 21.3 GiB of 24
    assert p.fits is True and p.fitting_tp == [8]
    p = make_plan(cfg, tp=8, instance="ml.g5.48xlarge", max_batch_size=32, max_seq_len=4096)  # 24.6 GiB
    assert p.fits is False and p.fitting_tp == []
    p = make_plan(cfg, tp=8, instance="ml.p4de.24xlarge", max_batch_size=32, max_seq_len=4096)
    assert p.fits is True and p.fitting_tp == [4, 8]  # tp=2: 64.5 GiB weights + 20 GiB KV per GPU > 80


def test_neuron_tp_choices_pad_heads_and_skip_non_core_counts(tmp_path):
    """Neuron sizes over NeuronCore counts (tp 3, 5, 6... never; 16 and 24 though 40 heads do not divide by them),
    each rank's KV heads rounded up, as transformers-neuronx pads them."""
    from lmi_compile.neuron.backend import VALID_TP

    cfg = ModelConfig.load(write_config(tmp_path, "llama-2-13b") / "config.json")
    p = make_plan(cfg, tp=2, instance="ml.inf2.48xlarge", max_batch_size=4, max_seq_len=4096, tp_choices=VALID_TP)
    weights = (163_840_000 + 40 * ((317_204_480 - 10_240) // 2 + 10_240) + 5120 + 16_000 * 5120) * 2  # as 7b above
    kv = 2 * 40 * 20 * 128 * 2 * 4 * 4096
    assert p.weight_bytes_per_rank == weights
    assert p.needed_per_accelerator == int((weights + kv) * 1.1) + GiB > 16 * GiB
    assert p.fits is False and p.fitting_tp == [4, 8, 16, 24]
    p = make_plan(cfg, tp=16, instance="ml.inf2.48xlarge", max_batch_size=4, max_seq_len=4096, tp_choices=VALID_TP)
    assert p.kv_bytes_per_token_per_rank == 2 * 40 * 3 * 128 * 2  # 40 heads padded to 48: 3 a rank
    assert p.fits is True and any("pads" in w for w in p.warnings)
    # and 3 query heads a core, not 2.5: q_proj's rows and o_proj's columns of half a head more, in each of 40 layers
    tensorrt_like = make_plan(cfg, tp=16, max_batch_size=4, max_seq_len=4096)
    assert p.weight_bytes_per_rank - tensorrt_like.weight_bytes_per_rank == 40 * 2 * (3 - 2.5) * 128 * 5120 * 2
    p = make_plan(cfg, tp=8, instance="ml.inf2.48xlarge", max_batch_size=4, max_seq_len=4096, tp_choices=VALID_TP)
    assert p.weight_bytes_per_rank == make_plan(cfg, tp=8, max_batch_size=4, max_seq_len=4096).weight_bytes_per_rank


def test_kv_replication_and_divisibility_warnings(tmp_path):
    cfg = ModelConfig.load(write_config(tmp_path, "llama-3-8b") / "config.json")
    p = make_plan(cfg, tp=16)
    assert any("repeated 2x" in w for w in p.warnings)
    assert p.kv_bytes_per_token_per_rank == 2 * 32 * 1 * 128 * 2  # one (repeated) kv head per rank
    p = make_plan(ModelConfig.load(write_config(tmp_path, "qwen2.5-7b") / "config.json"), tp=8)
    assert any("does not divide num_attention_heads 28" in w for w in p.warnings)


def test_disk_needs_count_replicated_embeddings(tmp_path):
    p = make_plan(ModelConfig.load(write_config(tmp_path, "llama-3-8b") / "config.json"), tp=4)
    emb = 128256 * 4096 * 2
    assert p.disk_bytes["convert"] == PARAMS["llama-3-8b"] * 2 + 3 * emb
    assert p.disk_bytes["fetch"] == PARAMS["llama-3-8b"] * 2


def test_cli_plan_reads_only_config_from_hub(hub_env, tmp_path):
    d = write_config(tmp_path, "mistral-7b")
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 14_483_464_192},
                                                                "weight_map": {}}))
    hub_env.add("mistralai/Mistral-7B-v0.1", d)
    n = len(hub_env.requests)
    proc = run_cli("plan", "mistralai/Mistral-7B-v0.1", "--tp", "2", "--instance", "ml.g5.12xlarge", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["parameters"] == PARAMS["mistral-7b"] and out["weight_bytes"] == 14_483_464_192
    assert out["fits"] is True
    fetched = {r[1].rsplit("/", 1)[-1] for r in hub_env.requests[n:] if "/resolve/" in r[1]}
    # small config files only (ModelOpt's hf_quant_config.json declares a quantization), never weights
    assert fetched <= {"config.json", "model.safetensors.index.json", "hf_quant_config.json"}


def test_cli_plan_unknown_instance(tmp_path):
    proc = run_cli("plan", write_config(tmp_path, "llama-2-7b"), "--instance", "ml.x9.huge")
    assert proc.returncode == 2 and "ml.x9.huge" in error_line(proc) and "ml.g5.12xlarge" in error_line(proc)


def test_cli_plan_for_neuron_from_the_instance_or_the_release(tmp_path):
    """An inf2/trn1 instance, or a release only Neuron has, plans for Neuron: its defaults (batch 4, n_positions
    up to 4096), NeuronCore counts, padded heads, and what its loader refuses, as warnings."""
    model = write_config(tmp_path, "llama-2-13b")  # 40 heads
    proc = run_cli("plan", model, "--tp", "16", "--instance", "ml.inf2.48xlarge", "--lmi-version", "0.34", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["max_batch_size"] == 4 and out["max_seq_len"] == 4096
    # NeuronCore counts up to the 24 cores, of 16 GiB each; tp=2 needs 23.0 GB (by hand in
    # test_neuron_tp_choices_pad_heads_and_skip_non_core_counts).
    assert out["fitting_tp"] == [4, 8, 16, 24]
    assert any("pads them to 48" in w for w in out["warnings"]) and not any("refuse" in w for w in out["warnings"])
    proc = run_cli("plan", model, "--tp", "3", "--lmi-version", "0.26", "--json")  # 0.26: a Neuron release only
    assert proc.returncode == 0, proc.stderr
    assert any("not a NeuronCore count" in w for w in json.loads(proc.stdout)["warnings"])
    qwen = write_config(tmp_path, "qwen2.5-7b")
    proc = run_cli("plan", qwen, "--tp", "2", "--instance", "inf2.xlarge", "--json")
    assert proc.returncode == 0, proc.stderr
    assert any("Qwen2ForCausalLM" in w or "qwen2" in w for w in json.loads(proc.stdout)["warnings"]), proc.stdout
    gpu = json.loads(run_cli("plan", model, "--tp", "16", "--json").stdout)  # no instance, no release: TensorRT-LLM
    assert any("TRT-LLM refuses it" in w for w in gpu["warnings"]) and gpu["max_batch_size"] != 4


def test_plan_fetch_disk_is_the_checkpoint_as_stored(tmp_path):
    path = write_config(tmp_path, "llama-2-7b") / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "torch_dtype": "float32"}))
    stored = PARAMS["llama-2-7b"] * 4  # a float32 checkpoint (its index's total_size), planned for float16
    p = make_plan(ModelConfig.load(path), dtype="float16", index_total=stored)
    assert p.disk_bytes["fetch"] == stored and p.weight_bytes == stored // 2 == p.disk_bytes["split"]


def test_plan_of_a_missing_s3_prefix_is_one_clear_line(s3_env, s3_prefix):
    proc = run_cli("plan", f"{s3_prefix}no-such-model/")
    assert proc.returncode == 2 and "no-such-model/config.json: no such object" in error_line(proc)
