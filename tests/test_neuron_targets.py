"""Graphs the serving container finds: for each LMI Neuron release, the graphs our compile writes are the
graphs that release's loader asks for, given the serving.properties we wrote.

The compile side is the real pipeline (in-process, with the compile entry point as its subprocess) over the
transformers-neuronx TEST DOUBLE in tests/doubles/, which records every call and names each graph by a hash of
its construction arguments. The loader side is `lmi_loader` below: a small model of djl-serving's
TNXModelLoader per release, written from djl-serving's code at each tag (as summarized with file:line in
/work/notes/lmi-neuron-releases.md), deliberately not from lmi_compile's target table, so the two are compared
rather than one checked against itself.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import error_line, run_cli

DOUBLE = Path(__file__).parent / "doubles" / "transformers_neuronx_double"
STANDIN = Path(__file__).parent / "standins" / "neuron_compile_standin.py"
ML = "engines/python/setup/djl_python/neuron_utils/model_loader.py"
TNXP = "engines/python/setup/djl_python/properties_manager/tnx_properties.py"

# What each release's loader does, from djl-serving at that ref (paths under engines/python/setup/djl_python/).
# tnx/cc: serving/docker/pytorch-inf2.Dockerfile pins. layouts: the trees it loads. cb: when continuous batching is
# on given (model_type, B, strategy). cle: the default context buckets with CB. user_cle: whether another user list
# raises. ode: on-device embedding (loader, split, neuron-format). neuron_weights: where a "neuron" root's weights
# are read. graph_option: what option.compiled_graph_path does.
LMI = {
    "0.26": dict(ref="v0.26.0", tnx="0.9.474", cc="2.12.54.0", layouts=["optimum"],
                 classes={"llama", "mistral"},                          # ML:68-76
                 cb=lambda mt, b, strategy: True,                       # ML:110 (rolling batch on)
                 cle="n", user_cle="must_equal",                       # ML:136-150
                 ode=lambda opts, neuron_fmt: False,                    # ML:108-123 (no such field)
                 neuron_weights="checkpoint", graph_option="ignored"),  # ML:192-199; TNXP:117-129
    "0.27": dict(ref="v0.27.0", tnx="0.10.0.21", cc="2.13.66.0", layouts=["optimum", "split"],
                 classes={"llama", "mistral", "mixtral"},               # ML:78-87
                 cb=lambda mt, b, strategy: strategy == "continuous_batching",  # ML:120
                 default_strategy=lambda mt, b: mt in ("llama", "mistral"),     # transformers_neuronx.py:90-94
                 cle="n", user_cle="must_equal",                        # ML:163-177
                 ode=lambda opts, neuron_fmt: opts.get("on_device_embedding") == "true",  # ML:115-139
                 neuron_weights="checkpoint", graph_option="load"),     # ML:237-282
    "0.28": dict(ref="v0.28.0", tnx="0.10.0.360", cc="2.13.72.0", layouts=["optimum", "split"],
                 classes={"llama", "mistral", "mixtral"},               # ML:108-117
                 cb=lambda mt, b, strategy: strategy == "continuous_batching" and b > 1,  # ML:147-159
                 default_strategy=lambda mt, b: mt in ("llama", "mistral") and b > 1,  # transformers_neuronx.py:105-111
                 cle="n", user_cle="must_equal",                        # ML:217-231
                 ode=lambda opts, neuron_fmt: False,                    # ML:161-193
                 neuron_weights="checkpoint", graph_option="load_if_dir"),  # ML:313-371
    "0.29": dict(ref="v0.29.0", tnx="0.11.351", cc="2.14.227.0", user_cle="pass"),  # ML:222-237
    "0.30": dict(ref="0.30.0-dlc", tnx="0.12.313", cc="2.15.141.0",
                 cb=lambda mt, b, strategy: strategy == "continuous_batching",  # ML:162-173
                 cle="buckets",                                         # ML:245-266, utils.py:100-119
                 ode=lambda opts, neuron_fmt: opts.get("on_device_embedding") == "true"
                 or opts.get("load_split_model") == "true"              # TNXP:265-269
                 or (neuron_fmt and "on_device_embedding" not in opts),  # neuron_smart_default_utils.py:82-85
                 neuron_weights="compiled"),                            # ML:343-371
    "0.31": dict(ref="0.31.0-dlc"),
    "0.32": dict(ref="0.32.0-dlc", tnx="0.13.380", cc="2.16.372.0"),
    "0.33": dict(ref="0.33.0-dlc"),
    "0.34": dict(ref="0.34.0-dlc"),
}
for _prev, _rel in zip(list(LMI), list(LMI)[1:]):  # each release as the one before unless stated
    LMI[_rel] = {**LMI[_prev], **LMI[_rel]}
RELEASE_LAYOUTS = [(r, lay) for r in LMI for lay in LMI[r]["layouts"]]
LMI_AMP = {"fp16": "f16", "bf16": "bf16", "fp32": "f32"}
SAMPLING_CLASS = {"llama": "llama.model.LlamaForSampling", "mistral": "mistral.model.MistralForSampling",
                  "mixtral": "mixtral.model.MixtralForSampling"}  # MODEL_TYPE_TO_CLS_LOADER (ML:117-124 in 0.34)
SAGEMAKER_MODEL_DIR = "/opt/ml/model"


def context_buckets(n: int) -> list[int]:
    """build_context_length_estimates (utils.py): 128, then 1024 doubling while below N, then N."""
    if n <= 128:
        return [n]
    return [128] + [1024 * 2 ** i for i in range(12) if 1024 * 2 ** i < n] + [n]


def read_props(path: Path) -> dict:
    return {k.removeprefix("option."): v for k, v in
            (ln.split("=", 1) for ln in path.read_text().splitlines() if ln and not ln.startswith("#"))}


def lmi_loader(release: str, root: Path) -> dict:
    """The transformers-neuronx calls LMI `release` makes for the model folder `root` (mounted at
    /opt/ml/model) and its serving.properties: {"class", "path", "kwargs", "neuron_config", "load"}."""
    rule, opts = LMI[release], read_props(root / "serving.properties")
    cfg = json.loads((root / "config.json").read_text())
    mt = cfg["model_type"]
    assert mt in rule["classes"], f"LMI {release} has no {mt} loader"
    rb = opts.get("rolling_batch")
    assert rb and rb != "disable", "rolling batch must be stated (0.29 defaults to disable, 0.30+ to vllm at B>=12)"
    if release == "0.26":
        assert rb == "auto"  # the only type it accepts (TNXP:48)
    elif release == "0.27":
        assert rb == "auto" and opts.get("model_loader") == "tnx"  # else optimum-neuron loads it (TNXP:221-240)
    else:
        assert rb == "tnx" and opts.get("model_loader") in (None, "tnx")
    b, n, tp = int(opts["max_rolling_batch_size"]), int(opts["n_positions"]), int(opts["tensor_parallel_degree"])
    amp = LMI_AMP[opts.get("dtype", "fp16")]
    strategy = opts.get("rolling_batch_strategy")
    if strategy is None and "default_strategy" in rule:
        strategy = "continuous_batching" if rule["default_strategy"](mt, b) else "naive_rolling_batch"
    cb = rule["cb"](mt, b, strategy)
    user = [int(x) for x in opts["context_length_estimate"].split(",")] if "context_length_estimate" in opts else None
    neuron_fmt = "neuron" in cfg and (release == "0.26" or not list(root.glob("*.safetensors")))
    kwargs = {"batch_size": b, "amp": amp, "tp_degree": tp, "n_positions": n}
    nc = {}
    if cb:
        nc["continuous_batching"] = {"batch_size_for_shared_caches": b}
        kwargs["n_positions"] = [n]
        if user is None:
            user = [n] if rule["cle"] == "n" else context_buckets(n)
        elif rule["user_cle"] == "must_equal" and user != [n]:
            raise RuntimeError(f"context_length_estimate {user} need to be the same as n_positions {n}")
    if user is not None:
        kwargs["context_length_estimate"] = user
    if rule["ode"](opts, neuron_fmt):
        nc["on_device_embedding"] = True
    auto, explicit = "transformers_neuronx.NeuronAutoModelForCausalLM", f"transformers_neuronx.{SAMPLING_CLASS[mt]}"
    if neuron_fmt:
        path = root / rule["neuron_weights"]
        cls = auto if list(path.glob("*.safetensors")) else explicit
        load = root / "compiled"
    else:
        path, cls = root, (explicit if opts.get("load_split_model") == "true" else auto)
        graph = opts.get("compiled_graph_path")
        load = None
        if graph and rule["graph_option"] != "ignored":
            if graph.startswith(SAGEMAKER_MODEL_DIR):
                graph = str(root) + graph[len(SAGEMAKER_MODEL_DIR):]
            resolved = Path("/tmp", graph)  # checked after os.chdir("/tmp"); an absolute path stays itself
            if rule["graph_option"] == "load" or resolved.is_dir():
                load = resolved
    return {"class": cls, "path": path, "kwargs": kwargs, "neuron_config": nc, "load": load}


@pytest.fixture
def tnx_double(monkeypatch, tmp_path):
    """The test double importable as transformers_neuronx, here and in the compile subprocess."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(DOUBLE), os.environ.get("PYTHONPATH")])))
    monkeypatch.syspath_prepend(str(DOUBLE))

    def forget():
        for name in [m for m in sys.modules if m.split(".")[0] in ("transformers_neuronx", "neuronxcc")]:
            del sys.modules[name]

    forget()
    yield monkeypatch
    forget()


def load_like_lmi(release: str, root: Path, log: Path):
    """Run lmi_loader's calls against the double: from_pretrained, load, to_neuron (which needs every graph)."""
    import importlib

    from transformers_neuronx.config import ContinuousBatchingConfig, NeuronConfig

    calls = lmi_loader(release, root)
    module, _, name = calls["class"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    nc = dict(calls["neuron_config"])
    if "continuous_batching" in nc:
        nc["continuous_batching"] = ContinuousBatchingConfig(**nc["continuous_batching"])
    os.environ["TNX_DOUBLE_LOG"] = str(log)
    try:
        model = cls.from_pretrained(calls["path"], neuron_config=NeuronConfig(**nc), **calls["kwargs"])
        if calls["load"] is not None:
            model.load(calls["load"])
        model.to_neuron()
    finally:
        del os.environ["TNX_DOUBLE_LOG"]
    return model


def events(log: Path) -> list[dict]:
    return [json.loads(ln) for ln in log.read_text().splitlines()]


def compile_for(model, tmp_path, *, release, layout, batch_size, family):
    from lmi_compile.neuron.backend import NeuronJob, run
    from lmi_compile.pipeline.workdir import WorkDir

    out = tmp_path / f"out-{family}-{batch_size}"
    job = NeuronJob(model=str(model), work=WorkDir(tmp_path / f"work-{family}"), output=out, n_positions=256,
                    tp=2, batch_size=batch_size, format=layout, lmi_version=release)
    return run(job)


@pytest.mark.parametrize("release,layout", RELEASE_LAYOUTS, ids=[f"{r}-{lay}" for r, lay in RELEASE_LAYOUTS])
def test_compiled_graphs_are_the_ones_lmi_loads(model_factory, tmp_path, tnx_double, release, layout):
    tnx_double.setenv("TNX_DOUBLE_VERSION", LMI[release]["tnx"])
    for family in ("llama", "mistral"):
        model = model_factory(family=family)
        for b in (1, 4):
            compile_log = tmp_path / f"compile-{family}-{b}.jsonl"
            tnx_double.setenv("TNX_DOUBLE_LOG", str(compile_log))
            out = compile_for(model, tmp_path, release=release, layout=layout, batch_size=b, family=family)
            tnx_double.delenv("TNX_DOUBLE_LOG")
            compiled = events(compile_log)
            lmi_model = load_like_lmi(release, out, tmp_path / f"lmi-{family}-{b}.jsonl")
            loaded = events(tmp_path / f"lmi-{family}-{b}.jsonl")
            # the same construction (class, every argument, every NeuronConfig field) ...
            want, have = loaded[0], compiled[0]
            assert (have["class"], have["kwargs"], have["neuron_config"]) == \
                   (want["class"], want["kwargs"], want["neuron_config"]), (family, b)
            assert Path(have["path"]).is_absolute()
            # ... so the graphs LMI asks for are exactly the graphs we wrote, and none is compiled at load time
            assert lmi_model.made == "loaded"
            neffs = sorted(p.name for p in (out / "compiled").glob("*.neff"))
            assert neffs == sorted(lmi_model.graph_names()), (family, b)
            # compiled on the CPU where transformers-neuronx has cpu_compile (0.13: LMI 0.32+)
            assert compiled[1]["call"] == ("cpu_compile" if LMI[release]["tnx"].startswith("0.13") else "to_neuron")
            if layout == "split":  # its weights are pytorch_model.bin/ alone: compiled/ holds graphs, not a copy
                assert not list((out / "compiled").glob("*.safetensors")), release


def test_table_agrees_with_the_loader_notes():
    from lmi_compile.lmi.targets import default_release, releases, resolve

    assert releases("neuron") == list(LMI) and default_release("neuron") == "0.34"
    for r, rule in LMI.items():
        t = resolve("neuron", r)
        assert (t["transformers_neuronx"], t["neuronx_cc"], t["layouts"]) == (rule["tnx"], rule["cc"], rule["layouts"])
        assert t["loader_ref"] == f"djl-serving@{rule['ref']}"
        assert {e["model_type"] for e in t["architectures"].values()} == rule["classes"]


def test_optimum_tree_for_030_and_later(model_factory, tmp_path, tnx_double):
    tnx_double.setenv("TNX_DOUBLE_VERSION", "0.13.380")
    out = compile_for(model_factory(), tmp_path, release="0.34", layout="optimum", batch_size=4, family="llama")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert not any(f.startswith("checkpoint/") or (f.endswith(".safetensors") and "/" not in f) for f in files)
    assert {"compiled/config.json", "compiled/DecoderLMHead.safetensors", "compiled/VERSION"} <= set(files)
    assert json.loads((out / "compiled" / "config.json").read_text())["is_presharded_checkpoint"] is True
    # VERSION names the compiler, as LMI's own partition writes it (neuron_utils/model_loader.py compile_and_save)
    versions = json.loads((out / "lmi-compile.json").read_text())["versions"]
    assert versions["neuronx_cc"] != versions["transformers_neuronx"]
    assert (out / "compiled" / "VERSION").read_text() == f"{versions['neuronx_cc']}\n"
    assert "neuron" in json.loads((out / "config.json").read_text())
    p = read_props(out / "serving.properties")
    assert p["on_device_embedding"] == "true" and p["rolling_batch"] == "tnx" and p["n_positions"] == "256"
    assert p["context_length_estimate"] == "128,256"  # 0.30+ buckets, stated so no env default can change them


def test_default_context_buckets_at_and_between_the_bucket_bounds():
    """LMI 0.30+'s default context buckets (build_context_length_estimates; the note's worked examples) at the
    lengths where a bound taken one off would add, drop or repeat a bucket; n_positions 256 above shows none."""
    from lmi_compile.lmi.targets import resolve
    from lmi_compile.neuron.calls import loader_calls

    want = {100: [100], 128: [128], 512: [128, 512], 1024: [128, 1024], 2048: [128, 1024, 2048],
            3000: [128, 1024, 2048, 3000], 4096: [128, 1024, 2048, 4096]}
    for n, buckets in want.items():
        assert context_buckets(n) == buckets, n  # the loader model above agrees with the note
        calls = loader_calls(resolve("neuron", "0.34"), "LlamaForCausalLM", batch_size=4, tp=2, n_positions=n,
                             amp="f16", context_length_estimate=[], layout="optimum")
        assert calls.kwargs["context_length_estimate"] == buckets, n


def test_qwen2_is_refused_naming_why(model_factory, tmp_path):
    proc = run_cli("neuron", model_factory(family="qwen2"), "--work-dir", tmp_path / "work", "--until", "fetch")
    assert proc.returncode == 2
    assert "no LMI release has a qwen2 Neuron loader" in error_line(proc)


def test_mixtral_needs_027(model_factory, tmp_path, monkeypatch):
    from lmi_compile.errors import BadInput
    from lmi_compile.lmi.targets import resolve
    from lmi_compile.neuron.calls import loader_calls

    args = dict(batch_size=4, tp=2, n_positions=256, amp="f16", context_length_estimate=[], layout="optimum")
    with pytest.raises(BadInput, match="LMI 0.26's Neuron loader has no mixtral class"):
        loader_calls(resolve("neuron", "0.26"), "MixtralForCausalLM", **args)
    calls = loader_calls(resolve("neuron", "0.34"), "MixtralForCausalLM", **args)
    # mixtral never gets continuous batching by default (OPTIMUM_CAUSALLM_CONTINUOUS_BATCHING_MODELS)
    assert calls.model_class.endswith("MixtralForSampling") and calls.kwargs["n_positions"] == 256
    assert "continuous_batching" not in calls.neuron_config


def test_heads_not_dividing_tp_are_padded_not_refused(model_factory, tmp_path):
    # transformers-neuronx pads 8 heads to 16 for tp 16 (utils.get_qkv_padding); LMI's AOT tutorial uses tp=24 for 64
    proc = run_cli("neuron", model_factory(), "--tp", "16", "--work-dir", tmp_path / "work", "--until", "fetch")
    assert proc.returncode == 0, proc.stderr


def test_relative_paths_reach_the_entry_point_absolute(model_factory, tmp_path):
    shutil.copy(STANDIN, tmp_path / "standin.py")  # refuses any relative path it is handed
    proc = run_cli("neuron", model_factory(), "--n-positions", "128", "--work-dir", "work", "--output", "out",
                   "--compile-entry", f"{sys.executable} standin.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "serving.properties").is_file()


def test_toolchain_of_another_release_is_refused_before_fetch(model_factory, tmp_path):
    entry = tmp_path / "entry.py"
    entry.write_text("import json\nprint(json.dumps({'transformers_neuronx': '0.12.313', 'neuronx_cc': '2.15.141.0'}))\n")
    proc = run_cli("neuron", model_factory(), "--lmi-version", "0.34", "--work-dir", tmp_path / "work",
                   "--until", "compile", "--compile-entry", f"{sys.executable} {entry}")
    assert proc.returncode == 1
    assert "transformers-neuronx 0.12.313" in error_line(proc) and "0.13.380" in error_line(proc)
    assert not (tmp_path / "work" / "split").exists()


def _check(folder: Path, release: str):
    """`check --lmi-version RELEASE`, the way the CLI runs it."""
    from lmi_compile.lmi.check import check

    return check(str(folder), lmi_version=release).problems


def test_check_for_a_release(model_factory, tmp_path, tnx_double):
    tnx_double.setenv("TNX_DOUBLE_VERSION", "0.13.380")
    out = compile_for(model_factory(), tmp_path, release="0.34", layout="optimum", batch_size=4, family="llama")
    assert not [p for p in _check(out, "0.34") if "stand-in" not in p]
    assert any("compiled for LMI 0.34, not 0.29" in p for p in _check(out, "0.29"))
    assert any("checkpoint/: missing" in p for p in _check(out, "0.29"))
    (out / "compiled" / "config.json").unlink()
    props = out / "serving.properties"
    props.write_text(props.read_text().replace("option.dtype=fp16", "option.dtype=bf16"))
    problems = _check(out, "0.34")
    assert any("compiled/config.json: missing" in p for p in problems)
    assert any("option.dtype=bf16 but the graphs were compiled with auto_cast_type fp16" in p for p in problems)
    # no presharded weights, on-device embedding turned off, graphs of another transformers-neuronx
    for f in (out / "compiled").glob("*.safetensors"):
        f.unlink()
    props.write_text(props.read_text().replace("option.on_device_embedding=true", "option.on_device_embedding=false"))
    manifest = json.loads((out / "lmi-compile.json").read_text())
    (out / "lmi-compile.json").write_text(json.dumps({**manifest, "versions": {**manifest["versions"],
                                                                              "transformers_neuronx": "0.12.313"}}))
    problems = _check(out, "0.34")
    for needle in ("compiled/: no presharded weights", "option.on_device_embedding=false: presharded weights need",
                   "graphs were made with transformers-neuronx 0.12.313; LMI 0.34"):
        assert any(needle in p for p in problems), (needle, problems)

    tnx_double.setenv("TNX_DOUBLE_VERSION", "0.11.351")
    split = compile_for(model_factory(), tmp_path, release="0.29", layout="split", batch_size=4, family="split")
    assert not [p for p in _check(split, "0.29") if "stand-in" not in p]
    assert any("does not load the Neuron split layout" in p for p in _check(split, "0.26"))
    props = split / "serving.properties"
    for graph, needle in (("s3://bucket/model/compiled/", "never loads graphs from S3"), ("compiled", "is relative")):
        props.write_text("\n".join(ln if not ln.startswith("option.compiled_graph_path") else
                                   f"option.compiled_graph_path={graph}" for ln in props.read_text().splitlines()))
        assert any(needle in p for p in _check(split, "0.29")), graph
    cfg = json.loads((split / "config.json").read_text())
    (split / "config.json").write_text(json.dumps({**cfg, "architectures": ["Qwen2ForCausalLM"]}))
    assert any("no LMI release has a qwen2 Neuron loader" in p for p in _check(split, "0.29"))
