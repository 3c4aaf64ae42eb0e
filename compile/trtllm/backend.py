"""The TensorRT-LLM backend: stages fetch -> convert -> build -> layout (-> push), for one LMI release.

Compiler boundary: the `trtllm-build` executable (trtllm/build.py); everything else runs anywhere. What
differs between LMI releases (flags, architecture names, layout, properties, defaults) comes from the
job's target (configs/targets.json), never from a version test here.
"""

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from lmi_compile import __version__
from lmi_compile.errors import STANDIN_MARK, BadInput
from lmi_compile.lmi.targets import Target, releases, resolve as resolve_target
from lmi_compile.model.architectures import resolve
from lmi_compile.model.config import read_json
from lmi_compile.model.limits import check_sequence_length
from lmi_compile.pipeline import observe, stages
from lmi_compile.pipeline.diskspace import ensure_room, tree_bytes
from lmi_compile.pipeline.workdir import (RUN_ONLY, Job, check_until, finish_layout, fresh_layout_staging,
                                          output_held, preflight_output)
from lmi_compile.remote import streaming
from lmi_compile.remote.stages import preflight_upload, push_stage, source_after
from lmi_compile.trtllm.build import BuildOptions, build_engines, check_interface, find_trtllm_build
from lmi_compile.trtllm.layout import DEFAULT_ENGINE_PATH, render_pbtxt, serving_properties, write_layout

log = logging.getLogger("lmi_compile")

STAGES = ("fetch", "convert", "build", "layout")


@dataclass(kw_only=True)
class TrtllmJob(Job):
    build: BuildOptions
    target: Target = field(default_factory=lambda: resolve_target("trtllm", None),
                           metadata={"as": "release", "flag": "--lmi-version"})
    tp: int = 1
    pp: int = 1
    dtype: str = field(default="auto", metadata={"filled": "auto"})  # auto: the checkpoint's, found in the convert
    parallel_embedding: bool = False
    embedding_sharding_dim: int = 0
    moe_tp: int | None = None
    moe_ep: int | None = None
    kv_cache_dtype: str = "auto"  # auto: the model dtype; fp8: FP8 KV cache (the checkpoint's k/v scales if stored)
    workers: int = field(default_factory=lambda: max(1, min(8, os.cpu_count() or 1)), metadata=RUN_ONLY)
    trtllm_build: str | None = field(default=None, metadata=RUN_ONLY)  # its version is checked against the target
    # TensorRT-LLM's convert_checkpoint.py, for 4-bit GPTQ / AWQ (its version is checked against the target)
    trtllm_convert_script: str | None = field(default=None, metadata=RUN_ONLY)
    engine_path: str = DEFAULT_ENGINE_PATH


def check_target(target: Target, config) -> str:
    """What the target release can serve, from config.json alone (before any download): the architecture
    under the name its TensorRT-LLM knows (returned), and the rope scaling its attention supports."""
    tool = target["tool"]
    arch = resolve(config)
    entry = tool["architectures"].get(arch.name, {})
    if "name" not in entry:
        why = entry.get("unsupported", f"TensorRT-LLM {tool['version']} does not know {arch.name}")
        raise BadInput(f"{config.path}: {arch.name} cannot be served by {target.describe()}: {why}; "
                       f"{_first_release(arch.name, lambda t: 'name' in t['architectures'].get(arch.name, {}))}")
    kind = (config.rope_scaling or {}).get("rope_type") or (config.rope_scaling or {}).get("type")
    if kind and kind not in tool["rope_scaling_types"]:
        raise BadInput(f"{config.path}: {kind} rope scaling is not supported by TensorRT-LLM {tool['version']} "
                       f"({target.describe()}); "
                       f"{_first_release(arch.name, lambda t: kind in t['rope_scaling_types'])}")
    return entry["name"]


KV_CACHE_DTYPES = {"auto": None, "fp8": "FP8", "int8": "INT8"}


def check_quantization(job: TrtllmJob, config) -> tuple:
    """(the checkpoint's Quantization, the KV-cache quant algo or None), refused (BadInput) unless the target's
    TensorRT-LLM reads both (configs/targets.json toolchains -> quantization). From config.json alone where the
    scheme is declared there, so before any download."""
    from lmi_compile.model.quantization import INT8_KV, read_quantization

    if job.kv_cache_dtype not in KV_CACHE_DTYPES:
        raise BadInput(f"--kv-cache-dtype {job.kv_cache_dtype!r}: use {', '.join(KV_CACHE_DTYPES)}")
    kv = KV_CACHE_DTYPES[job.kv_cache_dtype]
    if kv == "INT8":
        raise BadInput(f"--kv-cache-dtype int8: {INT8_KV}")
    quant = read_quantization(config)
    tool = job.target["tool"]
    facts = tool.get("quantization", {})
    if quant.external:  # 4-bit: what the target's own convert_checkpoint.py reads decides
        from lmi_compile.trtllm.convert_script import check_scheme

        check_scheme(job.target, config, quant, _first_release)
    weights = None if quant.external else quant.quant_algo
    for algo, key, what in ((weights, "quant_algos", f"{quant.quant_algo} weights"),
                            (kv, "kv_cache_quant_algos", f"an {kv} KV cache")):
        if algo and algo not in facts.get(key, ()):
            raise BadInput(f"{config.path}: {what} cannot be served by {job.target.describe()}: TensorRT-LLM "
                           f"{tool['version']} has no {algo} (tensorrt_llm/quantization/mode.py); "
                           f"{_first_release(algo, lambda t: algo in t.get('quantization', {}).get(key, ()))}")
    if quant.quant_algo and not quant.external and resolve(config).is_moe and \
            quant.quant_algo not in facts.get("moe_quant_algos", ()):
        algo = quant.quant_algo
        first = _first_release(algo, lambda t: algo in t.get("quantization", {}).get("moe_quant_algos", []))
        raise BadInput(f"{config.path}: {algo} experts cannot be served by {job.target.describe()}: the MoE layer of "
                       f"TensorRT-LLM {tool['version']} has no {algo} (tensorrt_llm/layers/moe.py); {first}")
    quant.require_converted()
    return quant, kv


def check_gpus(job: TrtllmJob, tool, quant, kv) -> None:
    """FP8 engines need the GPU architecture that runs FP8 (configs/targets.json trtllm -> quantization_gpus):
    refuse a build on older GPUs that nvidia-smi shows, warn when it shows none."""
    from lmi_compile.lmi.targets import table

    needs = table()["trtllm"]["quantization_gpus"]
    for key in [k for k in (quant.quant_algo, f"kv_{kv}" if kv else None) if k and k in needs]:
        need = needs[key]
        floor = _capability(need["min_compute_capability"])
        what = "an FP8 KV cache" if key.startswith("kv_") else f"{key} weights"
        if not tool.gpus:
            log.warning("build: %s need %s (compute capability %s or later); nvidia-smi shows no GPU here, so build "
                        "where you will serve", what, need["gpus"], need["min_compute_capability"])
            continue
        old = [g for g in tool.gpus if _capability(g.get("compute_capability", "0")) < floor]
        if old:
            g = old[0]
            raise BadInput(f"{what} need {need['gpus']} (compute capability {need['min_compute_capability']} or "
                           f"later), but this host's GPU is {g['name']} ({g.get('compute_capability')}); build and serve "
                           f"on such a GPU, or convert from the unquantized model with --kv-cache-dtype auto")


def _capability(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in str(text).split("."))
    except ValueError:
        return (0,)


def _first_release(arch: str, serves) -> str:
    ok = [r for r in releases("trtllm") if serves(resolve_target("trtllm", r)["tool"])]
    return f"the first LMI release that can is {ok[0]} (--lmi-version {ok[0]})" if ok else "no LMI release can"


def rowwise_options(tool) -> dict:
    """ConvertOptions for per-channel FP8 from the toolchain row (quantization -> fp8_rowwise); {} where the target's
    TensorRT-LLM has none (check_quantization has refused such checkpoints already)."""
    from lmi_compile.converters.trtllm_checkpoint import RowwiseLayout

    rowwise = tool.get("quantization", {}).get("fp8_rowwise")
    if not rowwise:
        return {}
    return {"rowwise_layouts": tuple(RowwiseLayout(tuple(x["linears"]), x["skip_edge_layers"],
                                                   tuple(sorted(x.get("config", {}).items())))
                                     for x in rowwise["layouts"])}


def convert_stage(job: TrtllmJob, model, architecture: str, stream=None) -> tuple[Path, str]:
    """`stream`: the model is still downloading (remote/streaming.py); tensors are read as they land and the
    stage is recorded only once the fetch has verified every byte."""
    from lmi_compile.converters.trtllm_checkpoint import ConvertOptions, check_parallelism, convert

    arch = resolve(model.config)
    tool = job.target["tool"]
    opts = ConvertOptions(tp=job.tp, pp=job.pp, dtype=job.dtype, parallel_embedding=job.parallel_embedding,
                          embedding_sharding_dim=job.embedding_sharding_dim, workers=job.workers,
                          architecture=architecture, moe_tp=job.moe_tp, moe_ep=job.moe_ep,
                          moe_config_style=tool["moe_config_style"],
                          kv_cache_quant_algo=KV_CACHE_DTYPES.get(job.kv_cache_dtype),
                          kv_cache_scale=tool.get("quantization", {}).get("kv_cache_scale", "max"),
                          **rowwise_options(tool))
    check_parallelism(arch, opts, model.config.path)
    fp = stages.fingerprint(files=model.checkpoint.identity(), root=str(model.root.resolve()),
                            config=model.config.raw, tp=job.tp, pp=job.pp, dtype=job.dtype,
                            parallel_embedding=job.parallel_embedding, sharding_dim=job.embedding_sharding_dim,
                            architecture=architecture, moe=(opts.moe_split(), opts.moe_config_style),
                            kv_cache=(opts.kv_cache_quant_algo, opts.kv_cache_scale),
                            rowwise=opts.rowwise_layouts)

    def work(staging: Path) -> dict:
        # rank files hold the model once, plus replicated embeddings and vocab padding: bounded by tp copies
        emb = model.checkpoint.tensors.get(arch.embedding_source)
        ensure_room(staging, model.checkpoint.total_bytes + (emb.nbytes * job.tp * job.pp if emb else 0), "convert")
        with streaming.unverified_output_discarded(stream, staging):
            cfg = convert(arch, model.config, model.checkpoint, staging, opts,
                          feed=stream.feed(model.checkpoint) if stream else None)
            if stream:
                stream.settle()  # recorded only once the fetch has verified every byte
        log.info("convert: %d rank file(s) ready", job.tp * job.pp)
        return {"tp": job.tp, "pp": job.pp, "dtype": cfg["dtype"]}

    stages.run(job.work.checkpoint, "convert", fp, work, force=job.force, resume=True)
    return job.work.checkpoint, fp


def external_convert_stage(job: TrtllmJob, model, quant, script: Path) -> tuple[Path, str]:
    """A 4-bit checkpoint converted by the target's own convert_checkpoint.py (trtllm/convert_script.py), recorded
    like our convert: the same folder, the same stage name, so build and layout follow unchanged."""
    from lmi_compile.trtllm import convert_script
    from lmi_compile.converters.trtllm_checkpoint import ConvertOptions, resolve_dtype

    f = convert_script.facts(job.target)
    dtype = job.dtype if job.dtype != "auto" or f.get("dtype_auto") else \
        resolve_dtype(ConvertOptions(dtype="auto"), model.config, model.checkpoint)
    world = job.tp * job.pp
    stat = script.stat()
    fp = stages.fingerprint(files=model.checkpoint.identity(), root=str(model.root.resolve()), config=model.config.raw,
                            tp=job.tp, pp=job.pp, dtype=dtype, script=(str(script), stat.st_size, stat.st_mtime_ns),
                            target=job.target["tool"]["version"], scheme=(quant.external, quant.group_size))
    log_path = job.work.logs / "convert_checkpoint.log"

    def work(staging: Path) -> dict:
        ensure_room(staging, model.checkpoint.total_bytes * 2, "convert")  # dequantized embeddings and lm_head
        cmd = convert_script.command(script, job.target, quant, model.root.resolve(), staging.resolve(), tp=job.tp,
                                     pp=job.pp, dtype=dtype, workers=max(1, min(job.workers, world)),
                                     weight_files=[p.name for p in model.checkpoint.files])
        convert_script.run(cmd, staging, world, log_path)
        cfg = convert_script.check_output(staging, world, log_path)
        return {"tp": job.tp, "pp": job.pp, "dtype": cfg["dtype"],
                "converter": {"script": str(script), "tensorrt_llm": job.target["tool"]["version"],
                              "scheme": quant.external, "stand_in": convert_script.is_standin(script) or
                              STANDIN_MARK in str(cfg.get("lmi_compile_standin", ""))}}

    stages.run(job.work.checkpoint, "convert", fp, work, force=job.force)
    return job.work.checkpoint, fp


def build_stage(job: TrtllmJob, tool, ckpt: Path, ckpt_fp: str) -> tuple[Path, dict]:
    fp = stages.fingerprint(checkpoint=ckpt_fp, build=dataclasses.asdict(job.build) | {"workers": None},
                            tool=str(tool.executable), target=job.target["tool"]["version"])

    def work(staging: Path) -> dict:
        ensure_room(staging, tree_bytes(ckpt), "build")  # engines are about the size of the checkpoint
        return {"build": build_engines(tool, ckpt, staging, job.build, job.work.logs, job.target)}

    return job.work.engines, stages.run(job.work.engines, "build", fp, work, force=job.force)["build"]


def layout_stage(job: TrtllmJob, model, engines: Path, build: dict, dtype: str, converter: dict | None = None) -> Path:
    out = job.output
    layout = job.target["layout"]
    staging = fresh_layout_staging(out, overwrite=job.overwrite)
    if os.stat(engines).st_dev != os.stat(stages.existing_parent(out)).st_dev:  # hard links need one filesystem
        ensure_room(out, tree_bytes(engines), "layout")
    manifest = {
        "tool": "lmi-compile", "tool_version": __version__, "backend": "tensorrt-llm", "layout": layout,
        "container": job.target["container"],
        "model": job.model, "revision": job.revision, "tensor_parallel_degree": job.tp,
        "pipeline_parallel_degree": job.pp, "dtype": dtype,
        "quantization": (read_json(engines / "config.json").get("pretrained_config") or {}).get("quantization"),
        # who wrote the checkpoint: lmi-compile or TensorRT-LLM's convert_checkpoint.py (4-bit; in tests a stand-in)
        "checkpoint_converter": converter or {"tool": "lmi-compile"},
        **build,
        # this layout's release, not the build record's: engines built for 0.30 are kept for 0.32 (one TensorRT-LLM)
        "lmi_version": job.target.release,
    }
    props = serving_properties(job, build, dtype, job.upload, job.target)
    pbtxt = None
    if job.target["pbtxt"]:
        window = model.config.raw.get("sliding_window")
        seq = build["build_options"]["max_seq_len"]
        pbtxt = render_pbtxt(job.target["pbtxt"], {
            "triton_max_batch_size": build["build_options"]["max_batch_size"], "engine_dir": job.engine_path,
            # a sliding window shorter than the sequence must reach the runtime, or attention sees too far back
            "max_attention_window_size": window if window and window < seq else ""})
    write_layout(layout, staging, engines, model.root, props, manifest, pbtxt=pbtxt)
    job.dtype = dtype  # as the convert found it: the layout's record keeps it for a rerun's pre-flight
    # the artifact's identity (push's content id): not where or with which executable it was built
    shaping = {k: v for k, v in manifest.items() if k not in ("build_command", "trtllm_build")}
    return finish_layout(staging, out, stages.fingerprint(**shaping, upload=job.upload), job,
                         stand_in=bool(build.get("stand_in") or (converter or {}).get("stand_in")), what="engines")


def run(job: TrtllmJob, until: str = "layout") -> Path:
    check_until(until, STAGES, job.output)
    if not job.engine_path.startswith("/"):  # config.pbtxt's gpt_model_path: read by the backend in the container
        raise BadInput(f"--engine-path {job.engine_path}: give the absolute path the engines have inside the serving "
                       f"container (default {DEFAULT_ENGINE_PATH}, where SageMaker puts model data), not a relative "
                       f"path or a URI")
    wants_build = STAGES.index(until) >= STAGES.index("build")
    b = job.build
    for flag, value in (("--max-batch-size", b.max_batch_size), ("--max-input-len", b.max_input_len),
                        ("--max-output-len", b.max_output_len), ("--max-num-tokens", b.max_num_tokens)):
        if value is not None and value < 1:
            raise BadInput(f"{flag} must be positive (got {value})")
    if b.seq_len is not None and b.seq_len <= b.max_input_len:
        raise BadInput(f"--max-seq-len {b.seq_len} must exceed --max-input-len {b.max_input_len} (it counts the "
                       f"prompt and the output)")
    log.info("target: %s, TensorRT-LLM %s, %s layout", job.target.describe(), job.target["tool"]["version"],
             job.target["layout"])
    for note in job.target.get("notes", []):
        log.warning("target: %s", note)
    # Pre-flight before any heavy work: output, upload and toolchain are checked now, not after the download.
    preflight_output(job.output if until == "layout" else None, overwrite=job.overwrite, work=job.work.root,
                     model=job.model)
    preflight_upload(job)
    tool = find_trtllm_build(job.trtllm_build) if wants_build else None
    if tool:
        check_interface(tool, job.target)
        if not tool.gpus:
            log.warning("build: nvidia-smi sees no GPU; trtllm-build needs one of the architecture you will serve on")
    if until != "fetch":
        from lmi_compile.remote.peek import read_remote_config

        remote = read_remote_config(job.model, job.revision, job.token)[0]
        check_target(job.target, remote)  # before any download
        quant, kv = check_quantization(job, remote)
        if tool:
            check_gpus(job, tool, quant, kv)
        if quant.external:
            from lmi_compile.trtllm.convert_script import find_script

            job.trtllm_convert_script = str(find_script(job.trtllm_convert_script, job.target, quant))
    with job.work.locked():
        return _run(job, until, tool)


def _run(job: TrtllmJob, until: str, tool) -> Path:
    if job.handover_in:  # `lmi-compile batch`: fetch and convert ran on a CPU node (batch/handover.py)
        from lmi_compile.batch.handover import receive

        observe.stage("handover-fetch")
        model, ckpt, ckpt_fp = receive(job.handover_in, job.work, "convert", job.work.checkpoint)
        _check_model(job, tool, model)
        return _from_build(job, until, tool, model, ckpt, ckpt_fp)
    # An S3 model is converted while it downloads (remote/streaming.py); other sources are fetched first.
    observe.stage("fetch")
    with streaming.opened(job, until != "fetch") as stream:
        return _stages(job, until, tool, stream)


def _check_model(job: TrtllmJob, tool, model) -> tuple:
    """What the model itself must satisfy for this target and these lengths; (the architecture's TRT-LLM name,
    the checkpoint's Quantization)."""
    arch = resolve(model.config)  # unsupported architectures fail here
    architecture = check_target(job.target, model.config)
    quant, kv = check_quantization(job, model.config)  # again: ModelOpt's hf_quant_config.json arrives with the model
    if tool:
        check_gpus(job, tool, quant, kv)
    if job.build.seq_len is None:  # the release leaves it to TensorRT-LLM, which takes the model's length
        job.build = dataclasses.replace(job.build, max_seq_len=arch.dims.max_position_embeddings)
        if job.build.seq_len <= job.build.max_input_len:
            raise BadInput(f"{model.config.path}: --max-input-len {job.build.max_input_len} leaves no room for output "
                           f"in the model's {job.build.seq_len} positions; lower it or set --max-output-len")
    check_sequence_length(model.config, arch.dims, job.build.seq_len, allow_longer=job.allow_longer,
                          flag="--max-seq-len (prompt plus output)")
    return architecture, quant


def _stages(job: TrtllmJob, until: str, tool, stream) -> Path:
    model = streaming.first_model(job, stream)
    architecture, quant = _check_model(job, tool, model)
    if until == "fetch":
        return model.root
    observe.stage("convert")
    if quant.external:  # 4-bit: TensorRT-LLM's own script reads the whole, verified source folder
        from lmi_compile.trtllm.convert_script import find_script

        if stream:
            model = stream.settle()
        ckpt, ckpt_fp = external_convert_stage(job, model, quant, find_script(job.trtllm_convert_script, job.target,
                                                                              quant))
    else:
        ckpt, ckpt_fp = convert_stage(job, model, architecture, stream)
    model = source_after(job, stream, model, ckpt, "convert", last=until == "convert")
    if until == "convert":
        return ckpt
    return _from_build(job, until, tool, model, ckpt, ckpt_fp)


def _from_build(job: TrtllmJob, until: str, tool, model, ckpt: Path, ckpt_fp: str) -> Path:
    observe.stage("build")
    engines, build = build_stage(job, tool, ckpt, ckpt_fp)
    if until == "build":
        return engines
    record = stages.read_record(ckpt)
    dtype = record.get("dtype", job.dtype)
    observe.stage("layout")
    with output_held(job.output):  # the layout and its push: another run's layout into this folder waits
        out = layout_stage(job, model, engines, build, dtype, record.get("converter"))
        if job.upload:
            observe.stage("push")
        push_stage(out, job.upload, overwrite=job.overwrite)
    return out
