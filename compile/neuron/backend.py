"""The Neuron backend: stages fetch -> split -> compile -> layout (-> push).

Compiler boundary: the compile entry point (`python -m lmi_compile.neuron_entry`, neuron/entry.py), run as a subprocess.
"""

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lmi_compile import __version__
from lmi_compile.pipeline import stages
from lmi_compile.model.architectures import resolve
from lmi_compile.pipeline.diskspace import ensure_room
from lmi_compile.errors import BadInput, STANDIN_MARK, LmiCompileError
from lmi_compile.neuron.layout import FORMATS, write_layout
from lmi_compile.model.limits import check_sequence_length
from lmi_compile.pipeline.workdir import WorkDir, check_until, finish_layout, fresh_layout_staging, preflight_output
from lmi_compile.remote.stages import fetch_stage, preflight_upload, push_stage

log = logging.getLogger("lmi_compile")

STAGES = ("fetch", "split", "compile", "layout")
# NeuronCore counts transformers-neuronx shards over (inf2: 2 per chip, up to 24; trn1: up to 32).
VALID_TP = (1, 2, 4, 8, 16, 24, 32)
DEFAULT_MAX_N_POSITIONS = 4096


@dataclass
class NeuronJob:
    model: str
    work: WorkDir
    output: Path | None = None
    n_positions: int | None = None  # default: the model's max_position_embeddings, at most 4096
    tp: int = 2
    batch_size: int = 4
    amp: str = "bf16"
    context_length_estimate: list[int] = field(default_factory=list)
    format: str = "optimum"
    allow_longer: bool = False
    neuron_cache: Path | None = None
    compile_entry: str | None = None  # command prefix; default: this Python's lmi_compile.neuron_entry
    upload: str | None = None
    revision: str | None = None
    token: str | None = None
    trust_remote_code: bool = False
    overwrite: bool = False
    force: bool = False
    source_kind: str = "local"


def validate(job: NeuronJob, arch, config) -> None:
    d, where = arch.dims, config.path
    if job.amp not in ("f16", "bf16", "f32"):
        raise BadInput(f"--amp {job.amp!r}; use f16, bf16 or f32")
    if job.batch_size < 1:
        raise BadInput(f"--batch-size must be positive (got {job.batch_size})")
    if job.tp not in VALID_TP:
        raise BadInput(f"--tp {job.tp} is not a NeuronCore count transformers-neuronx shards over; use one of "
                       f"{', '.join(map(str, VALID_TP))}")
    if d.num_heads % job.tp:
        raise BadInput(f"{where}: num_attention_heads {d.num_heads} is not divisible by --tp {job.tp}")
    if job.n_positions < 1:
        raise BadInput(f"--n-positions must be positive (got {job.n_positions})")
    check_sequence_length(config, d, job.n_positions, allow_longer=job.allow_longer, flag="--n-positions")
    for c in job.context_length_estimate:
        if not 0 < c <= job.n_positions:
            raise BadInput(f"--context-length-estimate {c} must be between 1 and --n-positions {job.n_positions}")
    if job.format not in FORMATS:
        raise BadInput(f"--format {job.format!r}; use one of {', '.join(FORMATS)}")


def split_stage(job: NeuronJob, model, arch) -> tuple[Path, str]:
    from lmi_compile.converters.neuron_split import write_split

    fp = stages.fingerprint(files=model.checkpoint.identity(), root=str(model.root.resolve()),
                            config=model.config.raw, amp=job.amp)
    final = job.work.split
    if not job.force and stages.is_done(final, "split", fp):
        log.info("split: %s is up to date, skipping", final)
        return final, fp
    staging = stages.open_staging(final, fp)
    ensure_room(final, model.checkpoint.total_bytes * (2 if job.amp == "f32" else 1), "split")
    write_split(arch, model.checkpoint, staging, job.amp, workers=max(1, min(4, os.cpu_count() or 1)))
    shutil.copy2(model.root / "config.json", staging / "config.json")
    stages.finish(staging, final, "split", fp, amp=job.amp)
    log.info("split: wrote %s", final)
    return final, fp


def compile_command(job: NeuronJob, arch, split: Path, out: Path, versions_file: Path) -> list[str]:
    prefix = shlex.split(job.compile_entry) if job.compile_entry else [sys.executable, "-m", "lmi_compile.neuron_entry"]
    cmd = [*prefix, "--split-dir", str(split), "--output", str(out), "--model-class", arch.entry["neuron_class"],
           "--batch-size", str(job.batch_size), "--tp-degree", str(job.tp), "--n-positions", str(job.n_positions),
           "--amp", job.amp, "--versions-file", str(versions_file)]
    if job.context_length_estimate:
        cmd += ["--context-length-estimate", ",".join(map(str, job.context_length_estimate))]
    return cmd


def compile_stage(job: NeuronJob, arch, split: Path, split_fp: str) -> tuple[Path, dict]:
    settings = {"batch_size": job.batch_size, "tp_degree": job.tp, "n_positions": job.n_positions, "amp": job.amp,
                "context_length_estimate": job.context_length_estimate,
                "neuron_cc_flags": os.environ.get("NEURON_CC_FLAGS", "")}
    fp = stages.fingerprint(split=split_fp, settings=settings, entry=job.compile_entry)
    final = job.work.compiled
    if not job.force and stages.is_done(final, "compile", fp):
        log.info("compile: %s is up to date, skipping", final)
        return final, stages.read_record(final)["compile"]
    staging = stages.staging_dir(final)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    job.work.logs.mkdir(parents=True, exist_ok=True)
    log_path = job.work.logs / "neuron-compile.log"
    versions_file = job.work.root / ".neuron-versions.json"
    env = dict(os.environ)
    if job.neuron_cache:
        env["NEURON_COMPILE_CACHE_URL"] = str(job.neuron_cache)
    cmd = compile_command(job, arch, split, staging, versions_file)
    log.info("compile: %s", " ".join(shlex.quote(c) for c in cmd))
    with open(log_path, "w") as logf:
        # A separate process: a compiler crash or OOM ends it, not the pipeline.
        proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        tail = lines[-1] if lines else "(no output)"
        shutil.rmtree(staging, ignore_errors=True)
        if proc.returncode == 3:
            raise LmiCompileError(f"Neuron compile unavailable: {tail.removeprefix('error: ')}")
        raise LmiCompileError(f"Neuron compile failed with exit code {proc.returncode}; see {log_path}: {tail[:300]}")
    versions = json.loads(versions_file.read_text())
    if not list(staging.glob("*.neff")):
        raise LmiCompileError(f"Neuron compile exited 0 but wrote no .neff files; see {log_path}")
    facts = {"versions": versions, "settings": settings,
             "stand_in": STANDIN_MARK in str(versions.get("neuronx_cc"))}
    if facts["stand_in"]:
        log.warning("compile: graphs came from a STAND-IN compile entry point: placeholders, not compiled NEFFs")
    stages.finish(staging, final, "compile", fp, compile=facts)
    return final, facts


def layout_stage(job: NeuronJob, model, split: Path, compiled: Path, facts: dict) -> Path:
    out = job.output
    staging = fresh_layout_staging(out, overwrite=job.overwrite)
    rec = stages.read_record(model.root) or {}
    revision = rec.get("resolved") if job.source_kind == "hub" else None
    manifest = {"tool": "lmi-compile", "tool_version": __version__, "backend": "neuron", "format": job.format,
                "model": job.model, "revision": revision, **facts}
    write_layout(job, staging, split, compiled, model.root, manifest, facts["versions"], revision)
    return finish_layout(staging, out, stages.fingerprint(**manifest, upload=job.upload),
                         stand_in=bool(facts.get("stand_in")), what="graphs")


def run(job: NeuronJob, until: str = "layout") -> Path:
    if job.format not in FORMATS:
        raise BadInput(f"--format {job.format!r}; use one of {', '.join(FORMATS)}")
    check_until(until, STAGES, job.output)
    preflight_output(job.output if until == "layout" else None, overwrite=job.overwrite)
    preflight_upload(job.upload)
    with job.work.locked():
        return _run(job, until)


def _run(job: NeuronJob, until: str) -> Path:
    model = fetch_stage(job.model, job.work, revision=job.revision, token=job.token,
                        trust_remote_code=job.trust_remote_code)
    arch = resolve(model.config)
    if job.n_positions is None:
        job.n_positions = min(DEFAULT_MAX_N_POSITIONS, arch.dims.max_position_embeddings)
    validate(job, arch, model.config)
    if until == "fetch":
        return model.root
    split, split_fp = split_stage(job, model, arch)
    if until == "split":
        return split
    compiled, facts = compile_stage(job, arch, split, split_fp)
    if until == "compile":
        return compiled
    out = layout_stage(job, model, split, compiled, facts)
    push_stage(out, job.upload, overwrite=job.overwrite)
    return out
