"""Progress that suits both people and batch jobs: tqdm bars on a TTY, periodic log lines elsewhere."""

import logging
import os
import sys
import time

from tqdm import tqdm as _tqdm

log = logging.getLogger("lmi_compile")

# Off a TTY a line every this many seconds is enough for CloudWatch and keeps logs short.
LOG_INTERVAL_S = float(os.environ.get("LMI_COMPILE_LOG_INTERVAL", "10"))


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()


class Progress(_tqdm):
    """A tqdm bar that turns into plain log lines when stderr is not a terminal.

    It is a real tqdm subclass so it can be handed to huggingface_hub as `tqdm_class`.
    """

    def __init__(self, *args, **kwargs):
        self._plain = not stderr_is_tty()
        # Set before tqdm's __init__, which already calls display(); the first line comes one
        # interval in, so short transfers stay silent in batch logs.
        self._last_log = time.monotonic()
        self._started = self._last_log
        if self._plain:
            kwargs.setdefault("mininterval", LOG_INTERVAL_S)
            kwargs["file"] = open(os.devnull, "w")  # tqdm must not draw; we log instead
        kwargs.pop("name", None)  # huggingface_hub passes a name kwarg some tqdm versions reject
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        if not self._plain:
            return super().display(msg, pos)
        now = time.monotonic()
        if now - self._last_log < LOG_INTERVAL_S:
            return True
        self._last_log = now
        log.info("%s", self._plain_line())
        return True

    def _plain_line(self) -> str:
        d = self.format_dict
        desc = d.get("prefix") or "progress"
        scale = 1024 * 1024 if d.get("unit") == "B" else 1
        unit = "MiB" if scale > 1 else (d.get("unit") or "it")
        n = d["n"] / scale
        elapsed = max(d["elapsed"], 1e-9)
        rate = n / elapsed
        if d.get("total"):
            total = d["total"] / scale
            return f"{desc}: {n:.1f}/{total:.1f} {unit} ({100 * d['n'] / d['total']:.0f}%), {rate:.1f} {unit}/s"
        return f"{desc}: {n:.1f} {unit}, {rate:.1f} {unit}/s"

    def close(self):
        plain_done = self._plain and not self.disable and self.n and \
            time.monotonic() - self._started >= LOG_INTERVAL_S
        self._last_log = time.monotonic()  # tqdm's close() displays once more; that line is ours below
        super().close()
        if plain_done:
            log.info("%s (done)", self._plain_line())
        if self._plain and self.fp is not sys.stderr:
            try:
                self.fp.close()
            except Exception:
                pass


def bytes_bar(total: int | None, desc: str) -> Progress:
    return Progress(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # botocore/urllib3 at INFO are noisy and could echo request details.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "httpx", "httpx2", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
