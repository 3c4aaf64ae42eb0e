"""What a new user hits first (issue #11): each test runs the CLI as a user does, from their own folder with
relative paths and the defaults, and fails on the code before the fix."""

import datetime
import json
import fcntl
import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import error_line, run_cli

STANDIN = Path(__file__).parent / "standins" / "trtllm-build"  # plain name: the default target's version
NEURON_STANDIN = f"{sys.executable} {Path(__file__).parent / 'standins' / 'neuron_compile_standin.py'}"


@pytest.fixture
def user_folder(model_factory, tmp_path):
    """A user's folder holding a model under a relative path; tests run the CLI from here."""
    home = tmp_path / "home"
    shutil.copytree(model_factory(shards=2), home / "models" / "tiny")
    return home


def test_trtllm_with_relative_paths_and_default_work_dir(user_folder):
    # Before: trtllm-build ran in its output folder with paths relative to the caller's, and failed.
    proc = run_cli("trtllm", "models/tiny", "--tp", "2", "--output", "out", "--trtllm-build", STANDIN,
                   cwd=user_folder)
    assert proc.returncode == 0, proc.stderr
    work = user_folder / "lmi-compile-work" / "tiny"
    assert sorted(p.name for p in (work / "engines").glob("rank*.engine")) == ["rank0.engine", "rank1.engine"]
    assert (user_folder / "out" / "rank1.engine").is_file()  # the default target (LMI 0.33) loads engine-dir
    # the command line trtllm-build got (logged before it runs) names only absolute paths
    line = next(ln for ln in proc.stderr.splitlines() if "INFO build: " in ln)
    assert f"--checkpoint_dir {work / 'checkpoint'} --output_dir {work / '.engines.partial'}" in line


def test_neuron_with_relative_paths(user_folder):
    proc = run_cli("neuron", "models/tiny", "--n-positions", "128", "--work-dir", "w", "--output", "out",
                   "--compile-entry", NEURON_STANDIN, cwd=user_folder)
    assert proc.returncode == 0, proc.stderr
    assert list((user_folder / "out" / "compiled").glob("*.neff"))
    assert (user_folder / "w" / "split" / "pytorch_model.bin" / "key_to_filename.json").is_file()


@pytest.mark.parametrize("backend,extra", [("trtllm", ["--trtllm-build", str(STANDIN)]),
                                           ("neuron", ["--compile-entry", NEURON_STANDIN, "--n-positions", "128"])])
def test_unusable_output_is_refused_before_any_stage(user_folder, backend, extra):
    (user_folder / "taken").write_text("a file the user owns")
    proc = run_cli(backend, "models/tiny", "--work-dir", "w", "--output", "taken", *extra, cwd=user_folder)
    assert proc.returncode == 2, proc.stderr
    assert "taken: exists and is not a folder" in error_line(proc)
    assert not (user_folder / "w").exists()  # no convert or split ran
    assert (user_folder / "taken").read_text() == "a file the user owns"


def test_work_dir_that_is_a_file_is_bad_input(user_folder):
    (user_folder / "w").write_text("")
    proc = run_cli("trtllm", "models/tiny", "--work-dir", "w", "--until", "convert", cwd=user_folder)
    assert proc.returncode == 2
    assert "--work-dir is a file" in error_line(proc)


def test_second_run_on_a_held_work_dir_names_the_holder(user_folder):
    work = user_folder / "w"
    work.mkdir()
    fd = os.open(work / ".lmi-compile.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"4242")
        proc = run_cli("trtllm", "models/tiny", "--work-dir", "w", "--until", "convert", cwd=user_folder)
    finally:
        os.close(fd)
    assert proc.returncode == 1
    assert "in use by process 4242" in error_line(proc)
    assert not (work / "checkpoint").exists()
    # once released, the same command runs
    again = run_cli("trtllm", "models/tiny", "--work-dir", "w", "--until", "convert", cwd=user_folder)
    assert again.returncode == 0, again.stderr


def test_sequence_longer_than_the_model_is_refused_or_warned(user_folder, model_factory, tmp_path):
    proc = run_cli("trtllm", "models/tiny", "--max-input-len", "4096", "--max-output-len", "512", "--until",
                   "convert", cwd=user_folder)
    assert proc.returncode == 2
    assert "4608 exceeds max_position_embeddings 2048" in error_line(proc)
    assert not (user_folder / "lmi-compile-work").exists()
    scaled = model_factory(rope_scaling={"type": "linear", "factor": 4.0})
    proc = run_cli("trtllm", scaled, "--max-input-len", "4096", "--max-output-len", "512", "--allow-longer",
                   "--work-dir", tmp_path / "w", "--until", "convert")
    assert proc.returncode == 0, proc.stderr
    assert "allowed by --allow-longer with linear rope scaling" in proc.stderr
    proc = run_cli("trtllm", scaled, "--max-input-len", "9000", "--max-output-len", "512", "--allow-longer",
                   "--work-dir", tmp_path / "w2", "--until", "convert")  # past the 4x the scaling stretches to
    assert proc.returncode == 2 and "(factor 4.0) covers 8192" in error_line(proc)
    plan = run_cli("plan", "models/tiny", "--max-seq-len", "4608", cwd=user_folder)
    assert plan.returncode == 0
    assert "warning: --max-seq-len 4608 exceeds max_position_embeddings 2048" in plan.stdout


def test_sequence_limits_at_their_edges(tmp_path):
    """The CLI test above, at each edge (checked in process): the model's own length is allowed; a longer one needs
    --allow-longer and rope scaling, and goes as far as the scaling stretches the trained length (llama3 names it
    original_max_position_embeddings, below max_position_embeddings)."""
    from tiny_models import TinySpec, hf_config

    from lmi_compile.model.architectures import read_dims
    from lmi_compile.model.config import ModelConfig
    from lmi_compile.model.limits import sequence_problem

    def problem(seq_len, allow_longer, **config):
        (tmp_path / "config.json").write_text(json.dumps({**hf_config(TinySpec()), **config}))
        cfg = ModelConfig.load(tmp_path / "config.json")
        found = sequence_problem(cfg, read_dims(cfg), seq_len, allow_longer=allow_longer, flag="--max-seq-len")
        return found and found[0]

    assert problem(2048, False) is None and problem(2049, True) == "error"
    linear = {"rope_scaling": {"type": "linear", "factor": 4.0}}
    assert problem(2049, False, **linear) == "error"  # rope scaling alone permits nothing
    assert problem(8192, True, **linear) == "warning" and problem(8193, True, **linear) == "error"
    llama3 = {"max_position_embeddings": 131072, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}}
    assert problem(131072, True, **llama3) is None and problem(131073, True, **llama3) == "error"

def test_mistyped_relative_path_says_so_at_once(user_folder):
    proc = run_cli("plan", "models/tiny-lama", cwd=user_folder)
    assert proc.returncode == 2
    assert error_line(proc) == (f"error: models/tiny-lama: no local folder named models/tiny-lama (looked from "
                                f"{user_folder}); check the path")
    assert "Retry" not in proc.stderr and "retry" not in proc.stderr


@pytest.mark.parametrize("args,needle", [(["--max-batch-size", "-5"], "--max-batch-size"),
                                         (["--max-seq-len", "0"], "--max-seq-len"),
                                         (["--tp", "0"], "--tp")])
def test_plan_refuses_non_positive_sizes(user_folder, args, needle):
    proc = run_cli("plan", "models/tiny", *args, cwd=user_folder)
    assert proc.returncode == 2
    line = error_line(proc)
    assert needle in line and "greater than or equal to 1" in line
    assert proc.stderr.count("\n") == 1  # one line, not click's usage block


def test_a_value_above_an_options_maximum_is_refused(user_folder):
    """argvalues takes plainly valid values itself: one past a maximum goes to typer's refusal too."""
    proc = run_cli("trtllm", "models/tiny", "--embedding-sharding-dim", "2", "--until", "convert", cwd=user_folder)
    assert proc.returncode == 2
    assert "--embedding-sharding-dim" in error_line(proc) and "less than or equal to 1" in error_line(proc)
    assert not (user_folder / "lmi-compile-work").exists()

def test_failed_build_and_fetch_leave_nothing_behind(user_folder, hub_env):
    failing = user_folder / "failing-build"
    # answers --help as the target's trtllm-build does, then fails the build
    failing.write_text(f"#!/bin/sh\n[ \"$1\" = --help ] && exec {STANDIN} --help\n"
                       f"echo 'trtllm-build: out of memory' >&2\nexit 1\n")
    failing.chmod(0o755)
    proc = run_cli("trtllm", "models/tiny", "--work-dir", "w", "--output", "out", "--trtllm-build", failing,
                   cwd=user_folder)
    assert proc.returncode == 1 and "trtllm-build failed" in error_line(proc)
    assert not (user_folder / "w" / ".engines.partial").exists() and not (user_folder / "w" / "engines").exists()
    assert (user_folder / "w" / "checkpoint" / "rank0.safetensors").is_file()  # finished stages are kept
    assert not (user_folder / "out").exists()
    proc = run_cli("trtllm", "org/no-such-model", "--work-dir", "w2", "--until", "convert", cwd=user_folder)
    assert proc.returncode == 2, proc.stderr
    assert not (user_folder / "w2").exists()


def test_check_finds_truncated_weights_and_pickled_code(model_copy, tmp_path):
    import torch

    m = model_copy(shards=2)
    shard = m / "model-00002-of-00002.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 64)
    proc = run_cli("check", m)
    assert proc.returncode == 1
    assert "model-00002-of-00002.safetensors" in proc.stdout and "truncated" in proc.stdout
    assert "NOT loadable" in proc.stdout

    b = tmp_path / "bin-model"
    shutil.copytree(m, b, ignore=shutil.ignore_patterns("*.safetensors*"))
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "when": datetime.datetime(2020, 1, 1)},
               b / "pytorch_model.bin")
    proc = run_cli("check", b, env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert proc.returncode == 1
    assert "pytorch_model.bin: refused to load" in proc.stdout


def test_check_recognises_a_converted_checkpoint(user_folder):
    proc = run_cli("trtllm", "models/tiny", "--tp", "2", "--work-dir", "w", "--until", "convert", cwd=user_folder)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("check", "w/checkpoint", cwd=user_folder)
    assert proc.returncode == 1
    assert "TensorRT-LLM checkpoint" in proc.stdout and "build them with `lmi-compile trtllm`" in proc.stdout
    assert "save_pretrained" not in proc.stdout


def test_small_things(user_folder, tmp_path, s3_env, s3_prefix):
    plan = run_cli("plan", "models/tiny", "--instance", "g5.12xlarge", cwd=user_folder)
    assert plan.returncode == 0, plan.stderr
    assert "0.00B" not in plan.stdout and "0 KiB" not in plan.stdout
    assert "K parameters" in plan.stdout and "ml.g5.12xlarge: fits" in plan.stdout

    (user_folder / "empty").mkdir()
    check = run_cli("check", "empty", cwd=user_folder)
    assert check.returncode == 1 and "deploy with" not in check.stdout

    tree = user_folder / "tree"
    tree.mkdir()
    (tree / "a.txt").write_text("a")
    first = run_cli("push", "tree", s3_prefix, cwd=user_folder)
    assert first.returncode == 0 and "1 uploaded now" in first.stdout, first.stderr
    again = run_cli("push", "tree", s3_prefix, cwd=user_folder)
    assert again.returncode == 0 and "nothing changed" in again.stdout

    quiet = run_cli("trtllm", "models/tiny", "--work-dir", "w", "--until", "convert", cwd=user_folder)
    loud = run_cli("-v", "trtllm", "models/tiny", "--work-dir", "w", "--until", "convert", cwd=user_folder)
    assert quiet.returncode == loud.returncode == 0
    assert "DEBUG" not in quiet.stderr
    assert "DEBUG convert:" in loud.stderr and "is up to date" in loud.stderr
    assert "trtllm settings: model=models/tiny (flag)" in loud.stderr and "tp=1 (default)" in loud.stderr
    # the first run converted; the up-to-date rerun skipped the convert whole (nothing written, nothing resumed)
    assert "rank file(s) ready" in quiet.stderr
    assert "rank file(s) ready" not in loud.stderr and "already written" not in loud.stderr

    usage = run_cli("plan", cwd=user_folder)
    assert usage.returncode == 2
    assert usage.stderr.count("\n") == 1 and error_line(usage).startswith("error: Missing argument")


def test_help_shows_an_example_per_command():
    for command in ("fetch", "push", "trtllm", "neuron", "check", "plan"):
        out = run_cli(command, "--help").stdout
        assert f"Example: lmi-compile {command}" in out, command


def test_command_values_need_no_pydantic(user_folder):
    # typer 0.29 coerces every given value through pydantic (a tenth of a second or more per command, more than
    # s5cmd's whole small fetch); compile/argvalues.py takes plain valid values itself. The values still arrive
    # typed (the plan reads --tp as the integer 2), and a bad one still gets typer's message (tests above).
    proc = run_cli("plan", "models/tiny", "--tp", "2", "--max-seq-len", "512", "--dtype", "float16", "--json",
                   cwd=user_folder, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout)
    assert (plan["tp"], plan["max_seq_len"], plan["dtype"]) == (2, 512, "float16")
    imported = [ln.rsplit("|", 1)[-1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")]
    assert "typer" in imported and "pydantic" not in imported


def test_the_installed_command_runs_from_a_users_folder(user_folder):
    # The console script the install made (pyproject's [project.scripts]), not `python -m`: users type this.
    import subprocess

    command = Path(sys.executable).parent / "lmi-compile"
    proc = subprocess.run([str(command), "check", "models/tiny"], cwd=user_folder, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("models/tiny: HuggingFace pretrained") and "loadable" in proc.stdout
