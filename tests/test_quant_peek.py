"""A quantization scheme declared only in ModelOpt's hf_quant_config.json is read before the download (issue #12):
a Hub model whose scheme the target cannot take is refused without fetching a byte of its weights."""

import json
import shutil

from conftest import error_line, run_cli


def test_hub_modelopt_scheme_refused_before_any_weight_is_fetched(hub_env, model_factory, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(model_factory(num_layers=2), repo)
    (repo / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt", "version": "0.19.0"},
         "quantization": {"quant_algo": "W4A16_AWQ", "group_size": 128, "exclude_modules": ["lm_head"]}}))
    hub_env.add("org/awq-only-in-modelopt-file", repo)
    n = len(hub_env.requests)
    proc = run_cli("trtllm", "org/awq-only-in-modelopt-file", "--work-dir", tmp_path / "work", "--until", "convert")
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = error_line(proc)
    assert "org/awq-only-in-modelopt-file/hf_quant_config.json" in line and "W4A16_AWQ" in line
    fetched = [path for _, path in hub_env.requests[n:] if "/resolve/" in path]
    assert any(p.endswith("/hf_quant_config.json") for p in fetched)
    assert not [p for p in fetched if p.endswith((".safetensors", ".bin"))], fetched
    assert not (tmp_path / "work" / "source").exists()


def test_hub_modelopt_fp8_fetched_with_its_quant_file(hub_env, model_factory, tmp_path):
    """ModelOpt's FP8 export declares its scheme only in hf_quant_config.json: the fetch brings that file, so the
    converter writes FP8 (not a refusal of 'FP8 tensors without a quantization_config')."""
    hub_env.add("org/modelopt-fp8", model_factory(fp8="modelopt", num_layers=2, kv_scales=True))
    proc = run_cli("trtllm", "org/modelopt-fp8", "--work-dir", tmp_path / "work", "--until", "convert")
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = json.loads((tmp_path / "work" / "checkpoint" / "config.json").read_text())
    assert cfg["quantization"]["quant_algo"] == "FP8"


def test_neuron_refuses_a_quantized_hub_model_before_any_weight_is_fetched(hub_env, model_factory, tmp_path):
    """transformers-neuronx reads dense weights only: a pre-quantized checkpoint is refused for Neuron, from its
    config.json, before the download (it used to fail later with an unrelated message, or be split as dense)."""
    hub_env.add("org/fp8-for-neuron", model_factory(fp8="compressed-tensors", num_layers=2))
    n = len(hub_env.requests)
    proc = run_cli("neuron", "org/fp8-for-neuron", "--work-dir", tmp_path / "work", "--until", "split")
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = error_line(proc)
    assert "org/fp8-for-neuron/config.json" in line and "compressed-tensors" in line and "Neuron" in line, line
    fetched = [path for _, path in hub_env.requests[n:] if "/resolve/" in path]
    assert not [p for p in fetched if p.endswith((".safetensors", ".bin"))], fetched
    assert not (tmp_path / "work" / "split").exists()


def test_neuron_refuses_dense_weights_declared_quantized_by_a_modelopt_file(model_factory, tmp_path):
    """A local model whose scheme is declared only in hf_quant_config.json: refused naming that file, not split as
    dense; a dense model beside it still splits."""
    model = tmp_path / "models" / "m"
    shutil.copytree(model_factory(num_layers=2), model)
    proc = run_cli("neuron", "models/m", "--work-dir", "w0", "--until", "split", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (model / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "FP8"}}))
    proc = run_cli("neuron", "models/m", "--work-dir", "w1", "--until", "split", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = error_line(proc)
    assert "hf_quant_config.json" in line and "modelopt" in line, line
    assert not (tmp_path / "w1" / "split").exists()
