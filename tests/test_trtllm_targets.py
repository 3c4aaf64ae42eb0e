"""Per-release TensorRT-LLM artifacts (issue #14): every LMI target builds with its own trtllm-build stand-in,
which enforces exactly that TensorRT-LLM version's interface, and `check --lmi-version` accepts the result
(save that stand-in engines are never loadable)."""

import json
import subprocess
from pathlib import Path

import pytest

from conftest import STANDINS, error_line, run_cli, trtllm_standin
from lmi_compile.configs import load_json
from lmi_compile.lmi.check import check
from lmi_compile.lmi.targets import releases, resolve

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
MODELS = {"llama2": dict(), "llama3.1": dict(rope_scaling=LLAMA3_ROPE), "mistral": dict(family="mistral"),
          "qwen2": dict(family="qwen2"), "mixtral": dict(family="mixtral")}
# What the target table says each release cannot serve (read from that release's TensorRT-LLM), with the
# first release that can: the refusal must name it.
REFUSED = {("0.28", "qwen2"): "first LMI release that can is 0.29",
           ("0.28", "llama3.1"): "first LMI release that can is 0.30",
           ("0.29", "llama3.1"): "first LMI release that can is 0.30"}
# Each release's facts written out here, not read from configs/targets.json (a wrong row there must fail a test):
# the TensorRT-LLM its container ships, the tree it loads, and the serving.properties lines that select its
# engine (djl-serving at each tag; the table's rows cite the files).
RELEASES = {
    "0.28": ("0.9.0", "triton", {"engine": "MPI", "option.rolling_batch": "trtllm"}),
    "0.29": ("0.11.0", "triton", {"engine": "MPI", "option.rolling_batch": "trtllm"}),
    "0.30": ("0.12.0", "triton", {"engine": "MPI", "option.rolling_batch": "trtllm"}),
    "0.31": ("0.12.0", "triton", {"engine": "MPI", "option.rolling_batch": "trtllm"}),
    "0.32": ("0.12.0", "triton", {"engine": "Python", "option.rolling_batch": "trtllm", "option.mpi_mode": "true"}),
    "0.33": ("0.21.0rc1", "engine-dir", {"engine": "Python", "option.rolling_batch": "disable",
                                         "option.async_mode": "true",
                                         "option.entryPoint": "djl_python.lmi_trtllm.trtllm_async_service"}),
    "0.35": ("1.0.0", "engine-dir", {"engine": "Python", "option.rolling_batch": "disable",
                                     "option.async_mode": "true",
                                     "option.entryPoint": "djl_python.lmi_trtllm.trtllm_async_service"}),
    "0.36": ("1.0.0", "engine-dir", {"engine": "Python", "option.rolling_batch": "disable",
                                     "option.async_mode": "true",
                                     "option.entryPoint": "djl_python.lmi_trtllm.trtllm_async_service"}),
}
# The TensorRT-LLM architecture each family's checkpoint names (its MODEL_MAP key at that version)
ARCH = {"llama2": "LlamaForCausalLM", "llama3.1": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM"}
EXPECTED_ARCH = {("0.29", "qwen2"): "QWenForCausalLM"}  # 0.11 has no Qwen2ForCausalLM: QWen with qwen_type
LAYOUT_TEXT = {"triton": "TensorRT-LLM triton repository", "engine-dir": "TensorRT-LLM engine directory"}
# the length option each layout's releases write beyond max_input_len (0.30-0.32 read max_output_len as the sequence)
LENGTH_OPTION = {"triton": "max_output_len", "engine-dir": "max_seq_len"}


def test_the_release_list_is_the_one_written_here():
    assert list(releases("trtllm")) == list(RELEASES)


def props(path: Path) -> dict:
    return dict(ln.split("=", 1) for ln in path.read_text().splitlines() if ln and not ln.startswith("#"))


def build(model, tmp_path, release, *args, standin=None):
    return run_cli("trtllm", model, "--lmi-version", release, "--work-dir", tmp_path / "work", "--output",
                   tmp_path / "out", "--trtllm-build", standin or trtllm_standin(release), *args)


def _first_release_of_each_toolchain() -> set[str]:
    seen: dict[str, str] = {}
    for r in releases("trtllm"):
        seen.setdefault(resolve("trtllm", r)["toolchain"], r)
    return set(seen.values())


@pytest.mark.parametrize("release", releases("trtllm"))
def test_every_target_builds_with_its_own_standin(release, model_factory, tmp_path):
    """Every release builds Llama 2; every family is built once per TensorRT-LLM version (releases sharing a
    toolchain differ only in layout and properties, which the Llama 2 run covers)."""
    families = MODELS if release in _first_release_of_each_toolchain() else {"llama2": MODELS["llama2"]}
    for name, spec in families.items():
        run_dir = tmp_path / name
        proc = build(model_factory(**spec), run_dir, release)
        if (release, name) in REFUSED:
            assert proc.returncode == 2, proc.stderr
            assert REFUSED[release, name] in error_line(proc)
            assert not (run_dir / "work").exists()  # refused from config.json alone, before any stage
            continue
        assert proc.returncode == 0, f"{name}: {proc.stderr[-1500:]}"
        out = run_dir / "out"
        engine_cfg = json.loads((out / ("tensorrt_llm/1/config.json" if RELEASES[release][1] == "triton"
                                        else "config.json")).read_text())
        tool, layout, engine_lines = RELEASES[release]
        assert engine_cfg["version"] == f"{tool}+lmi-compile-standin"
        arch = engine_cfg["pretrained_config"]["architecture"]
        assert arch == EXPECTED_ARCH.get((release, name), ARCH[name]), name
        manifest = json.loads((out / "lmi-compile.json").read_text())
        assert manifest["lmi_version"] == release and manifest["layout"] == layout
        p = props(out / "serving.properties")
        assert {k: p.get(k) for k in engine_lines} == engine_lines, (release, p)
        report = json.loads(run_cli("check", out, "--lmi-version", release, "--json").stdout)
        assert report["layout"] == f"trtllm-{layout}"
        assert [p for p in report["problems"] if "stand-in" not in p] == [], (name, report["problems"])
        assert any("stand-in" in p for p in report["problems"]) and report["loadable"] is False
        # checked for a release of the other layout, each difference that stops that release loading it is named
        other = "0.33" if layout == "triton" else "0.30"
        o_tool, o_layout, o_lines = RELEASES[other]
        got = check(str(out), lmi_version=other).problems
        want = [f"loads the {LAYOUT_TEXT[o_layout]} (LMI",
                f"engines were built with TensorRT-LLM {tool}; LMI {other}",
                f"serving.properties: option.{LENGTH_OPTION[layout]} is ignored by LMI {other}",
                *[f"serving.properties: {k}={p[k]}; LMI {other}" for k in o_lines if k in p and p[k] != o_lines[k]]]
        assert [w for w in want if not any(w in g for g in got)] == [], (release, name, got)
        if arch == "Qwen2ForCausalLM":  # LMI 0.29's TensorRT-LLM 0.11 knows Qwen2 as QWenForCausalLM
            assert any("architecture Qwen2ForCausalLM is not one TensorRT-LLM 0.11.0 knows" in g
                       for g in check(str(out), lmi_version="0.29").problems), (release, name)


@pytest.mark.parametrize("release", ["0.28", "0.29", "0.30", "0.33", "0.35"])  # one per TensorRT-LLM version
def test_attention_and_moe_plugins_run_in_the_models_dtype(release, model_factory, tmp_path):
    """TensorRT-LLM 0.9 runs the attention and MoE plugins in float16 unless the build names a dtype
    (plugin/plugin.py PluginConfig at v0.9.0; only the nccl plugin follows the model); 0.11 on default them to
    'auto'. A bf16 Mixtral's engine must not run them in float16."""
    assert build(model_factory(family="mixtral", dtype="bfloat16"), tmp_path, release).returncode == 0
    tool, layout, _ = RELEASES[release]
    engine_cfg = json.loads((tmp_path / "out" / ("tensorrt_llm/1/config.json" if layout == "triton"
                                                  else "config.json")).read_text())
    plugins = engine_cfg["build_config"]["plugin_config"]
    want = "bfloat16" if tool == "0.9.0" else "auto"
    assert {k: plugins[k] for k in ("gpt_attention_plugin", "moe_plugin", "gemm_plugin")} == dict.fromkeys(
        ("gpt_attention_plugin", "moe_plugin", "gemm_plugin"), want)


def test_release_flags_properties_and_defaults(model_factory, tmp_path):
    model = model_factory()
    # 0.28 = TensorRT-LLM 0.9: --max_output_len (no --max_seq_len), gemm plugin by dtype (no 'auto')
    assert build(model, tmp_path / "a", "0.28").returncode == 0
    m = json.loads((tmp_path / "a" / "out" / "lmi-compile.json").read_text())
    cmd = " ".join(m["build_command"])
    assert "--max_output_len 512" in cmd and "--max_seq_len" not in cmd and "--gemm_plugin float16" in cmd
    assert "--max_batch_size 256" in cmd and "--max_num_tokens 16384" in cmd  # LMI 0.28's own defaults
    p = props(tmp_path / "a" / "out" / "serving.properties")
    assert p["engine"] == "MPI" and p["option.max_output_len"] == "512" and p["option.dtype"] == "fp16"
    assert "option.max_seq_len" not in p
    # 0.30-0.32: option.max_output_len "now maps to max_seq_len"
    assert build(model, tmp_path / "b", "0.30").returncode == 0
    p = props(tmp_path / "b" / "out" / "serving.properties")
    assert p["option.max_output_len"] == "1536" and p["option.max_input_len"] == "1024"
    # 0.33+: build options through TensorRT-LLM's parser: option.max_seq_len; max_output_len would be ignored
    assert build(model, tmp_path / "c", "0.33", "--max-output-len", "512").returncode == 0
    p = props(tmp_path / "c" / "out" / "serving.properties")
    assert p["option.max_seq_len"] == "1536" and "option.max_output_len" not in p
    assert p["engine"] == "Python" and p["option.async_mode"] == "true" and p["option.rolling_batch"] == "disable"
    assert p["option.max_rolling_batch_size"] == "32" and p["option.max_num_tokens"] == "8192"
    # without lengths, 0.33 leaves max_seq_len to TensorRT-LLM, which takes the model's length
    assert build(model, tmp_path / "d", "0.33").returncode == 0
    assert props(tmp_path / "d" / "out" / "serving.properties")["option.max_seq_len"] == "2048"


@pytest.mark.parametrize("release,backend", [("0.28", "0.9.0"), ("0.29", "0.11.0"), ("0.30", "0.12.0")])
def test_config_pbtxt_has_every_field_of_the_backend_template(release, backend, model_copy, tmp_path):
    model = model_copy(family="mistral")
    cfg = json.loads((model / "config.json").read_text())
    cfg["sliding_window"] = 256
    (model / "config.json").write_text(json.dumps(cfg))
    assert build(model, tmp_path, release).returncode == 0
    text = (tmp_path / "out" / "tensorrt_llm" / "config.pbtxt").read_text()
    spec = load_json("trtllm_pbtxt.json")["versions"][backend]
    for e in spec["inputs"] + spec["outputs"]:
        assert f'name: "{e["name"]}"' in text, e["name"]
    for key, _ in spec["parameters"]:
        assert f'key: "{key}"' in text, key
    for name in ("stop_words_list", "bad_words_list", "len_penalty", "min_length", "presence_penalty",
                 "frequency_penalty", "return_log_probs", "cum_log_probs", "output_log_probs", "context_logits",
                 "generation_logits"):
        assert f'name: "{name}"' in text  # what LMI's TensorRT-LLM rolling batch sends and reads
    assert "${" not in text and "decoupled: True" in text and 'backend: "tensorrtllm"' in text
    # LMI returns the generated tokens alone, one beam (djl-serving@v0.29.0:serving/docs/lmi/tutorials/
    # trtllm_manual_convert_tutorial.md, its table of settings: exclude_input_in_output True, max_beam_width 1)
    for key, value in (("exclude_input_in_output", "true"), ("max_beam_width", "1")):
        assert f'key: "{key}"\n  value: {{\n    string_value: "{value}"' in text, key
    assert 'string_value: "inflight_fused_batching"' in text and "max_batch_size: 256" in text
    # the sliding window (256 < 1536) reaches the runtime
    assert 'key: "max_attention_window_size"\n  value: {\n    string_value: "256"' in text


def test_standins_enforce_their_own_version(model_factory, tmp_path):
    ck = tmp_path / "work" / "checkpoint"
    assert build(model_factory(), tmp_path, "0.30", "--until", "convert").returncode == 0
    out = tmp_path / "engines"
    seq = ["--checkpoint_dir", str(ck), "--output_dir", str(out)]

    def standin(version, *args):
        return subprocess.run([str(STANDINS / f"trtllm-build-{version}"), *seq, *args], capture_output=True, text=True)

    assert standin("0.9.0", "--max_seq_len", "1536").returncode == 2  # 0.9 has no --max_seq_len
    assert standin("0.9.0", "--gemm_plugin", "auto").returncode == 2  # nor 'auto'
    assert standin("0.12.0", "--max_output_len", "512").returncode == 2  # removed in 0.12
    assert standin("0.12.0", "--max_seq_len", "1536").returncode == 0
    # TensorRT-LLM 0.9 builds a missing rank from dummy weights and exits 0 ...
    (ck / "rank0.safetensors").rename(tmp_path / "rank0.safetensors")
    quiet = standin("0.9.0")
    assert quiet.returncode == 0 and "Use dummy model weights" in quiet.stdout
    # ... so lmi-compile checks every rank file itself before it calls trtllm-build
    (tmp_path / "rank0.safetensors").rename(ck / "rank0.safetensors")
    qwen = json.loads((ck / "config.json").read_text())
    qwen["architecture"] = "Qwen2ForCausalLM"
    (ck / "config.json").write_text(json.dumps(qwen))
    refused = standin("0.11.0")
    assert refused.returncode == 1 and "Unsupported model architecture: Qwen2ForCausalLM" in refused.stderr


def test_missing_rank_file_is_refused_before_trtllm_build(model_factory, tmp_path):
    model = model_factory()
    assert build(model, tmp_path, "0.28", "--tp", "2", "--until", "convert").returncode == 0
    ckpt = tmp_path / "work" / "checkpoint"
    (ckpt / "rank1.safetensors").unlink()
    proc = build(model, tmp_path, "0.28", "--tp", "2", "--until", "build")
    assert proc.returncode == 1
    assert "rank1.safetensors missing for world size 2" in error_line(proc)
    assert not (tmp_path / "work" / "engines").exists()


def test_a_standin_of_another_version_is_refused(model_factory, tmp_path, s3_client, s3_prefix):
    model = model_factory()
    # told apart by its flags: refused before convert
    proc = build(model, tmp_path / "a", "0.28", standin=STANDINS / "trtllm-build-0.12.0")
    assert proc.returncode == 2
    line = error_line(proc)
    assert "looks like TensorRT-LLM 0.12.0 (LMI 0.30, 0.31, 0.32)" in line and "needs TensorRT-LLM 0.9.0" in line
    assert not (tmp_path / "a" / "work").exists()
    # 0.11 still takes 0.9's --max_output_len (deprecated); its --max_seq_len, which 0.9 lacks, tells them apart
    proc = build(model, tmp_path / "c", "0.28", standin=STANDINS / "trtllm-build-0.11.0")
    assert proc.returncode == 2 and "looks like TensorRT-LLM 0.11.0 (LMI 0.29)" in error_line(proc)
    assert not (tmp_path / "c" / "work").exists()
    # same flags (0.21.0rc1 and 1.0.0): the engine config's version refuses it before layout and push
    proc = build(model, tmp_path / "b", "0.33", "--upload", s3_prefix, standin=STANDINS / "trtllm-build-1.0.0")
    assert proc.returncode == 1
    assert "engines report TensorRT-LLM 1.0.0+lmi-compile-standin" in error_line(proc)
    assert "nothing was laid out or pushed" in error_line(proc)
    assert not (tmp_path / "b" / "out").exists()
    listing = s3_client.list_objects_v2(Bucket="models", Prefix=s3_prefix.split("models/", 1)[1])
    assert listing.get("KeyCount", 0) == 0


def test_targets_command_and_unknown_release():
    proc = run_cli("targets", "--json")
    assert proc.returncode == 0
    table = json.loads(proc.stdout)["trtllm"]
    assert table["default"] == "0.33" and table["releases"]["0.29"]["tool"]["version"] == "0.11.0"
    assert "0.28" in run_cli("targets").stdout
    proc = run_cli("trtllm", "org/model", "--lmi-version", "0.27")
    assert proc.returncode == 2 and "supported: 0.28, 0.29, 0.30" in error_line(proc)
