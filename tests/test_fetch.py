"""The fetch stage: local folders in place, the Hub through huggingface_hub, S3 through boto3."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import error_line, run_cli, upload_folder


def digest_tree(folder: Path, names=None) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())
            if p.is_file() and not p.name.startswith(".") and (names is None or p.name in names)}


@pytest.mark.parametrize("fmt,shards", [("safetensors", 1), ("safetensors", 3), ("bin", 1), ("bin", 2)])
def test_local_folder_is_validated_in_place(model_factory, fmt, shards):
    model = model_factory(fmt=fmt, shards=shards)
    before = {p.name: p.stat().st_mtime_ns for p in model.iterdir()}
    proc = run_cli("fetch", model)
    assert proc.returncode == 0, proc.stderr
    assert "LlamaForCausalLM" in proc.stdout and f"in {shards} " in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in model.iterdir()} == before  # untouched, not copied


def test_fetch_of_a_local_folder_says_output_is_not_used(model_factory, tmp_path):
    model = model_factory()
    proc = run_cli("fetch", model, "--output", "copy", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--output copy is not used" in proc.stderr and not (tmp_path / "copy").exists()


def test_hub_fetch_downloads_one_weight_format(hub_env, model_factory, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(model_factory(shards=2), repo)
    # A repo carrying both formats plus files LMI never needs.
    for p in model_factory(fmt="bin", shards=1).glob("pytorch_model*"):
        shutil.copy(p, repo / p.name)
    (repo / "README.md").write_text("card")
    (repo / "original").mkdir()
    (repo / "original" / "consolidated.00.pth").write_bytes(b"x" * 100)
    hub_env.add("org/tiny-llama", repo)
    out = tmp_path / "out"
    proc = run_cli("fetch", "org/tiny-llama", "--output", out)
    assert proc.returncode == 0, proc.stderr
    got = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert got == ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                   "model-00002-of-00002.safetensors", "model.safetensors.index.json", "special_tokens_map.json",
                   "tokenizer.json", "tokenizer_config.json"]
    assert digest_tree(out) == digest_tree(repo, set(got))
    assert not (out / ".cache").exists()
    record = json.loads((out / ".lmi-compile-stage.json").read_text())
    assert record["stage"] == "fetch" and record["source"] == "org/tiny-llama"
    # A rerun finds the finished stage and downloads nothing.
    n = len(hub_env.requests)
    again = run_cli("fetch", "org/tiny-llama", "--output", out)
    assert again.returncode == 0
    assert not [r for r in hub_env.requests[n:] if "/resolve/" in r[1]]


def test_hub_fetch_revision_and_token(hub_env, model_factory, tmp_path):
    hub_env.add("org/private", model_factory(), token="hf_secret_token_123")
    hub_env.add("org/private", model_factory(fmt="bin"), revision="v1", token="hf_secret_token_123")
    out = tmp_path / "out"
    proc = run_cli("fetch", "org/private", "--revision", "v1", "--output", out, env={"HF_TOKEN": "hf_secret_token_123"})
    assert proc.returncode == 0, proc.stderr
    assert (out / "pytorch_model.bin").is_file() and not list(out.glob("*.safetensors"))
    assert "hf_secret_token_123" not in proc.stdout + proc.stderr
    out2 = tmp_path / "out2"
    # --token is sent as given, also where huggingface_hub sends no implicit token (it reaches the download child
    # in a variable of ours, not as HF_TOKEN, which that setting would leave unsent)
    proc = run_cli("fetch", "org/private", "--token", "hf_secret_token_123", "--output", out2,
                   env={"HF_HUB_DISABLE_IMPLICIT_TOKEN": "1"})
    assert proc.returncode == 0, proc.stderr
    assert (out2 / "model.safetensors").is_file()
    # `--token "$HF_TOKEN"` where that variable is unset in the shell: no token given, so HF_TOKEN's applies
    proc = run_cli("fetch", "org/private", "--token", "", "--output", tmp_path / "out3",
                   env={"HF_TOKEN": "hf_secret_token_123"})
    assert proc.returncode == 0, proc.stderr


def test_s3_fetch_round_trip(s3_client, s3_prefix, model_factory, tmp_path):
    model = model_factory(shards=3)
    upload_folder(s3_client, model, s3_prefix)
    out = tmp_path / "out"
    proc = run_cli("fetch", s3_prefix, "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert digest_tree(out) == digest_tree(model)


def test_remote_fetch_refuses_foreign_output(hub_env, model_factory, tmp_path):
    hub_env.add("org/tiny", model_factory())
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = run_cli("fetch", "org/tiny", "--output", out)
    assert proc.returncode == 2
    assert "not empty" in error_line(proc) and "--overwrite" in error_line(proc)
    assert (out / "notes.txt").read_text() == "mine"
    proc = run_cli("fetch", "org/tiny", "--output", out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()


def test_a_refetch_keeps_files_the_user_put_in_the_earlier_output(hub_env, model_factory, tmp_path):
    """An earlier fetch's output is replaced by a fetch of another model, but not over a file the user added or
    edited there since: that is refused naming the file, until --overwrite."""
    hub_env.add("org/tiny", model_factory())
    hub_env.add("org/other", model_factory(family="qwen2"))
    assert run_cli("fetch", "org/tiny", "--output", "out").returncode == 0
    out = Path("out").resolve()
    (out / "eval").mkdir()
    (out / "eval" / "results.json").write_text("{}")
    proc = run_cli("fetch", "org/other", "--output", "out")
    assert proc.returncode == 2 and "eval/results.json" in error_line(proc) and "--overwrite" in error_line(proc)
    assert (out / "eval" / "results.json").read_text() == "{}"
    (out / "eval" / "results.json").unlink()
    (out / "eval").rmdir()
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "rope_theta": 1.0}))  # edited in place
    proc = run_cli("fetch", "org/other", "--output", "out")
    assert proc.returncode == 2 and "config.json" in error_line(proc)
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 1.0
    proc = run_cli("fetch", "org/other", "--output", "out", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
    assert run_cli("fetch", "org/tiny", "--output", "out").returncode == 0  # its own output: replaced, unasked


def test_a_changed_remote_model_is_fetched_again(hub_env, s3_client, s3_prefix, model_factory, tmp_path):
    """A rerun asks the source whether it still holds what was fetched: a rewritten S3 prefix or a moved Hub branch
    is downloaded again, not compiled from the old copy; an unchanged one is skipped."""
    first, second = model_factory(), model_factory(family="qwen2")
    upload_folder(s3_client, first, s3_prefix)
    assert run_cli("fetch", s3_prefix, "--output", "s3out").returncode == 0
    assert run_cli("trtllm", s3_prefix, "--until", "convert", "--work-dir", "w").returncode == 0
    proc = run_cli("fetch", s3_prefix, "--output", "s3out")
    assert proc.returncode == 0 and "skipping" in proc.stderr
    upload_folder(s3_client, second, s3_prefix)  # same keys, other bytes
    proc = run_cli("fetch", s3_prefix, "--output", "s3out")
    assert proc.returncode == 0 and "changed on S3" in proc.stderr, proc.stderr
    assert digest_tree(Path("s3out")) == digest_tree(second)
    proc = run_cli("trtllm", s3_prefix, "--until", "convert", "--work-dir", "w")  # the convert of the old weights
    assert proc.returncode == 0 and "changed on S3" in proc.stderr and "up to date" not in proc.stderr, proc.stderr
    config = json.loads(Path("w", "checkpoint", "config.json").read_text())
    assert config["architecture"] == "Qwen2ForCausalLM"
    hub_env.add("org/moving", first)
    assert run_cli("fetch", "org/moving", "--output", "hubout").returncode == 0
    assert "skipping" in run_cli("fetch", "org/moving", "--output", "hubout").stderr
    hub_env.add("org/moving", second)  # main moves to a new commit
    offline = run_cli("fetch", "org/moving", "--output", "hubout", env={"HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0 and "skipping" in offline.stderr, offline.stderr  # offline: nothing is asked
    proc = run_cli("fetch", "org/moving", "--output", "hubout")
    assert proc.returncode == 0 and "moved to commit" in proc.stderr, proc.stderr
    assert json.loads(Path("hubout", "config.json").read_text())["model_type"] == "qwen2"


def test_a_prefix_republished_with_objects_of_the_same_sizes_is_fetched_again(s3_client, s3_prefix, model_factory,
                                                                               tmp_path):
    """A fine-tune of the same architecture has the same names and sizes: the objects' LastModified tells it from
    the copy fetched before, and the rerun brings the new weights instead of keeping the old."""
    import time

    first, other = model_factory(seed=0), model_factory(seed=1)
    second = shutil.copytree(first, tmp_path / "second")
    for w in other.glob("*.safetensors"):
        shutil.copy(w, second / w.name)
    assert {p.name: p.stat().st_size for p in first.iterdir()} == {p.name: p.stat().st_size for p in second.iterdir()}
    assert digest_tree(first) != digest_tree(second)
    upload_folder(s3_client, first, s3_prefix)
    assert run_cli("fetch", s3_prefix, "--output", tmp_path / "o").returncode == 0
    time.sleep(1.1)  # LastModified has whole seconds
    upload_folder(s3_client, second, s3_prefix)
    proc = run_cli("fetch", s3_prefix, "--output", tmp_path / "o")
    assert proc.returncode == 0 and "changed on S3" in proc.stderr, proc.stderr
    assert digest_tree(tmp_path / "o") == digest_tree(second)


def test_no_keep_source_removes_only_the_weights_it_fetched(s3_client, s3_prefix, model_factory, tmp_path):
    """--no-keep-source deletes the weights of the copy fetched into the work dir, never those of a folder given
    as the model (one an earlier `lmi-compile fetch` made included); a later run that needs them fetches them
    again instead of trusting a folder that lacks them."""
    from lmi_compile.remote.fetch import fetch, parse_source, remove_weights

    model = model_factory()
    upload_folder(s3_client, model, s3_prefix)
    source = parse_source(s3_prefix)
    fetched = fetch(source, tmp_path / "fetched")
    remove_weights(fetched, tmp_path / "w" / "source")  # `trtllm fetched/ --no-keep-source`: the user's folder
    assert digest_tree(tmp_path / "fetched") == digest_tree(model)
    fetched.checkpoint.close()
    remove_weights(fetch(source, tmp_path / "fetched"), tmp_path / "fetched")  # the work dir's own copy
    assert not list((tmp_path / "fetched").glob("*.safetensors"))
    assert digest_tree(fetch(source, tmp_path / "fetched").root) == digest_tree(model)


def test_a_file_kept_from_an_interrupted_fetch_is_the_object_listed_now(s3_client, s3_prefix, model_factory,
                                                                        tmp_path):
    """An interrupted fetch keeps its finished files for the rerun. Where no manifest has their checksums, one
    is kept only if it is the object the rerun lists (LastModified, which a fetched file carries as its mtime, not
    its size alone): the user who stopped the fetch of the base model and fetches the instruct variant of the same
    shapes into that output got the base model's first shard beside the instruct model's second, exit 0."""
    import time

    from lmi_compile.remote.s3 import download_files, list_objects, make_client, parse_s3_uri

    base, instruct = model_factory(shards=2, seed=0), model_factory(shards=2, seed=1)
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    client, staging = make_client(), tmp_path / ".out.partial"
    for model, prefix in ((base, "base/"), (instruct, "instruct/")):
        u, mtimes = parse_s3_uri(s3_prefix + prefix), {}
        for name in shards:
            s3_client.put_object(Bucket=u.bucket, Key=u.key(name), Body=(model / name).read_bytes())
        objects = list_objects(client, u, mtimes)
        assert sorted(objects) == shards
        # the base model's fetch is stopped after its first shard; the instruct one's gets both
        download_files(client, u, shards[:1] if model is base else shards, staging, objects, desc="d", mtimes=mtimes)
        if model is base:
            time.sleep(1.1)  # LastModified has whole seconds
    assert digest_tree(staging) == digest_tree(instruct, shards)


def test_a_huggingface_cache_snapshot_is_a_model_folder(model_factory, tmp_path):
    """huggingface_hub's cache keeps a snapshot's files as links into the repo's blobs/: such a folder converts;
    a link anywhere else is still refused, with the fix in the message."""
    import hashlib

    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in model_factory(shards=2).iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    proc = run_cli("trtllm", snap, "--until", "convert", "--work-dir", "w")
    assert proc.returncode == 0, proc.stderr
    assert (Path("w") / "checkpoint" / "rank0.safetensors").is_file()
    elsewhere = tmp_path / "elsewhere.safetensors"
    shard = next(snap.glob("*-00001-of-*.safetensors"))
    shutil.copy(shard, elsewhere)
    shard.unlink()
    shard.symlink_to(elsewhere)
    proc = run_cli("trtllm", snap, "--until", "convert", "--work-dir", "w2")
    assert proc.returncode == 2 and "outside" in error_line(proc) and "cp -rL" in error_line(proc)


def test_an_output_below_a_file_is_one_clear_line(hub_env, model_factory):
    hub_env.add("org/tiny", model_factory())
    Path("afile").write_text("mine")
    proc = run_cli("fetch", "org/tiny", "--output", "afile/sub")
    assert proc.returncode == 2 and "afile is a file, not a folder" in error_line(proc)
    assert Path("afile").read_text() == "mine"


def test_custom_code_needs_trust(hub_env, model_copy, tmp_path):
    model = model_copy()
    (model / "modeling_custom.py").write_text("raise SystemExit('custom code ran')\n")
    hub_env.add("org/custom", model)
    proc = run_cli("fetch", "org/custom", "--output", tmp_path / "o1")
    assert proc.returncode == 2
    assert "--trust-remote-code" in error_line(proc) and "modeling_custom.py" in error_line(proc)
    assert not (tmp_path / "o1").exists()
    proc = run_cli("fetch", "org/custom", "--output", tmp_path / "o2", "--trust-remote-code")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o2" / "modeling_custom.py").is_file()


def test_config_styles_4x_and_5x(model_copy):
    from lmi_compile.model.config import ModelConfig

    model = model_copy()
    cfg = json.loads((model / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}
    cfg["rope_theta"] = 500000.0
    (model / "config.json").write_text(json.dumps(cfg))
    v4 = ModelConfig.load(model / "config.json")
    cfg5 = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    cfg5["rope_parameters"] = {"rope_theta": 500000.0, **cfg["rope_scaling"]}
    cfg5["dtype"] = "bfloat16"
    (model / "config.json").write_text(json.dumps(cfg5))
    v5 = ModelConfig.load(model / "config.json")
    assert v4.rope_theta == v5.rope_theta == 500000.0
    assert v4.rope_scaling == v5.rope_scaling and v4.rope_scaling["type"] == "llama3"
    assert (v4.dtype, v5.dtype) == ("float32", "bfloat16")
    # 5.x writes rope_parameters for every model: the default rope is no scaling (--allow-longer has none to stretch)
    cfg5["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    cfg5["dtype"] = "torch.float16"  # as some exports write it
    (model / "config.json").write_text(json.dumps(cfg5))
    plain = ModelConfig.load(model / "config.json")
    assert (plain.rope_theta, plain.rope_scaling, plain.dtype) == (10000.0, None, "float16")
    cfg5["rope_parameters"] = {"type": "linear", "factor": 2.0}  # the older key alone: both are written
    (model / "config.json").write_text(json.dumps(cfg5))
    linear = ModelConfig.load(model / "config.json").rope_scaling
    assert linear == {"type": "linear", "rope_type": "linear", "factor": 2.0}


def hub_downloaders(endpoint: str) -> list[int]:
    """Processes downloading from the Hub at `endpoint` (lmi-compile's Hub download child)."""
    from pathlib import Path

    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if (b"lmi_compile.remote.hub" in (proc / "cmdline").read_bytes()
                    and f"HF_ENDPOINT={endpoint}".encode() in (proc / "environ").read_bytes().split(b"\0")):
                pids.append(int(proc.name))
        except (OSError, ValueError):
            pass
    return pids


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_a_hub_download_stops_at_once_when_interrupted_and_a_rerun_finishes(model_factory, tmp_path, how):
    """Ctrl-C (SIGINT to the terminal's process group) or a batch job's stop (SIGTERM) during a Hub download
    ends the command within seconds, though the weight files in flight cannot finish (the server holds them);
    before, it waited for every file in flight (huggingface_hub's download threads run to their end). The
    partial files stay for huggingface_hub to resume; nothing looks complete, and a rerun fetches the model
    whole. Killed outright (SIGKILL), the command leaves no download running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from servers.hub import HubServer

    model = model_factory(shards=2)
    server = HubServer(stall_after=1024).start()
    try:
        server.add("org/held", model)
        env = {**os.environ, "HF_ENDPOINT": server.endpoint, "HF_HUB_DOWNLOAD_TIMEOUT": "100"}
        with open(tmp_path / "err", "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "lmi_compile", "fetch", "org/held", "--output", "out"],
                                    cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
        try:
            assert server.stalled.wait(60), (tmp_path / "err").read_text()
            assert hub_downloaders(server.endpoint)
            if how == "ctrl-c":
                os.killpg(proc.pid, signal.SIGINT)
            else:
                proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
            try:
                rc = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                raise AssertionError("still running 15 s after the signal: waiting for downloads in flight")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        err = (tmp_path / "err").read_text()
        assert rc == {"ctrl-c": 130, "sigterm": 143, "sigkill": -9}[how], err
        if how != "sigkill":
            assert "interrupted by" in err and "Traceback" not in err, err
        deadline = time.monotonic() + 10
        while hub_downloaders(server.endpoint) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not hub_downloaders(server.endpoint)
        assert not (tmp_path / "out").exists()
        assert list((tmp_path / ".out.partial").rglob("*.incomplete"))  # kept for the rerun to resume
    finally:
        server.release.set()
        server.stop()
    server = HubServer().start()
    try:
        server.add("org/held", model)
        again = run_cli("fetch", "org/held", "--output", "out", cwd=tmp_path, env={"HF_ENDPOINT": server.endpoint})
    finally:
        server.stop()
    assert again.returncode == 0, again.stderr
    assert digest_tree(tmp_path / "out") == digest_tree(model)


def test_one_weight_format_is_chosen_safetensors_first(tmp_path):
    """A folder or a repository holding both formats (many Hub repos keep pytorch_model.bin beside safetensors):
    the safetensors are read or fetched, never the pickles; stray .safetensors (a LoRA adapter) are no weights, and
    files in sub-folders (original/, scripts/) are never what LMI loads. Custom code is refused from the listing,
    before any weight is downloaded."""
    from lmi_compile.errors import BadInput
    from lmi_compile.model.checkpoint import find_weight_set
    from lmi_compile.model.files import preferred_index, small_files, weight_files

    both = ["config.json", "tokenizer_config.json", "model.safetensors", "pytorch_model.bin"]
    assert weight_files(both, None, None, source="repo") == ["model.safetensors"]
    assert preferred_index([*both, "pytorch_model.bin.index.json"]) is None
    assert small_files([*both, "scripts/convert.py"], trust_remote_code=False, source="repo") == [
        "config.json", "tokenizer_config.json"]
    with pytest.raises(BadInput, match="repo: holds custom code"):
        small_files([*both, "modeling_custom.py"], trust_remote_code=False, source="repo")
    for name in both:
        (tmp_path / name).write_bytes(b"")
    assert find_weight_set(tmp_path) == ("safetensors", None, ["model.safetensors"])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    (adapter / "pytorch_model.bin").mkdir()  # a Neuron split folder of that name is no weight file either
    with pytest.raises(BadInput, match="no weights found"):
        find_weight_set(adapter)
