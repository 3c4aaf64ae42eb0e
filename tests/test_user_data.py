"""Nothing a user owns is deleted or overwritten without being asked: the work dir, the output and push's
--delete-local each touch only what lmi-compile made. Each test runs the CLI from the user's folder with relative
paths, and fails on the code before its fix."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import error_line, run_cli

STANDIN = Path(__file__).parent / "standins" / "trtllm-build"  # plain name: the default target's version


@pytest.fixture
def project(model_factory, tmp_path):
    """A user's project folder: their model as ./checkpoint (a name a stage folder has too), their own engines/
    of hand-built results."""
    home = tmp_path / "project"
    shutil.copytree(model_factory(), home / "checkpoint")
    (home / "engines").mkdir()
    (home / "engines" / "results.txt").write_text("three days of benchmarks")
    return home


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


@pytest.mark.parametrize("work_dir", [".", "checkpoint"], ids=["the-project", "the-model"])
def test_a_work_dir_holding_the_users_files_or_model_is_refused(project, work_dir):
    """Before: --work-dir . replaced ./checkpoint (the model) with the TRT-LLM checkpoint and exited 0; a work dir
    equal to the model folder wrote stages into it. Stages replace their folders in the work dir whole."""
    before = snapshot(project)
    proc = run_cli("trtllm", "checkpoint", "--work-dir", work_dir, "--output", "../out", "--trtllm-build", STANDIN,
                   cwd=project)
    assert proc.returncode == 2, proc.stderr
    assert "--work-dir" in error_line(proc)
    assert snapshot(project) == before
    assert not (project.parent / "out").exists()


def test_a_work_dir_of_other_files_is_used_when_no_stage_would_replace_them(project):
    """A scratch folder (a fresh filesystem's root holds lost+found) is a fine work dir: only names a stage replaces
    stop it."""
    (project.parent / "scratch" / "lost+found").mkdir(parents=True)
    proc = run_cli("trtllm", "checkpoint", "--work-dir", "../scratch", "--until", "convert", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert (project.parent / "scratch" / "checkpoint" / "rank0.safetensors").is_file()
    assert (project.parent / "scratch" / "lost+found").is_dir()


def test_a_work_dir_holding_a_stage_folder_is_refused_with_the_model_elsewhere(project, model_factory):
    """The model apart from the work dir: what stops `--work-dir .` is the user's checkpoint/ and engines/ alone (a
    stage would replace them whole)."""
    before = snapshot(project)
    proc = run_cli("trtllm", model_factory(), "--work-dir", ".", "--until", "convert", cwd=project)
    assert proc.returncode == 2, proc.stderr
    assert error_line(proc).startswith(f"error: {project / 'checkpoint'}: --work-dir is not an lmi-compile work dir")
    assert snapshot(project) == before


def test_work_dir_folders_the_user_made_or_links_to(tmp_path):
    """Checked in process: an empty folder the user made for --work-dir stays after a run that failed before any
    stage (one the run made goes); a path through a link to the model folder lies in the model folder."""
    from lmi_compile.pipeline.workdir import WorkDir, overlaps

    (tmp_path / "mine").mkdir()
    for folder in (tmp_path / "mine", tmp_path / "new" / "w"):
        with pytest.raises(RuntimeError):
            with WorkDir(folder).locked():
                raise RuntimeError("the fetch failed")
    assert (tmp_path / "mine").is_dir() and not (tmp_path / "new").exists()
    model = tmp_path / "model"
    model.mkdir()
    os.symlink(model, tmp_path / "link")
    assert overlaps(tmp_path / "link" / "work", model) and overlaps(model, tmp_path / "link")

def test_the_default_work_dir_never_lies_in_the_model(project):
    """Before: model `..` made the default work dir lmi-compile-work/.. = the current folder, and a user's
    engines/ there was replaced. Run from inside the model folder, the default work dir would lie in it."""
    inside = project / "checkpoint" / "eval"
    (inside / "engines").mkdir(parents=True)
    (inside / "engines" / "results.txt").write_text("mine")
    before = snapshot(project)
    proc = run_cli("trtllm", "..", "--until", "convert", cwd=inside)
    assert proc.returncode == 2, proc.stderr
    assert "overlaps the model folder" in error_line(proc) and "run from another folder" in error_line(proc)
    assert snapshot(project) == before

    from lmi_compile.pipeline.workdir import default_work_dir

    assert default_work_dir("..") == Path("lmi-compile-work") / Path.cwd().parent.name
    assert default_work_dir("models/llama/") == Path("lmi-compile-work/llama")


def test_an_output_that_is_a_link_is_refused_and_kept(project, tmp_path):
    """Before: the layout's rename replaced the link (the artifact never reached the folder it names, and the
    link was moved aside); a dangling link failed only after the build, naming .out.partial."""
    (tmp_path / "disk").mkdir()
    os.symlink(tmp_path / "disk", project / "out")
    os.symlink(tmp_path / "gone", project / "dangling")
    for out in ("out", "dangling"):
        proc = run_cli("trtllm", "checkpoint", "--work-dir", "../w", "--output", out, "--trtllm-build", STANDIN,
                       cwd=project)
        assert proc.returncode == 2, proc.stderr
        assert error_line(proc).startswith(f"error: {project / out}: is a symbolic link"), error_line(proc)
        assert not (tmp_path / "w").exists()  # refused before any stage
    assert os.readlink(project / "out") == str(tmp_path / "disk") and list((tmp_path / "disk").iterdir()) == []


def test_a_rerun_keeps_links_and_folders_the_user_added_to_the_output(project, tmp_path):
    """Before: only regular files the user added stopped a rerun; a link, an empty folder or a FIFO went with
    the replaced output."""
    args = ("trtllm", "checkpoint", "--work-dir", "../w", "--output", "out", "--trtllm-build", STANDIN)
    assert run_cli(*args, cwd=project).returncode == 0
    (tmp_path / "data").mkdir()
    for name, make in (("mydata", lambda p: os.symlink(tmp_path / "data", p)), ("notes", os.mkdir),
                       ("fifo", os.mkfifo)):
        make(project / "out" / name)
        proc = run_cli(*args, cwd=project)
        assert proc.returncode == 2, proc.stderr
        assert f"out/{name}: added or changed since lmi-compile wrote" in error_line(proc)
        assert os.path.lexists(project / "out" / name)
        (project / "out" / name).rmdir() if name == "notes" else (project / "out" / name).unlink()
    assert run_cli(*args, cwd=project).returncode == 0  # nothing of the user's left: the rerun goes ahead


def test_build_args_paths_are_the_users_current_folders(project, tmp_path):
    """trtllm-build runs in its staging folder: a relative --lora_dir named a folder there."""
    (project / "my-lora").mkdir()
    proc = run_cli("trtllm", "checkpoint", "--work-dir", "../w", "--until", "build", "--trtllm-build", STANDIN,
                   "--trtllm-build-args", "--lora_dir ./my-lora ../other --max_beam_width 1", cwd=project)
    line = next(ln for ln in proc.stderr.splitlines() if "INFO build: " in ln)
    assert f"--lora_dir {project / 'my-lora'} {tmp_path / 'other'} --max_beam_width 1" in line


@pytest.mark.parametrize("point,upload", [("stage-rename#3", False), ("push-file", True)],
                         ids=["layout-into-a-new-folder", "upload"])
def test_two_runs_into_one_output_take_turns(point, upload, project, tmp_path, request):
    """Before: a second run (another work dir) emptied the first's layout staging and renamed over its output;
    the first then failed and left no output at all; nor did a lock on the output's nearest existing folder help
    where the layout made its parent. Held at its upload, the first would have published the second's files. Now
    the second waits for the first's layout and push, then replaces its output as a rerun does."""
    out = "artifacts/out"  # its folder is new: the layout makes it
    first_args = ["trtllm", "checkpoint", "--work-dir", "../wa", "--output", out, "--trtllm-build", str(STANDIN)]
    if upload:
        request.getfixturevalue("s3_env")
        prefix = request.getfixturevalue("s3_prefix")
        first_args += ["--upload", prefix]
    release = tmp_path / "release"
    env = {**os.environ, "LMI_COMPILE_TEST_PAUSE_AT": point, "LMI_COMPILE_TEST_PAUSE_READY": str(tmp_path / "ready"),
           "LMI_COMPILE_TEST_PAUSE_RELEASE": str(release), "LMI_COMPILE_TEST_PAUSE_S": "120"}
    b = None
    with open(tmp_path / "a.err", "w") as a_err, open(tmp_path / "b.err", "w") as b_err:
        a = subprocess.Popen([sys.executable, "-m", "lmi_compile", *first_args], cwd=project, env=env, stderr=a_err,
                             stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while not (tmp_path / "ready").exists():  # the first holds its layout (or its push)
                assert a.poll() is None and time.monotonic() < deadline, (tmp_path / "a.err").read_text()
                time.sleep(0.05)
            b = subprocess.Popen([sys.executable, "-m", "lmi_compile", "trtllm", "checkpoint", "--tp", "2",
                                  "--work-dir", "../wb", "--output", out, "--trtllm-build", str(STANDIN)],
                                 cwd=project, stderr=b_err, stdout=subprocess.DEVNULL,
                                 env={k: v for k, v in os.environ.items() if not k.startswith("LMI_COMPILE_TEST")})
            while "waiting for another lmi-compile run" not in (tmp_path / "b.err").read_text():
                assert b.poll() is None and time.monotonic() < deadline, (tmp_path / "b.err").read_text()
                time.sleep(0.05)
            release.touch()
            assert a.wait(timeout=120) == 0, (tmp_path / "a.err").read_text()
            assert b.wait(timeout=120) == 0, (tmp_path / "b.err").read_text()
        finally:
            for proc in (a, b):
                if proc is not None and proc.poll() is None:
                    proc.kill()
    record = json.loads((project / out / ".lmi-compile-stage.json").read_text())
    assert record["made_with"]["--tp"] == 2  # the second's, replacing the first's as a rerun would
    assert sorted(p.name for p in (project / "artifacts").iterdir()) == ["out"]  # nothing left aside
    if upload:  # what the first published is the first's own artifact, whole
        from lmi_compile.remote.s3 import list_objects, make_client, parse_s3_uri

        keys = list_objects(make_client(), parse_s3_uri(prefix))
        assert "rank0.engine" in keys and "rank1.engine" not in keys, sorted(keys)


def test_a_bad_option_variable_is_named(project):
    proc = run_cli("trtllm", "checkpoint", "--work-dir", "../w", "--until", "convert",
                   env={"OPTION_TENSOR_PARALLEL_DEGREE": "max"}, cwd=project)
    assert proc.returncode == 2
    assert error_line(proc).startswith("error: OPTION_TENSOR_PARALLEL_DEGREE='max' is not valid; give a whole number")
