"""The TensorRT-LLM backend: stages fetch -> convert -> build -> layout (-> push).

Compiler boundary: the `trtllm-build` executable (see build_engines); everything else runs anywhere.
"""

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import stages
from .architectures import resolve
from .errors import BadInput
from .pipeline import WorkDir, fetch_stage

log = logging.getLogger("lmi_compile")

STAGES = ("fetch", "convert", "build", "layout")


@dataclass
class TrtllmJob:
    model: str
    work: WorkDir
    tp: int = 1
    pp: int = 1
    dtype: str = "auto"
    parallel_embedding: bool = False
    embedding_sharding_dim: int = 0
    workers: int = field(default_factory=lambda: max(1, min(8, os.cpu_count() or 1)))
    revision: str | None = None
    token: str | None = None
    trust_remote_code: bool = False
    force: bool = False


def convert_stage(job: TrtllmJob, model) -> Path:
    from .converters.trtllm_checkpoint import ConvertOptions, check_parallelism, convert

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
        return final
    staging = stages.staging_dir(final)
    cfg = convert(arch, model.config, model.checkpoint, staging, opts)
    stages.finish(staging, final, "convert", fp, tp=job.tp, pp=job.pp, dtype=cfg["dtype"])
    log.info("convert: wrote %d rank file(s) to %s", job.tp * job.pp, final)
    return final


def run(job: TrtllmJob, until: str = "layout") -> Path:
    if until not in STAGES:
        raise BadInput(f"--until {until!r} is not a stage; use one of {', '.join(STAGES)}")
    model = fetch_stage(job.model, job.work, revision=job.revision, token=job.token,
                        trust_remote_code=job.trust_remote_code)
    resolve(model.config)  # unsupported architectures fail here, before any heavy work
    if until == "fetch":
        return model.root
    ckpt = convert_stage(job, model)
    if until == "convert":
        return ckpt
    raise BadInput(f"--until {until}: the {until} stage needs the TensorRT-LLM build stage, not available yet")
