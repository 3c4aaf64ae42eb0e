"""`lmi-compile check`: the layout LMI would see, and each thing that would stop it loading."""

import json
import sys
from pathlib import Path

import pytest
from conftest import trtllm_standin, run_cli, upload_folder

STANDIN = Path(__file__).parent / "standins" / "trtllm-build"
NEURON_STANDIN = f"{sys.executable} {Path(__file__).parent / 'standins' / 'neuron_compile_standin.py'}"


def as_if_compiled_by(path: Path, version: str) -> None:
    """Give stand-in output the version a real toolchain would have written (to test check's other rules)."""
    cfg = json.loads(path.read_text())
    if "neuron" in cfg:
        cfg["neuron"]["compiler_version"] = version
    else:
        cfg["version"] = version
    path.unlink()  # the layout hard-linked it from the work dir: never edit through the link
    path.write_text(json.dumps(cfg))
    reseal(path)


def rewrite(path: Path, text: str) -> None:
    """Replace a laid-out file (never through a hard link into the work dir), its size resealed."""
    path.unlink()
    path.write_text(text)
    reseal(path)


def reseal(path: Path) -> None:
    """The file's size in its layout's lmi-compile.json as the real toolchain's tree would have it recorded."""
    root = next(p for p in path.parents if (p / "lmi-compile.json").is_file())
    manifest = json.loads((root / "lmi-compile.json").read_text())
    manifest["files"][path.relative_to(root).as_posix()] = path.stat().st_size
    (root / "lmi-compile.json").write_text(json.dumps(manifest))


def check_json(*args):
    proc = run_cli("check", *args, "--json")
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    assert (proc.returncode == 0) == report["loadable"]
    return report


@pytest.fixture
def triton_out(model_factory, tmp_path):
    proc = run_cli("trtllm", model_factory(), "--tp", "2", "--lmi-version", "0.30", "--work-dir", tmp_path / "w",
                   "--output", tmp_path / "out", "--trtllm-build", trtllm_standin("0.30"))
    assert proc.returncode == 0, proc.stderr
    return tmp_path / "out"


def test_standin_output_is_never_called_loadable(triton_out):
    r = check_json(triton_out)
    assert r["layout"] == "trtllm-triton" and r["loadable"] is False
    assert any("stand-in" in p for p in r["problems"])


def test_plugins_in_another_dtype_than_the_model_are_noted(model_factory, tmp_path):
    """TensorRT-LLM 0.9's attention plugin runs in float16 unless trtllm-build names the dtype: an engine built that
    way from a bf16 model loads, and check says what it runs in. lmi-compile's own build names it."""
    model = model_factory(dtype="bfloat16")
    for name, extra in (("own", ()), ("fp16", ("--trtllm-build-args", "--gpt_attention_plugin float16"))):
        proc = run_cli("trtllm", model, "--lmi-version", "0.28", "--work-dir", tmp_path / name / "w", "--output",
                       tmp_path / name / "out", "--trtllm-build", trtllm_standin("0.28"), *extra)
        assert proc.returncode == 0, proc.stderr
    assert not [n for n in check_json(tmp_path / "own" / "out")["notes"] if "plugin" in n]
    notes = [n for n in check_json(tmp_path / "fp16" / "out")["notes"] if "plugin" in n]
    assert notes == ["tensorrt_llm/1/config.json: gpt_attention_plugin runs in float16 on a bfloat16 model "
                     "(trtllm-build --gpt_attention_plugin bfloat16 builds it in the model's dtype)"]


def test_triton_repository_rules(triton_out):
    as_if_compiled_by(triton_out / "tensorrt_llm" / "1" / "config.json", "0.12.0")
    r = check_json(triton_out)
    assert r["loadable"] is True and r["versions"]["tensorrt_llm"] == "0.12.0"
    assert r["properties"]["option.tensor_parallel_degree"] == "2" and r["properties"]["engine"] == "MPI"
    assert check_json(triton_out, "--container-trtllm", "0.13.0")["problems"] == [
        "engines were built with TensorRT-LLM 0.12.0, the container has 0.13.0: rebuild them in the serving container"]
    (triton_out / "tensorrt_llm" / "1" / "rank1.engine").rename(triton_out / "tensorrt_llm" / "1" / "rank2.engine")
    r = check_json(triton_out)
    assert r["loadable"] is False and any("rank1.engine is missing" in p for p in r["problems"])
    assert any("rank2.engine is beyond the engine config's 2 ranks" in p for p in r["problems"]), r["problems"]


def test_unfilled_pbtxt_and_missing_tokenizer(triton_out):
    as_if_compiled_by(triton_out / "tensorrt_llm" / "1" / "config.json", "0.12.0")
    pbtxt = triton_out / "tensorrt_llm" / "config.pbtxt"
    text = pbtxt.read_text().replace("max_batch_size: 256", "max_batch_size: ${triton_max_batch_size}")
    pbtxt.unlink()
    pbtxt.write_text(text.replace('backend: "tensorrtllm"', 'backend: "python"'))
    problems = check_json(triton_out)["problems"]
    assert any("unfilled template" in p for p in problems)
    assert any("config.pbtxt: backend is not tensorrtllm" in p for p in problems), problems
    (triton_out / "tensorrt_llm" / "tokenizer_config.json").unlink()
    r = check_json(triton_out)  # without the tokenizer LMI no longer sees a triton repository at all
    assert r["layout"] != "trtllm-triton" and r["loadable"] is False


def test_engine_dir_layout(model_factory, tmp_path):
    proc = run_cli("trtllm", model_factory(), "--tp", "2", "--work-dir", tmp_path / "w",
                   "--output", tmp_path / "out", "--trtllm-build", STANDIN)  # the default target loads engine-dir
    assert proc.returncode == 0, proc.stderr
    as_if_compiled_by(tmp_path / "out" / "config.json", "0.21.0")
    r = check_json(tmp_path / "out")
    assert r["layout"] == "trtllm-engine-dir" and r["loadable"] is True


def test_neuron_optimum_rules(model_factory, tmp_path):
    proc = run_cli("neuron", model_factory(), "--n-positions", "256", "--work-dir", tmp_path / "w", "--output",
                   tmp_path / "out", "--compile-entry", NEURON_STANDIN, "--lmi-version", "0.29")  # checkpoint/ tree
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert check_json(out)["loadable"] is False  # stand-in graphs
    as_if_compiled_by(out / "config.json", "2.16.372.0")
    r = check_json(out)
    assert r["layout"] == "neuron-optimum" and r["loadable"] is True, r["problems"]
    assert "2.12.54.0" in check_json(out, "--container-neuronx-cc", "2.12.54.0")["problems"][0]
    props = (out / "serving.properties").read_text().replace("option.n_positions=256", "option.n_positions=512")
    (out / "serving.properties").unlink()
    (out / "serving.properties").write_text(props.replace("option.tensor_parallel_degree=2",
                                                          "option.tensor_parallel_degree=8"))
    problems = check_json(out)["problems"]
    assert any("option.n_positions=512" in p for p in problems)
    assert any("option.tensor_parallel_degree=8 but the graphs were compiled with num_cores=2" in p for p in problems)
    victim = next((out / "checkpoint" / "pytorch_model.bin").glob("p3.*"))
    victim.unlink()
    # a neuron section without task (optimum-neuron requires it), a split without lm_head.weight
    cfg = json.loads((out / "config.json").read_text())
    del cfg["neuron"]["task"]
    rewrite(out / "config.json", json.dumps(cfg))
    k2f = out / "checkpoint" / "pytorch_model.bin" / "key_to_filename.json"
    rewrite(k2f, json.dumps({k: v for k, v in json.loads(k2f.read_text()).items() if k != "lm_head.weight"}))
    problems = check_json(out)["problems"]
    for needle in ("tensor file(s) named by key_to_filename.json are missing", "the neuron section lacks task",
                   "key_to_filename.json: no lm_head.weight"):
        assert any(needle in p for p in problems), (needle, problems)
    # weights at the top: LMI takes the folder as a HuggingFace model to compile, not as compiled graphs
    (out / "model.safetensors").write_bytes(b"")
    assert check_json(out)["layout"] == "hf-pretrained"


def test_neuron_split_rules(model_factory, tmp_path):
    proc = run_cli("neuron", model_factory(), "--n-positions", "128", "--format", "split", "--work-dir",
                   tmp_path / "w", "--output", tmp_path / "out", "--compile-entry", NEURON_STANDIN)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    r = check_json(out)
    assert r["layout"] == "neuron-split" and any("stand-in" in p for p in r["problems"])
    props = (out / "serving.properties").read_text().replace("/opt/ml/model/compiled", "compiled")
    (out / "serving.properties").unlink()
    (out / "serving.properties").write_text(props.replace("option.load_split_model=true\n", ""))
    problems = check_json(out)["problems"]
    assert any("is relative" in p for p in problems)
    assert any("set option.load_split_model=true" in p for p in problems), problems


def test_a_tree_is_held_to_what_its_layout_recorded(model_factory, tmp_path):
    """lmi-compile.json records each file's size and the serving.properties values the graphs were compiled for:
    a deleted graph, or an edited compiled setting, is a problem in a tree the other rules pass; an added option
    and a moved compiled_graph_path are the user's to set."""
    proc = run_cli("neuron", model_factory(), "--n-positions", "128", "--format", "split", "--tp", "2",
                   "--context-length-estimate", "64,128", "--work-dir", tmp_path / "w", "--output", tmp_path / "out",
                   "--compile-entry", NEURON_STANDIN)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    baseline = set(check_json(out)["problems"])  # the stand-in's
    text = (out / "serving.properties").read_text()
    edited = text.replace("/opt/ml/model/compiled", "/opt/ml/model/graphs") + "option.max_rolling_batch_prefill_tokens=1\n"
    (out / "serving.properties").unlink()
    (out / "serving.properties").write_text(edited)
    assert set(check_json(out)["problems"]) == baseline
    for old, new in (("option.tensor_parallel_degree=2", "option.tensor_parallel_degree=8"),
                     ("option.context_length_estimate=64,128", "option.context_length_estimate=128")):
        (out / "serving.properties").write_text(edited.replace(old, new))
        key = old.split("=")[0]
        assert any(f"{key}={new.split('=')[1]}, but the artifact was compiled for {old}" in p
                   for p in check_json(out)["problems"]), check_json(out)["problems"]
    (out / "serving.properties").write_text(edited)
    gone, cut = sorted((out / "compiled").glob("*.neff"))[:2]  # one graph deleted, one cut short by a byte
    gone.unlink()
    data = cut.read_bytes()
    cut.unlink()
    cut.write_bytes(data[:-1])
    assert any("missing, or another size than lmi-compile laid out (2 such file(s))" in p
               for p in check_json(out)["problems"]), check_json(out)["problems"]


def test_hf_pretrained(model_copy):
    m = model_copy(shards=2)
    r = check_json(m)
    assert r["layout"] == "hf-pretrained" and r["loadable"] is True
    assert r["properties"] == {"option.model_id": str(m.resolve())}
    (m / "model-00002-of-00002.safetensors").unlink()
    r = check_json(m)
    assert r["loadable"] is False and any("model-00002-of-00002.safetensors" in p for p in r["problems"])


def test_s3_upload_complete_and_incomplete(s3_env, s3_client, s3_prefix, triton_out):
    as_if_compiled_by(triton_out / "tensorrt_llm" / "1" / "config.json", "0.12.0")
    assert run_cli("push", triton_out, s3_prefix).returncode == 0
    r = check_json(s3_prefix)
    assert r["loadable"] is True and r["upload_complete"] is True and r["properties"]["option.model_id"] == s3_prefix
    bucket, prefix = "models", s3_prefix.split("models/", 1)[1]
    s3_client.delete_object(Bucket=bucket, Key=prefix + "tensorrt_llm/1/rank0.engine")
    r = check_json(s3_prefix)
    assert r["upload_complete"] is False and r["loadable"] is False
    s3_client.delete_object(Bucket=bucket, Key=prefix + "lmi-compile-manifest.json")
    s3_client.put_object(Bucket=bucket, Key=prefix + "lmi-compile-upload-in-progress.json", Body=b"{}")
    r = check_json(s3_prefix)
    assert any("incomplete upload" in p for p in r["problems"])


def test_s3_check_reads_no_weights(s3_env, s3_client, s3_prefix, model_factory, monkeypatch):
    """check in-process, on a real client whose events count every GET: what it read, and how many bytes."""
    import lmi_compile.remote.s3 as s3
    from lmi_compile.lmi.check import check, render

    model = model_factory(shards=2)
    upload_folder(s3_client, model, s3_prefix)
    got: dict[str, int] = {}
    real = s3.make_client

    def counting_client(*a, **kw):
        client = real(*a, **kw)
        keys = []
        client.meta.events.register("provide-client-params.s3.GetObject",
                                    lambda params, **_: keys.append(params["Key"]))
        client.meta.events.register("after-call.s3.GetObject", lambda parsed, **_: got.__setitem__(
            keys[-1], got.get(keys[-1], 0) + parsed["ContentLength"]))
        return client

    monkeypatch.setattr(s3, "make_client", counting_client)
    report = check(s3_prefix)
    assert report.layout == "hf-pretrained" and report.loadable, report.problems
    assert "HuggingFace pretrained" in render(report)
    prefix = s3_prefix.split("models/", 1)[1]
    read = {k[len(prefix):]: n for k, n in got.items()}
    weights = {p.name for p in model.glob("*.safetensors")}
    assert set(read) <= {"config.json", "model.safetensors.index.json", *weights}, read  # small files only
    for w in weights:  # of a weight file, its header alone (to see that it fits the file), never tensor data
        header_len = 8 + int.from_bytes((model / w).read_bytes()[:8], "little")
        assert read.get(w, 0) <= header_len < (model / w).stat().st_size, (w, read)


def test_unrecognized_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("hi")
    proc = run_cli("check", tmp_path / "x")
    assert proc.returncode == 1 and "no LMI layout recognized" in proc.stdout
