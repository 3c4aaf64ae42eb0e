"""Convert while the model downloads: the S3 fetch runs in a background thread and the convert reads each
tensor as soon as its bytes have landed.

The fetch is the ordinary fetch stage (same staging folder, checks, resume and record); it only reports each
file and byte range as it lands. The convert reads through a folder of hard links to the files being
downloaded (`.NAME.arriving` beside the source folder), so its paths stay valid while the fetch renames
files and then its folder into place. Rank files are written at planned offsets, so tensors may arrive in
any order; each convert task waits for its source bytes. The convert stage counts as done only after the
fetch finished and verified every byte against the upload manifest: a convert fed a corrupt byte is never
recorded as finished, and a rerun converts again from the verified source.

The convert's fingerprint is taken from the listing (names, sizes, LastModified), which is what the fetched
files carry once complete (the fetch gives them their object's LastModified as mtime), so a rerun on the
finished source folder finds the convert up to date.
"""

import logging
import os
import shutil
import threading
from pathlib import Path

from lmi_compile.errors import Interrupted
from lmi_compile.pipeline import stages
from lmi_compile.pipeline.interrupts import STOP, received

log = logging.getLogger("lmi_compile")


class Cancelled(Exception):
    """The run that started this fetch gave up (it failed or was interrupted): stop downloading."""


class ArrivingModel:
    """What has landed of a model being fetched: files (by relative name) and their byte ranges."""

    def __init__(self, view: Path):
        self.view = view
        self._cv = threading.Condition()
        self._ranges: dict[str, list[tuple[int, int]]] = {}  # rel -> merged [start, end) ranges
        self._sizes: dict[str, int] = {}
        self._weights: list[str] | None = None
        self.sizes: dict[str, int] = {}
        self.mtimes: dict[str, int] = {}
        self.error: BaseException | None = None
        self.done = False
        self.cancelled = False
        self.unlinkable = False  # the filesystem refused a hard link: the convert waits for the whole fetch

    # --- heard from the fetch (download threads) ---
    def listed(self, sizes: dict[str, int], mtimes: dict[str, int]) -> None:
        self.sizes, self.mtimes = dict(sizes), dict(mtimes)

    def _link(self, rel: str, path: Path) -> None:
        if self.unlinkable:
            return
        dst = self.view / rel
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.unlink(missing_ok=True)
            os.link(path, dst)
        except OSError as e:
            log.info("fetch: cannot hard-link %s (%s); converting once the download is complete", path, e.strerror)
            with self._cv:
                self.unlinkable = True
                self._cv.notify_all()

    def kept(self, rel: str, path: Path) -> None:
        self._check_cancelled()
        self._link(rel, path)
        with self._cv:
            self._ranges[rel] = [(0, path.stat().st_size)]
            self._cv.notify_all()

    def opened(self, rel: str, tmp: Path) -> None:
        self._check_cancelled()
        self._link(rel, tmp)
        with self._cv:
            self._ranges[rel] = []

    def arrived(self, rel: str, start: int, end: int) -> None:
        self._check_cancelled()
        with self._cv:
            self._ranges[rel] = _merge(self._ranges.get(rel, []), (start, end))
            self._cv.notify_all()

    def weights(self, rels: list[str]) -> None:
        with self._cv:
            self._weights = list(rels)
            self._cv.notify_all()

    def finished(self, error: BaseException | None) -> None:
        with self._cv:
            self.done, self.error = True, error
            self._cv.notify_all()

    def _check_cancelled(self) -> None:
        if self.cancelled:
            raise Cancelled("the run that started this fetch stopped")

    # --- asked by the convert ---
    def _wait(self, pred) -> None:
        """Wait until pred() holds (under the lock); raise the fetch's error if it failed first."""
        with self._cv:
            while not pred():
                if self.error is not None:
                    raise self.error
                if self.done:
                    return  # finished: everything there is has landed
                if STOP.is_set():
                    raise Interrupted(received())
                self._cv.wait(0.2)

    def wait_range(self, rel: str, start: int, end: int) -> None:
        self._wait(lambda: any(s <= start and end <= e for s, e in self._ranges.get(rel, [])) or start >= end)

    def wait_weights(self) -> list[str]:
        """The weight files, once the small files are in and every weight file's safetensors header has landed."""
        self._wait(lambda: self._weights is not None or self.unlinkable)
        if self.unlinkable or self._weights is None:
            return []
        for rel in self._weights:
            if rel.endswith(".safetensors"):
                self.wait_range(rel, 0, 8)
                with open(self.view / rel, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                self.wait_range(rel, 0, min(8 + n, _size(self.view / rel)))
            else:
                self.wait_range(rel, 0, _size(self.view / rel))  # pickles are read whole
        return self._weights


def _size(path: Path) -> int:
    return path.stat().st_size


def _merge(ranges: list[tuple[int, int]], new: tuple[int, int]) -> list[tuple[int, int]]:
    out = []
    s, e = new
    for a, b in sorted(ranges + [(s, e)]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


class StreamingFetch:
    """An S3 fetch in a background thread, with the model it is bringing readable as it lands."""

    def __init__(self, source, work, *, trust_remote_code: bool):
        self.source, self.work = source, work
        self.trust_remote_code = trust_remote_code
        self.view = stages.staging_dir(work.source).with_name(f".{work.source.name}.arriving")
        shutil.rmtree(self.view, ignore_errors=True)
        self.view.mkdir(parents=True)
        self.arriving = ArrivingModel(self.view)
        self.result = None
        self._thread = threading.Thread(target=self._fetch, name="fetch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        from lmi_compile.remote.fetch import fetch

        try:
            self.result = fetch(self.source, self.work.source, trust_remote_code=self.trust_remote_code,
                                listener=self.arriving)
        except BaseException as e:  # handed to the main thread, which reports it
            self.arriving.finished(e)
        else:
            self.arriving.finished(None)

    def model(self):
        """The model as the convert sees it: config and tokenizer from the view, tensors read as they land,
        fingerprinted as the finished source folder will be."""
        from lmi_compile.model.validate import ValidatedModel, validate_model_dir

        self.arriving.wait_weights()
        if self.result is not None or self.arriving.unlinkable or self.arriving.done:
            return self.settle()  # complete already, or it cannot be read while it lands
        seen = validate_model_dir(self.view, trust_remote_code=self.trust_remote_code)
        ck = seen.checkpoint
        identity = self._listing_identity(ck)
        ck.identity = lambda: identity  # what Checkpoint(source).identity() reads once the files are complete
        return ValidatedModel(self.work.source, seen.config, ck, seen.custom_code)

    def _listing_identity(self, ck) -> list:
        a = self.arriving
        rels = [f.relative_to(self.view).as_posix() for f in ck.files]
        return [[f.name, a.sizes[rel], a.mtimes.get(rel, _mtime(f))] for f, rel in zip(ck.files, rels)]

    def ready(self, ck, sources) -> None:
        """Block until every byte of these source tensors has landed."""
        for name in sources:
            info = ck.tensors[name]
            rel = info.file.relative_to(self.view).as_posix() if info.file.is_relative_to(self.view) else None
            if rel is None:
                continue  # a complete folder
            if info.offset is None:
                self.arriving.wait_range(rel, 0, _size(info.file))
            else:
                self.arriving.wait_range(rel, info.offset, info.offset + info.nbytes)

    def settle(self):
        """Wait for the fetch to finish; raise its error. Returns the validated source folder."""
        self._thread.join()
        if self.arriving.error is not None:
            raise self.arriving.error
        return self.result

    def close(self) -> None:
        """Stop the fetch if it still runs (a failure or interrupt elsewhere) and remove the view."""
        self.arriving.cancelled = True
        self._thread.join()
        shutil.rmtree(self.view, ignore_errors=True)


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


def start(model: str, work, *, revision, trust_remote_code: bool) -> StreamingFetch | None:
    """A StreamingFetch for an S3 model whose fetch stage is not yet done; None where the ordinary fetch
    stage applies (local folders, the Hub, a finished fetch)."""
    from lmi_compile.remote.fetch import parse_source, stage_fingerprint

    source = parse_source(model, revision)
    if source.kind != "s3":
        return None
    if stages.is_done(work.source, "fetch", stage_fingerprint(source, trust_remote_code)):
        return None
    log.info("fetch: converting while %s downloads", source.describe())
    return StreamingFetch(source, work, trust_remote_code=trust_remote_code)
