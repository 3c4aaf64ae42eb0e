"""Errors users see: one line, naming the file or input and the fix, with a documented exit code."""

# Exit codes (README "Exit codes"): 0 done, 1 failure, 2 bad input or usage, 130/143 interrupted.
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

# Version strings of the test stand-ins carry this, so their output is never taken for a compiled model.
STANDIN_MARK = "standin"


class LmiCompileError(Exception):
    """A failure to report as one line; `exit_code` is what the process exits with."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, *, exit_code: int | None = None):
        # Newlines would break the one-line contract with batch-job log scrapers.
        super().__init__(" ".join(str(message).split()))
        if exit_code is not None:
            self.exit_code = exit_code


class BadInput(LmiCompileError):
    """The user's model, options or location are wrong; nothing was written."""

    exit_code = EXIT_BAD_INPUT


class BadSetting(BadInput):
    """An environment setting of ours is wrong: a rerun with it fixed gets past it, so work already done (a
    partial download) stays."""


def os_error_text(e: OSError) -> str:
    """An OSError as users read it (disk full, permissions, vanished files): the file it names, then its reason."""
    where = f"{e.filename}: " if getattr(e, "filename", None) else ""
    return f"{where}{e.strerror or e}"


class Interrupted(BaseException):
    """SIGINT/SIGTERM arrived; the stage stopped at a tensor, file or part boundary.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it.
    """

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        self.exit_code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
        super().__init__(f"interrupted by {signal.Signals(signum).name}; finished work is kept, rerun the same "
                         f"command to resume")
