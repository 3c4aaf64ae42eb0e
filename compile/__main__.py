"""`lmi-compile` and `python -m lmi_compile`: this process's own settings, then the CLI (cli.main)."""

import gc


def run() -> None:
    # A command's start-up (typer, botocore's S3 model) makes about a million objects that all live on, and the
    # default thresholds rescan them dozens of times: 25-40 ms of every command here. Collections stay on,
    # rarer; what a convert allocates in bulk (tensors, buffers) is freed by reference counts, not by them.
    gc.set_threshold(50_000, 10, 10)
    from lmi_compile.cli import main

    main()


if __name__ == "__main__":
    run()
