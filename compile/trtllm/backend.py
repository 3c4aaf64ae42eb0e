"""The TensorRT-LLM backend: stages fetch -> convert -> build -> layout (-> push).

Compiler boundary: the `trtllm-build` executable (compile/trtllm_build.py); everything else runs anywhere.
"""

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lmi_compile import __version__
from lmi_compile.pipeline import stages
from lmi_compile.model.architectures import resolve
from lmi_compile.pipeline.diskspace import ensure_room, tree_bytes
from lmi_compile.errors import BadInput
from lmi_compile.trtllm.layout import DEFAULT_ENGINE_PATH, LAYOUTS, serving_properties, write_layout
from lmi_compile.pipeline.workdir import WorkDir, check_until, finish_layout, fresh_layout_staging
from lmi_compile.remote.stages import fetch_stage, preflight_upload, push_stage
from lmi_compile.trtllm.build import BuildOptions, build_engines, find_trtllm_build

log = logging.getLogger("lmi_compile")

STAGES = ("fetch", "convert", "build", "layout")


@dataclass
class TrtllmJob:
    model: str
    work: WorkDir
    output: Path | None = None
    tp: int = 1
    pp: int = 1
    dtype: str = "auto"
    parallel_embedding: bool = False
    embedding_sharding_dim: int = 0
    workers: int = field(default_factory=lambda: max(1, min(8, os.cpu_count() or 1)))
    build: BuildOptions = field(default_factory=BuildOptions)
    trtllm_build: str | None = None
    layout: str = "triton"
    engine_path: str = DEFAULT_ENGINE_PATH
    upload: str | None = None
    revision: str | None = None
    token: str | None = None
    trust_remote_code: bool = False
    overwrite: bool = False
    force: bool = False


def convert_stage(job: TrtllmJob, model) -> tuple[Path, str]:
    from lmi_compile.converters.trtllm_checkpoint import ConvertOptions, check_parallelism, convert

    arch = resolve(model.config)
    opts = ConvertOptions(tp=job.tp, pp=job.pp, dtype=job.dtype, parallel_embedding=job.parallel_embedding,
                          embedding_sharding_dim=job.embedding_sharding_dim, workers=job.workers)
    check_parallelism(arch, opts, model.config.path)
    fp = stages.fingerprint(files=model.checkpoint.identity(), root=str(model.root.resolve()),
                            config=model.config.raw, tp=job.tp, pp=job.pp, dtype=job.dtype,
                            parallel_embedding=job.parallel_embedding, sharding_dim=job.embedding_sharding_dim)
    final = job.work.checkpoint
    if not job.force and stages.is_done(final, "convert", fp):
        log.info("convert: %s is up to date, skipping", final)
        return final, fp
    staging = stages.open_staging(final, fp)
    # rank files hold the model once, plus replicated embeddings and vocab padding: bounded by tp copies of them
    emb = model.checkpoint.tensors.get(arch.embedding_source)
    ensure_room(final, model.checkpoint.total_bytes + (emb.nbytes * job.tp * job.pp if emb else 0), "convert")
    cfg = convert(arch, model.config, model.checkpoint, staging, opts)
    stages.finish(staging, final, "convert", fp, tp=job.tp, pp=job.pp, dtype=cfg["dtype"])
    log.info("convert: wrote %d rank file(s) to %s", job.tp * job.pp, final)
    return final, fp


def build_stage(job: TrtllmJob, tool, ckpt: Path, ckpt_fp: str) -> tuple[Path, dict]:
    fp = stages.fingerprint(checkpoint=ckpt_fp, build=job.build.__dict__ | {"workers": None},
                            tool=str(tool.executable))
    final = job.work.engines
    rec = stages.read_record(final)
    if not job.force and stages.is_done(final, "build", fp):
        log.info("build: %s is up to date, skipping", final)
        return final, rec["build"]
    staging = stages.staging_dir(final)
    shutil.rmtree(staging, ignore_errors=True)  # a half-built engine folder is never reused
    ensure_room(final, tree_bytes(ckpt), "build")  # engines are about the size of the checkpoint
    facts = build_engines(tool, ckpt, staging, job.build, job.work.logs)
    stages.finish(staging, final, "build", fp, build=facts)
    return final, facts


def layout_stage(job: TrtllmJob, model, engines: Path, build: dict, dtype: str) -> Path:
    out = job.output
    staging = fresh_layout_staging(out, overwrite=job.overwrite)
    if os.stat(engines).st_dev != os.stat(stages.existing_parent(out)).st_dev:  # hard links need one filesystem
        ensure_room(out, tree_bytes(engines), "layout")
    manifest = {
        "tool": "lmi-compile", "tool_version": __version__, "backend": "tensorrt-llm", "layout": job.layout,
        "model": job.model, "revision": job.revision, "tensor_parallel_degree": job.tp,
        "pipeline_parallel_degree": job.pp, "dtype": dtype, **build,
    }
    props = serving_properties(job, build, dtype, job.upload)
    write_layout(job.layout, staging, engines, model.root, props, manifest, batch_size=job.build.max_batch_size,
                 engine_path=job.engine_path)
    return finish_layout(staging, out, stages.fingerprint(**manifest, upload=job.upload),
                         stand_in=bool(build.get("stand_in")), what="engines")


def run(job: TrtllmJob, until: str = "layout") -> Path:
    if job.layout not in LAYOUTS:
        raise BadInput(f"--layout {job.layout!r}; use one of {', '.join(LAYOUTS)}")
    check_until(until, STAGES, job.output)
    wants_build = STAGES.index(until) >= STAGES.index("build")
    b = job.build
    if min(b.max_batch_size, b.max_input_len, b.max_output_len, b.max_num_tokens) < 1:
        raise BadInput("--max-batch-size, --max-input-len, --max-output-len and --max-num-tokens must be positive")
    if b.seq_len <= b.max_input_len:
        raise BadInput(f"--max-seq-len {b.seq_len} must exceed --max-input-len {b.max_input_len} (it counts the "
                       f"prompt and the output)")
    # Pre-flight before any heavy work: the toolchain is there, or we stop now, not after the download.
    preflight_upload(job.upload)
    tool = find_trtllm_build(job.trtllm_build) if wants_build else None
    if tool and not tool.gpus:
        log.warning("build: nvidia-smi sees no GPU; trtllm-build needs one of the architecture you will serve on")
    model = fetch_stage(job.model, job.work, revision=job.revision, token=job.token,
                        trust_remote_code=job.trust_remote_code)
    resolve(model.config)  # unsupported architectures fail here
    if until == "fetch":
        return model.root
    ckpt, ckpt_fp = convert_stage(job, model)
    if until == "convert":
        return ckpt
    engines, build = build_stage(job, tool, ckpt, ckpt_fp)
    if until == "build":
        return engines
    dtype = stages.read_record(ckpt).get("dtype", job.dtype)
    out = layout_stage(job, model, engines, build, dtype)
    push_stage(out, job.upload, overwrite=job.overwrite)
    return out
