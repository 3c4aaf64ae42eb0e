"""The `lmi-compile` command line: it only parses options and wires stages together."""

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmi_compile import __version__
from lmi_compile.errors import EXIT_SIGINT, Interrupted, LmiCompileError

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
Token = Annotated[Optional[str], typer.Option(help="Hub token; defaults to HF_TOKEN or the huggingface-cli login.",
                                              show_default=False)]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code",
                                               help="Allow models that ship custom *.py code.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output that is not ours.")]


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


@app.command()
def fetch(
    model: Model,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to download into (remote models).")] = None,
    revision: Revision = None,
    token: Token = None,
    trust_remote_code: TrustRemoteCode = False,
    overwrite: Overwrite = False,
):
    """Download a model (Hub or S3) and check it against the LMI artifact rules; local folders are only checked."""
    from lmi_compile.remote.fetch import fetch as run_fetch, parse_source

    source = parse_source(model, revision)
    validated = run_fetch(source, output, token=token, trust_remote_code=trust_remote_code, overwrite=overwrite)
    ck = validated.checkpoint
    typer.echo(f"{validated.root}: {validated.config.architecture or 'unknown architecture'}, "
               f"{len(ck.tensors)} tensors in {len(ck.files)} {ck.format} file(s), {ck.total_bytes / 2**20:.1f} MiB")


@app.command()
def push(
    folder: Annotated[Path, typer.Argument(help="The artifact folder to publish.", show_default=False)],
    uri: Annotated[str, typer.Argument(help="s3://bucket/prefix/ to publish to.", show_default=False)],
    overwrite: Overwrite = False,
    delete_local: Annotated[bool, typer.Option("--delete-local", help="Delete FOLDER after the upload is verified.")] = False,
    concurrency: Annotated[Optional[int], typer.Option(help="Parallel requests (default from CPU count).")] = None,
    part_size_mb: Annotated[Optional[int], typer.Option("--part-size-mb", help="Multipart part size in MiB (default 32).")] = None,
):
    """Publish FOLDER to S3: checksummed, verified with HEAD, resumable, manifest written last."""
    from lmi_compile.remote.publish import push as run_push

    manifest = run_push(folder, uri, overwrite=overwrite, delete_local=delete_local, concurrency=concurrency,
                        part_size=part_size_mb * 1024 * 1024 if part_size_mb else None)
    typer.echo(f"published {len(manifest['objects'])} objects to {uri}")


def _pick(cli, settings: dict, key: str, default):
    """An explicit command-line value wins, then serving.properties / OPTION_* settings, then the default."""
    if cli is not None:
        return cli
    return settings.get(key, default)


@app.command()
def trtllm(
    model: Annotated[Optional[str], typer.Argument(help="Hub repo id, s3:// prefix or local folder (or "
                                                       "option.model_id from --properties).", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Where the LMI artifact tree is written.")] = None,
    tp: Annotated[Optional[int], typer.Option("--tp", help="Tensor-parallel degree (option.tensor_parallel_degree). [default: 1]")] = None,
    pp: Annotated[Optional[int], typer.Option("--pp", help="Pipeline-parallel degree. [default: 1]")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto (the checkpoint's), float16, bfloat16 or float32. [default: auto]")] = None,
    max_batch_size: Annotated[Optional[int], typer.Option("--max-batch-size", help="Engine batch size (LMI's option.max_rolling_batch_size). [default: 32]")] = None,
    max_input_len: Annotated[Optional[int], typer.Option("--max-input-len", help="Longest prompt (option.max_input_len). [default: 1024]")] = None,
    max_output_len: Annotated[Optional[int], typer.Option("--max-output-len", help="Longest output (option.max_output_len). [default: 512]")] = None,
    max_seq_len: Annotated[Optional[int], typer.Option("--max-seq-len", help="Prompt plus output; default max-input-len + max-output-len.")] = None,
    max_num_tokens: Annotated[Optional[int], typer.Option("--max-num-tokens", help="Tokens per engine step (option.max_num_tokens). [default: 16384]")] = None,
    gemm_plugin: Annotated[str, typer.Option("--gemm-plugin", help="trtllm-build --gemm_plugin value.")] = "auto",
    trtllm_build_args: Annotated[Optional[str], typer.Option("--trtllm-build-args", help="More trtllm-build flags, passed through (quoted).")] = None,
    trtllm_build_path: Annotated[Optional[str], typer.Option("--trtllm-build", help="The trtllm-build executable (default: from PATH).")] = None,
    build_workers: Annotated[Optional[int], typer.Option("--build-workers", help="trtllm-build --workers (default: min(GPUs, ranks)).")] = None,
    layout: Annotated[str, typer.Option(help="triton (LMI <= 0.32) or engine-dir (LMI >= 0.33).")] = "triton",
    engine_path: Annotated[str, typer.Option("--engine-path", help="gpt_model_path in config.pbtxt (triton layout): where the engines are inside the serving container.")] = "/opt/ml/model/tensorrt_llm/1",
    properties: Annotated[Optional[Path], typer.Option("--properties", help="Read settings from an existing serving.properties (OPTION_* env vars also apply).")] = None,
    upload: Annotated[Optional[str], typer.Option("--upload", help="S3 prefix the output will be published to (goes into option.model_id).")] = None,
    work_dir: Annotated[Optional[Path], typer.Option("--work-dir", help="Stage folders (default ./lmi-compile-work/NAME).")] = None,
    until: Annotated[str, typer.Option(help="Stop after this stage: fetch, convert, build or layout.")] = "layout",
    workers: Annotated[Optional[int], typer.Option(help="Parallel rank writers in convert (default: CPU count, at most 8).")] = None,
    parallel_embedding: Annotated[bool, typer.Option("--parallel-embedding", help="Split the embedding table across tp ranks.")] = False,
    embedding_sharding_dim: Annotated[int, typer.Option(help="0: split the vocab, 1: split the hidden dim.")] = 0,
    revision: Revision = None,
    token: Token = None,
    trust_remote_code: TrustRemoteCode = False,
    overwrite: Overwrite = False,
    force: Annotated[bool, typer.Option("--force", help="Redo every stage.")] = False,
):
    """Compile MODEL for TensorRT-LLM: fetch, convert to a rank-sharded TRT-LLM checkpoint, build engines
    with trtllm-build, and lay out the tree LMI loads with its serving.properties."""
    from lmi_compile.errors import BadInput
    from lmi_compile.pipeline.workdir import WorkDir, default_work_dir
    from lmi_compile.lmi.properties import lmi_settings
    from lmi_compile.trtllm.backend import TrtllmJob, run
    from lmi_compile.trtllm.build import BuildOptions, parse_extra_args

    settings = lmi_settings(properties)
    model = model or settings.get("model")
    if not model:
        raise BadInput("no MODEL given (as an argument, option.model_id in --properties, or HF_MODEL_ID)")
    build = BuildOptions(max_batch_size=_pick(max_batch_size, settings, "max_batch_size", 32),
                         max_input_len=_pick(max_input_len, settings, "max_input_len", 1024),
                         max_output_len=_pick(max_output_len, settings, "max_output_len", 512),
                         max_seq_len=max_seq_len,
                         max_num_tokens=_pick(max_num_tokens, settings, "max_num_tokens", 16384),
                         gemm_plugin=gemm_plugin, workers=build_workers, extra_args=parse_extra_args(trtllm_build_args))
    job = TrtllmJob(model=model, work=WorkDir(work_dir or default_work_dir(model)), output=output,
                    tp=_pick(tp, settings, "tp", 1), pp=_pick(pp, settings, "pp", 1),
                    dtype=_pick(dtype, settings, "dtype", "auto"), parallel_embedding=parallel_embedding,
                    embedding_sharding_dim=embedding_sharding_dim, build=build, trtllm_build=trtllm_build_path,
                    layout=layout, engine_path=engine_path, upload=upload,
                    revision=_pick(revision, settings, "revision", None), token=token,
                    trust_remote_code=trust_remote_code or settings.get("trust_remote_code", False),
                    overwrite=overwrite, force=force)
    if workers:
        job.workers = workers
    out = run(job, until)
    typer.echo(f"{until}: {out}" + (f" (published to {upload})" if upload and until == "layout" else ""))


@app.command()
def neuron(
    model: Annotated[Optional[str], typer.Argument(help="Hub repo id, s3:// prefix or local folder (or "
                                                       "option.model_id from --properties).", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Where the LMI artifact tree is written.")] = None,
    n_positions: Annotated[Optional[int], typer.Option("--n-positions", help="Longest sequence (option.n_positions). [default: the model's max_position_embeddings, at most 4096]")] = None,
    tp: Annotated[Optional[int], typer.Option("--tp", help="NeuronCores to shard over (option.tensor_parallel_degree). [default: 2]")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Batch size compiled in (LMI's option.max_rolling_batch_size). [default: 4]")] = None,
    amp: Annotated[Optional[str], typer.Option("--amp", help="f16, bf16 or f32 (option.dtype fp16/bf16/fp32). [default: the release's default, fp16]")] = None,
    lmi_version: Annotated[Optional[str], typer.Option("--lmi-version", help="LMI Neuron release to serve with (0.26-0.34); graphs are compiled as its loader rebuilds them. [default: 0.34]")] = None,
    context_length_estimate: Annotated[Optional[str], typer.Option("--context-length-estimate", help="Context buckets, e.g. 1024,2048.")] = None,
    format: Annotated[str, typer.Option("--format", help="optimum (LMI's neuron format: compiled/ with presharded weights on 0.30+, checkpoint/ + compiled/ before) or split (split model + compiled graph, LMI 0.27+).")] = "optimum",
    allow_longer: Annotated[bool, typer.Option("--allow-longer", help="Allow --n-positions above max_position_embeddings when rope scaling covers it.")] = False,
    neuron_cache: Annotated[Optional[Path], typer.Option("--neuron-cache", help="Compile cache to keep or reuse (NEURON_COMPILE_CACHE_URL).")] = None,
    compile_entry: Annotated[Optional[str], typer.Option("--compile-entry", help="Command that compiles (default: python -m lmi_compile.neuron_entry).")] = None,
    properties: Annotated[Optional[Path], typer.Option("--properties", help="Read settings from an existing serving.properties (OPTION_* env vars also apply).")] = None,
    upload: Annotated[Optional[str], typer.Option("--upload", help="S3 prefix to publish the output to (goes into option.model_id).")] = None,
    work_dir: Annotated[Optional[Path], typer.Option("--work-dir", help="Stage folders (default ./lmi-compile-work/NAME).")] = None,
    until: Annotated[str, typer.Option(help="Stop after this stage: fetch, split, compile or layout.")] = "layout",
    revision: Revision = None,
    token: Token = None,
    trust_remote_code: TrustRemoteCode = False,
    overwrite: Overwrite = False,
    force: Annotated[bool, typer.Option("--force", help="Redo every stage.")] = False,
):
    """Compile MODEL for AWS Neuron (inf2/trn1): fetch, write split weights, compile NEFF graphs with
    transformers-neuronx, and lay out the tree LMI loads with its serving.properties."""
    from lmi_compile.errors import BadInput
    from lmi_compile.remote.fetch import parse_source
    from lmi_compile.neuron.backend import NeuronJob, run
    from lmi_compile.pipeline.workdir import WorkDir, default_work_dir
    from lmi_compile.lmi.properties import lmi_settings

    settings = lmi_settings(properties)
    model = model or settings.get("model")
    if not model:
        raise BadInput("no MODEL given (as an argument, option.model_id in --properties, or HF_MODEL_ID)")
    lmi_amp = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}.get(settings.get("dtype", ""))
    try:
        buckets = [int(x) for x in context_length_estimate.split(",")] if context_length_estimate else []
    except ValueError:
        raise BadInput(f"--context-length-estimate {context_length_estimate!r}: use integers like 1024,2048") from None
    job = NeuronJob(model=model, work=WorkDir(work_dir or default_work_dir(model)), output=output,
                    n_positions=_pick(n_positions, settings, "n_positions", None), tp=_pick(tp, settings, "tp", 2),
                    batch_size=_pick(batch_size, settings, "max_batch_size", 4), amp=amp or lmi_amp,
                    lmi_version=lmi_version,
                    context_length_estimate=buckets, format=format, allow_longer=allow_longer,
                    neuron_cache=neuron_cache, compile_entry=compile_entry, upload=upload,
                    revision=_pick(revision, settings, "revision", None), token=token,
                    trust_remote_code=trust_remote_code or settings.get("trust_remote_code", False),
                    overwrite=overwrite, force=force, source_kind=parse_source(model, revision).kind)
    out = run(job, until)
    typer.echo(f"{until}: {out}" + (f" (published to {upload})" if upload and until == "layout" else ""))


@app.command()
def check(
    location: Annotated[str, typer.Argument(help="A local folder or s3://bucket/prefix/.", show_default=False)],
    container_trtllm: Annotated[Optional[str], typer.Option("--container-trtllm", help="TensorRT-LLM version of the serving container.")] = None,
    container_neuronx_cc: Annotated[Optional[str], typer.Option("--container-neuronx-cc", help="neuronx-cc version of the serving container.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
):
    """Say which LMI loading path LOCATION fits and what would stop it loading; exit 0 loadable, 1 not.
    Reads listings and small files only, never weights."""
    from lmi_compile.lmi.check import as_json, check as run_check, render

    report = run_check(location, container_trtllm=container_trtllm, container_neuronx_cc=container_neuronx_cc)
    typer.echo(as_json(report) if json_out else render(report))
    if not report.loadable:
        raise typer.Exit(1)


@app.command()
def plan(
    model: Model,
    tp: Annotated[int, typer.Option("--tp", help="Tensor-parallel degree.")] = 1,
    pp: Annotated[int, typer.Option("--pp", help="Pipeline-parallel degree.")] = 1,
    dtype: Annotated[str, typer.Option(help="auto, float16, bfloat16 or float32.")] = "auto",
    instance: Annotated[Optional[str], typer.Option(help="SageMaker instance type, e.g. ml.g5.12xlarge.")] = None,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", help="Concurrent sequences.")] = 32,
    max_seq_len: Annotated[int, typer.Option("--max-seq-len", help="Prompt plus output tokens.")] = 1536,
    revision: Revision = None,
    token: Token = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
):
    """Size a compile before running it: parameters, bytes per rank, KV cache, fit on an instance, disk per stage.
    Reads only config.json (and the weight index); downloads no weights."""
    from lmi_compile.lmi.plan import as_json, make_plan, read_remote_config, render

    config, total = read_remote_config(model, revision, token)
    p = make_plan(config, tp=tp, pp=pp, dtype=dtype, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                  instance=instance, index_total=total)
    typer.echo(as_json(p) if json_out else render(p))


def main() -> None:
    from lmi_compile.pipeline.interrupts import install

    install()
    try:
        app()
    except (LmiCompileError, Interrupted) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(EXIT_SIGINT)
    except OSError as e:
        # Disk full, permissions, vanished files: name the file, keep it to one line.
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or e}; finished stages are kept, rerun to resume", file=sys.stderr)
        sys.exit(1)
    except Exception as e:
        if _VERBOSE:
            import traceback

            traceback.print_exc()
        print(f"error: unexpected {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''} "
              f"(a bug in lmi-compile; rerun with --verbose for the traceback and report it)", file=sys.stderr)
        sys.exit(1)
