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


def main() -> None:
    try:
        app()
    except LmiCompileError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(EXIT_SIGINT)
