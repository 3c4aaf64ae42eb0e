"""The TensorRT-LLM backend: stages fetch -> convert -> build -> layout (-> push), for one LMI release.

Compiler boundary: the `trtllm-build` executable (trtllm/build.py); everything else runs anywhere. What
differs between LMI releases (flags, architecture names, layout, properties, defaults) comes from the
job's target (configs/targets.json), never from a version test here.
"""

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lmi_compile import __version__
from lmi_compile.errors import BadInput
from lmi_compile.lmi.targets import Target, releases, resolve as resolve_target
from lmi_compile.model.architectures import resolve
from lmi_compile.model.limits import check_sequence_length
from lmi_compile.pipeline import stages
from lmi_compile.pipeline.diskspace import ensure_room, tree_bytes
from lmi_compile.pipeline.workdir import WorkDir, check_until, finish_layout, fresh_layout_staging, preflight_output
from lmi_compile.remote import streaming
from lmi_compile.remote.stages import fetch_stage, preflight_upload, push_stage
from lmi_compile.trtllm.build import BuildOptions, build_engines, check_interface, find_trtllm_build
from lmi_compile.trtllm.layout import DEFAULT_ENGINE_PATH, render_pbtxt, serving_properties, write_layout

log = logging.getLogger("lmi_compile")

STAGES = ("fetch", "convert", "build", "layout")


@dataclass
class TrtllmJob:
    model: str
    work: WorkDir
    build: BuildOptions
    target: Target = field(default_factory=lambda: resolve_target("trtllm", None))
    output: Path | None = None
    tp: int = 1
    pp: int = 1
    dtype: str = "auto"
    parallel_embedding: bool = False
    embedding_sharding_dim: int = 0
    moe_tp: int | None = None
    moe_ep: int | None = None
    workers: int = field(default_factory=lambda: max(1, min(8, os.cpu_count() or 1)))
    trtllm_build: str | None = None
    engine_path: str = DEFAULT_ENGINE_PATH
    allow_longer: bool = False
    upload: str | None = None
    revision: str | None = None
    token: str | None = None
    trust_remote_code: bool = False
    overwrite: bool = False
    force: bool = False


def check_target(job: TrtllmJob, config) -> str:
    """What the target release can serve, from config.json alone (before any download): the architecture
    under the name its TensorRT-LLM knows (returned), and the rope scaling its attention supports."""
    tool = job.target["tool"]
    arch = resolve(config)
    entry = tool["architectures"].get(arch.name, {})
    if "name" not in entry:
        why = entry.get("unsupported", f"TensorRT-LLM {tool['version']} does not know {arch.name}")
        raise BadInput(f"{config.path}: {arch.name} cannot be served by {job.target.describe()}: {why}; "
                       f"{_first_release(arch.name, lambda t: 'name' in t['architectures'].get(arch.name, {}))}")
    kind = (config.rope_scaling or {}).get("rope_type") or (config.rope_scaling or {}).get("type")
    if kind and kind not in tool["rope_scaling_types"]:
        raise BadInput(f"{config.path}: {kind} rope scaling is not supported by TensorRT-LLM {tool['version']} "
                       f"({job.target.describe()}); "
                       f"{_first_release(arch.name, lambda t: kind in t['rope_scaling_types'])}")
    return entry["name"]


def _first_release(arch: str, serves) -> str:
    ok = [r for r in releases("trtllm") if serves(resolve_target("trtllm", r)["tool"])]
    return f"the first LMI release that can is {ok[0]} (--lmi-version {ok[0]})" if ok else "no LMI release can"


def convert_stage(job: TrtllmJob, model, architecture: str, stream=None) -> tuple[Path, str]:
    """`stream`: the model is still downloading (remote/streaming.py); tensors are read as they land and the
    stage is recorded only once the fetch has verified every byte."""
    from lmi_compile.converters.trtllm_checkpoint import ConvertOptions, check_parallelism, convert

    arch = resolve(model.config)
    tool = job.target["tool"]
    opts = ConvertOptions(tp=job.tp, pp=job.pp, dtype=job.dtype, parallel_embedding=job.parallel_embedding,
                          embedding_sharding_dim=job.embedding_sharding_dim, workers=job.workers,
                          architecture=architecture, moe_tp=job.moe_tp, moe_ep=job.moe_ep,
                          moe_config_style=tool["moe_config_style"])
    check_parallelism(arch, opts, model.config.path)
    fp = stages.fingerprint(files=model.checkpoint.identity(), root=str(model.root.resolve()),
                            config=model.config.raw, tp=job.tp, pp=job.pp, dtype=job.dtype,
                            parallel_embedding=job.parallel_embedding, sharding_dim=job.embedding_sharding_dim,
                            architecture=architecture, moe=(opts.moe_split(), opts.moe_config_style))
    final = job.work.checkpoint
    if not job.force and stages.is_done(final, "convert", fp):
        log.info("convert: %s is up to date, skipping", final)
        return final, fp
    staging = stages.open_staging(final, fp)
    # rank files hold the model once, plus replicated embeddings and vocab padding: bounded by tp copies of them
    emb = model.checkpoint.tensors.get(arch.embedding_source)
    ensure_room(final, model.checkpoint.total_bytes + (emb.nbytes * job.tp * job.pp if emb else 0), "convert")
    cfg = convert(arch, model.config, model.checkpoint, staging, opts,
                  ready=(lambda sources: stream.ready(model.checkpoint, sources)) if stream else None)
    if stream:
        stream.settle()
    stages.finish(staging, final, "convert", fp, tp=job.tp, pp=job.pp, dtype=cfg["dtype"])
    log.info("convert: %d rank file(s) ready in %s", job.tp * job.pp, final)
    return final, fp


def build_stage(job: TrtllmJob, tool, ckpt: Path, ckpt_fp: str) -> tuple[Path, dict]:
    fp = stages.fingerprint(checkpoint=ckpt_fp, build=dataclasses.asdict(job.build) | {"workers": None},
                            tool=str(tool.executable), target=job.target["tool"]["version"])
    final = job.work.engines
    rec = stages.read_record(final)
    if not job.force and stages.is_done(final, "build", fp):
        log.info("build: %s is up to date, skipping", final)
        return final, rec["build"]
    staging = stages.staging_dir(final)
    shutil.rmtree(staging, ignore_errors=True)  # a half-built engine folder is never reused
    ensure_room(final, tree_bytes(ckpt), "build")  # engines are about the size of the checkpoint
    try:
        facts = build_engines(tool, ckpt, staging, job.build, job.work.logs, job.target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing of a failed build is reused: leave nothing behind
        raise
    stages.finish(staging, final, "build", fp, build=facts)
    return final, facts


def layout_stage(job: TrtllmJob, model, engines: Path, build: dict, dtype: str) -> Path:
    out = job.output
    layout = job.target["layout"]
    staging = fresh_layout_staging(out, overwrite=job.overwrite)
    if os.stat(engines).st_dev != os.stat(stages.existing_parent(out)).st_dev:  # hard links need one filesystem
        ensure_room(out, tree_bytes(engines), "layout")
    manifest = {
        "tool": "lmi-compile", "tool_version": __version__, "backend": "tensorrt-llm", "layout": layout,
        "lmi_version": job.target.release, "container": job.target["container"],
        "model": job.model, "revision": job.revision, "tensor_parallel_degree": job.tp,
        "pipeline_parallel_degree": job.pp, "dtype": dtype, **build,
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
    return finish_layout(staging, out, stages.fingerprint(**manifest, upload=job.upload),
                         stand_in=bool(build.get("stand_in")), what="engines")


def run(job: TrtllmJob, until: str = "layout") -> Path:
    check_until(until, STAGES, job.output)
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
    preflight_output(job.output if until == "layout" else None, overwrite=job.overwrite)
    preflight_upload(job.upload)
    tool = find_trtllm_build(job.trtllm_build) if wants_build else None
    if tool:
        check_interface(tool, job.target)
        if not tool.gpus:
            log.warning("build: nvidia-smi sees no GPU; trtllm-build needs one of the architecture you will serve on")
    if until != "fetch":
        from lmi_compile.remote.peek import read_remote_config

        check_target(job, read_remote_config(job.model, job.revision, job.token)[0])  # before any download
    with job.work.locked():
        return _run(job, until, tool)


def _run(job: TrtllmJob, until: str, tool) -> Path:
    # An S3 model is converted while it downloads (remote/streaming.py); other sources are fetched first.
    stream = None if until == "fetch" else streaming.start(job.model, job.work, revision=job.revision,
                                                           trust_remote_code=job.trust_remote_code)
    try:
        return _stages(job, until, tool, stream)
    finally:
        if stream:
            stream.close()


def _stages(job: TrtllmJob, until: str, tool, stream) -> Path:
    model = stream.model() if stream else fetch_stage(job.model, job.work, revision=job.revision, token=job.token,
                                                      trust_remote_code=job.trust_remote_code)
    arch = resolve(model.config)  # unsupported architectures fail here
    architecture = check_target(job, model.config)
    if job.build.seq_len is None:  # the release leaves it to TensorRT-LLM, which takes the model's length
        job.build = dataclasses.replace(job.build, max_seq_len=arch.dims.max_position_embeddings)
        if job.build.seq_len <= job.build.max_input_len:
            raise BadInput(f"{model.config.path}: --max-input-len {job.build.max_input_len} leaves no room for output "
                           f"in the model's {job.build.seq_len} positions; lower it or set --max-output-len")
    check_sequence_length(model.config, arch.dims, job.build.seq_len, allow_longer=job.allow_longer,
                          flag="--max-seq-len (prompt plus output)")
    if until == "fetch":
        return model.root
    ckpt, ckpt_fp = convert_stage(job, model, architecture, stream)
    if stream:
        model = stream.settle()  # the verified source folder, for the stages below
    if until == "convert":
        return ckpt
    engines, build = build_stage(job, tool, ckpt, ckpt_fp)
    if until == "build":
        return engines
    dtype = stages.read_record(ckpt).get("dtype", job.dtype)
    out = layout_stage(job, model, engines, build, dtype)
    push_stage(out, job.upload, overwrite=job.overwrite)
    return out
