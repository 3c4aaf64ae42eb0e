"""The TRT-LLM converter reproduces the HF model's logits through a TRT-LLM-semantics forward pass."""

import json
from pathlib import Path

import pytest
import torch
from conftest import error_line, run_cli
from safetensors import safe_open
from trtllm_reference import reference_logits

from lmi_compile.model.architectures import resolve
from lmi_compile.converters.trtllm_checkpoint import ConvertOptions, convert
from lmi_compile.model.validate import validate_model_dir

INPUT = torch.tensor([[1, 17, 42, 99, 3, 200, 7, 128, 64, 5, 249, 11]])


def hf_logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(INPUT).logits


def run_convert(model_dir: Path, out: Path, **opts) -> Path:
    m = validate_model_dir(model_dir)
    # float32 unless a test asks otherwise: the logits comparisons need full precision (auto would give float16)
    convert(resolve(m.config), m.config, m.checkpoint, out, ConvertOptions(workers=4, **{"dtype": "float32", **opts}))
    return out


def assert_close(got: torch.Tensor, want: torch.Tensor):
    rel = (got - want).abs().max() / want.abs().max()
    assert rel < 1e-4, f"relative error {rel:.2e}"


_HF_CACHE: dict = {}


def hf_cached(model_dir):
    if model_dir not in _HF_CACHE:
        _HF_CACHE[model_dir] = hf_logits(model_dir)
    return _HF_CACHE[model_dir]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("pp", [1, 2])
def test_logits_match_hf(model_factory, tmp_path, family, tp, pp):
    model = model_factory(family=family, shards=2)
    ck = run_convert(model, tmp_path / "ckpt", tp=tp, pp=pp)
    assert sorted(p.name for p in ck.glob("rank*.safetensors")) == sorted(f"rank{r}.safetensors" for r in range(tp * pp))
    assert_close(reference_logits(ck, INPUT), hf_cached(model))


@pytest.mark.parametrize("variant", [
    dict(spec=dict(tie_word_embeddings=True), opts=dict(tp=2, pp=2)),
    dict(spec=dict(num_kv_heads=1), opts=dict(tp=4)),  # every rank gets a copy of the one kv head
    dict(spec=dict(num_kv_heads=8), opts=dict(tp=4)),  # multi-head attention
    dict(spec=dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}), opts=dict(tp=2)),
    dict(spec=dict(rope_scaling={"type": "linear", "factor": 2.0}), opts=dict(tp=2)),
    # max_position_embeddings 4 < the 12-token INPUT: HF rescales the rope base, so a converter that drops
    # the dynamic scaling (or a reference that ignores it) cannot match
    dict(spec=dict(rope_scaling={"type": "dynamic", "factor": 4.0}, max_position_embeddings=4), opts=dict(tp=2)),
    dict(spec={}, opts=dict(tp=4, parallel_embedding=True, embedding_sharding_dim=0)),
    dict(spec={}, opts=dict(tp=2, parallel_embedding=True, embedding_sharding_dim=1)),
    dict(spec={}, fmt="bin", opts=dict(tp=2, pp=2)),
    dict(spec={}, fmt="bin", shards=1, opts=dict(tp=4)),
], ids=["tied", "kv1-tp4", "mha", "llama3-rope", "linear-rope", "dynamic-rope", "par-emb-dim0", "par-emb-dim1",
        "bin-sharded", "bin-single"])
def test_variants_match_hf(model_factory, tmp_path, variant):
    model = model_factory(fmt=variant.get("fmt", "safetensors"), shards=variant.get("shards", 2), **variant["spec"])
    ck = run_convert(model, tmp_path / "ckpt", **variant["opts"])
    assert_close(reference_logits(ck, INPUT), hf_cached(model))


def test_rank_file_layout_and_config(model_factory, tmp_path):
    model = model_factory(family="qwen2", shards=2)
    ck = run_convert(model, tmp_path / "ckpt", tp=4, pp=2)
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["architecture"] == "Qwen2ForCausalLM" and cfg["qwen_type"] == "qwen2" and cfg["attn_bias"] is True
    assert cfg["mapping"] == {"world_size": 8, "tp_size": 4, "pp_size": 2}
    assert cfg["rotary_base"] == 1000000.0 and cfg["norm_epsilon"] == 1e-6
    for r in range(8):
        # tensor data starts 8-byte aligned, as the safetensors library writes it (readers that map the file rely on it)
        assert (8 + int.from_bytes((ck / f"rank{r}.safetensors").read_bytes()[:8], "little")) % 8 == 0
        with safe_open(str(ck / f"rank{r}.safetensors"), "pt") as f:
            names = set(f.keys())
            first, last = r < 4, r >= 4
            assert ("transformer.vocab_embedding.weight" in names) == first
            assert ("lm_head.weight" in names) == last and ("transformer.ln_f.weight" in names) == last
            # 4 layers over 2 stages: each stage holds layers 0 and 1, renumbered
            layers = {n.split(".")[2] for n in names if n.startswith("transformer.layers.")}
            assert layers == {"0", "1"}
            qkv = f.get_tensor("transformer.layers.0.attention.qkv.weight")
            # 8 heads / 4 ranks = 2 q heads; 2 kv heads < 4 ranks -> 1 repeated kv head each; head_dim 8
            assert qkv.shape == ((2 + 2 * 1) * 8, 64)
            assert f.get_tensor("transformer.layers.0.attention.qkv.bias").shape == (32,)
            if last:
                assert f.get_tensor("lm_head.weight").shape == (252 // 4, 64)  # vocab 250 padded to 252


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names a descriptor's file through /proc (Linux)")
def test_each_tensor_goes_to_disk_before_the_rank_file_is_closed(model_factory, tmp_path, monkeypatch):
    """A rank file's bytes start their writeback tensor by tensor (the real sync_file_range, which must accept
    every call), so the closing fsync waits only for the tail, not for the whole file."""
    import os

    from lmi_compile.converters import safetensors_writer

    real = safetensors_writer._sync_file_range()
    assert real is not None, "sync_file_range is missing from libc on Linux"
    events = []

    def recorded(fd, offset, nbytes, flags):
        rc = real(fd, offset, nbytes, flags)
        events.append(("range", os.readlink(f"/proc/self/fd/{fd}"), offset, nbytes, rc))
        return rc

    real_fsync = os.fsync
    monkeypatch.setattr(safetensors_writer, "_sync_file_range", lambda: recorded)
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    ck = run_convert(model_factory(shards=2), tmp_path / "ckpt", tp=2)
    for r in range(2):
        path = ck / f"rank{r}.safetensors"
        tmp = str(path.with_name(f".{path.name}.tmp-{os.getpid()}"))
        mine = [e for e in events if e[1] == tmp]
        assert mine[-1][0] == "fsync" and all(e[0] == "range" for e in mine[:-1])
        assert all(e[4] == 0 for e in mine[:-1]), "sync_file_range refused a range"
        header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
        covered = sorted((e[2], e[2] + e[3]) for e in mine[:-1])
        assert covered[0][0] == header and covered[-1][1] == path.stat().st_size
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), "a tensor's bytes were never started"


def test_dtype_cast_per_tensor(model_factory, tmp_path):
    model = model_factory()
    ck = run_convert(model, tmp_path / "ckpt", tp=2, dtype="bfloat16")
    cfg = json.loads((ck / "config.json").read_text())
    # logits in float32 whatever the weights' dtype, as TensorRT-LLM's own conversion writes them
    # (NVIDIA/TensorRT-LLM@v0.10.0 examples/llama/convert_checkpoint.py l.281)
    assert cfg["dtype"] == "bfloat16" and cfg["logits_dtype"] == "float32"
    with safe_open(str(ck / "rank0.safetensors"), "pt") as f, safe_open(str(model / "model.safetensors"), "pt") as src:
        assert f.get_tensor("transformer.ln_f.weight").dtype == torch.bfloat16
        assert torch.equal(f.get_tensor("transformer.ln_f.weight"), src.get_tensor("model.norm.weight").bfloat16())


def test_rank_files_of_another_plan_are_rewritten(model_factory, tmp_path):
    """convert() keeps a rank file already in its folder only when the file's header records the same plan: the
    tp=2 rank0 and rank1 there are rewritten for tp=1 pp=2, whose ranks have the same names."""
    model = model_factory(shards=2)
    ck = run_convert(model, tmp_path / "ckpt", tp=2)
    run_convert(model, ck, pp=2)
    assert_close(reference_logits(ck, INPUT), hf_cached(model))


def test_writer_refuses_a_tensor_of_another_size_and_a_file_with_one_missing(tmp_path):
    """A tensor whose pieces do not add up to its planned bytes, or a file closed with a planned tensor never
    written, is an error: neither may leave a rank file that loads with misplaced or zero-filled weights."""
    import torch

    from lmi_compile.converters.safetensors_writer import SafetensorsWriter

    (tmp_path / "ckpt").mkdir()
    path = tmp_path / "ckpt" / "rank0.safetensors"
    w = SafetensorsWriter(path, [("a", "float32", (4,)), ("b", "float32", (2,))])
    with pytest.raises(ValueError, match="tensor a got 12 bytes, planned 16"):
        w.write_pieces_at(0, [torch.zeros(3)], None)
    w.write_pieces_at(0, [torch.ones(4)], None)
    with pytest.raises(ValueError, match="1 planned tensors were not written"):
        w.close()
    w.abort()
    assert list(path.parent.iterdir()) == []


def test_cli_convert_and_resume(model_factory, tmp_path):
    model = model_factory(shards=2)
    work = tmp_path / "work"
    proc = run_cli("trtllm", model, "--tp", "2", "--pp", "2", "--work-dir", work, "--until", "convert")
    assert proc.returncode == 0, proc.stderr
    files = {p.name: p.stat().st_mtime_ns for p in (work / "checkpoint").iterdir()}
    assert {"config.json", "rank0.safetensors", "rank3.safetensors"} <= set(files)
    again = run_cli("trtllm", model, "--tp", "2", "--pp", "2", "--work-dir", work, "--until", "convert")
    assert again.returncode == 0 and "skipping" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (work / "checkpoint").iterdir()} == files
    changed = run_cli("trtllm", model, "--tp", "4", "--work-dir", work, "--until", "convert")
    assert changed.returncode == 0, changed.stderr
    # tp2/pp2 and tp4 both give rank0-3: what proves the redo is what the files say
    ck = work / "checkpoint"
    assert sorted(p.name for p in ck.glob("rank*")) == [f"rank{r}.safetensors" for r in range(4)]
    assert json.loads((ck / "config.json").read_text())["mapping"] == {"world_size": 4, "tp_size": 4, "pp_size": 1}
    record = json.loads((ck / ".lmi-compile-stage.json").read_text())
    assert (record["stage"], record["tp"], record["pp"]) == ("convert", 4, 1)
    with safe_open(str(ck / "rank0.safetensors"), "pt") as f:
        # 8 heads / 4 ranks = 2 q heads + 1 repeated kv head each, head_dim 8; and all 4 layers (no pp split)
        assert f.get_slice("transformer.layers.0.attention.qkv.weight").get_shape() == [(2 + 2 * 1) * 8, 64]
        assert "transformer.layers.3.attention.qkv.weight" in f.keys() and "lm_head.weight" in f.keys()


# 12 heads, 4 kv heads: tp 3 divides the heads but not the kv heads, tp 12 the heads and kv heads but not the MLP
ODD = dict(hidden_size=96, num_heads=12, num_kv_heads=4, intermediate_size=100)


@pytest.mark.parametrize("args,needle,spec", [
    (["--tp", "3"], "not divisible by --tp 3", {}),
    (["--tp", "16"], "larger than num_attention_heads", {}),
    (["--pp", "8"], "larger than num_hidden_layers", {}),
    (["--pp", "3"], "not divisible by --pp 3", {}),
    (["--dtype", "int8"], "--dtype 'int8' is not supported", {}),
    (["--tp", "3"], "num_key_value_heads 4 and --tp 3 do not divide one another", ODD),
    (["--tp", "12"], "intermediate_size 100 is not divisible by --tp 12", ODD),
])
def test_bad_parallelism(model_factory, tmp_path, args, needle, spec):
    proc = run_cli("trtllm", model_factory(**spec), *args, "--work-dir", tmp_path / "w", "--until", "convert")
    assert proc.returncode == 2, proc.stderr
    assert needle in error_line(proc)
    assert not (tmp_path / "w" / "checkpoint").exists()


def test_unsupported_architecture(model_copy, tmp_path):
    m = model_copy()
    cfg = json.loads((m / "config.json").read_text())
    cfg["architectures"] = ["GPTBigCodeForCausalLM"]
    (m / "config.json").write_text(json.dumps(cfg))
    proc = run_cli("trtllm", m, "--work-dir", tmp_path / "w", "--until", "convert")
    assert proc.returncode == 2
    line = error_line(proc)
    assert "GPTBigCodeForCausalLM" in line
    assert "LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, Qwen2ForCausalLM" in line


def test_missing_tensor(model_copy, tmp_path):
    from safetensors.torch import load_file, save_file

    m = model_copy(shards=1)
    sd = load_file(str(m / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(m / "model.safetensors"), metadata={"format": "pt"})
    proc = run_cli("trtllm", m, "--work-dir", tmp_path / "w", "--until", "convert")
    assert proc.returncode == 2
    assert "model.layers.1.mlp.up_proj.weight" in error_line(proc) and "missing" in error_line(proc)


def test_config_and_weights_disagree(model_copy, tmp_path):
    m = model_copy()
    cfg = json.loads((m / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (m / "config.json").write_text(json.dumps(cfg))
    proc = run_cli("trtllm", m, "--work-dir", tmp_path / "w", "--until", "convert")
    assert proc.returncode == 2
    assert "config and weights disagree" in error_line(proc)


def test_unused_tensor_is_an_error_unless_ignored(model_copy, tmp_path):
    from safetensors.torch import load_file, save_file

    m = model_copy(shards=1)
    sd = load_file(str(m / "model.safetensors"))
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # not a weight: the table ignores it
    save_file(sd, str(m / "model.safetensors"), metadata={"format": "pt"})
    assert sorted(p.name for p in run_convert(m, tmp_path / "ok").glob("rank*")) == ["rank0.safetensors"]
    sd["model.layers.1.mlp.down_proj.bias"] = torch.zeros(64)  # a weight the llama layout does not map
    save_file(sd, str(m / "model.safetensors"), metadata={"format": "pt"})
    proc = run_cli("trtllm", m, "--work-dir", tmp_path / "w", "--until", "convert")
    assert proc.returncode == 2
    line = error_line(proc)
    assert "model.layers.1.mlp.down_proj.bias" in line and "model.safetensors" in line and "not used" in line
