"""4-bit GPTQ / AutoAWQ through TensorRT-LLM's own convert_checkpoint.py (issue #12): a compiler boundary like
trtllm-build, run with the flags the target's version accepts, only where that version reads the scheme. The tests run
the per-version STAND-INs of the script (tests/standins/convert_checkpoint_standin-<version>.py, enforcing that
version's argparse) and of trtllm-build; their output is flagged as stand-in everywhere."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import STANDINS, error_line, run_cli, trtllm_standin
from safetensors.torch import save_file

GROUP = 32
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def convert_standin(release: str) -> Path:
    from lmi_compile.lmi.targets import resolve

    return STANDINS / f"convert_checkpoint_standin-{resolve('trtllm', release)['tool']['version']}.py"


def four_bit_model(out: Path, scheme: str, **qc) -> Path:
    """A tiny Llama as AutoGPTQ / AutoAWQ save it: every decoder Linear as qweight (int32, 8 int4 per value),
    qzeros, scales (float16, one row per group) and, for GPTQ, g_idx; embeddings, norms and lm_head in float16.
    Values are arbitrary: only the stand-ins read these files, and they read names and shapes."""
    from tiny_models import TinySpec, hf_config, write_tokenizer

    spec = TinySpec(num_layers=2, dtype="float16")
    out.mkdir(parents=True)
    cfg = hf_config(spec)
    cfg["quantization_config"] = ({"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False,
                                   "sym": True, "damp_percent": 0.01} if scheme == "gptq" else
                                  {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True,
                                   "version": "gemm"}) | qc
    (out / "config.json").write_text(json.dumps(cfg))
    write_tokenizer(out, 250)
    h, inter, kv = spec.hidden_size, spec.intermediate_size, spec.num_kv_heads * spec.head_dim
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, inter),
            "up_proj": (h, inter), "down_proj": (inter, h)}
    t = {"model.embed_tokens.weight": torch.zeros(spec.vocab_size, h, dtype=torch.float16),
         "model.norm.weight": torch.ones(h, dtype=torch.float16),
         "lm_head.weight": torch.zeros(spec.vocab_size, h, dtype=torch.float16)}
    for i in range(spec.num_layers):
        t[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        t[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        for lin in LINEARS:
            k, n = dims[lin.split(".")[1]]
            p = f"model.layers.{i}.{lin}."
            t[p + "qweight"] = torch.zeros(k // 8, n, dtype=torch.int32)
            t[p + "qzeros"] = torch.zeros(k // GROUP, n // 8, dtype=torch.int32)
            t[p + "scales"] = torch.ones(k // GROUP, n, dtype=torch.float16)
            if scheme == "gptq":
                t[p + "g_idx"] = torch.arange(k, dtype=torch.int32) // GROUP
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def build(model: Path, tmp_path: Path, release: str, *args, cwd=None):
    return run_cli("trtllm", model, "--lmi-version", release, "--work-dir", tmp_path / "work", "--output",
                   tmp_path / "out", "--trtllm-build", trtllm_standin(release), "--tp", "2", *args, cwd=cwd)


@pytest.mark.parametrize("scheme,release", [("gptq", "0.30"), ("gptq", "0.28"), ("awq", "0.33")])
def test_four_bit_through_the_release_convert_script(tmp_path, scheme, release):
    """Through the CLI (from another folder, relative paths) to a laid-out tree: the stand-in script of the release's
    TensorRT-LLM ran with the flags that version accepts (its argparse rejects any other), trtllm-build's stand-in
    took its checkpoint, and the manifest and `check` say the checkpoint came from a stand-in."""
    model = four_bit_model(tmp_path / "model", scheme)
    user = tmp_path / "user"
    user.mkdir()
    script = os.path.relpath(convert_standin(release), user)
    proc = build(Path("../model"), tmp_path, release, "--trtllm-convert-script", script, cwd=user)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((tmp_path / "work" / "checkpoint" / "config.json").read_text())
    assert cfg["quantization"]["quant_algo"] == "W4A16_GPTQ" and cfg["quantization"]["group_size"] == GROUP
    assert cfg["mapping"]["world_size"] == 2 and cfg.get("use_autoawq", False) == (scheme == "awq")
    log = (tmp_path / "work" / "logs" / "convert_checkpoint.log").read_text()
    assert f"STAND-IN convert_checkpoint.py {cfg['lmi_compile_standin'].split()[1].split('+')[0]}" in log
    manifest = json.loads((tmp_path / "out" / "lmi-compile.json").read_text())
    assert manifest["checkpoint_converter"]["stand_in"] is True
    assert manifest["checkpoint_converter"]["scheme"] == scheme
    report = json.loads(run_cli("check", tmp_path / "out", "--lmi-version", release, "--json").stdout)
    assert report["quantization"]["quant_algo"] == "W4A16_GPTQ"
    assert any("stand-in convert_checkpoint.py" in p for p in report["problems"])
    assert [p for p in report["problems"] if "stand-in" not in p] == []
    assert model.is_dir() and (model / "model.safetensors").is_file()  # the user's folder is untouched


def test_four_bit_refusals_before_any_work(tmp_path):
    gptq = four_bit_model(tmp_path / "gptq", "gptq")
    awq = four_bit_model(tmp_path / "awq", "awq")
    # AutoAWQ: TensorRT-LLM 0.12 (LMI 0.30) has no reader for it; the refusal names the first release that has
    proc = build(awq, tmp_path / "a", "0.30", "--trtllm-convert-script", convert_standin("0.30"))
    assert proc.returncode == 2
    line = error_line(proc)
    assert "AutoAWQ cannot be converted" in line and "TensorRT-LLM 0.12.0" in line and "is 0.33" in line
    # no script given: the pre-flight says where the script comes from, for that version
    proc = build(gptq, tmp_path / "b", "0.30")
    assert proc.returncode == 2
    line = error_line(proc)
    assert "--trtllm-convert-script" in line and "git clone --depth 1 -b v0.12.0" in line
    assert "examples/llama/convert_checkpoint.py" in line
    # act-order GPTQ: refused with the reason
    desc = four_bit_model(tmp_path / "desc", "gptq", desc_act=True)
    proc = build(desc, tmp_path / "c", "0.33", "--trtllm-convert-script", convert_standin("0.33"))
    assert proc.returncode == 2 and "desc_act" in error_line(proc) and "g_idx" in error_line(proc)
    for t in "abc":
        assert not (tmp_path / t / "work").exists()


def test_the_standin_enforces_each_version_command_line(tmp_path):
    """0.9 names the GPTQ file flag --ammo_quant_ckpt_path, later versions --quant_ckpt_path; --dtype auto exists
    only in 1.x: each stand-in rejects the other's flags as argparse does (exit 2)."""
    model = four_bit_model(tmp_path / "m", "gptq")
    common = ["--model_dir", str(model), "--output_dir", str(tmp_path / "o"), "--weight_only_precision", "int4_gptq"]
    for version, bad in (("0.9.0", ["--quant_ckpt_path", str(model / "model.safetensors")]),
                         ("0.12.0", ["--ammo_quant_ckpt_path", str(model / "model.safetensors")]),
                         ("0.12.0", ["--dtype", "auto"])):
        proc = subprocess.run([sys.executable, str(STANDINS / f"convert_checkpoint_standin-{version}.py"), *common,
                               *bad], capture_output=True, text=True)
        said = proc.stderr + proc.stdout
        assert proc.returncode == 2 and ("unrecognized arguments" in said or "invalid choice" in said), \
            (version, bad, said)


def _real_convert() -> Path | None:
    try:
        import tensorrt_llm  # noqa: F401
    except Exception:
        return None
    path = os.environ.get("TRTLLM_CONVERT_SCRIPT")
    return Path(path) if path and Path(path).is_file() and shutil.which("trtllm-build") else None


@pytest.mark.real_trtllm
@pytest.mark.skipif(_real_convert() is None, reason="needs TensorRT-LLM, trtllm-build, a GPU and TRTLLM_CONVERT_SCRIPT "
                                                    "(examples/llama/convert_checkpoint.py at the installed version)")
def test_real_convert_checkpoint(tmp_path):
    """With the real toolchain: a GPTQ checkpoint (TRTLLM_GPTQ_MODEL, a small Llama GPTQ export) to engines."""
    model = os.environ.get("TRTLLM_GPTQ_MODEL")
    if not model:
        pytest.skip("set TRTLLM_GPTQ_MODEL to a small GPTQ Llama folder")
    proc = run_cli("trtllm", model, "--trtllm-convert-script", _real_convert(), "--work-dir", tmp_path / "work",
                   "--output", tmp_path / "out", "--max-batch-size", "2", "--max-input-len", "64", "--max-output-len",
                   "64", timeout=3600)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "out" / "lmi-compile.json").read_text())
    assert manifest["checkpoint_converter"]["stand_in"] is False and manifest["stand_in"] is False
