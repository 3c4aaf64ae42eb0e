"""The whole `lmi-compile trtllm` pipeline, through the trtllm-build STAND-IN (and the real one where installed)."""

import dataclasses
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import error_line, run_cli, trtllm_standin

STANDIN = trtllm_standin()  # the default target's (LMI 0.33, TensorRT-LLM 0.21.0rc1)
TRITON = "0.30"  # a release that loads the triton repository layout
HF_FILES = ["config.json", "generation_config.json", "special_tokens_map.json", "tokenizer.json",
            "tokenizer_config.json"]


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def props(path: Path) -> dict:
    return dict(ln.split("=", 1) for ln in path.read_text().splitlines() if ln and not ln.startswith("#"))


def compile_trtllm(model, tmp_path, *args, env=None, release: str | None = TRITON):
    """Run the pipeline for LMI `release` (None: the default target) with that release's stand-in."""
    lmi = ["--lmi-version", release] if release else []
    return run_cli("trtllm", model, "--work-dir", tmp_path / "work", "--output", tmp_path / "out",
                   "--trtllm-build", trtllm_standin(release), *lmi, *args, env=env)


def test_triton_layout_tree(model_factory, tmp_path, s3_env, s3_prefix):
    model = model_factory(shards=2)
    proc = compile_trtllm(model, tmp_path, "--tp", "2", "--pp", "2", "--max-batch-size", "8",
                          "--upload", s3_prefix)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert tree(out) == sorted([
        ".lmi-compile-stage.json", "lmi-compile.json", "serving.properties",
        "tensorrt_llm/config.pbtxt", *[f"tensorrt_llm/{f}" for f in HF_FILES],
        "tensorrt_llm/1/config.json", "tensorrt_llm/1/model.cache",
        *[f"tensorrt_llm/1/rank{r}.engine" for r in range(4)]])
    repo = out / "tensorrt_llm"
    for f in HF_FILES:
        assert sha(repo / f) == sha(model / f)
    pbtxt = (repo / "config.pbtxt").read_text()
    assert "${" not in pbtxt and 'backend: "tensorrtllm"' in pbtxt and "decoupled: True" in pbtxt
    assert "max_batch_size: 8" in pbtxt and '"/opt/ml/model/tensorrt_llm/1"' in pbtxt
    engine_cfg = json.loads((repo / "1" / "config.json").read_text())
    assert engine_cfg["pretrained_config"]["mapping"]["world_size"] == 4
    assert engine_cfg["build_config"]["max_batch_size"] == 8 and engine_cfg["build_config"]["max_seq_len"] == 1536
    # LMI 0.30's option.max_output_len "maps to max_seq_len"; a float32 model is built in float16, as
    # TensorRT-LLM's own conversion does for --dtype auto
    assert props(out / "serving.properties") == {
        "engine": "MPI", "option.model_id": s3_prefix, "option.tensor_parallel_degree": "2",
        "option.pipeline_parallel_degree": "2", "option.rolling_batch": "trtllm",
        "option.max_rolling_batch_size": "8", "option.max_input_len": "1024", "option.max_output_len": "1536",
        "option.max_num_tokens": "16384", "option.dtype": "fp16"}
    manifest = json.loads((out / "lmi-compile.json").read_text())
    assert manifest["stand_in"] is True and "standin" in manifest["tensorrt_llm_version"]
    assert manifest["layout"] == "triton" and manifest["world_size"] == 4
    assert "STAND-IN" in proc.stderr  # never presented as a compiled model
    # LMI's own check: a direct sub-folder holding config.pbtxt and tokenizer_config.json
    assert [d.name for d in out.iterdir() if (d / "config.pbtxt").is_file() and (d / "tokenizer_config.json").is_file()] \
        == ["tensorrt_llm"]


def test_tp_and_pp_each_reach_their_own_setting(model_factory, tmp_path):
    """--tp 1 --pp 2: the two degrees differ, so a swapped one shows (the layout test above has tp = pp)."""
    proc = compile_trtllm(model_factory(), tmp_path, "--tp", "1", "--pp", "2", release=None)
    assert proc.returncode == 0, proc.stderr
    p = props(tmp_path / "out" / "serving.properties")
    assert (p["option.tensor_parallel_degree"], p["option.pipeline_parallel_degree"]) == ("1", "2")
    mapping = json.loads((tmp_path / "out" / "config.json").read_text())["pretrained_config"]["mapping"]
    assert (mapping["tp_size"], mapping["pp_size"], mapping["world_size"]) == (1, 2, 2)


def test_relative_trtllm_build_path_from_the_users_folder(model_factory, tmp_path):
    """trtllm-build runs in its output folder: a relative --trtllm-build must reach it absolute."""
    home = tmp_path / "home"
    shutil.copytree(STANDIN.parent, home / "tools")
    shutil.copytree(model_factory(), home / "tiny")
    proc = run_cli("trtllm", "tiny", "--work-dir", "w", "--until", "build", "--trtllm-build",
                   f"tools/{STANDIN.name}", cwd=home)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if "INFO build: " in ln)
    assert line.split("INFO build: ", 1)[1].startswith(f"{home / 'tools' / STANDIN.name} --checkpoint_dir")


def test_engine_dir_layout_tree(model_factory, tmp_path):
    model = model_factory(family="qwen2")
    proc = compile_trtllm(model, tmp_path, "--tp", "2", "--dtype", "bfloat16", release=None)  # 0.33: engine-dir
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert tree(out) == sorted([".lmi-compile-stage.json", "lmi-compile.json", "serving.properties", "config.json",
                                "rank0.engine", "rank1.engine", "generation_config.json", "special_tokens_map.json",
                                "tokenizer.json", "tokenizer_config.json"])
    top = json.loads((out / "config.json").read_text())
    assert "build_config" in top and top["pretrained_config"]["architecture"] == "Qwen2ForCausalLM"
    assert top["pretrained_config"]["dtype"] == "bfloat16"
    p = props(out / "serving.properties")
    assert p["option.dtype"] == "bf16" and "option.model_id" not in p
    assert "option.model_id" in (out / "serving.properties").read_text()  # as a comment telling what to set
    # the model's own files are copies: an edit of the artifact must not reach the user's model folder
    assert (out / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()
    assert all(not (out / f).samefile(model / f) for f in ("tokenizer.json", "tokenizer_config.json"))


def test_rerun_skips_and_option_change_invalidates_only_later_stages(model_factory, tmp_path):
    model = model_factory()
    assert compile_trtllm(model, tmp_path, "--tp", "2").returncode == 0
    work = tmp_path / "work"
    ck_mtime = (work / "checkpoint" / "rank0.safetensors").stat().st_mtime_ns
    eng_mtime = (work / "engines" / "rank0.engine").stat().st_mtime_ns
    again = compile_trtllm(model, tmp_path, "--tp", "2")
    assert again.returncode == 0, again.stderr
    assert "convert: " in again.stderr and "skipping" in again.stderr
    assert (work / "engines" / "rank0.engine").stat().st_mtime_ns == eng_mtime
    changed = compile_trtllm(model, tmp_path, "--tp", "2", "--max-batch-size", "4")
    assert changed.returncode == 0, changed.stderr
    assert (work / "checkpoint" / "rank0.safetensors").stat().st_mtime_ns == ck_mtime
    assert (work / "engines" / "rank0.engine").stat().st_mtime_ns != eng_mtime
    assert props(tmp_path / "out" / "serving.properties")["option.max_rolling_batch_size"] == "4"
    for cfg in (work / "engines" / "config.json", tmp_path / "out" / "tensorrt_llm" / "1" / "config.json"):
        assert json.loads(cfg.read_text())["build_config"]["max_batch_size"] == 4, cfg
    # a changed tp redoes convert and build: checkpoint and engines say tp=4, not tp=2 under tp=4 properties
    changed = compile_trtllm(model, tmp_path, "--tp", "4", "--max-batch-size", "4")
    assert changed.returncode == 0, changed.stderr
    assert json.loads((work / "checkpoint" / "config.json").read_text())["mapping"]["tp_size"] == 4
    engine_cfg = json.loads((tmp_path / "out" / "tensorrt_llm" / "1" / "config.json").read_text())
    assert engine_cfg["pretrained_config"]["mapping"]["world_size"] == 4
    assert sorted(p.name for p in (tmp_path / "out" / "tensorrt_llm" / "1").glob("rank*.engine")) == \
        [f"rank{r}.engine" for r in range(4)]
    assert props(tmp_path / "out" / "serving.properties")["option.tensor_parallel_degree"] == "4"
    # another release of the same TensorRT-LLM (0.30 -> 0.32): engines kept, the layout is 0.32's, and says so
    eng_mtime = (work / "engines" / "rank0.engine").stat().st_mtime_ns
    changed = compile_trtllm(model, tmp_path, "--tp", "4", "--max-batch-size", "4", release="0.32")
    assert changed.returncode == 0, changed.stderr
    assert (work / "engines" / "rank0.engine").stat().st_mtime_ns == eng_mtime
    assert json.loads((tmp_path / "out" / "lmi-compile.json").read_text())["lmi_version"] == "0.32"
    report = run_cli("check", tmp_path / "out", "--lmi-version", "0.32").stdout
    assert "--lmi-version" not in report and "0.30" not in report, report  # the stand-in is its one problem


def test_settings_from_serving_properties_and_env(model_factory, tmp_path):
    model = model_factory()
    sp = tmp_path / "serving.properties"
    # LMI reads the file with java.util.Properties.load (djl-serving@0.33.0-dlc:wlm/src/main/java/ai/djl/serving/
    # wlm/ModelInfo.java loadServingProperties): ':' separates as '=' does, with or without spaces around it, and so
    # do blanks alone; a backslash at the end goes on to the next line; the bytes are ISO-8859-1 (a UTF-8 editor's
    # 'é' in a comment is no error)
    sp.write_bytes(f"# mod\xe8le\nengine=MPI\noption.model_id={model}\noption.tensor_parallel_degree: 4\n"
                   "option.max_rolling_batch_size 16\noption.dtype = \\\n    bf16\n".encode("latin-1")
                   + "# café\n".encode())
    proc = run_cli("trtllm", "--properties", sp, "--work-dir", tmp_path / "work", "--output", tmp_path / "out",
                   "--trtllm-build", STANDIN, env={"OPTION_MAX_INPUT_LEN": "1536", "OPTION_MAX_SEQ_LEN": "2000"})
    assert proc.returncode == 0, proc.stderr
    p = props(tmp_path / "out" / "serving.properties")
    assert p["option.tensor_parallel_degree"] == "4" and p["option.max_rolling_batch_size"] == "16"
    assert p["option.max_input_len"] == "1536" and p["option.dtype"] == "bf16" and p["option.max_seq_len"] == "2000"
    # an explicit flag wins over the file
    proc = run_cli("trtllm", "--properties", sp, "--tp", "2", "--work-dir", tmp_path / "work", "--output",
                   tmp_path / "out", "--trtllm-build", STANDIN)
    assert proc.returncode == 0, proc.stderr
    assert props(tmp_path / "out" / "serving.properties")["option.tensor_parallel_degree"] == "2"


def test_pass_through_flags_reach_trtllm_build(model_factory, tmp_path):
    proc = compile_trtllm(model_factory(), tmp_path, "--trtllm-build-args", "--use_paged_context_fmha enable")
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((tmp_path / "out" / "tensorrt_llm" / "1" / "config.json").read_text())
    assert cfg["build_config"]["plugin_config"]["use_paged_context_fmha"] == "enable"
    log = (tmp_path / "work" / "logs" / "trtllm-build.log").read_text()
    assert "STAND-IN" in log


def test_pass_through_cannot_override_managed_flags(model_factory, tmp_path):
    proc = compile_trtllm(model_factory(), tmp_path, "--trtllm-build-args", "--output_dir /elsewhere")
    assert proc.returncode == 2 and "--output_dir is set by lmi-compile" in error_line(proc)


def test_no_flag_lmi_compile_sets_can_be_passed_through():
    """Each flag of the trtllm-build command lmi-compile writes, for every TensorRT-LLM of the target table, is
    refused in --trtllm-build-args: a second value would build engines that serving.properties misdescribes."""
    from lmi_compile.errors import LmiCompileError
    from lmi_compile.lmi.targets import toolchains
    from lmi_compile.trtllm.build import BuildOptions, Toolchain, build_command, parse_extra_args

    opts = BuildOptions(max_batch_size=8, max_input_len=16, max_seq_len=32, max_num_tokens=64)
    for version, facts in toolchains("trtllm").items():
        cmd = build_command(Toolchain(Path("/t/trtllm-build")), Path("/ckpt"), Path("/eng"), opts, 2, facts, "float16")
        defaults = facts["dtype_plugins"]["flags"]  # a plugin's dtype: lmi-compile's default, the user's to change
        for flag in [a for a in cmd[1:] if a.startswith("--") and a not in defaults]:
            for passed in (f"{flag} 7", f"{flag}=7"):
                with pytest.raises(LmiCompileError, match=f"{flag} is set by lmi-compile"):
                    parse_extra_args(passed)
        for flag in defaults:
            for passed in (f"{flag} float32", f"{flag}=float32"):
                mine = dataclasses.replace(opts, extra_args=parse_extra_args(passed))
                cmd = build_command(Toolchain(Path("/t/trtllm-build")), Path("/ckpt"), Path("/eng"), mine, 2, facts,
                                    "float16")
                assert [a for a in cmd if a.startswith(flag)] == [passed.split()[0]] and cmd[-1].endswith("float32")


def test_standin_rejects_flags_the_real_tool_lacks(model_factory, tmp_path):
    proc = compile_trtllm(model_factory(), tmp_path, "--trtllm-build-args", "--no_such_flag 1")
    assert proc.returncode == 1
    line = error_line(proc)
    assert "trtllm-build failed with exit code 2" in line and "trtllm-build.log" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "work" / "engines").exists()


def test_failed_build_leaves_no_output(model_factory, tmp_path):
    broken = tmp_path / "trtllm-build"
    broken.write_text(f"#!/bin/sh\n[ \"$1\" = --help ] && exec {STANDIN} --help\n"
                      "echo 'building rank 0'\necho 'CUDA error: out of memory' >&2\nexit 3\n")
    broken.chmod(0o755)
    proc = run_cli("trtllm", model_factory(), "--work-dir", tmp_path / "work", "--output", tmp_path / "out",
                   "--trtllm-build", broken)
    assert proc.returncode == 1
    assert "exit code 3" in error_line(proc) and "out of memory" in error_line(proc)
    assert not (tmp_path / "out").exists() and not (tmp_path / "work" / "engines").exists()


def test_missing_toolchain_fails_before_heavy_work(model_factory, tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    proc = run_cli("trtllm", model_factory(), "--work-dir", tmp_path / "work", "--output", tmp_path / "out", env=env)
    assert proc.returncode == 1
    line = error_line(proc)
    assert "trtllm-build is not on PATH" in line and "tensorrt-llm" in line.lower() and "container" in line
    assert not (tmp_path / "work" / "checkpoint").exists()


def test_output_safety(model_factory, tmp_path):
    model = model_factory()
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    proc = compile_trtllm(model, tmp_path)
    assert proc.returncode == 2 and "--overwrite" in error_line(proc)
    assert (out / "precious.txt").read_text() == "user data" and tree(out) == ["precious.txt"]
    proc = compile_trtllm(model, tmp_path, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "precious.txt").exists() and (out / "tensorrt_llm" / "config.pbtxt").is_file()
    # a rerun of the same job may replace its own output without --overwrite
    assert compile_trtllm(model, tmp_path, "--tp", "2").returncode == 0
    # but not over a file the user put there since; refused before the convert
    (out / "notes.md").write_text("user data")
    proc = compile_trtllm(model, tmp_path)
    assert proc.returncode == 2 and "notes.md" in error_line(proc) and "--overwrite" in error_line(proc)
    assert (out / "notes.md").read_text() == "user data" and "convert:" not in proc.stderr


@pytest.mark.parametrize("output,work_dir", [
    ("model", "work"),  # the model folder itself (the refusal named --overwrite, which then emptied it)
    (".", "work"),  # a folder holding the model
    ("out", "out/work"),  # a work dir inside the output: the layout would replace it
    ("work/out", "work"),
    ("w", "w"),
])
def test_an_output_overlapping_the_model_or_the_work_dir_is_refused(model_copy, output, work_dir):
    """Refused before the convert, even with --overwrite, naming what it overlaps; nothing of the model changes."""
    model = model_copy()
    before = {p.name: p.stat().st_mtime_ns for p in model.iterdir()}
    proc = run_cli("trtllm", "model", "--output", output, "--work-dir", work_dir, "--trtllm-build", STANDIN,
                   "--overwrite", cwd=model.parent)
    assert proc.returncode == 2 and "overlaps" in error_line(proc) and "--output" in error_line(proc), proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in model.iterdir()} == before
    assert not (model.parent / work_dir / "checkpoint").exists()


def test_custom_tokenizer_code_goes_with_the_artifact(model_copy, tmp_path):
    """A tokenizer_config.json whose auto_map names the model's own tokenizer code: the code is in the layout."""
    model = model_copy()
    (model / "tokenization_custom.py").write_text("# a custom tokenizer\n")
    proc = compile_trtllm(model, tmp_path, "--trust-remote-code", release=None)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert (out / "tokenization_custom.py").read_text() == "# a custom tokenizer\n"
    assert props(out / "serving.properties")["option.trust_remote_code"] == "true"


@pytest.mark.parametrize("engine_path", ["tensorrt_llm/1", "s3://bucket/engines/"])
def test_an_engine_path_that_is_not_absolute_is_refused(model_factory, tmp_path, engine_path):
    proc = compile_trtllm(model_factory(), tmp_path, "--engine-path", engine_path)
    assert proc.returncode == 2 and f"--engine-path {engine_path}: give the absolute path" in error_line(proc)
    assert not (tmp_path / "work").exists()


def test_until_stops_early(model_factory, tmp_path):
    proc = compile_trtllm(model_factory(), tmp_path, "--until", "build")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "work" / "engines" / "rank0.engine").is_file() and not (tmp_path / "out").exists()


def _real_toolchain() -> bool:
    try:
        import tensorrt_llm  # noqa: F401
    except Exception:
        return False
    return shutil.which("trtllm-build") is not None and shutil.which("nvidia-smi") is not None and \
        subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


@pytest.mark.real_trtllm
@pytest.mark.skipif(not _real_toolchain(), reason="needs TensorRT-LLM (trtllm-build) and an NVIDIA GPU")
def test_real_trtllm_build(model_factory, tmp_path):
    model = model_factory()
    proc = run_cli("trtllm", model, "--tp", "1", "--dtype", "float16", "--max-batch-size", "2", "--max-input-len",
                   "64", "--max-output-len", "64", "--max-num-tokens", "128", "--work-dir", tmp_path / "work",
                   "--output", tmp_path / "out", timeout=3600)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "out" / "lmi-compile.json").read_text())
    assert manifest["stand_in"] is False and manifest["gpus"]
    assert (tmp_path / "out" / "tensorrt_llm" / "1" / "rank0.engine").stat().st_size > 1_000_000
