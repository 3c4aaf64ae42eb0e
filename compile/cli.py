"""The `lmi-compile` command line: it only parses options and wires stages together."""

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import EXIT_SIGINT, LmiCompileError

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
    from .progress import setup_logging

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
    from .fetch import fetch as run_fetch, parse_source

    source = parse_source(model, revision)
    validated = run_fetch(source, output, token=token, trust_remote_code=trust_remote_code, overwrite=overwrite)
    ck = validated.checkpoint
    typer.echo(f"{validated.root}: {validated.config.architecture or 'unknown architecture'}, "
               f"{len(ck.tensors)} tensors in {len(ck.files)} {ck.format} file(s), {ck.total_bytes / 2**20:.1f} MiB")


@app.command()
def trtllm(
    model: Model,
    tp: Annotated[int, typer.Option("--tp", help="Tensor-parallel degree (LMI: option.tensor_parallel_degree).")] = 1,
    pp: Annotated[int, typer.Option("--pp", help="Pipeline-parallel degree.")] = 1,
    dtype: Annotated[str, typer.Option(help="auto (the checkpoint's), float16, bfloat16 or float32.")] = "auto",
    work_dir: Annotated[Optional[Path], typer.Option("--work-dir", help="Stage folders (default ./lmi-compile-work/NAME).")] = None,
    until: Annotated[str, typer.Option(help="Stop after this stage: fetch, convert, build or layout.")] = "layout",
    workers: Annotated[Optional[int], typer.Option(help="Parallel rank writers (default: CPU count, at most 8).")] = None,
    parallel_embedding: Annotated[bool, typer.Option("--parallel-embedding", help="Split the embedding table across tp ranks.")] = False,
    embedding_sharding_dim: Annotated[int, typer.Option(help="0: split the vocab, 1: split the hidden dim.")] = 0,
    revision: Revision = None,
    token: Token = None,
    trust_remote_code: TrustRemoteCode = False,
    force: Annotated[bool, typer.Option("--force", help="Redo every stage.")] = False,
):
    """Compile MODEL for TensorRT-LLM: fetch, convert to a rank-sharded TRT-LLM checkpoint, build, lay out."""
    from .pipeline import WorkDir, default_work_dir
    from .trtllm import TrtllmJob, run

    job = TrtllmJob(model=model, work=WorkDir(work_dir or default_work_dir(model)), tp=tp, pp=pp, dtype=dtype,
                    parallel_embedding=parallel_embedding, embedding_sharding_dim=embedding_sharding_dim,
                    revision=revision, token=token, trust_remote_code=trust_remote_code, force=force)
    if workers:
        job.workers = workers
    out = run(job, until)
    typer.echo(f"{until}: {out}")


def main() -> None:
    try:
        app()
    except LmiCompileError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(EXIT_SIGINT)
