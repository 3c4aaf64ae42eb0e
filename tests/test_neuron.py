"""The Neuron pipeline: split weights checked tensor by tensor, layouts file by file, through the
compile STAND-IN (and the real transformers-neuronx where installed)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import error_line, run_cli

from lmi_compile.model.architectures import resolve
from lmi_compile.converters.neuron_split import write_split
from lmi_compile.model.validate import validate_model_dir

STANDIN = f"{sys.executable} {Path(__file__).parent / 'standins' / 'neuron_compile_standin.py'}"
TOKENIZER = ["generation_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def props(path: Path) -> dict:
    return dict(ln.split("=", 1) for ln in path.read_text().splitlines() if ln and not ln.startswith("#"))


def hf_state_dict(model_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()


def load_like_transformers_neuronx(split: Path, names) -> dict:
    """What transformers_neuronx.module.load_state_dict_dir does: look each parameter up, torch.load it."""
    mapping = json.loads((split / "key_to_filename.json").read_text())
    return {n: torch.load(split / mapping[n], weights_only=True) for n in names}


@pytest.mark.parametrize("case", [
    dict(family="llama", fmt="safetensors", shards=2),
    dict(family="qwen2", fmt="safetensors", shards=1),
    dict(family="mistral", fmt="bin", shards=2),
    dict(family="llama", fmt="safetensors", shards=1, tie_word_embeddings=True),
], ids=["llama-st-sharded", "qwen2-bias", "mistral-bin", "tied"])
def test_split_matches_hf_state_dict(model_factory, tmp_path, case):
    model = model_factory(**case)
    m = validate_model_dir(model)
    write_split(resolve(m.config), m.checkpoint, tmp_path, amp=None)
    split = tmp_path / "pytorch_model.bin"
    sd = hf_state_dict(model)
    mapping = json.loads((split / "key_to_filename.json").read_text())
    # same keys, same (state-dict) order, file names as save_split names them
    assert list(mapping) == list(sd)
    assert list(mapping.values()) == [f"p{i}.{k}" for i, k in enumerate(sd)]
    loaded = load_like_transformers_neuronx(split, sd)
    for k, v in sd.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
        # each file holds just its tensor, not a larger shared storage
        assert loaded[k].untyped_storage().nbytes() == v.numel() * v.element_size()
    assert sorted(p.name for p in split.iterdir()) == sorted([*mapping.values(), "key_to_filename.json"])


def test_split_casts_to_amp(model_factory, tmp_path):
    model = model_factory()
    m = validate_model_dir(model)
    write_split(resolve(m.config), m.checkpoint, tmp_path, amp="bf16")
    sd = hf_state_dict(model)
    loaded = load_like_transformers_neuronx(tmp_path / "pytorch_model.bin", sd)
    for k, v in sd.items():
        assert loaded[k].dtype == torch.bfloat16 and torch.equal(loaded[k], v.bfloat16()), k


def test_a_request_above_the_byte_budget_runs_alone():
    """The split holds at most max(largest tensor, 512 MiB) in flight, and a cast holds a tensor twice: a request above
    that limit (a Llama 3 embedding cast to bf16) waits for the others, then runs alone; it never waits forever."""
    import threading

    from lmi_compile.converters.tensor_reader import ByteBudget

    budget, done = ByteBudget(100), threading.Event()

    def big():
        with budget.hold(250):
            done.set()

    with budget.hold(60):
        worker = threading.Thread(target=big, daemon=True)
        worker.start()
        assert not done.wait(0.2)  # 60 are held: the large request waits
    assert done.wait(10), "a request above the limit waited forever"
    worker.join()


def compile_neuron(model, tmp_path, *args, env=None):
    return run_cli("neuron", model, "--work-dir", tmp_path / "work", "--output", tmp_path / "out",
                   "--compile-entry", STANDIN, *args, env=env)


def test_optimum_layout(model_factory, tmp_path):
    model = model_factory(shards=2)
    # a context bucket as long as n_positions is allowed (the only one LMI 0.26-0.28 accept with continuous batching)
    proc = compile_neuron(model, tmp_path, "--n-positions", "256", "--tp", "2", "--batch-size", "4",
                          "--amp", "f16", "--context-length-estimate", "64,256", "--lmi-version", "0.29")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    files = tree(out)
    mapping = json.loads((out / "checkpoint" / "pytorch_model.bin" / "key_to_filename.json").read_text())
    neffs = [f for f in files if f.startswith("compiled/") and f != "compiled/VERSION"]
    assert len(neffs) == 3 and all(f.endswith(".neff") for f in neffs)  # two context buckets + token generation
    assert files == sorted([".lmi-compile-stage.json", "config.json", "lmi-compile.json", "serving.properties",
                            *TOKENIZER, "checkpoint/config.json", "checkpoint/pytorch_model.bin/key_to_filename.json",
                            *[f"checkpoint/pytorch_model.bin/{v}" for v in mapping.values()], *neffs,
                            "compiled/VERSION"])
    cfg = json.loads((out / "config.json").read_text())
    src = json.loads((model / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k != "neuron"} == src
    assert json.loads((out / "checkpoint" / "config.json").read_text()) == src
    assert cfg["neuron"] == {"task": "text-generation", "batch_size": 4, "num_cores": 2, "auto_cast_type": "fp16",
                             "sequence_length": 256, "compiler_type": "neuronx-cc",
                             "compiler_version": "0.0.0+lmi-compile-standin", "checkpoint_id": None,
                             "checkpoint_revision": None}
    assert props(out / "serving.properties") == {
        "option.tensor_parallel_degree": "2", "option.n_positions": "256", "option.max_rolling_batch_size": "4",
        "option.dtype": "fp16", "option.rolling_batch": "tnx", "option.model_loader": "tnx",
        "option.rolling_batch_strategy": "continuous_batching", "option.context_length_estimate": "64,256"}
    manifest = json.loads((out / "lmi-compile.json").read_text())
    assert manifest["stand_in"] is True and manifest["settings"]["n_positions"] == 256
    assert "STAND-IN" in proc.stderr
    assert all(not (out / f).samefile(model / f) for f in TOKENIZER)  # copies, not links into the user's model


def test_split_layout_refuses_s3_graph_path(model_factory, tmp_path):
    # LMI never loads graphs from an S3 option.compiled_graph_path (0.28+ skip it and recompile).
    proc = compile_neuron(model_factory(), tmp_path, "--n-positions", "128", "--format", "split",
                          "--upload", "s3://bucket/prefix/")
    assert proc.returncode == 2, proc.stderr
    assert "--format optimum" in error_line(proc) and "S3" in error_line(proc)
    assert not (tmp_path / "work").exists()


def test_split_layout_default_graph_path_is_absolute(model_factory, tmp_path):
    proc = compile_neuron(model_factory(), tmp_path, "--n-positions", "128", "--format", "split")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    files = tree(out)
    assert "pytorch_model.bin/key_to_filename.json" in files and not any(f.startswith("checkpoint/") for f in files)
    assert "neuron" not in json.loads((out / "config.json").read_text())
    p = props(out / "serving.properties")
    assert p["option.load_split_model"] == "true" and p["option.compiled_graph_path"] == "/opt/ml/model/compiled"


def test_hub_model_records_checkpoint_id_and_revision(hub_env, model_factory, tmp_path):
    hub_env.add("org/tiny-neuron", model_factory())
    proc = compile_neuron("org/tiny-neuron", tmp_path, "--n-positions", "128")
    assert proc.returncode == 0, proc.stderr
    neuron = json.loads((tmp_path / "out" / "config.json").read_text())["neuron"]
    assert neuron["checkpoint_id"] == "org/tiny-neuron" and len(neuron["checkpoint_revision"]) == 40


def test_an_output_overlapping_the_work_dir_is_refused_before_the_split(model_factory, tmp_path):
    proc = run_cli("neuron", model_factory(), "--work-dir", "out/work", "--output", "out", "--compile-entry", STANDIN,
                   "--overwrite")
    assert proc.returncode == 2 and "overlaps the work dir" in error_line(proc)
    assert not Path("out").exists()


def test_an_incomplete_checkpoint_is_refused_before_the_split(model_copy, tmp_path):
    from safetensors.torch import load_file, save_file

    model = model_copy()
    f = model / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    proc = compile_neuron(model, tmp_path)
    assert proc.returncode == 2 and "'model.layers.1.mlp.down_proj.weight' is missing" in error_line(proc)
    assert not (tmp_path / "work" / "split").exists() and not (tmp_path / "out").exists()


def test_a_tensor_the_layout_does_not_know_is_refused_before_the_split(model_copy, tmp_path):
    """A weight the architecture's layout has no place for would be left out of pytorch_model.bin without a word
    (transformers-neuronx then builds the model without it)."""
    from safetensors.torch import load_file, save_file

    model = model_copy()
    f = model / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.1.mlp.down_proj.bias"] = torch.zeros(64)
    save_file(tensors, f, metadata={"format": "pt"})
    proc = compile_neuron(model, tmp_path, "--until", "split")
    assert proc.returncode == 2 and "model.layers.1.mlp.down_proj.bias" in error_line(proc), proc.stderr
    assert not (tmp_path / "work" / "split").exists()


def test_context_buckets_from_the_environment_and_unused_options_are_said(model_factory, tmp_path):
    env = {"OPTION_CONTEXT_LENGTH_ESTIMATE": "64,128", "OPTION_ROLLING_BATCH_STRATEGY": "naive_rolling_batch"}
    proc = compile_neuron(model_factory(), tmp_path, "--n-positions", "256", env=env)
    assert proc.returncode == 0, proc.stderr
    assert props(tmp_path / "out" / "serving.properties")["option.context_length_estimate"] == "64,128"
    assert "option.rolling_batch_strategy=naive_rolling_batch (from OPTION_ROLLING_BATCH_STRATEGY): not a setting" \
        in proc.stderr


def test_the_split_is_recorded_without_fsync(model_factory, tmp_path, synced_paths):
    """The split's files are written without fsync (torch.save), so its record is too: from S3 that fsync waited
    1.2-1.5 s for the fetched shards' writeback. The record still appears by rename, and a rerun trusts it."""
    from lmi_compile.cli import app

    model = model_factory()
    work = tmp_path / "work"
    app(["neuron", str(model), "--work-dir", str(work), "--until", "split"], standalone_mode=False)
    assert json.loads((work / "split" / ".lmi-compile-stage.json").read_text())["stage"] == "split"
    assert not [p for p in synced_paths if "split" in p], synced_paths
    again = compile_neuron(model, tmp_path, "--until", "split")
    assert again.returncode == 0 and "is up to date, skipping" in again.stderr, again.stderr


def test_weights_that_disagree_with_the_config_are_refused_before_the_split(model_copy, tmp_path):
    model = model_copy()
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] + 32}))
    proc = compile_neuron(model, tmp_path, "--until", "split")
    assert proc.returncode == 2 and "config and weights disagree" in error_line(proc) and "mlp" in error_line(proc)
    assert not (tmp_path / "work" / "split").exists()


def test_rerun_skips_and_changed_settings_recompile(model_factory, tmp_path):
    model = model_factory()
    assert compile_neuron(model, tmp_path, "--n-positions", "128").returncode == 0
    split_file = next((tmp_path / "work" / "split" / "pytorch_model.bin").glob("p0.*"))
    mtime = split_file.stat().st_mtime_ns
    compiled = tmp_path / "work" / "compiled"
    graphs_128 = sorted(p.name for p in compiled.glob("*.neff"))
    again = compile_neuron(model, tmp_path, "--n-positions", "256")
    assert again.returncode == 0, again.stderr
    assert "split: " in again.stderr and "skipping" in again.stderr
    assert split_file.stat().st_mtime_ns == mtime
    assert props(tmp_path / "out" / "serving.properties")["option.n_positions"] == "256"
    # the compile stage itself was redone: its record and its graphs (named by a hash of the settings)
    record = json.loads((compiled / ".lmi-compile-stage.json").read_text())
    assert record["stage"] == "compile" and record["compile"]["settings"]["n_positions"] == 256
    graphs_256 = sorted(p.name for p in compiled.glob("*.neff"))
    assert graphs_256 and not set(graphs_256) & set(graphs_128)
    assert sorted(p.name for p in (tmp_path / "out" / "compiled").glob("*.neff")) == graphs_256
    # another release: the split stays, the graphs are made again for it (never kept from the other release)
    again = compile_neuron(model, tmp_path, "--n-positions", "256", "--lmi-version", "0.33")
    assert again.returncode == 0, again.stderr
    assert "compiled is up to date" not in again.stderr
    assert json.loads((tmp_path / "out" / "lmi-compile.json").read_text())["lmi_version"] == "0.33"
    assert "target: LMI 0.33 (" in again.stderr and "transformers-neuronx 0.13.380" in again.stderr
    assert "compiled for LMI" not in run_cli("check", tmp_path / "out", "--lmi-version", "0.33").stdout


@pytest.mark.parametrize("args,needle", [
    (["--n-positions", "4096"], "exceeds max_position_embeddings 2048"),
    (["--n-positions", "4096", "--allow-longer"], "--allow-longer needs rope scaling"),
    (["--tp", "3"], "not a NeuronCore count"),
    (["--lmi-version", "0.25"], "no neuron target for this LMI release"),
    (["--lmi-version", "0.26", "--format", "split"], "LMI 0.26 (LMI 0.26 Neuron container"),
    (["--lmi-version", "0.28", "--n-positions", "256", "--context-length-estimate", "128"],
     "accepts only [n_positions] (256); drop the option or use --lmi-version 0.29 or later"),
    (["--batch-size", "0"], "--batch-size': Input should be greater than or equal to 1"),
    (["--amp", "fp8"], "--amp 'fp8'"),
    (["--n-positions", "256", "--context-length-estimate", "64,9999"], "--context-length-estimate 9999"),
])
def test_bad_settings(model_factory, tmp_path, args, needle):
    proc = compile_neuron(model_factory(), tmp_path, *args)
    assert proc.returncode == 2, proc.stderr
    assert needle in error_line(proc)
    assert not (tmp_path / "work" / "split").exists() and not (tmp_path / "out").exists()


def test_allow_longer_with_rope_scaling(model_factory, tmp_path):
    model = model_factory(rope_scaling={"type": "linear", "factor": 4.0}, max_position_embeddings=512)
    proc = compile_neuron(model, tmp_path, "--n-positions", "1024", "--allow-longer")
    assert proc.returncode == 0, proc.stderr
    # compiled for 1024 positions, beyond max_position_embeddings 512, and served with that setting
    record = json.loads((tmp_path / "work" / "compiled" / ".lmi-compile-stage.json").read_text())
    assert record["compile"]["settings"]["n_positions"] == 1024
    assert props(tmp_path / "out" / "serving.properties")["option.n_positions"] == "1024"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["neuron"]["sequence_length"] == 1024


def test_compile_failure_leaves_no_output(model_factory, tmp_path):
    failing = tmp_path / "fail.py"
    failing.write_text("import sys\nif '--check-sdk' in sys.argv: print('{\"transformers_neuronx\": \"0.13.380\"}'); "
                       "sys.exit(0)\nprint('neuronx-cc: internal compiler error: OOM')\nsys.exit(70)\n")
    proc = run_cli("neuron", model_factory(), "--work-dir", tmp_path / "work", "--output", tmp_path / "out",
                   "--compile-entry", f"{sys.executable} {failing}")
    assert proc.returncode == 1
    line = error_line(proc)
    assert "exit code 70" in line and "neuron-compile.log" in line and "internal compiler error" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "work" / "compiled").exists()


def test_graphs_without_presharded_weights_are_refused_for_030_and_later(model_factory, tmp_path):
    """LMI 0.30+ build the model from compiled/ (what save(dir, sharded_weights=True) writes beside the graphs): an
    entry point that exits 0 with graphs alone would lay out a tree those releases cannot load."""
    entry = tmp_path / "graphs_only.py"
    entry.write_text("import json, sys\n"
                     "if '--check-sdk' in sys.argv: print(json.dumps({'transformers_neuronx': '0.13.380'})); sys.exit(0)\n"
                     "a = dict(zip(sys.argv[1::2], sys.argv[2::2]))\n"
                     "open(a['--output'] + '/0123456789abcdef0123.neff', 'wb').write(b'graph')\n"
                     "open(a['--versions-file'], 'w').write(json.dumps({'neuronx_cc': '2.16.372.0'}))\n")
    proc = run_cli("neuron", model_factory(), "--lmi-version", "0.34", "--n-positions", "128", "--work-dir",
                   tmp_path / "work", "--output", tmp_path / "out", "--compile-entry", f"{sys.executable} {entry}")
    assert proc.returncode == 1 and "wrote no presharded weights" in error_line(proc), proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "work" / "compiled").exists()


def _has_sdk() -> bool:
    try:
        import transformers_neuronx  # noqa: F401
        return True
    except Exception:
        return False


@pytest.mark.skipif(_has_sdk(), reason="checks the message shown where the Neuron SDK is absent")
def test_missing_sdk_message(model_factory, tmp_path):
    proc = run_cli("neuron", model_factory(), "--work-dir", tmp_path / "work", "--output", tmp_path / "out")
    assert proc.returncode == 1
    line = error_line(proc)
    assert "Neuron SDK is not installed" in line and "--until split" in line
    assert not (tmp_path / "work" / "source").exists() and not (tmp_path / "work" / "split").exists()
    proc = run_cli("neuron", model_factory(), "--work-dir", tmp_path / "work", "--until", "split")
    assert proc.returncode == 0, proc.stderr  # no SDK needed before the compile stage


@pytest.mark.real_neuron
@pytest.mark.skipif(not _has_sdk(), reason="needs the Neuron SDK (transformers-neuronx, neuronx-cc)")
def test_real_neuron_compile(model_factory, tmp_path):
    proc = run_cli("neuron", model_factory(), "--n-positions", "128", "--tp", "2", "--batch-size", "1",
                   "--work-dir", tmp_path / "work", "--output", tmp_path / "out", timeout=7200)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "out" / "lmi-compile.json").read_text())
    assert manifest["stand_in"] is False and manifest["versions"]["neuronx_cc"]


def test_mixtral_split_in_transformers_4x_state_dict_order(model_factory, tmp_path):
    """transformers 5 fuses Mixtral's experts in its state dict, so the order is written out by hand from the
    4.x modules (MixtralDecoderLayer: self_attn, block_sparse_moe (gate, experts[e].w1/w2/w3), norms)."""
    from safetensors.torch import load_file

    model = model_factory(family="mixtral", shards=2)
    m = validate_model_dir(model)
    write_split(resolve(m.config), m.checkpoint, tmp_path, amp=None)
    split = tmp_path / "pytorch_model.bin"
    mapping = json.loads((split / "key_to_filename.json").read_text())
    p = "model.layers.{}."
    layer = [p + f"self_attn.{x}_proj.weight" for x in "qkvo"] + [p + "block_sparse_moe.gate.weight"] + \
        [p + f"block_sparse_moe.experts.{e}.{w}.weight" for e in range(4) for w in ("w1", "w2", "w3")] + \
        [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    want = ["model.embed_tokens.weight", *(k.format(i) for i in range(4) for k in layer), "model.norm.weight",
            "lm_head.weight"]
    assert list(mapping) == want
    source = {k: v for f in sorted(model.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    loaded = load_like_transformers_neuronx(split, want)
    assert all(torch.equal(loaded[k], source[k]) for k in want)
