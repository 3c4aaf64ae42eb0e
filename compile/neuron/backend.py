"""The Neuron backend: stages fetch -> split -> compile -> layout (-> push), for one target LMI release.

Compiler boundary: the compile entry point (`python -m lmi_compile.neuron_entry`, neuron/entry.py), run as a
subprocess with absolute paths. It makes the calls neuron/calls.py derives from the target release's row in
configs/targets.json, so the graphs are the ones that release's loader looks up.
"""

import json
import logging
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from lmi_compile import __version__
from lmi_compile.errors import STANDIN_MARK, BadInput, LmiCompileError
from lmi_compile.lmi import targets
from lmi_compile.model.architectures import resolve
from lmi_compile.neuron.calls import LMI_TO_AMP, LoaderCalls, loader_calls
from lmi_compile.neuron.entry import EXIT_NO_SDK
from lmi_compile.neuron.layout import FORMATS, write_layout
from lmi_compile.model.limits import check_sequence_length
from lmi_compile.pipeline import observe, stages
from lmi_compile.pipeline.diskspace import ensure_room
from lmi_compile.pipeline.tool import python_module
from lmi_compile.pipeline.workdir import (RUN_ONLY, Job, check_until, finish_layout, fresh_layout_staging,
                                          output_held, preflight_output)
from lmi_compile.remote import streaming
from lmi_compile.remote.stages import preflight_upload, push_stage, source_after

log = logging.getLogger("lmi_compile")

STAGES = ("fetch", "split", "compile", "layout")
# NeuronCore counts an instance offers transformers-neuronx to shard over (inf2: 2 per chip, up to 24; trn1:
# up to 32). Heads need not divide it: transformers-neuronx pads the heads to a multiple of tp
# (aws-neuron/transformers-neuronx@release-2.21:src/transformers_neuronx/utils.py, get_qkv_padding).
VALID_TP = (1, 2, 4, 8, 16, 24, 32)
DEFAULT_MAX_N_POSITIONS = 4096


@dataclass(kw_only=True)
class NeuronJob(Job):
    n_positions: int | None = None  # default: the model's max_position_embeddings, at most 4096
    tp: int = 2
    batch_size: int = 4
    amp: str | None = None  # default: the target release's default dtype
    context_length_estimate: list[int] = field(default_factory=list)
    format: str = "optimum"
    neuron_cache: Path | None = field(default=None, metadata=RUN_ONLY)
    # command prefix; default: this Python's lmi_compile.neuron_entry
    compile_entry: str | None = field(default=None, metadata=RUN_ONLY)
    source_kind: str = field(default="local", metadata=RUN_ONLY)  # follows from the model
    lmi_version: str | None = None  # default: the newest supported release


def check_settings(job: NeuronJob, target) -> None:
    """What can be refused before anything is fetched."""
    if job.format not in FORMATS:
        raise BadInput(f"--format {job.format!r}; use one of {', '.join(FORMATS)}")
    if job.format not in target["layouts"]:
        raise BadInput(f"--format {job.format}: {target.describe()} does not load it; use --format "
                       f"{' or '.join(target['layouts'])}")
    if job.format == "split" and job.upload:
        raise BadInput("--format split with --upload: LMI never loads graphs from an S3 option.compiled_graph_path "
                       "(0.26 ignores it, 0.27 fails, 0.28+ skip it and recompile); use --format optimum to deploy "
                       "from S3, or deploy the split layout as model data (/opt/ml/model)")
    if job.amp not in ("f16", "bf16", "f32"):
        raise BadInput(f"--amp {job.amp!r}; use f16, bf16 or f32")
    if job.batch_size < 1:
        raise BadInput(f"--batch-size must be positive (got {job.batch_size})")
    if job.tp not in VALID_TP:
        raise BadInput(f"--tp {job.tp} is not a NeuronCore count transformers-neuronx shards over; use one of "
                       f"{', '.join(map(str, VALID_TP))}")


def validate(job: NeuronJob, arch, config, target) -> LoaderCalls:
    """Check the settings against the model and the target release; the calls its loader will make."""
    d, where = arch.dims, config.path
    check_settings(job, target)
    if d.num_heads % job.tp:
        log.info("tp %d does not divide %d attention heads: transformers-neuronx pads them to %d", job.tp,
                 d.num_heads, -(-d.num_heads // job.tp) * job.tp)
    if job.n_positions < 1:
        raise BadInput(f"--n-positions must be positive (got {job.n_positions})")
    check_sequence_length(config, d, job.n_positions, allow_longer=job.allow_longer, flag="--n-positions")
    for c in job.context_length_estimate:
        if not 0 < c <= job.n_positions:
            raise BadInput(f"--context-length-estimate {c} must be between 1 and --n-positions {job.n_positions}")
    try:
        return loader_calls(target, arch.name, batch_size=job.batch_size, tp=job.tp, n_positions=job.n_positions,
                            amp=job.amp, context_length_estimate=job.context_length_estimate, layout=job.format)
    except BadInput as e:
        raise BadInput(f"{where}: {e}") from None


def check_dense(config) -> None:
    """transformers-neuronx loads dense float weights and quantizes (int8) itself at load time
    (aws-neuron/transformers-neuronx@release-2.21:src/transformers_neuronx/module.py l.434-460 load_state_dict_dir
    reads the HF tensors as they are; config.py l.29 QuantizationConfig, passed as NeuronConfig(quant=...) l.206,
    quantizes them), so a pre-quantized
    checkpoint would be split as if its FP8 / int4 tensors and scales were float weights: refused."""
    from lmi_compile.model.quantization import declared_scheme

    declared = declared_scheme(config)
    if declared:
        method, where = declared
        raise BadInput(f"{where}: a {method}-quantized checkpoint cannot be compiled for Neuron: transformers-neuronx "
                       f"reads dense float16/bfloat16 weights only; compile the unquantized model it was made from")


def entry_prefix(job: NeuronJob) -> list[str]:
    """The compile entry command; a relative script path in it is made absolute (it must not depend on a cwd)."""
    if not job.compile_entry:
        return python_module("lmi_compile.neuron_entry")
    out = []
    for tok in shlex.split(job.compile_entry):
        p = Path(tok)
        if not p.is_absolute() and (os.sep in tok or tok.endswith(".py")) and p.is_file():
            tok = str(p.resolve())
        out.append(tok)
    return out


def preflight_sdk(job: NeuronJob, target) -> dict:
    """Ask the compile entry point whether it can run here (the SDK imports) and which transformers-neuronx
    it has, before anything is fetched or split: graphs from another version carry other hashes."""
    proc = subprocess.run([*entry_prefix(job), "--check-sdk"], capture_output=True, text=True, check=False)
    lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    if proc.returncode == EXIT_NO_SDK:
        tail = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "")
        raise LmiCompileError(f"Neuron compile unavailable: {tail.removeprefix('error: ')} (or stop earlier with "
                              f"--until split)")
    try:
        facts = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    except (ValueError, IndexError):
        facts = None
    if not isinstance(facts, dict):
        raise LmiCompileError(f"the compile entry point failed its --check-sdk (exit {proc.returncode}): "
                              f"{(lines[-1] if lines else '(no output)')[:300]}")
    have, want = str(facts.get("transformers_neuronx")), target["transformers_neuronx"]
    if STANDIN_MARK not in have and have.split("+")[0] != want:
        raise LmiCompileError(f"transformers-neuronx {have} is installed where the compile runs, but "
                              f"{target.describe()} loads graphs made by {want} (graph names are hashes that "
                              f"differ between versions); run in {target['container']}, or pass the --lmi-version "
                              f"of the container you run in")
    return facts


def split_stage(job: NeuronJob, model, arch, stream=None) -> tuple[Path, str]:
    """`stream`: the model is still downloading (remote/streaming.py); tensors are read as they land and the
    stage is recorded only once the fetch has verified every byte."""
    from lmi_compile.converters.neuron_split import write_split

    fp = stages.fingerprint(files=model.checkpoint.identity(), root=str(model.root.resolve()),
                            config=model.config.raw, amp=job.amp)

    def work(staging: Path) -> dict:
        ensure_room(staging, model.checkpoint.total_bytes * (2 if job.amp == "f32" else 1), "split")
        with streaming.unverified_output_discarded(stream, staging):
            write_split(arch, model.checkpoint, staging, job.amp, workers=max(1, min(4, os.cpu_count() or 1)),
                        feed=stream.feed(model.checkpoint) if stream else None)
            if stream:
                stream.settle()  # recorded only once the fetch has verified every byte
        shutil.copy2(model.root / "config.json", staging / "config.json")
        return {"amp": job.amp}

    # Not synced, as the split files are not (torch.save): from S3 on the 16-core host the record's fsync waited
    # 1.2-1.5 s for the fetched shards' writeback
    stages.run(job.work.split, "split", fp, work, force=job.force, resume=True, durable=False)
    return job.work.split, fp


def compile_command(job: NeuronJob, split: Path, out: Path, calls_file: Path, versions_file: Path) -> list[str]:
    return [*entry_prefix(job), "--split-dir", str(split.resolve()), "--output", str(out.resolve()),
            "--calls", str(calls_file.resolve()), "--versions-file", str(versions_file.resolve())]


def compile_stage(job: NeuronJob, calls: LoaderCalls, target, split: Path, split_fp: str) -> tuple[Path, dict]:
    settings = {"batch_size": job.batch_size, "tp_degree": job.tp, "n_positions": job.n_positions, "amp": job.amp,
                "context_length_estimate": job.context_length_estimate,
                "neuron_cc_flags": os.environ.get("NEURON_CC_FLAGS", "")}
    # The release too: its loader rebuilds the model with its own toolchain and arguments (neuron/check.py refuses
    # graphs recorded for another release), so graphs of one release are never kept for another.
    fp = stages.fingerprint(split=split_fp, settings=settings, calls=calls.to_json(), entry=job.compile_entry,
                            target=target.release)

    def work(staging: Path) -> dict:
        job.work.logs.mkdir(parents=True, exist_ok=True)
        log_path = job.work.logs / "neuron-compile.log"
        versions_file = job.work.root / ".neuron-versions.json"
        calls_file = job.work.root / ".neuron-calls.json"
        calls_file.write_text(json.dumps(calls.to_json(), indent=2) + "\n")
        env = dict(os.environ)
        if job.neuron_cache:
            env["NEURON_COMPILE_CACHE_URL"] = str(job.neuron_cache.resolve())
        cmd = compile_command(job, split, staging, calls_file, versions_file)
        log.info("compile: %s", " ".join(shlex.quote(c) for c in cmd))
        with open(log_path, "w") as logf:
            # A separate process: a compiler crash or OOM ends it, not the pipeline.
            proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, check=False)
        if proc.returncode != 0:
            lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
            tail = lines[-1] if lines else "(no output)"
            if proc.returncode == 3:
                raise LmiCompileError(f"Neuron compile unavailable: {tail.removeprefix('error: ')}")
            raise LmiCompileError(f"Neuron compile failed with exit code {proc.returncode}; see {log_path}: "
                                  f"{tail[:300]}")
        versions = json.loads(versions_file.read_text())
        if not list(staging.glob("*.neff")):
            raise LmiCompileError(f"Neuron compile exited 0 but wrote no .neff files; see {log_path}")
        if calls.sharded_weights and not ((staging / "config.json").is_file() and list(staging.glob("*.safetensors"))):
            raise LmiCompileError(f"Neuron compile exited 0 but save(sharded_weights=True) wrote no presharded weights "
                                  f"and config.json; see {log_path}")
        facts = {"versions": versions, "settings": settings, "lmi_version": target.release, "calls": calls.to_json(),
                 "stand_in": STANDIN_MARK in str(versions.get("neuronx_cc"))}
        if facts["stand_in"]:
            log.warning("compile: graphs came from a STAND-IN compile entry point: placeholders, not compiled NEFFs")
        return {"compile": facts}

    return job.work.compiled, stages.run(job.work.compiled, "compile", fp, work, force=job.force)["compile"]


def layout_stage(job: NeuronJob, target, calls: LoaderCalls, model, split: Path, compiled: Path, facts: dict) -> Path:
    out = job.output
    staging = fresh_layout_staging(out, overwrite=job.overwrite)
    rec = stages.read_record(model.root) or {}
    revision = rec.get("resolved") if job.source_kind == "hub" else None
    manifest = {"tool": "lmi-compile", "tool_version": __version__, "backend": "neuron", "format": job.format,
                "model": job.model, "revision": revision, **facts}
    write_layout(job, target, calls, staging, split, compiled, model.root, manifest, facts["versions"], revision)
    return finish_layout(staging, out, stages.fingerprint(**manifest, upload=job.upload), job,
                         stand_in=bool(facts.get("stand_in")), what="graphs")


def run(job: NeuronJob, until: str = "layout") -> Path:
    target = targets.resolve("neuron", job.lmi_version)
    job.lmi_version = target.release  # the default release by name, as its layout's record keeps it
    job.amp = job.amp or LMI_TO_AMP[target["dtype_default"]]
    check_settings(job, target)
    log.info("target: %s, transformers-neuronx %s, neuronx-cc %s, %s format, amp %s", target.describe(),
             target["transformers_neuronx"], target["neuronx_cc"], job.format, job.amp)
    check_until(until, STAGES, job.output)
    preflight_output(job.output if until == "layout" else None, overwrite=job.overwrite, work=job.work.root,
                     model=job.model)
    preflight_upload(job)
    if STAGES.index(until) >= STAGES.index("compile"):
        preflight_sdk(job, target)
    if until != "fetch":
        from lmi_compile.remote.peek import read_remote_config

        check_dense(read_remote_config(job.model, job.revision, job.token)[0])  # before any download
    with job.work.locked():
        return _run(job, until, target)


def _run(job: NeuronJob, until: str, target) -> Path:
    if job.handover_in:  # `lmi-compile batch`: fetch and split ran on a CPU node (batch/handover.py)
        from lmi_compile.batch.handover import receive

        observe.stage("handover-fetch")
        model, split, split_fp = receive(job.handover_in, job.work, "split", job.work.split)
        return _from_compile(job, until, target, model, _calls(job, model, target)[1], split, split_fp)
    # An S3 model is split while it downloads (remote/streaming.py); other sources are fetched first.
    observe.stage("fetch")
    with streaming.opened(job, until != "fetch") as stream:
        return _stages(job, until, target, stream)


def _stages(job: NeuronJob, until: str, target, stream) -> Path:
    model = streaming.first_model(job, stream)
    arch, calls = _calls(job, model, target)
    if until == "fetch":
        return model.root
    check_dense(model.config)  # what was fetched, as well as what the peek read
    observe.stage("split")
    split, split_fp = split_stage(job, model, arch, stream)
    model = source_after(job, stream, model, split, "split", last=until == "split")
    if until == "split":
        return split
    return _from_compile(job, until, target, model, calls, split, split_fp)


def _calls(job: NeuronJob, model, target):
    arch = resolve(model.config)
    if job.n_positions is None:
        job.n_positions = min(DEFAULT_MAX_N_POSITIONS, arch.dims.max_position_embeddings)
    return arch, validate(job, arch, model.config, target)


def _from_compile(job: NeuronJob, until: str, target, model, calls: LoaderCalls, split: Path, split_fp: str) -> Path:
    observe.stage("compile")
    compiled, facts = compile_stage(job, calls, target, split, split_fp)
    if until == "compile":
        return compiled
    observe.stage("layout")
    with output_held(job.output):  # the layout and its push: another run's layout into this folder waits
        out = layout_stage(job, target, calls, model, split, compiled, facts)
        if job.upload:
            observe.stage("push")
        push_stage(out, job.upload, overwrite=job.overwrite)
    return out
