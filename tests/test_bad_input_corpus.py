"""Bad-input corpus across commands, table-driven. Each case: one `error:` line with the expected words,
the documented exit code, and no output that looks complete. (More cases, by stage, live in
test_fetch_bad_input.py, test_trtllm_convert.py, test_trtllm_pipeline.py, test_neuron.py, test_publish.py.)"""

import json
import struct
from pathlib import Path

import pytest
from conftest import error_line, run_cli

STANDIN = str(Path(__file__).parent / "standins" / "trtllm-build")


def edit_config(m: Path, **changes):
    cfg = json.loads((m / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (m / "config.json").write_text(json.dumps(cfg))


def dup_across_shards(m: Path):
    from safetensors.torch import load_file, save_file

    a = load_file(str(m / "model-00001-of-00002.safetensors"))
    b = load_file(str(m / "model-00002-of-00002.safetensors"))
    b.update({k: v for k, v in list(a.items())[:1]})
    save_file(b, str(m / "model-00002-of-00002.safetensors"))
    (m / "model.safetensors.index.json").unlink()


def int8_weights(m: Path):
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(str(m / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].to(torch.int8)
    save_file(sd, str(m / "model.safetensors"))


def garbage_safetensors(m: Path):
    (m / "model.safetensors").write_bytes(struct.pack("<Q", 20) + b"this is not json!!!!" + b"\0" * 64)


def empty_folder(m: Path):
    for p in m.iterdir():
        p.unlink()


def bad_properties(m: Path):
    (m.parent / "bad.properties").write_text("option.tensor_parallel_degree=two\n")


def junk_properties(m: Path):
    # Properties.load reads any line as a key and a value; a \u escape without four hex digits it refuses
    (m.parent / "junk.properties").write_text("option.model_id=/models/\\u00zz\n")


CASES = [
    # (id, model kwargs, breaker, command args (M = model path, P = parent), exit code, words)
    ("duplicate-tensor-across-shards", dict(shards=2), dup_across_shards, ["fetch", "M"], 2, ["also appears in"]),
    ("int8-dtype", {}, int8_weights, ["trtllm", "M", "--until", "convert"], 2, ["int8", "not supported"]),
    ("garbage-safetensors", {}, garbage_safetensors, ["fetch", "M"], 2, ["model.safetensors", "not valid JSON"]),
    ("empty-folder", {}, empty_folder, ["fetch", "M"], 2, ["config.json", "missing"]),
    ("config-not-json", {}, lambda m: (m / "config.json").write_text("{oops"), ["fetch", "M"], 2,
     ["config.json", "not valid JSON"]),
    ("config-is-a-list", {}, lambda m: (m / "config.json").write_text("[1, 2]"), ["fetch", "M"], 2,
     ["expected a JSON object"]),
    ("tokenizer-config-not-json", {}, lambda m: (m / "tokenizer_config.json").write_text("nope"), ["fetch", "M"], 2,
     ["tokenizer_config.json", "not valid JSON"]),
    ("index-without-weight-map", dict(shards=2),
     lambda m: (m / "model.safetensors.index.json").write_text('{"metadata": {}}'), ["fetch", "M"], 2,
     ["no weight_map"]),
    ("config-missing-heads", {}, lambda m: edit_config(m, num_attention_heads=None),
     ["trtllm", "M", "--until", "convert"], 2, ["num_attention_heads", "missing"]),
    ("contradictory-kv-heads", {}, lambda m: edit_config(m, num_key_value_heads=3),
     ["trtllm", "M", "--until", "convert"], 2, ["not a multiple of num_key_value_heads"]),
    ("negative-layers", {}, lambda m: edit_config(m, num_hidden_layers=-2),
     ["trtllm", "M", "--until", "convert"], 2, ["num_hidden_layers", "positive"]),
    ("no-architectures", {}, lambda m: edit_config(m, architectures=None),
     ["neuron", "M", "--until", "split"], 2, ["architecture None is not supported"]),
    ("unknown-stage", {}, None, ["trtllm", "M", "--until", "deploy"], 2, ["--until 'deploy' is not a stage"]),
    ("unknown-lmi-version", {}, None, ["trtllm", "M", "--lmi-version", "0.19", "--output", "P/out"], 2, ["--lmi-version 0.19: no trtllm target", "supported: 0.28"]),
    ("unknown-neuron-format", {}, None, ["neuron", "M", "--format", "zip", "--n-positions", "128"], 2,
     ["--format 'zip'"]),
    ("layout-without-output", {}, None, ["trtllm", "M", "--trtllm-build", STANDIN], 2, ["--output is required"]),
    ("seq-len-not-above-input", {}, None, ["trtllm", "M", "--max-input-len", "2048", "--max-seq-len", "1024",
                                           "--until", "convert"], 2, ["--max-seq-len 1024 must exceed"]),
    ("properties-bad-value", {}, bad_properties, ["trtllm", "M", "--properties", "P/bad.properties",
                                                  "--until", "convert"], 2, ["option.tensor_parallel_degree='two'"]),
    ("properties-unparsable", {}, junk_properties, ["trtllm", "M", "--properties", "P/junk.properties",
                                                    "--until", "convert"], 2, ["junk.properties:1", "cannot parse"]),
    ("properties-missing-file", {}, None, ["trtllm", "--properties", "P/none.properties"], 2, ["cannot read"]),
    ("no-model-at-all", {}, None, ["trtllm", "--until", "convert"], 2, ["no MODEL given"]),
    ("unbalanced-build-args", {}, None, ["trtllm", "M", "--trtllm-build-args", "--foo 'bar", "--until", "convert"],
     2, ["--trtllm-build-args", "quotation"]),
    ("push-empty-folder", {}, lambda m: (m.parent / "emptydir").mkdir(), ["push", "P/emptydir", "s3://models/x/"],
     2, ["nothing to publish"]),
    ("push-whole-bucket", {}, None, ["push", "M", "s3://models"], 2, ["give a prefix"]),
    ("push-not-s3", {}, None, ["push", "M", "gs://models/x/"], 2, ["not an S3 URI"]),
    ("upload-malformed-uri", {}, None, ["trtllm", "M", "--upload", "s3://Bad_Bucket/x/", "--until", "convert"], 2,
     ["not a valid S3 bucket name"]),
    ("local-path-missing", {}, None, ["fetch", "./does/not/exist"], 2, ["no local folder named ./does/not/exist"]),
    ("model-is-a-file", {}, None, ["fetch", "M/config.json"], 2, ["not a folder"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, model_copy, tmp_path):
    _, kwargs, breaker, args, code, words = case
    m = model_copy(**kwargs)
    if breaker:
        breaker(m)
    argv = [a.replace("M", str(m), 1) if a.startswith("M") else a.replace("P", str(m.parent), 1)
            if a.startswith("P") else a for a in args]
    if argv[0] in ("trtllm", "neuron"):
        argv += ["--work-dir", str(tmp_path / "work")]
    proc = run_cli(*argv)
    assert proc.returncode == code, (proc.returncode, proc.stderr[-1500:])
    line = error_line(proc)
    for w in words:
        assert w in line, line
    assert "Traceback" not in proc.stderr
    # nothing that looks complete: no finished stage beyond fetch, no output tree
    for stage in ("checkpoint", "engines", "split", "compiled"):
        assert not (tmp_path / "work" / stage).exists()
    assert not (tmp_path / "out").exists() and not (m.parent / "out").exists()


# config.json contradictions, checked in process (model/architectures.py reads them before any weight): family, config
# changes, words of the refusal
BAD_CONFIGS = [
    ("zero-heads", "llama", dict(num_attention_heads=0), ["'num_attention_heads' must be a positive integer"]),
    ("zero-layers", "llama", dict(num_hidden_layers=0), ["'num_hidden_layers' must be a positive integer"]),
    ("heads-as-a-bool", "llama", dict(num_key_value_heads=True), ["'num_key_value_heads' must be a positive"]),
    ("heads-not-dividing-hidden", "llama", dict(hidden_size=60),
     ["hidden_size 60 is not divisible by num_attention_heads 8"]),
    ("moe-without-experts", "mixtral", dict(num_local_experts=0), ["mixture of experts", "'num_local_experts'"]),
    ("moe-negative-experts", "mixtral", dict(num_local_experts=-4), ["'num_local_experts' must be a non-negative"]),
    ("moe-top-k-above-experts", "mixtral", dict(num_experts_per_tok=5),
     ["'num_experts_per_tok' 5 is larger than 'num_local_experts' 4"]),
]


def config_file(tmp_path: Path, family: str, **changes):
    from tiny_models import TinySpec, hf_config

    from lmi_compile.model.config import ModelConfig

    (tmp_path / "config.json").write_text(json.dumps({**hf_config(TinySpec(family=family)), **changes}))
    return ModelConfig.load(tmp_path / "config.json")


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config(case, tmp_path):
    from lmi_compile.errors import BadInput
    from lmi_compile.model.architectures import resolve

    _, family, changes, words = case
    with pytest.raises(BadInput) as e:
        resolve(config_file(tmp_path, family, **changes))
    assert str(e.value).startswith(f"{tmp_path / 'config.json'}: ")
    for w in words:
        assert w in str(e.value), str(e.value)


def test_head_dim_given_apart_from_hidden_size(tmp_path):
    """Mistral-Nemo and Qwen3 give head_dim apart from hidden_size / heads (5120 / 32 heads of 128): the weights are
    checked against it."""
    from lmi_compile.model.architectures import resolve

    arch = resolve(config_file(tmp_path, "llama", head_dim=16))  # hidden 64, 8 heads (2 kv heads) of 16
    shapes = arch.source_shapes()
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (8 * 16, 64)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (2 * 16, 64)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (64, 8 * 16)
