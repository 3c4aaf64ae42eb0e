"""The `lmi-compile` command line: it only parses options and wires stages together."""

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmi_compile import __version__
from lmi_compile.errors import EXIT_SIGINT, Interrupted, LmiCompileError, os_error_text

log = logging.getLogger("lmi_compile")

app = typer.Typer(
    name="lmi-compile",
    help="Compile HuggingFace models ahead of time into the artifacts AWS LMI containers load "
         "(TensorRT-LLM engines, Neuron NEFFs), and publish them to S3.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# Option types shared by every command (same names and meanings everywhere, like the `hf` CLI).
Model = Annotated[str, typer.Argument(help="Hub repo id (org/name), s3://bucket/prefix/ or a local folder.",
                                      show_default=False)]
Revision = Annotated[Optional[str], typer.Option(help="Hub branch, tag or commit (Hub models only).")]
def _token(value: str | None) -> str | None:
    """`--token "$HF_TOKEN"` with the variable unset is no token (huggingface_hub would send an empty header)."""
    return value.strip() or None if value is not None else None


Token = Annotated[Optional[str], typer.Option(help="Hub token; defaults to HF_TOKEN or the huggingface-cli login.",
                                              show_default=False, callback=_token)]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code",
                                               help="Allow models that ship custom *.py code.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output that is not ours.")]
Output = Annotated[Optional[Path], typer.Option("--output", "-o", help="Where the LMI artifact tree is written.",
                                                show_default=False)]
Properties = Annotated[Optional[Path], typer.Option(
    "--properties", help="Read settings from an existing serving.properties (OPTION_* env vars also apply).",
    show_default=False)]
Upload = Annotated[Optional[str], typer.Option(
    "--upload", help="S3 prefix to publish the output to, verified (becomes option.model_id).", show_default=False)]
WorkDirOpt = Annotated[Optional[Path], typer.Option(
    "--work-dir", help="Stage folders, kept for resuming (default ./lmi-compile-work/NAME).", show_default=False)]
Force = Annotated[bool, typer.Option("--force", help="Redo every stage.")]
KeepSource = Annotated[bool, typer.Option("--keep-source/--no-keep-source", help=(
    "Keep the weights of a model fetched into the work dir once they are converted (trtllm) or split (neuron); "
    "--no-keep-source removes them then (config and tokenizer stay), so the work dir holds one copy. A rerun "
    "fetches them again where a stage needs them."))]
JsonOut = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
AllowLonger = Annotated[bool, typer.Option(
    "--allow-longer", help="Allow sequences above max_position_embeddings when the model's rope scaling covers it.")]
LmiVersion = Annotated[Optional[str], typer.Option(
    "--lmi-version", help="The LMI release the artifacts are for (its TensorRT-LLM / Neuron SDK, layout and options); "
                          "`lmi-compile targets` lists them. [default: the newest supported]", show_default=False)]
HandoverOut = Annotated[Optional[str], typer.Option(
    "--handover-out", hidden=True, help="lmi-compile batch: publish the CPU stages' output to this S3 prefix.")]
HandoverIn = Annotated[Optional[str], typer.Option(
    "--handover-in", hidden=True, help="lmi-compile batch: start from the CPU stages' output at this S3 prefix.")]
TensorParallel = Annotated[Optional[int], typer.Option("--tp", min=1, help="Tensor-parallel degree "
                                                        "(option.tensor_parallel_degree).", show_default=False)]


_VERBOSE = False


def _version(value: bool):
    if value:
        typer.echo(f"lmi-compile {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
):
    from lmi_compile.pipeline.progress import setup_logging

    global _VERBOSE
    _VERBOSE = verbose
    setup_logging(verbose)


@app.command(epilog="Example: lmi-compile fetch meta-llama/Llama-2-13b-hf --output models/llama-2-13b")
def fetch(
    model: Model,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Folder to download into (remote models).",
                                                   show_default=False)] = None,
    revision: Revision = None,
    token: Token = None,
    trust_remote_code: TrustRemoteCode = False,
    overwrite: Overwrite = False,
):
    """Download a model (Hub or S3) and check it against the LMI artifact rules; local folders are only checked."""
    import contextlib

    from lmi_compile.pipeline.workdir import output_held
    from lmi_compile.remote.fetch import fetch as run_fetch, parse_source

    source = parse_source(model, revision)
    if output is not None and source.kind == "local":
        log.warning("fetch: %s is a local folder, checked in place; --output %s is not used (nothing is copied)",
                    model, output)
    # two fetches into one folder take turns: the second then finds the first's (or fetches what changed since)
    with output_held(_abs(output)) if output is not None and source.kind != "local" else contextlib.nullcontext():
        validated = run_fetch(source, _abs(output), token=token, trust_remote_code=trust_remote_code,
                              overwrite=overwrite)
    ck = validated.checkpoint
    typer.echo(f"{validated.root}: {validated.config.architecture or 'unknown architecture'}, "
               f"{len(ck.tensors)} tensors in {len(ck.files)} {ck.format} file(s), {ck.total_bytes / 2**20:.1f} MiB")


@app.command(epilog="Example: lmi-compile push out/llama-2-13b-trtllm s3://my-bucket/models/llama-2-13b-trtllm/")
def push(
    folder: Annotated[Path, typer.Argument(help="The artifact folder to publish.", show_default=False)],
    uri: Annotated[str, typer.Argument(help="s3://bucket/prefix/ to publish to.", show_default=False)],
    overwrite: Overwrite = False,
    delete_local: Annotated[bool, typer.Option("--delete-local", help=(
        "After the upload is verified, delete the files it uploaded and the folders they leave empty (hidden files, "
        "which push skips, stay; lmi-compile's own records go)."))] = False,
    concurrency: Annotated[Optional[int], typer.Option(min=1, help=(
        "Parallel PUTs, one connection each (default: LMI_COMPILE_S3_CONNECTIONS, else two per core, 8 to 64)."),
                                                       show_default=False)] = None,
    part_size_mb: Annotated[Optional[int], typer.Option("--part-size-mb", min=5, help="Multipart part size in MiB "
                                                        "(default 64).", show_default=False)] = None,
):
    """Publish FOLDER to S3: checksummed, verified with HEAD, resumable, manifest written last."""
    from lmi_compile.remote.publish import push as run_push

    done = run_push(_abs(folder), uri, overwrite=overwrite, delete_local=delete_local, concurrency=concurrency,
                    part_size=part_size_mb * 1024 * 1024 if part_size_mb else None)
    if done.uploaded:
        typer.echo(f"published {done.objects} objects to {uri} ({done.uploaded} uploaded now, verified)")
    else:
        typer.echo(f"{uri} already holds these {done.objects} objects, verified; nothing changed")


class Settings:
    """The settings of one run: a flag wins, then serving.properties / OPTION_* values, then the default.
    Each pick is remembered with its source, so the run can say what it merged."""

    def __init__(self, properties: Path | None):
        from lmi_compile.lmi.properties import lmi_settings

        self.lmi = lmi_settings(properties)
        self.picked: dict[str, tuple[object, str]] = {}

    def pick(self, key: str, flag_value, default):
        if flag_value is not None:
            value, source = flag_value, "flag"
        elif key in self.lmi:
            value, source = self.lmi[key], "properties"
        else:
            value, source = default, "default"
        self.picked[key] = (value, source)
        return value

    def model(self, argument: str | None) -> str:
        from lmi_compile.errors import BadInput

        model = self.pick("model", argument, None)
        if not model:
            raise BadInput("no MODEL given (as an argument, option.model_id in --properties, or HF_MODEL_ID)")
        return model

    def log(self, command: str) -> None:
        shown = ", ".join(f"{k}={v} ({src})" for k, (v, src) in self.picked.items() if v is not None)
        log.info("%s settings: %s", command, shown)


def _abs(path: Path | None) -> Path | None:
    """Paths are made absolute once, at the edge: stages and subprocesses never depend on the current folder."""
    import os

    return Path(os.path.abspath(path.expanduser())) if path is not None else None


ModelOrProperties = Annotated[Optional[str], typer.Argument(
    help="Hub repo id, s3:// prefix or local folder (or option.model_id from --properties).", show_default=False)]


@app.command(epilog="Example: lmi-compile trtllm --tp 2 meta-llama/Llama-2-13b-hf --output out/llama-2-13b-trtllm")
def trtllm(
    model: ModelOrProperties = None,
    output: Output = None,
    tp: TensorParallel = None,
    pp: Annotated[Optional[int], typer.Option("--pp", min=1, help="Pipeline-parallel degree. [default: 1]",
                                              show_default=False)] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto (the checkpoint's), float16, bfloat16 or float32. "
                                                      "[default: auto]", show_default=False)] = None,
    lmi_version: LmiVersion = None,
    max_batch_size: Annotated[Optional[int], typer.Option("--max-batch-size", min=1, help=(
        "Engine batch size (option.max_rolling_batch_size). [default: LMI's for the release]"),
        show_default=False)] = None,
    max_input_len: Annotated[Optional[int], typer.Option("--max-input-len", min=1, help=(
        "Longest prompt (option.max_input_len). [default: LMI's for the release]"), show_default=False)] = None,
    max_output_len: Annotated[Optional[int], typer.Option("--max-output-len", min=1, help=(
        "Longest output, in tokens. [default: LMI's for the release]"), show_default=False)] = None,
    max_seq_len: Annotated[Optional[int], typer.Option("--max-seq-len", min=2, help=(
        "Prompt plus output. [default: max-input-len + max-output-len, or the model's length where the release "
        "leaves it to TensorRT-LLM]"), show_default=False)] = None,
    max_num_tokens: Annotated[Optional[int], typer.Option("--max-num-tokens", min=1, help=(
        "Tokens per engine step (option.max_num_tokens). [default: LMI's for the release]"),
        show_default=False)] = None,
    gemm_plugin: Annotated[str, typer.Option("--gemm-plugin", help="trtllm-build --gemm_plugin value.")] = "auto",
    trtllm_build_args: Annotated[Optional[str], typer.Option("--trtllm-build-args", help=(
        "More trtllm-build flags, passed through (quoted)."), show_default=False)] = None,
    trtllm_build_path: Annotated[Optional[str], typer.Option("--trtllm-build", help=(
        "The trtllm-build executable (default: from PATH)."), show_default=False)] = None,
    trtllm_convert_script: Annotated[Optional[str], typer.Option("--trtllm-convert-script", help=(
        "TensorRT-LLM's examples/llama/convert_checkpoint.py at the target's version: converts 4-bit GPTQ / AWQ "
        "checkpoints (lmi-compile does not pack 4-bit weights itself)."), show_default=False)] = None,
    build_workers: Annotated[Optional[int], typer.Option("--build-workers", min=1, help=(
        "trtllm-build --workers (default: min(GPUs, ranks))."), show_default=False)] = None,
    engine_path: Annotated[str, typer.Option("--engine-path", help=(
        "gpt_model_path in config.pbtxt (triton layout): where the engines are inside the serving container."))
    ] = "/opt/ml/model/tensorrt_llm/1",
    properties: Properties = None,
    upload: Upload = None,
    work_dir: WorkDirOpt = None,
    until: Annotated[str, typer.Option(help="Stop after this stage: fetch, convert, build or layout.")] = "layout",
    handover_out: HandoverOut = None,
    handover_in: HandoverIn = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help=(
        "Parallel rank writers in convert (default: CPU count, at most 8)."), show_default=False)] = None,
    parallel_embedding: Annotated[bool, typer.Option("--parallel-embedding", help=(
        "Split the embedding table across tp ranks."))] = False,
    embedding_sharding_dim: Annotated[int, typer.Option(min=0, max=1, help=(
        "0: split the vocab, 1: split the hidden dim."))] = 0,
    moe_tp: Annotated[Optional[int], typer.Option("--moe-tp", min=1, help=(
        "Mixture of experts: split every expert over this many ranks (moe_tp * moe_ep = tp). [default: tp]"),
        show_default=False)] = None,
    moe_ep: Annotated[Optional[int], typer.Option("--moe-ep", min=1, help=(
        "Mixture of experts: give each rank group whole experts, over this many groups. [default: 1]"),
        show_default=False)] = None,
    kv_cache_dtype: Annotated[str, typer.Option("--kv-cache-dtype", help=(
        "auto (the model dtype) or fp8 (FP8 KV cache, Ada or Hopper GPUs; the checkpoint's k/v scales where stored). "
        "int8 is refused: it needs calibration."))] = "auto",
    allow_longer: AllowLonger = False,
    revision: Revision = None,
    token: Token = None,
    trust_remote_code: TrustRemoteCode = False,
    overwrite: Overwrite = False,
    force: Force = False,
    keep_source: KeepSource = True,
):
    """Compile MODEL for TensorRT-LLM: fetch, convert to a rank-sharded TRT-LLM checkpoint, build engines
    with trtllm-build, and lay out the tree LMI loads with its serving.properties."""
    from lmi_compile.lmi.properties import reinterpret_lengths
    from lmi_compile.lmi.targets import resolve as resolve_target
    from lmi_compile.pipeline.workdir import WorkDir, default_work_dir
    from lmi_compile.trtllm.backend import TrtllmJob, run
    from lmi_compile.trtllm.build import BuildOptions, parse_extra_args

    s = Settings(properties)
    model = s.model(model)
    target = resolve_target("trtllm", lmi_version)
    s.lmi = reinterpret_lengths(s.lmi, target["properties"]["lengths"])
    d = target["defaults"]  # LMI's own defaults for this release
    build = BuildOptions(max_batch_size=s.pick("max_batch_size", max_batch_size, d["max_batch_size"]),
                         max_input_len=s.pick("max_input_len", max_input_len, d["max_input_len"]),
                         max_output_len=s.pick("max_output_len", max_output_len, d["max_output_len"]),
                         max_seq_len=s.pick("max_seq_len", max_seq_len, None),
                         max_num_tokens=s.pick("max_num_tokens", max_num_tokens, d["max_num_tokens"]),
                         gemm_plugin=gemm_plugin, workers=build_workers, extra_args=parse_extra_args(trtllm_build_args))
    job = TrtllmJob(model=model, work=WorkDir(work_dir or default_work_dir(model)), output=_abs(output),
                    target=target, tp=s.pick("tp", tp, 1), pp=s.pick("pp", pp, 1),
                    dtype=s.pick("dtype", dtype, "auto"), parallel_embedding=parallel_embedding,
                    embedding_sharding_dim=embedding_sharding_dim, moe_tp=moe_tp, moe_ep=moe_ep, build=build,
                    kv_cache_dtype=kv_cache_dtype, trtllm_build=trtllm_build_path,
                    trtllm_convert_script=str(_abs(Path(trtllm_convert_script))) if trtllm_convert_script else None,
                    engine_path=engine_path, upload=upload,
                    allow_longer=allow_longer, revision=s.pick("revision", revision, None), token=token,
                    trust_remote_code=trust_remote_code or s.lmi.get("trust_remote_code", False),
                    overwrite=overwrite, force=force, keep_source=keep_source, handover_out=handover_out,
                    handover_in=handover_in)
    if workers:
        job.workers = workers
    s.picked["lmi_version"] = (target.release, "flag" if lmi_version else "default")
    s.log("trtllm")
    out = run(job, until)
    typer.echo(f"{until}: {out}" + (f" (published to {upload})" if upload and until == "layout" else ""))


@app.command(epilog="Example: lmi-compile neuron --n-positions 4096 --tp 8 meta-llama/Llama-2-13b-hf --output out/llama-2-13b-neuron")
def neuron(
    model: ModelOrProperties = None,
    output: Output = None,
    n_positions: Annotated[Optional[int], typer.Option("--n-positions", min=1, help=(
        "Longest sequence (option.n_positions). [default: the model's max_position_embeddings, at most 4096]"),
        show_default=False)] = None,
    tp: TensorParallel = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help=(
        "Batch size compiled in (LMI's option.max_rolling_batch_size). [default: 4]"), show_default=False)] = None,
    amp: Annotated[Optional[str], typer.Option("--amp", help=(
        "f16, bf16 or f32 (option.dtype fp16/bf16/fp32). [default: the release's, fp16]"), show_default=False)] = None,
    lmi_version: LmiVersion = None,
    context_length_estimate: Annotated[Optional[str], typer.Option("--context-length-estimate", help=(
        "Context buckets, e.g. 1024,2048."), show_default=False)] = None,
    format: Annotated[str, typer.Option("--format", help=(
        "optimum (LMI's neuron format: compiled/ with presharded weights on 0.30+, checkpoint/ + compiled/ before) "
        "or split (split model + compiled graph, LMI 0.27+)."))] = "optimum",
    allow_longer: AllowLonger = False,
    neuron_cache: Annotated[Optional[Path], typer.Option("--neuron-cache", help=(
        "Compile cache to keep or reuse (NEURON_COMPILE_CACHE_URL)."), show_default=False)] = None,
    compile_entry: Annotated[Optional[str], typer.Option("--compile-entry", help=(
        "Command that compiles (default: python -m lmi_compile.neuron_entry)."), show_default=False)] = None,
    properties: Properties = None,
    upload: Upload = None,
    work_dir: WorkDirOpt = None,
    until: Annotated[str, typer.Option(help="Stop after this stage: fetch, split, compile or layout.")] = "layout",
    handover_out: HandoverOut = None,
    handover_in: HandoverIn = None,
    revision: Revision = None,
    token: Token = None,
    trust_remote_code: TrustRemoteCode = False,
    overwrite: Overwrite = False,
    force: Force = False,
    keep_source: KeepSource = True,
):
    """Compile MODEL for AWS Neuron (inf2/trn1): fetch, write split weights, compile NEFF graphs with
    transformers-neuronx, and lay out the tree LMI loads with its serving.properties."""
    from lmi_compile.errors import BadInput
    from lmi_compile.model.dtypes import DTYPE_AMPS
    from lmi_compile.neuron.backend import NeuronJob, run
    from lmi_compile.pipeline.workdir import WorkDir, default_work_dir
    from lmi_compile.remote.fetch import parse_source

    s = Settings(properties)
    model = s.model(model)
    lmi_amp = DTYPE_AMPS.get(s.lmi.get("dtype", ""))
    context_length_estimate = s.pick("context_length_estimate", context_length_estimate, None)
    try:
        buckets = [int(x) for x in context_length_estimate.split(",")] if context_length_estimate else []
    except ValueError:
        raise BadInput(f"--context-length-estimate {context_length_estimate!r}: use integers like 1024,2048") from None
    job = NeuronJob(model=model, work=WorkDir(work_dir or default_work_dir(model)), output=_abs(output),
                    n_positions=s.pick("n_positions", n_positions, None), tp=s.pick("tp", tp, 2),
                    batch_size=s.pick("max_batch_size", batch_size, 4), amp=amp or lmi_amp,
                    lmi_version=lmi_version,
                    context_length_estimate=buckets, format=format, allow_longer=allow_longer,
                    neuron_cache=_abs(neuron_cache), compile_entry=compile_entry, upload=upload,
                    revision=s.pick("revision", revision, None), token=token,
                    trust_remote_code=trust_remote_code or s.lmi.get("trust_remote_code", False),
                    overwrite=overwrite, force=force, source_kind=parse_source(model, revision).kind,
                    keep_source=keep_source, handover_out=handover_out, handover_in=handover_in)
    s.log("neuron")
    out = run(job, until)
    typer.echo(f"{until}: {out}" + (f" (published to {upload})" if upload and until == "layout" else ""))


@app.command(epilog="Example: lmi-compile check s3://my-bucket/models/llama-2-13b-trtllm/")
def check(
    location: Annotated[str, typer.Argument(help="A local folder or s3://bucket/prefix/.", show_default=False)],
    container_trtllm: Annotated[Optional[str], typer.Option("--container-trtllm", help=(
        "TensorRT-LLM version of the serving container."), show_default=False)] = None,
    container_neuronx_cc: Annotated[Optional[str], typer.Option("--container-neuronx-cc", help=(
        "neuronx-cc version of the serving container."), show_default=False)] = None,
    lmi_version: LmiVersion = None,
    json_out: JsonOut = False,
):
    """Say which LMI loading path LOCATION fits and what would stop it loading; exit 0 loadable, 1 not.
    Reads listings and small files only, never weights."""
    from lmi_compile.lmi.check import as_json, check as run_check, render

    report = run_check(location, container_trtllm=container_trtllm, container_neuronx_cc=container_neuronx_cc,
                       lmi_version=lmi_version)
    typer.echo(as_json(report) if json_out else render(report))
    if not report.loadable:
        raise typer.Exit(1)


@app.command(epilog="Example: lmi-compile plan meta-llama/Llama-2-70b-hf --tp 8 --instance ml.p4d.24xlarge")
def plan(
    model: Model,
    tp: Annotated[int, typer.Option("--tp", min=1, help="Tensor-parallel degree.")] = 1,
    pp: Annotated[int, typer.Option("--pp", min=1, help="Pipeline-parallel degree (TensorRT-LLM).")] = 1,
    dtype: Annotated[str, typer.Option(help="auto, float16, bfloat16 or float32.")] = "auto",
    instance: Annotated[Optional[str], typer.Option(help="SageMaker instance type, e.g. ml.g5.12xlarge.",
                                                    show_default=False)] = None,
    backend: Annotated[Optional[str], typer.Option(help=(
        "trtllm or neuron. [default: the --instance's kind (inf2/trn1: neuron), else the --lmi-version's backend, "
        "else trtllm]"), show_default=False)] = None,
    lmi_version: LmiVersion = None,
    max_batch_size: Annotated[Optional[int], typer.Option("--max-batch-size", min=1, help=(
        "Concurrent sequences (Neuron: the batch size). [default: LMI's for the release]"), show_default=False)] = None,
    max_seq_len: Annotated[Optional[int], typer.Option("--max-seq-len", min=1, help=(
        "Prompt plus output tokens (Neuron: n_positions). [default: LMI's for the release]"),
        show_default=False)] = None,
    revision: Revision = None,
    token: Token = None,
    json_out: JsonOut = False,
):
    """Size a compile before running it: parameters, bytes per rank, KV cache, fit on an instance, disk per stage.
    Reads only config.json (and the weight index); downloads no weights."""
    from lmi_compile.lmi.plan import as_json, plan_backend, plan_for, render
    from lmi_compile.remote.peek import read_remote_config

    backend = plan_backend(backend, instance, lmi_version)
    config, total = read_remote_config(model, revision, token)
    p = plan_for(backend, config, total, tp=tp, pp=pp, dtype=dtype, instance=instance, lmi_version=lmi_version,
                 max_batch_size=max_batch_size, max_seq_len=max_seq_len)
    typer.echo(as_json(p) if json_out else render(p))


@app.command(epilog="Example: lmi-compile targets --backend trtllm")
def targets(
    backend: Annotated[Optional[str], typer.Option(help="trtllm or neuron (default: both).", show_default=False)] = None,
    json_out: JsonOut = False,
):
    """List the LMI releases lmi-compile builds for: container, toolchain, layout and LMI's defaults."""
    import json

    from lmi_compile.lmi.targets import BACKENDS, default_release, releases, resolve

    chosen = [backend] if backend else list(BACKENDS)
    rows = {b: {r: resolve(b, r).facts for r in releases(b)} for b in chosen}
    if json_out:
        typer.echo(json.dumps({b: {"default": default_release(b), "releases": rows[b]} for b in chosen}, indent=2))
        return
    for b in chosen:
        typer.echo(f"{b} (default {default_release(b)}):")
        for r, f in rows[b].items():
            tool = f.get("tool", {}).get("version") or f.get("transformers_neuronx") or ""
            shown = ", ".join(f"{k}={v}" for k, v in (f.get("defaults") or {}).items() if v is not None)
            typer.echo(f"  {r:5} {f.get('container', ''):52} {tool:10} {str(f.get('layout', f.get('layouts', ''))):12} "
                       f"{shown}")


@app.command(epilog="Example: lmi-compile batch jobs.yaml --address auto --staging s3://my-bucket/lmi-compile-staging/")
def batch(
    jobs_file: Annotated[Path, typer.Argument(help=(
        "JOBS.yaml: `jobs:` (each: name, backend, model, the backend command's long options with _ for -, "
        "resources) and optional `defaults:`."), show_default=False)],
    address: Annotated[Optional[str], typer.Option(help=(
        "Ray cluster to join: auto, HOST:PORT or ray://HOST:10001. [default: start Ray embedded on this machine]"),
        show_default=False)] = None,
    staging: Annotated[Optional[str], typer.Option(help=(
        "s3://bucket/prefix/ that local model folders are published to first (a cluster's nodes do not see this "
        "disk)."), show_default=False)] = None,
    max_parallel: Annotated[Optional[int], typer.Option("--max-parallel", min=1, help=(
        "Jobs in flight at once. [default: as many as the cluster's resources allow]"), show_default=False)] = None,
    json_out: JsonOut = False,
):
    """Run many trtllm/neuron compile jobs on Ray, each on a node with its GPU type or NeuronCores; skip jobs
    already published, retry lost nodes, report per job. Exit 0 all done, 1 any failed, 2 bad JOBS file."""
    from lmi_compile.batch.driver import run_batch

    group = typer.main.get_command(app)
    code = run_batch(_abs(jobs_file), {b: group.commands[b] for b in ("trtllm", "neuron")}, address=address,
                     staging=staging, max_parallel=max_parallel, json_out=json_out)
    if code:
        raise typer.Exit(code)


def _usage_error(e: Exception) -> bool:
    # Typer vendors click in newer releases (typer._click), so match the class by name, not by import.
    return any(c.__name__ == "UsageError" for c in type(e).__mro__)


def main() -> None:
    import typer

    from lmi_compile import argvalues
    from lmi_compile.pipeline.interrupts import install

    install()
    argvalues.install()
    try:
        # standalone_mode=False: usage errors reach us, so they print as the one `error:` line every error uses.
        code = app(standalone_mode=False)
    except typer.Exit as e:
        code = e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        code = EXIT_SIGINT
    except (LmiCompileError, Interrupted) as e:
        print(f"error: {e}", file=sys.stderr)
        code = e.exit_code
    except OSError as e:
        print(f"error: {os_error_text(e)}; finished stages are kept, rerun to resume", file=sys.stderr)
        code = 1
    except Exception as e:
        code = _usage(e) if _usage_error(e) else _unexpected(e)
    sys.exit(code if isinstance(code, int) else 0)


def _usage(e) -> int:
    if type(e).__name__ == "NoArgsIsHelpError" and e.ctx is not None:
        print(e.ctx.get_help())
        return 2
    where = f"lmi-compile {e.ctx.info_name} --help" if e.ctx is not None and e.ctx.parent else "lmi-compile --help"
    print(f"error: {' '.join(e.format_message().split())} (see: {where})", file=sys.stderr)
    return 2


def _unexpected(e: Exception) -> int:
    if _VERBOSE:
        import traceback

        traceback.print_exc()
    print(f"error: unexpected {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''} "
          f"(a bug in lmi-compile; rerun with --verbose for the traceback and report it)", file=sys.stderr)
    return 1
